"""What a hostile signed-in (or not signed-in) user meets: a Content-Security-Policy on every
page and on the Gradio mount, sign-in throttling, private files on disk.

The media views, archives, resampler and body limits have their attacks in the modules of
those parts (test_datasets_views, test_archives, test_audio, test_bodylimit).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from studio.security import GRADIO_CSP, SecurityHeaders

pytestmark = pytest.mark.django_db


def directives(policy: str) -> dict[str, str]:
    parts = [d.strip().split(" ", 1) for d in policy.split(";") if d.strip()]
    return {p[0]: p[1] if len(p) > 1 else "" for p in parts}


def test_every_page_has_a_strict_content_security_policy(client, client_user, staff_user):
    pages = {"/accounts/login/": client.get("/accounts/login/")}
    for path in ("/", "/datasets/", "/datasets/new/", "/runs/", "/configs/"):
        pages[path] = client_user.get(path, follow=True)
    client.force_login(staff_user)
    pages["/admin/"] = client.get("/admin/")
    for path, response in pages.items():
        assert response.status_code == 200, path
        policy = directives(response["Content-Security-Policy"])
        assert policy["script-src"] == "'self'", path
        assert policy["style-src"] == "'self'" and policy["default-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'" and policy["object-src"] == "'none'"
        assert response["X-Content-Type-Options"] == "nosniff"
        # No inline script or handler that the policy would block in the browser.
        html = response.content.decode()
        assert "<script>" not in html and " onsubmit=" not in html and " onclick=" not in html


def test_a_404_has_the_policy_too(client_user):
    response = client_user.get("/datasets/999999/")
    assert (
        response.status_code == 404 and "default-src 'self'" in response["Content-Security-Policy"]
    )


def _asgi_get(app, path: str, headers=()) -> dict:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": list(headers),
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return {k.decode().lower(): v.decode() for k, v in start["headers"]} | {
        ":status": start["status"]
    }


def test_security_headers_are_added_to_what_bypasses_django():
    async def gradio_like(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"<html></html>"})

    headers = _asgi_get(SecurityHeaders(gradio_like), "/synthesize/")
    assert headers["content-security-policy"] == GRADIO_CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"

    async def own_policy(scope, receive, send):
        start = {"type": "http.response.start", "status": 200}
        await send(start | {"headers": [(b"content-security-policy", b"default-src 'none'")]})
        await send({"type": "http.response.body", "body": b""})

    # Files Gradio serves (a user's upload among them) get the media policy: no script.
    headers = _asgi_get(SecurityHeaders(gradio_like), "/synthesize/gradio_api/file=/tmp/x.html")
    assert "sandbox" in headers["content-security-policy"]

    # A response with its own policy (Django's pages, media) keeps it.
    headers = _asgi_get(SecurityHeaders(own_policy), "/x")
    assert headers["content-security-policy"] == "default-src 'none'"


@pytest.mark.django_db(transaction=True)
def test_the_gradio_mount_of_the_studio_application_has_the_headers():
    from studio.asgi import application

    headers = _asgi_get(application, "/synthesize/config")  # anonymous: the gate answers
    assert headers[":status"] == 401
    assert headers["content-security-policy"] == GRADIO_CSP
    assert headers["x-content-type-options"] == "nosniff"


# --------------------------------------------------------------------------- sign-in throttling


def test_sign_in_is_throttled_after_repeated_failures(client, user, settings):
    assert settings.AXES_FAILURE_LIMIT == 5
    wrong = {"username": user.username, "password": "not-it"}
    for _ in range(4):
        assert client.post("/accounts/login/", wrong).status_code == 200  # the form again
    response = client.post("/accounts/login/", wrong)
    assert response.status_code == 429
    assert "Too many failed sign-ins" in response.content.decode()
    # Locked: even the right password waits out the cool-off.
    right = {"username": user.username, "password": "alice-pass-123"}
    assert client.post("/accounts/login/", right).status_code == 429
    assert int(client.post("/accounts/login/", right)["Retry-After"]) == 15 * 60


def test_api_token_is_throttled_with_a_json_answer(client, user):
    wrong = {"username": user.username, "password": "not-it"}
    answers = [client.post("/api/token", wrong).status_code for _ in range(6)]
    assert answers[:4] == [401] * 4 and answers[-1] == 429
    body = client.post("/api/token", wrong).json()
    assert "Too many failed sign-ins" in body["error"]


def test_a_good_sign_in_resets_the_count(client, user):
    wrong = {"username": user.username, "password": "not-it"}
    for _ in range(4):
        client.post("/accounts/login/", wrong)
    right = {"username": user.username, "password": "alice-pass-123"}
    assert client.post("/accounts/login/", right).status_code == 302
    client.logout()
    for _ in range(4):
        assert client.post("/accounts/login/", wrong).status_code == 200


def test_the_admin_cannot_point_a_dataset_or_utterance_elsewhere(client, admin_user_, user):
    from studio.models import Dataset

    dataset = Dataset.objects.create(owner=user, name="d", source_path="/srv/corpus")
    utterance = dataset.utterances.create(item_id="a", audio_path="/srv/corpus/a.wav")
    client.force_login(admin_user_)
    form = client.get(f"/admin/studio/dataset/{dataset.pk}/change/").content.decode()
    assert 'name="source_path"' not in form and "/srv/corpus" in form  # shown, not editable
    form = client.get(f"/admin/studio/utterance/{utterance.pk}/change/").content.decode()
    assert 'name="audio_path"' not in form


# --------------------------------------------------------------------------- files on disk


def test_the_data_folder_is_private(settings, tmp_path: Path):
    from studio.runtime import private_data_dir

    assert stat.S_IMODE(Path(settings.DATA_DIR).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(settings.MEDIA_ROOT).stat().st_mode) == 0o700
    shared = tmp_path / "data"
    shared.mkdir(mode=0o755)
    previous = os.umask(0o022)
    try:
        private_data_dir(shared)
        assert stat.S_IMODE(shared.stat().st_mode) == 0o700
        (shared / "studio.sqlite3").write_bytes(b"")
        assert stat.S_IMODE((shared / "studio.sqlite3").stat().st_mode) == 0o600
    finally:
        os.umask(previous)
