"""Oversized bodies are refused with 413 before the app reads them."""

import asyncio

import pytest

from studio.bodylimit import ANONYMOUS_LIMIT, MARGIN, BodySizeLimit


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


# --------------------------------------------------------------------------- anonymous bodies


async def anonymous(scope):
    return False


async def signed_in(scope):
    return True


def studio_limit(path):
    return 2 * 1024**3  # what /datasets/ allows a signed-in upload


def test_anonymous_declared_body_over_64_kb_is_refused_unread():
    inner = Recorder()
    headers = [(b"content-length", str(300 * 1024**2).encode())]
    sent = call(BodySizeLimit(inner, studio_limit, anonymous), headers, [b"x" * 10])
    assert sent[0]["status"] == 413 and inner.bytes_read == 0
    assert b"sign in first" in sent[1]["body"]
    assert (b"connection", b"close") in sent[0]["headers"]


def test_anonymous_chunked_body_is_cut_off_after_64_kb():
    inner = Recorder()
    sent = call(BodySizeLimit(inner, studio_limit, anonymous), [], [b"x" * (32 * 1024)] * 100)
    assert inner.aborted and inner.bytes_read <= ANONYMOUS_LIMIT
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]


def test_signed_in_bodies_keep_the_path_limit():
    inner = Recorder()
    chunks = [b"x" * (256 * 1024)] * 8
    headers = [(b"content-length", str(2 * 1024**2).encode())]
    sent = call(BodySizeLimit(inner, studio_limit, signed_in), headers, chunks)
    assert sent[0]["status"] == 200 and inner.bytes_read == 2 * 1024**2


def test_a_sign_in_form_needs_no_session():
    inner = Recorder()
    sent = call(BodySizeLimit(inner, studio_limit, anonymous), [], [b"x" * 2000])
    assert sent[0]["status"] == 200


@pytest.mark.django_db
def test_the_session_cookie_decides(client, user):
    from asgiref.sync import async_to_sync

    from studio.bodylimit import _signed_in, studio_signed_in

    # No cookie and no token: anonymous without asking the database.
    assert async_to_sync(studio_signed_in)({"headers": []}) is False
    assert _signed_in("sessionid=forged", "") is False
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    assert _signed_in(cookie, "") is True
    user.is_active = False
    user.save()
    assert _signed_in(cookie, "") is False
    assert _signed_in("", "Bearer forged") is False


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def uvicorn_studio(django_db_modify_db_settings):
    """The web process exactly as `make run` starts it (studio.runtime.web_command)."""
    import os
    import socket
    import subprocess
    import tempfile

    from django.db import connection

    from studio.runtime import web_command
    from tests.conftest import ROOT, wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STUDIO_TEST_DB_NAME=str(connection.settings_dict["NAME"]))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        web_command("127.0.0.1", port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def listening():
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read().decode(errors="replace")[-3000:])
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 60, message="uvicorn to listen")
    yield port, proc
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def test_uvicorn_refuses_an_anonymous_300_mb_post_before_reading_it(uvicorn_studio):
    """Only 128 KB of the declared 300 MB is ever sent: the answer comes anyway, so the server
    answered without waiting for (or buffering) the body, as daphne did."""
    import socket

    port, _ = uvicorn_studio
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /datasets/upload/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n"
            + f"Content-Length: {300 * 1024**2}\r\n\r\n".encode()
            + b"x" * (128 * 1024)
        )
        answer = b""
        while b"\r\n\r\n" not in answer or b"sign in first" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"sign in first" in answer


def test_uvicorn_serves_the_channels_websockets(uvicorn_studio):
    """An anonymous socket to the runs list is accepted, then closed with 4401."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    port, _ = uvicorn_studio
    url = f"ws://127.0.0.1:{port}/ws/runs/"
    with (
        connect(url, origin=f"http://127.0.0.1:{port}", open_timeout=30) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.recv(timeout=30)
    assert closed.value.rcvd.code == 4401


def test_uvicorn_pages_carry_the_security_headers(uvicorn_studio):
    import httpx

    port, _ = uvicorn_studio
    for path in ("/accounts/login/", "/synthesize/config"):
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=30)
        assert "default-src 'self'" in response.headers["content-security-policy"], path
        assert response.headers["x-content-type-options"] == "nosniff"
