"""The "Voice out" page: pick a checkpoint, type, give a voice, listen.

Built from plain callables so this module knows nothing of Django: the studio passes in how to
list a user's checkpoints, how to turn a checkpoint id into a file for that user (or refuse), and
how to list a checkpoint's seen speakers. The user is whoever the mount's auth dependency says
(`gr.Request.username`); a request without one gets nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import soundfile as sf

from synthesis import engine
from synthesis import evaluate as scores
from synthesis.pictures import mel_figure, rgb_array
from synthesis.reference_clips import ReferenceAudioError
from synthesis.vocoders import (
    GRIFFIN_LIM,
    HIFIGAN,
    VocoderChoice,
    available_vocoders,
    default_vocoder_name,
)
from training import audio as audio_lib
from training import text as text_lib

VOICE_REFERENCE = "reference"
VOICE_SEEN = "seen"
LANGUAGES = [("The checkpoint's language", "auto"), ("English", "en"), ("Persian", "fa")]


@dataclass(frozen=True)
class CheckpointChoice:
    id: str
    run: str
    step: int
    val_loss: float | None = None

    @property
    def label(self) -> str:
        val = f" · val loss {self.val_loss:.3f}" if self.val_loss is not None else ""
        return f"{self.run} · step {self.step}{val}"


@dataclass
class PageSources:
    """What the page needs from the studio; every callable gets the signed-in user's id first."""

    list_checkpoints: Callable[[str], list[CheckpointChoice]]
    resolve_checkpoint: Callable[[str, str], str | Path | None]
    # None: read the speakers from the checkpoint file itself.
    list_speakers: Callable[[str, str], list[str]] | None = None
    # The vocoders the user may pick: HiFi-GAN universal, their fine-tuned vocoders (name = the
    # checkpoint path, never shown to the browser) and Griffin-Lim. None: the built-in two.
    list_vocoders: Callable[[str], list[VocoderChoice]] | None = None
    # The vocoder picked when the page opens (a VocoderChoice.name); None: default_vocoder_name().
    default_vocoder: str | None = None
    device: str = "auto"
    max_chars: int = 2000
    home_url: str = "/"


def vocoder_key(choice: VocoderChoice) -> str:
    """What the browser sees for a vocoder: built-in names as they are, a fine-tuned vocoder's
    path as a digest, so server paths never leave the server and a forged value matches nothing."""
    if choice.name in (GRIFFIN_LIM, HIFIGAN):
        return choice.name
    return "tuned-" + hashlib.sha1(choice.name.encode()).hexdigest()[:16]


def mel_picture(mel: np.ndarray, sample_rate: int, hop_length: int) -> np.ndarray:
    """RGB array of the log-mel, time in seconds along x."""
    return rgb_array(mel_figure(mel, sample_rate, hop_length, size=(9.0, 2.6)))


def whole_mel(sentences: list[tuple[str, np.ndarray, float]], sr: int, hop: int) -> np.ndarray:
    """The sentences' mels joined with floor-level frames for the pauses, as the audio is."""
    if not sentences:
        return np.zeros((80, 1), dtype=np.float32)
    floor = float(np.log(audio_lib.LOG_FLOOR))
    parts = []
    for _, mel, pause_s in sentences:
        parts.append(mel)
        frames = round(pause_s * sr / hop)
        if frames:
            parts.append(np.full((mel.shape[0], frames), floor, dtype=np.float32))
    return np.concatenate(parts, axis=1)


def _shadow_zope_marker() -> None:
    """Let Gradio build components in a process that has imported Twisted (Daphne does).

    Twisted's `@implementer` on a subclass of abc.ABC makes zope.interface put a ClassProvides
    descriptor named `__provides__` on ABC itself, and that descriptor raises AttributeError
    when read through an instance of any other ABC subclass. Gradio's components are ABC
    subclasses that getattr() every name in dir() while being built, so they fail with
    "AttributeError: __provides__". A plain attribute on Gradio's component base class comes
    first in the lookup and hides the marker; nothing asks zope about Gradio components.
    """
    from gradio.components.base import ComponentBase

    if "__provides__" not in vars(ComponentBase):
        ComponentBase.__provides__ = None


