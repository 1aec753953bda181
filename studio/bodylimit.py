"""Refuse oversized request bodies before anyone reads them.

Django's ASGI handler spools the whole body to disk before a view runs, so a view-level size
check keeps an oversized upload from being stored but not from being received. This wrapper
answers 413 from the Content-Length header alone, and cuts off a chunked body the moment it
passes the limit.

Nobody who is not signed in needs more than a sign-in form: an anonymous body over
ANONYMOUS_LIMIT (64 KB) is refused as soon as that is known, from the declared length or after
64 KB of a chunked body, so an anonymous caller cannot make the server receive an upload.
The session (or API token) is looked up only for bodies that large.

This only helps under a server that streams the body to the app as it arrives: uvicorn does,
daphne does not (it reads the whole body into memory first), which is why the studio is served
with uvicorn (see the README).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from django.template.defaultfilters import filesizeformat

# multipart framing and the other form fields around the file itself
MARGIN = 1024 * 1024
# A sign-in form, an API token request: a few hundred bytes. Anything anonymous and larger is
# refused before it is received.
ANONYMOUS_LIMIT = 64 * 1024


class BodySizeLimit:
    def __init__(
        self,
        app,
        limit_for_path: Callable[[str], int],
        signed_in: Callable[[dict], Awaitable[bool]] | None = None,
    ):
        self.app = app
        self.limit_for_path = limit_for_path
        self.signed_in = signed_in or studio_signed_in

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for_path(scope.get("path", "")) + MARGIN
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _refuse(send, limit)
        known_signed_in: bool | None = None
        if declared is not None and declared > ANONYMOUS_LIMIT:
            known_signed_in = await self.signed_in(scope)
            if not known_signed_in:
                return await _refuse_anonymous(send)

        received = 0
        exceeded = False
        anonymous = False
        response_started = False

        async def limited_receive():
            nonlocal received, exceeded, anonymous, known_signed_in
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > ANONYMOUS_LIMIT and known_signed_in is None:
                    known_signed_in = await self.signed_in(scope)
                if received > limit or (received > ANONYMOUS_LIMIT and not known_signed_in):
                    exceeded = True
                    anonymous = received <= limit
                    return {"type": "http.disconnect"}  # the app stops reading and answers nothing
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if exceeded and not response_started:
            await (_refuse_anonymous(send) if anonymous else _refuse(send, limit))


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send, limit: int) -> None:
    await _answer_413(
        send,
        f"Request too large: the studio accepts at most {filesizeformat(limit - MARGIN)} here. "
        "For a bigger dataset, register its folder on the server instead of uploading it.\n",
    )


async def _refuse_anonymous(send) -> None:
    await _answer_413(
        send,
        f"Request too large: sign in first. Without a signed-in session the studio accepts "
        f"at most {filesizeformat(ANONYMOUS_LIMIT)} in a request.\n",
    )


async def _answer_413(send, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                # the rest of the body is never read, so the connection cannot be reused
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def studio_limits(path: str) -> int:
    """Dataset archives may be large; everything else (reference clips, forms) is small."""
    from django.conf import settings

    if path.startswith("/datasets/"):
        return settings.STUDIO_MAX_UPLOAD_BYTES
    return settings.STUDIO_MAX_REFERENCE_BYTES


async def studio_signed_in(scope) -> bool:
    """Whether the request carries a live session of an active user, or a valid API token.

    A request with neither is anonymous without touching the database.
    """
    cookie = authorization = b""
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookie += (b"; " if cookie else b"") + value
        elif name == b"authorization":
            authorization = value
    if not cookie and not authorization:
        return False
    from channels.db import database_sync_to_async

    return await database_sync_to_async(_signed_in)(
        cookie.decode("latin-1"), authorization.decode("latin-1")
    )


def _signed_in(cookie: str, authorization: str) -> bool:
    from importlib import import_module
    from types import SimpleNamespace

    from django.conf import settings
    from django.contrib.auth import get_user
    from django.http.cookie import parse_cookie

    scheme, _, token = authorization.partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        from studio.synthesis.views import user_from_token

        if user_from_token(token.strip()) is not None:
            return True
    key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME) if cookie else None
    if not key:
        return False
    session = import_module(settings.SESSION_ENGINE).SessionStore(key)
    # get_user checks the session's auth hash too: a session from before a password change
    # is not signed in.
    user = get_user(SimpleNamespace(session=session))
    return bool(user.is_authenticated and user.is_active)
