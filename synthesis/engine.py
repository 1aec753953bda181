"""Text in, speech out, from a trained checkpoint.

normalise -> split into sentences -> tokens with the checkpoint's own symbol table -> the
acoustic model's mel -> vocoder -> sentences joined with pauses. Loaded models are kept in a
small per-process LRU cache, so a page or an API serving a few checkpoints pays the load once.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from synthesis import reference_clips
from synthesis.vocoders import Vocoder, load_vocoder
from training import audio as audio_lib
from training import text as text_lib
from training import voice_stats
from training.checkpoint import CheckpointError, load_checkpoint
from training.device import select_device
from training.model import ModelConfig, TTSModel, load_model_weights

# A chunk the model sees at once. Long inputs are cut at sentence ends, then at clause
# punctuation: attention-free duration models cope with any length, but the pauses a reader
# makes at sentence ends are what the split restores, and short chunks give the first audio early.
MAX_CHUNK_CHARS = 200
SENTENCE_PAUSE_S = 0.35
CLAUSE_PAUSE_S = 0.15
EDGE_FADE_S = 0.005  # fades each chunk in and out so the joins do not click

SPEED_RANGE = (0.5, 2.0)
PITCH_RANGE = (-12.0, 12.0)  # semitones
ENERGY_RANGE = (0.5, 2.0)

MODEL_CACHE_SIZE = 2  # checkpoints kept loaded per process

_SENTENCE_END = {"en": ".!?", "fa": ".!\u061f"}
_CLAUSE_END = {"en": ",;:", "fa": "\u060c\u061b:"}


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for a process that serves synthesis (default 1, or
    STUDIO_SYNTH_THREADS).

    Synthesis is many small FFTs and matmuls. On a small CPU shared with other work, torch's
    threads spin against each other and against other processes: on the project's loaded 2-core
    box two threads made `small` 35x slower than one (RTF 2.2 against 0.06). Parallel requests, not parallel kernels,
    are the better use of the cores. Process-wide, so it is called once by the web process
    and the benchmark, never by the engine behind a caller's back.
    """
    threads = threads or 1
    torch.set_num_threads(threads)
    return threads


