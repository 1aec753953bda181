"""The Gradio "Voice out" page inside the studio: same origin, same Django login.

`with_synthesis_page(django_app)` wraps the studio's HTTP ASGI app: requests under
/synthesize/ go to Gradio (mounted in a small FastAPI app), everything else to Django. Every
request under /synthesize/, Gradio's own API routes, uploads and files included, first passes a
session check: no signed-in user, no Gradio. The page and its callables see the user's id
through `gr.Request.username`, and list and load only checkpoints that user may see.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote, urlsplit

from channels.auth import AuthMiddlewareStack
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import close_old_connections
from django.shortcuts import resolve_url

from studio.models import Checkpoint, Run
from studio.synthesis import vocoders

MOUNT_PATH = "/synthesize"


def _user(user_id: str):
    return get_user_model().objects.filter(pk=int(user_id), is_active=True).first()


def checkpoint_choices(user_id: str) -> list:
    """The user's checkpoints (every run's, for staff), newest run first, latest step first."""
    from synthesis.gradio_page import CheckpointChoice

    close_old_connections()
    user = _user(user_id)
    if user is None:
        return []
    rows = (
        Checkpoint.objects.visible_to(user)
        .exclude(run__kind=Run.Kind.VOCODER)  # those are vocoders, offered in their own menu
        .select_related("run")
        .order_by("-run__created", "-step")[:200]
    )
    return [
        CheckpointChoice(id=str(c.pk), run=str(c.run), step=c.step, val_loss=c.val_loss)
        for c in rows
    ]


def checkpoint_file(user_id: str, checkpoint_id: str) -> Path | None:
    """The checkpoint's file if this user may use it; None for anything else, so a guessed
    id of someone else's checkpoint looks exactly like one that does not exist."""
    close_old_connections()
    user = _user(user_id)
    if user is None or not str(checkpoint_id).isdigit():
        return None
    ckpt = Checkpoint.objects.visible_to(user).filter(pk=int(checkpoint_id)).first()
    return Path(ckpt.path) if ckpt is not None else None


def vocoder_choices(user_id: str) -> list:
    """HiFi-GAN universal (or why it is missing), the user's fine-tuned vocoders (the best
    checkpoint of each vocoder run they may see), and Griffin-Lim as the fast preview."""
    from synthesis.vocoders import available_vocoders

    close_old_connections()
    user = _user(user_id)
    if user is None:
        return []
    tuned = {c.path: vocoders.label(c) for c in vocoders.fine_tuned_vocoders(user)}
    return available_vocoders(
        {path: label for path, label in tuned.items() if Path(path).is_file()}
    )


def page_sources():
    from synthesis.gradio_page import PageSources

    return PageSources(
        list_checkpoints=checkpoint_choices,
        resolve_checkpoint=checkpoint_file,
        list_speakers=None,  # read from the checkpoint itself: its table is what it was trained on
        list_vocoders=vocoder_choices,
        default_vocoder=vocoders.default_name(),
        device=settings.STUDIO_SYNTH_DEVICE,
        max_chars=settings.STUDIO_MAX_SYNTH_CHARS,
    )


def build_gradio_app():
    """A FastAPI app with the page mounted at MOUNT_PATH, so its paths match the public URLs."""
    import gradio as gr
    from fastapi import FastAPI

    from synthesis.engine import configure_cpu_threads
    from synthesis.gradio_page import build_synthesis_page

    configure_cpu_threads(settings.STUDIO_SYNTH_THREADS)

    def signed_in_user(request) -> str | None:
        # Set by AuthMiddlewareStack in SynthesisPageGate; Gradio calls this on its own routes
        # too, so even a request that slipped past the gate would get a 401.
        user = request.scope.get("user")
        return str(user.pk) if user is not None and user.is_authenticated else None

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    gr.mount_gradio_app(
        app,
        build_synthesis_page(page_sources()),
        path=MOUNT_PATH,
        auth_dependency=signed_in_user,
        max_file_size=settings.STUDIO_MAX_REFERENCE_BYTES,
        ssr_mode=False,
        footer_links=["api"],
        run_history=False,
        mcp_server=False,
    )
    return app


