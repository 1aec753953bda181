"""Oversized bodies are refused with 413 before the app reads them."""

import asyncio

import pytest

from studio.bodylimit import MARGIN, BodySizeLimit


class Recorder:
    """An ASGI app that reads the whole body, as Django does, then answers 200."""

    def __init__(self):
        self.bytes_read = 0
        self.aborted = False

    async def __call__(self, scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.aborted = True
                return
            self.bytes_read += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(app, headers, chunks):
    sent = []
    queue = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/datasets/upload/", "method": "POST", "headers": headers}
    asyncio.run(app(scope, receive, send))
    return sent


def limit(path):
    return 1000


def test_declared_length_over_limit_is_refused_unread():
    inner = Recorder()
    sent = call(
        BodySizeLimit(inner, limit), [(b"content-length", str(MARGIN + 5000).encode())], [b"x" * 10]
    )
    assert sent[0]["status"] == 413
    assert b"register its folder" in sent[1]["body"]
    assert inner.bytes_read == 0


def test_chunked_body_is_cut_off_when_it_passes_the_limit():
    inner = Recorder()
    chunk = b"x" * (256 * 1024)
    sent = call(BodySizeLimit(inner, limit), [], [chunk] * 8)  # 2 MiB, no Content-Length
    assert inner.aborted and inner.bytes_read <= MARGIN + 1000
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]


def test_body_within_limit_passes():
    inner = Recorder()
    sent = call(BodySizeLimit(inner, limit), [(b"content-length", b"300")], [b"x" * 300])
    assert sent[0]["status"] == 200 and inner.bytes_read == 300


@pytest.mark.django_db
def test_studio_application_refuses_huge_declared_upload(settings):
    from studio.asgi import application

    settings.STUDIO_MAX_UPLOAD_BYTES = 10_000
    sent = call(application, [(b"content-length", str(50 * 1024 * 1024).encode())], [b""])
    assert sent[0]["status"] == 413
