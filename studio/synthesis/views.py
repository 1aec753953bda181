"""HTTP API for scripts: text (and a reference clip) in, WAV out.

POST /api/token      username + password -> {"token": ...}
POST /api/synthesize checkpoint, text [, reference file(s), speaker, language, speed, pitch,
                     energy, vocoder] -> audio/wav, with a session cookie or
                     `Authorization: Bearer <token>`. vocoder: hifigan, griffin-lim, or the id of
                     a checkpoint of one of the user's vocoder runs (default: STUDIO_VOCODER).

Tokens are signed, not stored: they carry the user id and a fingerprint of the password hash,
so changing the password revokes every token, and they expire after STUDIO_API_TOKEN_MAX_AGE.
Every user mistake is a 4xx with {"error": "..."}; a 500 here is a bug.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import threading
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.decorators import login_not_required
from django.core import signing
from django.http import HttpResponse, JsonResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.crypto import constant_time_compare, salted_hmac
from django.views.decorators.csrf import csrf_exempt

from studio.models import Checkpoint
from studio.synthesis import vocoders
from studio.synthesis.forms import SynthesizeForm

TOKEN_SALT = "studio.api.token"


@functools.cache
def _synth_slots() -> threading.BoundedSemaphore:
    # Synthesis is CPU-heavy; more at once in one web process only makes every request slower.
    return threading.BoundedSemaphore(settings.STUDIO_SYNTH_CONCURRENCY)


# Syntheses in flight per user in this web process: one user cannot take every slot.
_per_user: collections.Counter = collections.Counter()
_per_user_lock = threading.Lock()


@contextlib.contextmanager
def _user_slot(user_id: int):
    with _per_user_lock:
        taken = _per_user[user_id] < settings.STUDIO_SYNTH_PER_USER
        if taken:
            _per_user[user_id] += 1
    if not taken:
        yield False
        return
    try:
        yield True
    finally:
        with _per_user_lock:
            _per_user[user_id] -= 1
            if not _per_user[user_id]:
                del _per_user[user_id]


@functools.cache
def _configure_threads_once() -> int:
    from synthesis.engine import configure_cpu_threads

    return configure_cpu_threads(settings.STUDIO_SYNTH_THREADS)


def error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


# ----------------------------------------------------------------------------- tokens


def _password_fingerprint(user) -> str:
    return salted_hmac(TOKEN_SALT, user.password).hexdigest()[:16]


def make_token(user) -> str:
    return signing.dumps(
        {"u": user.pk, "p": _password_fingerprint(user)}, salt=TOKEN_SALT, compress=True
    )


def user_from_token(token: str):
    try:
        data = signing.loads(token, salt=TOKEN_SALT, max_age=settings.STUDIO_API_TOKEN_MAX_AGE)
    except signing.BadSignature:  # also SignatureExpired
        return None
    user = get_user_model().objects.filter(pk=data.get("u"), is_active=True).first()
    if user is None or not constant_time_compare(data.get("p", ""), _password_fingerprint(user)):
        return None
    return user


def _bearer(request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() in ("bearer", "token") and value.strip() else None


def api_user(request):
    """(user, via_token) from a bearer token or the session; (None, False) if neither."""
    token = _bearer(request)
    if token is not None:
        return user_from_token(token), True
    user = request.user
    return (user, False) if user.is_authenticated else (None, False)


def _csrf_failure(request):
    """Session-authenticated writes need the CSRF token like any form; token callers do not,
    because a bearer token is never sent by a browser on its own."""
    return CsrfViewMiddleware(lambda r: None).process_view(request, None, (), {})


@login_not_required
@csrf_exempt
def token(request):
    if request.method != "POST":
        return error(405, "POST username and password to get a token.")
    fields = _fields(request)
    if fields is None:
        return error(400, "Send form fields or a JSON object.")
    username, password = fields.get("username"), fields.get("password")
    if not username or not password:
        return error(400, "Give username and password.")
    user = authenticate(request, username=str(username), password=str(password))
    if user is None:
        return error(401, "Wrong username or password.")
    return JsonResponse(
        {"token": make_token(user), "expires_in": settings.STUDIO_API_TOKEN_MAX_AGE}
    )


# ----------------------------------------------------------------------------- synthesis


def _fields(request) -> dict | None:
    if request.content_type == "application/json":
        try:
            data = json.loads(request.body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None
    return request.POST.dict()


def _checkpoint_path(user, checkpoint_id):
    ckpt = Checkpoint.objects.visible_to(user).filter(pk=checkpoint_id).first()
    return ckpt.path if ckpt is not None else None


def _vocoder(user, value) -> tuple[str | None, str]:
    """(name for load_vocoder or None, error message or "")."""
    try:
        name = vocoders.resolve(user, value)
    except vocoders.VocoderChoiceError as exc:
        return None, str(exc)
    if name not in vocoders.BUILT_IN and not Path(name).is_file():
        return None, "That vocoder checkpoint's file is gone from the server."
    return name, ""


def _synthesize(path, text, references, speaker, lang, speed, pitch, energy, vocoder):
    from synthesis.engine import Synthesizer

    _configure_threads_once()
    with _synth_slots():
        synth = Synthesizer(path, settings.STUDIO_SYNTH_DEVICE, vocoder=vocoder)
        embedding = synth.speaker_embedding(speaker=speaker, references=references or None)
        return synth.synthesize(text, embedding, lang=lang, speed=speed, pitch=pitch, energy=energy)


@login_not_required
@csrf_exempt
async def synthesize(request):
    if request.method != "POST":
        return error(405, "POST checkpoint, text and optionally a reference clip.")
    user, via_token = await sync_to_async(api_user)(request)
    if user is None:
        return error(
            401, "Sign in, or send Authorization: Bearer <token> (POST /api/token gets one)."
        )
    if not via_token and _csrf_failure(request) is not None:
        return error(403, "CSRF check failed; send the csrftoken cookie's value as X-CSRFToken.")

    max_ref = settings.STUDIO_MAX_REFERENCE_BYTES
    declared = request.META.get("CONTENT_LENGTH") or "0"
    # Refuse an oversized body before Django parses (and spools) it.
    if declared.isdigit() and int(declared) > max_ref + 1024 * 1024:
        return error(
            413, f"The request is larger than the {max_ref // (1024 * 1024)} MB reference limit."
        )
    fields = _fields(request)
    if fields is None:
        return error(400, "Send form fields (multipart for a reference clip) or a JSON object.")

    form = SynthesizeForm(fields)
    if not form.is_valid():
        return error(400, form.first_error())
    data = form.cleaned_data
    checkpoint_id = data["checkpoint"]

    uploads = request.FILES.getlist("reference") if request.FILES else []
    for upload in uploads:
        if upload.size > max_ref:
            return error(
                413, f"{upload.name} is over the {max_ref // (1024 * 1024)} MB reference limit."
            )
    references = [upload.read() for upload in uploads]

    path = await sync_to_async(_checkpoint_path)(user, checkpoint_id)
    if path is None:
        return error(404, f"No checkpoint {checkpoint_id} that you may use.")
    vocoder, problem = await sync_to_async(_vocoder)(user, data["vocoder"])
    if problem:
        return error(400, problem)

    from synthesis.reference_clips import ReferenceAudioError
    from synthesis.vocoders import VocoderError
    from training.checkpoint import CheckpointError

    try:
        with _user_slot(user.pk) as free:
            if not free:
                return error(
                    429,
                    f"You already have {settings.STUDIO_SYNTH_PER_USER} syntheses running; "
                    "try again when one has finished.",
                )
            out = await asyncio.to_thread(
                _synthesize,
                path,
                data["text"],
                references,
                data["speaker"] or None,
                data["language"] or None,
                data["speed"],
                data["pitch"],
                data["energy"],
                vocoder,
            )
    except ReferenceAudioError as exc:
        return error(400, str(exc))
    except VocoderError as exc:
        return error(400, f"The vocoder cannot be used: {exc}")
    except CheckpointError as exc:
        return error(409, f"The checkpoint cannot be used: {exc}")
    except FileNotFoundError:
        return error(409, "The checkpoint's file is gone from the server.")
    except ValueError as exc:
        return error(400, str(exc))

    response = HttpResponse(out.wav_bytes(), content_type="audio/wav")
    response["Content-Disposition"] = 'attachment; filename="speech.wav"'
    response["X-Sample-Rate"] = str(out.sample_rate)
    response["X-Audio-Seconds"] = f"{out.duration_s:.3f}"
    response["X-Real-Time-Factor"] = f"{out.timings['rtf']:.3f}"
    response["X-Vocoder"] = vocoder if vocoder in vocoders.BUILT_IN else "fine-tuned"
    return response