def build_synthesis_page(sources: PageSources, title: str = "Voice out") -> gr.Blocks:
    _shadow_zope_marker()

    def user_of(request: gr.Request | None) -> str:
        user = getattr(request, "username", None)
        if not user:
            raise gr.Error("Sign in to use the synthesis page.")
        return str(user)

    def checkpoint_path(user: str, checkpoint_id: str | None) -> Path:
        if not checkpoint_id:
            raise gr.Error("Pick a checkpoint first.")
        path = sources.resolve_checkpoint(user, str(checkpoint_id))
        if path is None:
            raise gr.Error("That checkpoint does not exist or is not yours.")
        return Path(path)

    def list_checkpoints(request: gr.Request):
        choices = sources.list_checkpoints(user_of(request))
        options = [(c.label, c.id) for c in choices]
        return gr.Dropdown(choices=options, value=options[0][1] if options else None)

    def vocoder_choices(user: str) -> list[VocoderChoice]:
        if sources.list_vocoders is not None:
            return list(sources.list_vocoders(user))
        return available_vocoders()

    def list_vocoders(request: gr.Request):
        choices = vocoder_choices(user_of(request))
        options = [(c.label, vocoder_key(c)) for c in choices if c.available]
        keys = [key for _, key in options]
        default = sources.default_vocoder or default_vocoder_name()
        default = next((vocoder_key(c) for c in choices if c.name == default), default)
        value = default if default in keys else (keys[0] if keys else None)
        missing = [f"{c.label} is unavailable: {c.reason}" for c in choices if not c.available]
        return gr.Dropdown(choices=options, value=value), "\n\n".join(missing)

    def vocoder_name(user: str, key: str | None) -> str | None:
        if not key:
            return None
        for choice in vocoder_choices(user):
            if choice.available and vocoder_key(choice) == key:
                return choice.name
        raise gr.Error("That vocoder does not exist or is not yours.")

    def list_speakers(checkpoint_id: str | None, request: gr.Request):
        user = user_of(request)
        if not checkpoint_id:
            return gr.Dropdown(choices=[], value=None)
        if sources.list_speakers is not None:
            names = sources.list_speakers(user, str(checkpoint_id))
        else:
            try:
                names = engine.Synthesizer(
                    checkpoint_path(user, checkpoint_id), sources.device
                ).speakers
            except (ValueError, FileNotFoundError) as exc:
                raise gr.Error(str(exc)) from exc
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    def synthesize(
        checkpoint_id: str | None,
        text: str,
        language: str,
        voice: str,
        reference: str | None,
        speaker: str | None,
        speed: float,
        pitch: float,
        energy: float,
        vocoder: str | None,
        request: gr.Request,
    ):
        user = user_of(request)
        if not text or not text.strip():
            raise gr.Error("Type some text to speak.")
        if len(text) > sources.max_chars:
            raise gr.Error(f"The text is {len(text)} characters; the limit is {sources.max_chars}.")
        path = checkpoint_path(user, checkpoint_id)
        try:
            synth = engine.Synthesizer(path, sources.device, vocoder=vocoder_name(user, vocoder))
            if voice == VOICE_REFERENCE:
                if not reference:
                    raise gr.Error("Upload or record a reference clip, or choose a seen speaker.")
                target = synth.speaker_embedding(references=reference)
                against = "the reference clip"
            else:
                if not speaker:
                    raise gr.Error("This checkpoint has no seen speakers; give a reference clip.")
                target = synth.speaker_embedding(speaker=speaker)
                against = f"the mean voice of {speaker}"
            lang = None if language in (None, "", "auto") else language
            sentences: list[tuple[str, np.ndarray, float]] = []
            timings: dict[str, float] = {}
            pieces: list[np.ndarray] = []
            # Each piece goes to the live player as it is made: with HiFi-GAN the first 0.3 s
            # plays while the rest of the sentence is still rendering. 16-bit WAV bytes pass
            # through Gradio untouched (a numpy chunk would be peak-normalised on its own).
            for piece in synth.audio_chunks(
                text, target, lang=lang, speed=speed, pitch=pitch, energy=energy,
                timings=timings, sentences=sentences,
            ):  # fmt: skip
                pieces.append(piece)
                yield audio_lib.wav_bytes(piece, synth.sample_rate), *([gr.skip()] * 4)
        except gr.Error:
            raise  # already worded for the user (gr.Error is a ValueError too)
        except (ReferenceAudioError, ValueError, FileNotFoundError) as exc:
            raise gr.Error(str(exc)) from exc
        wav = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
        sr, hop = synth.sample_rate, synth.loaded.audio.hop_length
        similarity = scores.secs(scores.embed_audio(wav, sr), engine.embedding_of(target))
        seconds = len(wav) / sr
        total = timings.get("total_s", 0.0)
        notes = [
            f"**Speaker similarity** of the output to {against}: **{similarity:.3f}** "
            "(cosine of speaker embeddings; the same person in two real clips scores about 0.8-0.9).",
            f"{seconds:.1f} s of audio in {total:.2f} s (real-time factor "
            f"{total / max(seconds, 1e-9):.2f}; first audio after "
            f"{timings.get('first_audio_s', total):.2f} s), {len(sentences)} "
            f"sentence{'s' if len(sentences) != 1 else ''}, vocoder: {synth.vocoder.label}.",
        ]
        dropped = sorted(text_lib.unspeakable(text, lang or synth.lang))
        if dropped:
            notes.append("Skipped characters this model cannot say: " + " ".join(dropped))
        picture = mel_picture(whole_mel(sentences, sr, hop), sr, hop)
        yield (
            gr.skip(),
            audio_lib.wav_bytes(wav, sr),
            picture,
            round(similarity, 4),
            "\n\n".join(notes),
        )

    def predicted_mos(audio_path: str | None, request: gr.Request):
        """DNSMOS after the audio is out: it costs a few hundred ms the listener need not wait."""
        from synthesis.quality import QualityUnavailable, dnsmos

        user_of(request)
        if not audio_path:
            return None
        try:
            wav, sr = sf.read(audio_path, dtype="float32")
            return round(dnsmos(wav, sr).ovrl, 2)
        except (QualityUnavailable, ValueError, RuntimeError):
            return None

    # Voices and generated audio stay in Gradio's cache only for an hour.
    with gr.Blocks(title=title, delete_cache=(900, 3600), analytics_enabled=False) as page:
        gr.Markdown(
            f"[← Studio]({sources.home_url}) · **{title}** — type text, give a voice, listen. "
            "Only your own checkpoints are listed."
        )
        with gr.Row():
            with gr.Column(scale=3):
                checkpoint = gr.Dropdown(
                    label="Checkpoint (run · step · validation loss)",
                    choices=[],
                    allow_custom_value=True,
                )
                text = gr.Textbox(
                    label="Text",
                    lines=4,
                    max_length=sources.max_chars,
                    placeholder="The quick brown fox jumps over the lazy dog.",
                )
                language = gr.Dropdown(label="Language", choices=LANGUAGES, value="auto")
                voice = gr.Radio(
                    label="Voice",
                    choices=[
                        ("Reference clip (upload or record)", VOICE_REFERENCE),
                        ("Seen speaker", VOICE_SEEN),
                    ],
                    value=VOICE_SEEN,
                )
                reference = gr.Audio(
                    label="Reference clip: 3-30 s of one person speaking",
                    sources=["upload", "microphone"],
                    type="filepath",
                    visible=False,
                )
                speaker = gr.Dropdown(label="Seen speaker", choices=[], allow_custom_value=True)
                with gr.Row():
                    speed = gr.Slider(*engine.SPEED_RANGE, value=1.0, step=0.05, label="Speed")
                    pitch = gr.Slider(
                        *engine.PITCH_RANGE, value=0.0, step=0.5, label="Pitch (semitones)"
                    )
                    energy = gr.Slider(*engine.ENERGY_RANGE, value=1.0, step=0.05, label="Energy")
                vocoder = gr.Dropdown(
                    label="Vocoder (HiFi-GAN sounds natural; Griffin-Lim is a fast preview)",
                    choices=[],
                    allow_custom_value=True,
                )
                vocoder_note = gr.Markdown()
                go = gr.Button("Synthesise", variant="primary")
            with gr.Column(scale=2):
                # Plays while the voice is still rendering (Gradio encodes it with ffmpeg).
                live = gr.Audio(
                    label="Listen (plays as it renders)",
                    streaming=True,
                    autoplay=True,
                    interactive=False,
                )
                audio = gr.Audio(
                    label="Output",
                    type="filepath",
                    format="wav",
                    buttons=["download"],
                    interactive=False,
                )
                picture = gr.Image(label="Mel spectrogram", type="numpy", interactive=False)
                similarity = gr.Number(
                    label="Speaker similarity (SECS)", precision=3, interactive=False
                )
                mos = gr.Number(
                    label="Predicted naturalness (DNSMOS overall, 1-5)",
                    precision=2,
                    interactive=False,
                )
                notes = gr.Markdown()

        page.load(list_checkpoints, inputs=None, outputs=checkpoint, api_visibility="undocumented")
        page.load(
            list_vocoders,
            inputs=None,
            outputs=[vocoder, vocoder_note],
            api_visibility="undocumented",
        )
        voice.change(
            lambda v: (
                gr.Audio(visible=v == VOICE_REFERENCE),
                gr.Dropdown(visible=v == VOICE_SEEN),
            ),
            inputs=voice,
            outputs=[reference, speaker],
            api_visibility="private",
            queue=False,
        )
        checkpoint.change(
            list_speakers, inputs=checkpoint, outputs=speaker, api_visibility="undocumented"
        )
        go.click(
            synthesize,
            inputs=[
                checkpoint,
                text,
                language,
                voice,
                reference,
                speaker,
                speed,
                pitch,
                energy,
                vocoder,
            ],
            outputs=[live, audio, picture, similarity, notes],
            api_name="synthesize",
        ).then(predicted_mos, inputs=audio, outputs=mos, api_visibility="undocumented")
    return page
