"""Refuse oversized request bodies before anyone reads them.

Django's ASGI handler spools the whole body to disk before a view runs, so a view-level size
check keeps an oversized upload from being stored but not from being received. This wrapper
answers 413 from the Content-Length header alone, and cuts off a chunked body the moment it
passes the limit.
"""

from __future__ import annotations

from collections.abc import Callable

from django.template.defaultfilters import filesizeformat

# multipart framing and the other form fields around the file itself
MARGIN = 1024 * 1024


class BodySizeLimit:
    def __init__(self, app, limit_for_path: Callable[[str], int]):
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for_path(scope.get("path", "")) + MARGIN
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _refuse(send, limit)

        received = 0
        exceeded = False
        response_started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # the app stops reading and answers nothing
            return message

        async def tracking_send(message):
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if exceeded and not response_started:
            await _refuse(send, limit)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send, limit: int) -> None:
    body = (
        f"Request too large: the studio accepts at most {filesizeformat(limit - MARGIN)} here. "
        "For a bigger dataset, register its folder on the server instead of uploading it.\n"
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
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
