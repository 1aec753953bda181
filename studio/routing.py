"""WebSocket routes (owned by the runs area; the consumers live in studio.consumers)."""

from django.urls import path

from studio import consumers

websocket_urlpatterns: list = [
    path("ws/runs/", consumers.RunsListConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", consumers.RunConsumer.as_asgi()),
]
