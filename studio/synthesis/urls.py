"""URLs of the synthesis area. The Gradio page itself is not here: it is mounted in the ASGI
app under /synthesize/ (studio.synthesis.page)."""

from django.urls import path

from studio.synthesis import views as api

urlpatterns = [
    path("api/token", api.token, name="api_token"),
    path("api/synthesize", api.synthesize, name="api_synthesize"),
]