@dataclass
class LoadedModel:
    """A checkpoint's model and everything needed to speak with it exactly as it was trained."""

    path: Path
    device: torch.device
    model: TTSModel
    symbols: text_lib.SymbolTable
    lang: str
    text_backend: str
    audio: audio_lib.AudioConfig
    speakers: dict[str, list[float]]
    step: int
    size: str
    val_loss: float | None
    stats: dict = field(default_factory=dict)
    # Seen speakers' voice statistics (training.voice_stats), for a model that uses them.
    voices: dict[str, list[float]] = field(default_factory=dict)
    _frontends: dict = field(default_factory=dict)

    @property
    def uses_voice_stats(self) -> bool:
        return bool(self.model.cfg.voice_stats)

    def frontend(self, lang: str) -> text_lib.Frontend:
        if lang not in self._frontends:
            # The checkpoint's own backend: phonemes for a phoneme model, characters for a
            # character model, whatever this machine would pick today.
            self._frontends[lang] = text_lib.Frontend(lang, backend=self.text_backend)
        return self._frontends[lang]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a checkpoint (tensors only; a pickled payload is refused) and build its model."""
    path = Path(path)
    device = select_device(device)
    ckpt = load_checkpoint(path, map_location="cpu")
    missing = [k for k in ("model", "model_config", "symbols") if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path.name} is not a synthesis checkpoint (missing {', '.join(missing)})"
        )
    known = {f for f in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**{k: v for k, v in ckpt["model_config"].items() if k in known})
    symbols = text_lib.SymbolTable.from_list(list(ckpt["symbols"]))
    model = TTSModel(cfg, n_symbols=len(symbols))
    try:
        # Checkpoints from before conditional layer norms load with those at identity. The
        # weight average, where the run kept one, is what speaks: steadier than the last step.
        ema = ckpt.get("ema") or {}
        load_model_weights(model, ema.get("weights") or ckpt["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path.name}: its weights do not fit this version of the model; it was written by "
            f"another version of the studio ({first})"
        ) from exc
    model.to(device).eval()
    text_cfg = ckpt.get("text") or {}
    return LoadedModel(
        path=path,
        device=device,
        model=model,
        symbols=symbols,
        lang=text_cfg.get("lang", "en"),
        text_backend=text_cfg.get("backend", "auto"),
        audio=audio_lib.AudioConfig.from_dict(ckpt.get("audio") or {}),
        speakers={k: list(v) for k, v in (ckpt.get("speakers") or {}).items()},
        step=int(ckpt.get("step", 0)),
        size=str(ckpt.get("size", "")),
        val_loss=ckpt.get("val_loss"),
        stats=dict(ckpt.get("stats") or {}),
        voices={k: list(v) for k, v in (ckpt.get("voices") or {}).items()},
    )


class ModelCache:
    """Least-recently-used loaded models, keyed by file, its modification time and the device,
    so a checkpoint rewritten in place (best.pt) is reloaded rather than served stale."""

    def __init__(self, size: int = MODEL_CACHE_SIZE):
        self.size = max(1, size)
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | Path, device: str | torch.device = "auto") -> LoadedModel:
        path = Path(path).resolve()
        device = select_device(device)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"checkpoint not found: {path}") from None
        key = (str(path), stat.st_mtime_ns, stat.st_size, str(device))
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        # Loading takes seconds; do it outside the lock so other checkpoints stay servable.
        loaded = load_model(path, device)
        with self._lock:
            self._models[key] = loaded
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()

    def __len__(self) -> int:
        return len(self._models)


MODELS = ModelCache()


def split_text(
    text: str, lang: str = "en", max_chars: int = MAX_CHUNK_CHARS
) -> list[tuple[str, float]]:
    """Normalised text -> [(chunk, pause after it in seconds)], cut at sentence ends and, for
    sentences longer than `max_chars`, at clause punctuation, then at spaces."""
    norm = text_lib.normalize(text, lang)
    ends = re.escape(_SENTENCE_END[lang])
    clauses = re.escape(_CLAUSE_END[lang])
    chunks: list[tuple[str, float]] = []
    for sentence in re.findall(rf"[^{ends}]+[{ends}]*", norm):
        sentence = sentence.strip()
        if not sentence:
            continue
        if len(sentence) <= max_chars:
            chunks.append((sentence, SENTENCE_PAUSE_S))
            continue
        pieces = [
            p.strip() for p in re.findall(rf"[^{clauses}]+[{clauses}]*", sentence) if p.strip()
        ]
        current = ""
        for piece in pieces:
            for word_piece in _cut_at_spaces(piece, max_chars):
                if current and len(current) + 1 + len(word_piece) > max_chars:
                    chunks.append((current, CLAUSE_PAUSE_S))
                    current = word_piece
                else:
                    current = f"{current} {word_piece}".strip()
        if current:
            chunks.append((current, SENTENCE_PAUSE_S))
    if chunks:
        chunks[-1] = (chunks[-1][0], 0.0)
    return chunks


def _cut_at_spaces(piece: str, max_chars: int) -> list[str]:
    if len(piece) <= max_chars:
        return [piece]
    out, current = [], ""
    for word in piece.split(" "):
        if current and len(current) + 1 + len(word) > max_chars:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    if current:
        out.append(current)
    return out


def check_controls(speed: float, pitch: float, energy: float) -> None:
    for name, value, (low, high), unit in (
        ("speed", speed, SPEED_RANGE, "x"),
        ("pitch", pitch, PITCH_RANGE, " semitones"),
        ("energy", energy, ENERGY_RANGE, "x"),
    ):
        if not (low <= float(value) <= high):  # also false for NaN
            raise ValueError(
                f"{name} must be between {low:g}{unit} and {high:g}{unit}, not {value}"
            )


@dataclass
class Synthesis:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    mel: np.ndarray  # [n_mels, frames] natural-log mel of the whole output, pauses included
    timings: dict[str, float]
    chunks: list[str]
    speaker_embedding: np.ndarray
    dropped: list[str] = field(default_factory=list)  # characters the checkpoint cannot say
    vocoder: str = ""  # the name load_vocoder took: griffin-lim, hifigan or a checkpoint path

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    def wav_bytes(self) -> bytes:
        return audio_lib.wav_bytes(self.audio, self.sample_rate)


@dataclass
class Chunk:
    text: str
    audio: np.ndarray
    mel: np.ndarray
    pause_s: float


class Synthesizer:
    """One checkpoint, ready to speak. Cheap to create: the model itself comes from MODELS and
    the vocoder from synthesis.vocoders' cache.

    `vocoder` is a Vocoder, or a name for `load_vocoder` (griffin-lim, hifigan, the path of a
    fine-tuned vocoder checkpoint); None is the default (HiFi-GAN universal when installed).
    A vocoder that cannot serve this checkpoint raises VocoderError with the reason.
    `match_voice` moves each sentence's mel to the voice's statistics before the vocoder
    (training.voice_stats.match), for models and voices that have them. Off by default: on
    dev-en-8spk it moved the normalised SECS of unseen voices by +0.02 without augmentation and
    -0.02 with it, and raised the WER, so it is an option to measure, not a default.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str | torch.device = "auto",
        vocoder: Vocoder | str | Path | None = None,
        cache: ModelCache | None = None,
        match_voice: bool = False,
    ):
        self.match_voice = match_voice
        self.loaded = (cache if cache is not None else MODELS).get(checkpoint, device)
        if not isinstance(vocoder, Vocoder):
            vocoder = load_vocoder(vocoder, self.loaded.audio, self.loaded.device)
        self.vocoder = vocoder
        if self.vocoder.sample_rate != self.loaded.audio.sample_rate:
            raise ValueError(
                f"the vocoder works at {self.vocoder.sample_rate} Hz but the model at "
                f"{self.loaded.audio.sample_rate} Hz"
            )

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    @property
    def lang(self) -> str:
        return self.loaded.lang

    @property
    def speakers(self) -> list[str]:
        return sorted(self.loaded.speakers)

    def speaker_embedding(self, speaker: str | None = None, references=None) -> np.ndarray:
        """The voice to speak with: reference clip(s) if given, else a seen speaker by name, else
        the first seen speaker.

        The 256-d speaker embedding, followed, for a model with voice statistics, by the
        voice's statistics (training.voice_stats): the references' own, or the seen speaker's
        from the checkpoint. Every method here takes this vector, or a bare embedding (the
        model then uses its training voices' mean statistics).
        """
        uses_stats = self.loaded.uses_voice_stats
        if references is not None and not (isinstance(references, Sequence) and not references):
            return reference_clips.reference_voice(
                references, self.loaded.audio if uses_stats else None
            )
        if not speaker and self.loaded.speakers:
            speaker = self.speakers[0]
        if speaker:
            embedding = reference_clips.seen_speaker_embedding(self.loaded.speakers, speaker)
            if uses_stats and speaker in self.loaded.voices:
                stats = np.asarray(self.loaded.voices[speaker], dtype=np.float32)
                return np.concatenate([embedding, stats])
            return embedding
        raise reference_clips.ReferenceAudioError(
            "missing", "This checkpoint has no seen speakers; give a reference clip of the voice."
        )

    def _voice_tensors(self, voice: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A voice vector -> (embedding [1, 256], statistics [1, 2 n_mels + 1] or None)."""
        vector = torch.as_tensor(np.asarray(voice, dtype=np.float32)).reshape(1, -1)
        vector = vector.to(self.loaded.device)
        cfg = self.loaded.model.cfg
        dim = cfg.speaker_dim
        if vector.shape[1] == dim:
            return vector, None
        if self.loaded.uses_voice_stats and vector.shape[1] == dim + voice_stats.dim(cfg.n_mels):
            return vector[:, :dim], vector[:, dim:]
        also = (
            " optionally followed by its voice statistics" if self.loaded.uses_voice_stats else ""
        )
        raise ValueError(
            f"a voice is a {dim}-d speaker embedding{also}, not {vector.shape[1]} numbers"
        )

    def encode(self, chunk: str, lang: str) -> list[int]:
        return self.loaded.symbols.encode(self.loaded.frontend(lang).tokens(chunk))

    def stream(
        self,
        text: str,
        speaker_embedding: np.ndarray,
        lang: str | None = None,
        speed: float = 1.0,
        pitch: float = 0.0,
        energy: float = 1.0,
        timings: dict | None = None,
    ) -> Iterator[Chunk]:
        """Chunk by chunk, so a caller can start playing after the first sentence."""
        lang = lang or self.lang
        check_controls(speed, pitch, energy)
        if not text or not text.strip():
            raise ValueError("Type some text to speak.")
        timings = timings if timings is not None else {}
        for key in ("frontend_s", "model_s", "vocoder_s"):
            timings.setdefault(key, 0.0)
        t0 = time.perf_counter()
        chunks = split_text(text, lang)
        timings["frontend_s"] += time.perf_counter() - t0
        if not chunks:
            raise ValueError("Nothing to say: the text has no words this model can speak.")
        spk = self._voice_tensors(speaker_embedding)
        said = 0
        for chunk_text, pause in chunks:
            t = time.perf_counter()
            ids = self.encode(chunk_text, lang)
            timings["frontend_s"] += time.perf_counter() - t
            if not ids:
                continue
            t = time.perf_counter()
            mel = self._mel(ids, spk, speed, pitch, energy)
            timings["model_s"] += time.perf_counter() - t
            t = time.perf_counter()
            wav = self.vocoder(mel)
            timings["vocoder_s"] += time.perf_counter() - t
            said += 1
            yield Chunk(
                text=chunk_text,
                audio=fade_edges(wav, self.sample_rate),
                mel=mel.numpy(),
                pause_s=pause,
            )
        if not said:
            raise ValueError(
                "Nothing to say: none of the text's sounds are in this model's symbol table."
            )

    def audio_chunks(
        self,
        text: str,
        speaker_embedding: np.ndarray,
        lang: str | None = None,
        speed: float = 1.0,
        pitch: float = 0.0,
        energy: float = 1.0,
        timings: dict | None = None,
        sentences: list | None = None,
    ) -> Iterator[np.ndarray]:
        """The waveform as it is made, for a player that streams: each sentence's mel goes
        through `vocoder.stream`, so the first piece (about 0.3 s of audio with HiFi-GAN) is
        ready before the first sentence is fully rendered. Pauses come as silent pieces;
        joined, the pieces are `synthesize(...).audio` up to the chunk seams. A `sentences`
        list receives (text, mel, pause_s) per sentence, for a caller that also shows the
        mel once the audio is out."""
        timings = timings if timings is not None else {}
        start = time.perf_counter()
        lang = lang or self.lang
        check_controls(speed, pitch, energy)
        if not text or not text.strip():
            raise ValueError("Type some text to speak.")
        chunks = split_text(text, lang)
        spk = self._voice_tensors(speaker_embedding)
        said = 0
        for chunk_text, pause in chunks:
            ids = self.encode(chunk_text, lang)
            if not ids:
                continue
            mel = self._mel(ids, spk, speed, pitch, energy)
            if sentences is not None:
                sentences.append((chunk_text, mel.numpy(), pause))
            # One piece is held back so the sentence's last one can be faded out like
            # `synthesize` does; the first is faded in.
            held = None
            for i, piece in enumerate(self.vocoder.stream(mel)):
                if i == 0:
                    piece = fade_in(piece, self.sample_rate)
                    if said == 0:
                        timings["first_audio_s"] = time.perf_counter() - start
                if held is not None:
                    yield held
                held = piece
            if held is not None:
                yield fade_edges(held, self.sample_rate, fade_in_too=False)
            said += 1
            if pause:
                yield np.zeros(int(pause * self.sample_rate), dtype=np.float32)
        if not said:
            raise ValueError(
                "Nothing to say: none of the text's sounds are in this model's symbol table."
            )
        timings["total_s"] = time.perf_counter() - start

    def _mel(self, ids: list[int], spk: tuple, speed, pitch, energy) -> torch.Tensor:
        embedding, stats = spk
        with torch.inference_mode():
            tokens = torch.tensor([ids], dtype=torch.long, device=self.loaded.device)
            out = self.loaded.model.infer(
                tokens,
                torch.tensor([len(ids)], device=self.loaded.device),
                embedding,
                voice_stats=stats,
                duration_scale=1.0 / float(speed),
                pitch_shift=float(pitch),  # semitones; the model maps them through its pitch stats
                energy_scale=float(energy),
            )
            n = int(out["mel_lens"][0])
            mel = out["mel"][0, :, :n].float().cpu()
            if stats is not None and self.match_voice:
                mel = voice_stats.match(mel, stats[0].cpu(), float(np.log(audio_lib.LOG_FLOOR)))
            return mel

    def synthesize(
        self,
        text: str,
        speaker_embedding: np.ndarray | None = None,
        *,
        speaker: str | None = None,
        references=None,
        lang: str | None = None,
        speed: float = 1.0,
        pitch: float = 0.0,
        energy: float = 1.0,
    ) -> Synthesis:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        if speaker_embedding is None:
            t = time.perf_counter()
            speaker_embedding = self.speaker_embedding(speaker, references)
            timings["speaker_s"] = time.perf_counter() - t
        lang = lang or self.lang
        dropped = sorted(text_lib.unspeakable(text, lang))
        audio_parts: list[np.ndarray] = []
        mel_parts: list[np.ndarray] = []
        chunks: list[str] = []
        floor = float(np.log(audio_lib.LOG_FLOOR))
        hop = self.loaded.audio.hop_length
        for chunk in self.stream(text, speaker_embedding, lang, speed, pitch, energy, timings):
            if not chunks:
                timings["first_audio_s"] = time.perf_counter() - start
            chunks.append(chunk.text)
            audio_parts.append(chunk.audio)
            mel_parts.append(chunk.mel)
            pause = round(chunk.pause_s * self.sample_rate / hop)
            if pause:
                audio_parts.append(np.zeros(pause * hop, dtype=np.float32))
                mel_parts.append(np.full((chunk.mel.shape[0], pause), floor, dtype=np.float32))
        audio = np.concatenate(audio_parts).astype(np.float32)
        timings["total_s"] = time.perf_counter() - start
        timings["audio_s"] = len(audio) / self.sample_rate
        timings["rtf"] = timings["total_s"] / max(timings["audio_s"], 1e-9)
        return Synthesis(
            audio=audio,
            sample_rate=self.sample_rate,
            mel=np.concatenate(mel_parts, axis=1),
            timings=timings,
            chunks=chunks,
            speaker_embedding=np.asarray(speaker_embedding, dtype=np.float32),
            dropped=dropped,
            vocoder=self.vocoder.name,
        )


def embedding_of(voice: np.ndarray) -> np.ndarray:
    """The speaker embedding part of a voice vector (Synthesizer.speaker_embedding), for
    similarity scores: the statistics after it are not in the encoder's space."""
    from training.speaker_embedding import EMBEDDING_DIM

    return np.asarray(voice, dtype=np.float32).reshape(-1)[:EMBEDDING_DIM]


def fade_in(wav: np.ndarray, sr: int, seconds: float = EDGE_FADE_S) -> np.ndarray:
    n = min(len(wav), int(sr * seconds))
    if n <= 0:
        return wav
    wav = wav.copy()
    wav[:n] *= np.linspace(0.0, 1.0, n, dtype=np.float32)
    return wav


def fade_edges(
    wav: np.ndarray, sr: int, seconds: float = EDGE_FADE_S, fade_in_too: bool = True
) -> np.ndarray:
    n = min(len(wav) // 2, int(sr * seconds))
    if n <= 0:
        return wav
    wav = wav.copy()
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    if fade_in_too:
        wav[:n] *= ramp
    wav[-n:] *= ramp[::-1]
    return wav
