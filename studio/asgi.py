"""One ASGI application: Django over HTTP, Channels for WebSockets, Gradio under /synthesize/."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")

from django.core.asgi import get_asgi_application

# Django must be set up before anything imports models (consumers, the Gradio mount).
django_asgi = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from studio.bodylimit import BodySizeLimit, studio_limits  # noqa: E402
from studio.routing import websocket_urlpatterns  # noqa: E402
from studio.security import SecurityHeaders  # noqa: E402
from studio.synthesis.page import with_synthesis_page  # noqa: E402

# /synthesize/... goes to the Gradio page behind the Django session; the rest to Django.
# Oversized bodies (anonymous ones over 64 KB) are refused before Django or Gradio spool them.
# Gradio's responses skip Django's middleware: SecurityHeaders gives them the same headers.
http_app = SecurityHeaders(BodySizeLimit(with_synthesis_page(django_asgi), studio_limits))

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)