def is_page_path(path: str) -> bool:
    return path == MOUNT_PATH or path.startswith(MOUNT_PATH + "/")


def same_origin(scope) -> bool:
    """A browser sends Origin on cross-site writes; the session cookie must not carry another
    site's POST into Gradio. Scripts (gradio_client) send no Origin and are let through."""
    if scope["method"] in ("GET", "HEAD", "OPTIONS"):
        return True
    headers = dict(scope.get("headers") or [])
    origin = headers.get(b"origin")
    if not origin:
        return True
    return urlsplit(origin.decode("latin-1")).netloc == headers.get(b"host", b"").decode("latin-1")


class SynthesisPageGate:
    """ASGI: /synthesize/... -> session check -> Gradio; anything else -> the studio's app."""

    def __init__(self, django_app, gradio_app=None):
        self.django_app = django_app
        self._gradio_app = gradio_app
        self._guarded = AuthMiddlewareStack(self._signed_in_only)
        self._building = asyncio.Lock()
        self._started: asyncio.Future | None = None
        self._warming: asyncio.Task | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and is_page_path(scope["path"]):
            return await self._guarded(scope, receive, send)
        await self.django_app(scope, receive, send)
        if self._warming is None and settings.STUDIO_SYNTH_PREWARM:
            # Importing Gradio and torch takes seconds (14.7 s for the page's first load when
            # it waited for them): start once the first studio page has been answered, so
            # neither that page nor the synthesis page waits.
            self._warming = asyncio.ensure_future(self._gradio())

    async def _signed_in_only(self, scope, receive, send):
        user = scope.get("user")
        if user is None or not user.is_authenticated:
            return await self._refuse(scope, send)
        if not same_origin(scope):
            body = b'{"error": "Cross-site requests to the synthesis page are refused."}'
            return await _respond(send, 403, body, [(b"content-type", b"application/json")])
        app = await self._gradio()
        return await app(scope, receive, send)

    async def _gradio(self):
        """Built and started on first use: importing Gradio and torch takes seconds that the
        rest of the studio should not wait for."""
        async with self._building:
            if self._gradio_app is None:
                self._gradio_app = await asyncio.to_thread(build_gradio_app)
            if self._started is None:
                self._started = await self._run_lifespan_startup(self._gradio_app)
        return self._gradio_app

    async def _refuse(self, scope, send):
        """The page itself sends people to the sign-in page; Gradio's API routes get a 401."""
        path = scope["path"]
        if scope["method"] in ("GET", "HEAD") and path.rstrip("/") == MOUNT_PATH:
            target = f"{resolve_url(settings.LOGIN_URL)}?next={quote(MOUNT_PATH + '/')}"
            return await _respond(send, 302, b"", [(b"location", target.encode())])
        body = b'{"error": "Sign in to the studio to use the synthesis page."}'
        return await _respond(send, 401, body, [(b"content-type", b"application/json")])

    async def _run_lifespan_startup(self, app):
        """Gradio starts its queue in the ASGI lifespan startup, which Daphne never sends; so
        the gate speaks that protocol to the app itself, once, in this server's event loop."""
        started = asyncio.get_running_loop().create_future()
        inbox: asyncio.Queue = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})

        async def lifespan_send(message):
            if message["type"].startswith("lifespan.startup.") and not started.done():
                started.set_result(message)

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        # Kept on self: a task nobody references can be garbage-collected mid-flight.
        self._lifespan = asyncio.ensure_future(app(scope, inbox.get, lifespan_send))
        message = await started
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the Gradio page failed to start: {message.get('message', '')}")
        return started


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]):
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_synthesis_page(django_app):
    """The one line studio/asgi.py needs: `http_app = with_synthesis_page(django_asgi)`."""
    return SynthesisPageGate(django_app)
