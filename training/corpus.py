"""Read speech corpora in the common layouts and say, per utterance, what is wrong with them.

Nothing here is fatal: a broken row, a missing file or an odd encoding becomes a `Problem`
against that utterance, and the good utterances are kept. Severity "error" means the
utterance is dropped; "warning" means it is kept and the person should know.

Layouts (`FORMATS`):
- ljspeech: `metadata.csv` lines `id|text|normalized`, audio in `wavs/<id>.wav`.
- vctk: `wav48*/<speaker>/<id>[_mic1].wav|flac` and `txt/<speaker>/<id>.txt`.
- coqui: a `.csv` whose header names `audio_file|text|speaker_name` (paths relative to it).
- commonvoice: a `.tsv` with `path`, `sentence`, `client_id` columns; audio in `clips/`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("ljspeech", "vctk", "coqui", "commonvoice")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus")

# Utterances outside these bounds are dropped: very short clips teach the aligner little and
# very long ones dominate the memory of a batch.
MIN_DURATION_S = 0.3
MAX_DURATION_S = 20.0
TARGET_SAMPLE_RATE = 22050
# A file whose loudest frame is below this is treated as silent.
SILENT_DBFS = -60.0
# Frames within this many dB of the loudest frame count as sound.
ACTIVE_RANGE_DB = 40.0
MIN_ACTIVE_SHARE = 0.2
# Share of samples at (or resampled near) full scale above which we call the file clipped.
CLIP_LEVEL = 0.99
MAX_CLIPPED_SHARE = 0.001
# Above this share of unspeakable characters the transcript no longer matches the audio.
MAX_UNSPEAKABLE_SHARE = 0.25

# Folders that archive tools add and that never hold a corpus.
_IGNORED_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class CorpusItem:
    id: str
    audio_path: Path
    text: str
    speaker: str


@dataclass(frozen=True)
class Problem:
    item_id: str
    path: str
    code: str
    message: str
    severity: str  # "error" (utterance dropped) or "warning" (kept)


def _error(item_id: str, path: str, code: str, message: str) -> Problem:
    return Problem(item_id, path, code, message, "error")


def _warning(item_id: str, path: str, code: str, message: str) -> Problem:
    return Problem(item_id, path, code, message, "warning")


# ---------------------------------------------------------------------------------------------
# Finding and detecting a corpus


def corpus_root(root: str | Path) -> Path:
    """The folder that holds the corpus: archives often wrap it in one extra folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    current = root
    for _ in range(4):
        if _detect(current) is not None:
            return current
        children = [
            p
            for p in current.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED_DIRS
        ]
        files = [p for p in current.iterdir() if p.is_file() and not p.name.startswith(".")]
        if len(children) != 1 or files:
            break
        current = children[0]
    return root


def detect_format(root: str | Path) -> str:
    """Name the layout of the corpus in `root`, or raise ValueError saying what was expected."""
    root = Path(root)
    fmt = _detect(corpus_root(root))
    if fmt is None:
        raise ValueError(
            f"could not recognise a corpus in {root.name or root}: expected one of "
            "LJSpeech (metadata.csv + wavs/), VCTK (wav48*/<speaker>/ + txt/<speaker>/), "
            "a CSV with header audio_file|text|speaker_name, "
            "or a Common Voice TSV with path and sentence columns"
        )
    return fmt


def _header_fields(path: Path) -> list[str]:
    try:
        with path.open("rb") as f:
            first = f.readline(65536)
    except OSError:
        return []
    line = _decode_line(first)[0].strip().lstrip("\ufeff")
    return [field.strip().lower() for field in re.split(r"[|,\t;]", line)]


def _detect(root: Path) -> str | None:
    csvs = sorted(root.glob("*.csv"))
    for path in csvs:
        if {"audio_file", "speaker_name"} & set(_header_fields(path)):
            return "coqui"
    if (root / "metadata.csv").is_file():
        return "ljspeech"
    for path in sorted(root.glob("*.tsv")):
        if {"path", "sentence"} & set(_header_fields(path)):
            return "commonvoice"
    if any(p.is_dir() for p in root.glob("wav48*")) and (root / "txt").is_dir():
        return "vctk"
    return None


# ---------------------------------------------------------------------------------------------
# Metadata


def _decode_line(raw: bytes) -> tuple[str, bool]:
    """UTF-8, or Latin-1 (which decodes any byte) with a flag so the row gets a warning."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("latin-1"), True


# A metadata file is read whole: 64 MB is ~500,000 lines of transcripts, far more than any
# corpus has; a bigger one is refused with this message rather than filling the worker's memory.
MAX_METADATA_BYTES = 64 * 1024**2
# One VCTK transcript is a sentence.
MAX_TRANSCRIPT_BYTES = 64 * 1024


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    with path.open("rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(
            f"{path.name} is larger than {cap // 1024**2 or cap // 1024} "
            f"{'MB' if cap >= 1024**2 else 'KB'}, more than any {what} needs; it was not read"
        )
    return data


def _read_lines(path: Path) -> list[tuple[int, str, bool]]:
    """(line number, text, was Latin-1) for each non-blank line of a metadata file."""
    data = _read_capped(path, MAX_METADATA_BYTES, "metadata file")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        text, latin1 = _decode_line(raw.rstrip(b"\r"))
        if text.strip():
            lines.append((number, text, latin1))
    return lines


def _metadata_lines(
    path: Path, root: Path, problems: list[Problem]
) -> list[tuple[int, str, bool]] | None:
    """The lines of a metadata file inside the corpus; a link leading out of it is not read,
    so a registered folder cannot be used to show other files of the server."""
    if not _inside(path, root):
        problems.append(
            _error(
                "",
                path.name,
                "outside_root",
                f"{path.name} links to a file outside the corpus folder; it was not read",
            )
        )
        return None
    try:
        return _read_lines(path)
    except ValueError as exc:
        problems.append(_error("", path.name, "metadata_too_large", str(exc)))
        return None
    except OSError as exc:
        problems.append(
            _error("", path.name, "missing_file", f"{path.name} could not be read ({exc.strerror})")
        )
        return None


def _fields(line: str, delimiter: str, quoted: bool) -> list[str]:
    """One metadata line split by the csv module: a quoted field may hold the delimiter
    ("Hello, world" in a comma-separated file). LJSpeech and Common Voice never quote, and
    their transcripts may start with a quote mark, so for them quotes are plain text."""
    if quoted:
        return next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_MINIMAL), [])
    return next(csv.reader([line], delimiter=delimiter, quoting=csv.QUOTE_NONE), [])


def _clean_text(text: str) -> str:
    # Control characters (NUL, stray escapes) never belong in a transcript.
    text = "".join(ch if ch.isprintable() or ch == " " else " " for ch in text)
    return " ".join(text.split())


def _safe_id(raw: str) -> str:
    """Ids name feature files, so keep them to letters, digits, dot, dash and underscore."""
    cleaned = re.sub(r"[^\w.-]+", "_", raw).strip("._")
    return cleaned or "item"


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _inside(path: Path, root: Path) -> bool:
    """True when `path` (symlinks followed) stays inside `root`."""
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


@dataclass
class _Row:
    """One utterance as the metadata describes it, before files are checked."""

    id: str
    audio_rel: str  # as written in the metadata; "" when it had none
    audio_path: Path | None
    text: str | None
    speaker: str
    where: str  # "metadata.csv line 12", for messages
    latin1: bool = False


def _finish(rows: Iterable[_Row], root: Path) -> tuple[list[CorpusItem], list[Problem]]:
    """Turn rows into items, dropping the ones with missing files, transcripts or repeated ids."""
    items: list[CorpusItem] = []
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for row in rows:
        path_text = row.audio_rel or (_rel(row.audio_path, root) if row.audio_path else "")
        if row.id in seen:
            problems.append(
                _error(
                    row.id,
                    path_text,
                    "duplicate_id",
                    f"id {row.id!r} ({row.where}) was already used by {seen[row.id]}; "
                    "only the first is kept",
                )
            )
            continue
        seen[row.id] = row.where
        if row.latin1:
            problems.append(
                _warning(
                    row.id,
                    path_text,
                    "bad_encoding",
                    f"{row.where} is not valid UTF-8; read it as Latin-1, check the text "
                    "(save the metadata as UTF-8 to silence this)",
                )
            )
        if row.audio_path is None:
            problems.append(
                _error(row.id, path_text, "missing_file", f"{row.where} names no audio file")
            )
            continue
        if not _inside(row.audio_path, root):
            problems.append(
                _error(
                    row.id,
                    path_text,
                    "outside_root",
                    f"{row.where} points at {path_text!r}, which is outside the corpus folder",
                )
            )
            continue
        if not row.audio_path.is_file():
            problems.append(
                _error(
                    row.id,
                    path_text,
                    "missing_file",
                    f"{path_text} (from {row.where}) does not exist",
                )
            )
            continue
        if row.audio_path.stat().st_size == 0:
            problems.append(
                _error(row.id, path_text, "empty_audio", f"{path_text} is an empty (0-byte) file")
            )
            continue
        text = _clean_text(row.text or "")
        if not text:
            problems.append(
                _error(
                    row.id,
                    path_text,
                    "missing_transcript",
                    f"{path_text} has no transcript"
                    + (" (the text field is empty)" if row.text is not None else ""),
                )
            )
            continue
        items.append(CorpusItem(row.id, row.audio_path, text, row.speaker or "speaker"))
    return items, problems


def _find_audio(folder: Path, stem: str) -> Path | None:
    for ext in AUDIO_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _ids_from_paths(rel_paths: list[str]) -> list[str]:
    """Ids from audio paths: the path below the folder all of them share, without extension."""
    # Rows that climb out or are absolute are dropped later; they must not change the others' ids.
    parents = [
        Path(p).parent.parts
        for p in rel_paths
        if p and not Path(p).is_absolute() and ".." not in Path(p).parts
    ]
    common: tuple[str, ...] = ()
    if parents:
        common = parents[0]
        for parts in parents[1:]:
            n = 0
            while n < min(len(common), len(parts)) and common[n] == parts[n]:
                n += 1
            common = common[:n]
    ids = []
    for p in rel_paths:
        parts = Path(p).with_suffix("").parts[len(common) :]
        ids.append(_safe_id("_".join(parts)))
    return ids


def _read_ljspeech(root: Path) -> tuple[list[CorpusItem], list[Problem]]:
    meta = root / "metadata.csv"
    rows: list[_Row] = []
    problems: list[Problem] = []
    wavs = root / "wavs"
    for number, line, latin1 in _metadata_lines(meta, root, problems) or []:
        fields = _fields(line, "|", quoted=False)
        raw_id = fields[0].strip() if fields else ""
        item_id = _safe_id(raw_id)
        where = f"metadata.csv line {number}"
        # The third field is the normalised text (numbers spelled out); prefer it when present.
        text = None
        if len(fields) >= 3 and fields[2].strip():
            text = fields[2]
        elif len(fields) >= 2:
            text = fields[1]
        audio = _find_audio(wavs, raw_id) if raw_id else None
        audio_rel = f"wavs/{audio.name}" if audio else f"wavs/{raw_id}.wav"
        rows.append(
            _Row(
                item_id, audio_rel, audio or wavs / f"{raw_id}.wav", text, "speaker", where, latin1
            )
        )
    return _finish(rows, root)


def _table_rows(
    path: Path, root: Path, delimiter: str, audio_col: str, text_col: str, speaker_col: str
) -> tuple[list[_Row], list[Problem]]:
    """Rows of a table with a header line; a missing column becomes one clear problem."""
    problems: list[Problem] = []
    lines = _metadata_lines(path, root, problems)
    name = path.name
    if lines is None:
        return [], problems
    if not lines:
        return [], [_error("", name, "missing_column", f"{name} is empty")]
    # Common Voice's TSV never quotes; Coqui-style tables may (pandas writes quotes as needed).
    quoted = delimiter != "\t"
    header = [h.strip().lower().lstrip("\ufeff") for h in _fields(lines[0][1], delimiter, quoted)]
    missing = [c for c in (audio_col, text_col) if c not in header]
    if missing:
        names = " and ".join(repr(c) for c in missing)
        plural = "columns" if len(missing) > 1 else "column"
        problems.append(
            _error(
                "",
                name,
                "missing_column",
                f"{name} has no {names} {plural}; its header is "
                f"{delimiter.join(header)!r}, expected "
                f"{delimiter.join((audio_col, text_col, speaker_col))!r}. No utterance was read.",
            )
        )
        return [], problems
    if speaker_col not in header:
        problems.append(
            _warning(
                "",
                name,
                "missing_column",
                f"{name} has no {speaker_col!r} column; all utterances belong to one speaker",
            )
        )
    ai, ti = header.index(audio_col), header.index(text_col)
    si = header.index(speaker_col) if speaker_col in header else None
    base = path.parent
    rows = []
    for number, line, latin1 in lines[1:]:
        fields = _fields(line, delimiter, quoted)
        audio_rel = fields[ai].strip() if ai < len(fields) else ""
        text = fields[ti] if ti < len(fields) else None
        speaker = fields[si].strip() if si is not None and si < len(fields) else ""
        audio_path = (base / audio_rel) if audio_rel else None
        rows.append(_Row("", audio_rel, audio_path, text, speaker, f"{name} line {number}", latin1))
    return rows, problems


def _sniff_delimiter(path: Path) -> str:
    try:
        with path.open("rb") as f:
            line = _decode_line(f.readline(65536))[0]
    except OSError:
        return "|"
    for delimiter in ("|", "\t", ",", ";"):
        if delimiter in line:
            return delimiter
    return "|"


def _read_coqui(root: Path) -> tuple[list[CorpusItem], list[Problem]]:
    metas = [p for p in sorted(root.glob("*.csv")) if "audio_file" in _header_fields(p)]
    if not metas:
        metas = [p for p in sorted(root.glob("*.csv")) if "speaker_name" in _header_fields(p)]
    rows: list[_Row] = []
    problems: list[Problem] = []
    for meta in metas:
        table, table_problems = _table_rows(
            meta, root, _sniff_delimiter(meta), "audio_file", "text", "speaker_name"
        )
        rows += table
        problems += table_problems
    ids = _ids_from_paths([r.audio_rel for r in rows])
    for row, item_id in zip(rows, ids, strict=True):
        row.id = item_id if row.audio_rel else _safe_id(row.where)
    items, more = _finish(rows, root)
    return items, problems + more


def _read_commonvoice(root: Path) -> tuple[list[CorpusItem], list[Problem]]:
    tsvs = [p for p in sorted(root.glob("*.tsv")) if "path" in _header_fields(p)]
    # validated.tsv is the union of the splits; without it read the splits we have.
    preferred = [p for p in tsvs if p.name == "validated.tsv"]
    if not preferred:
        preferred = [p for p in tsvs if p.stem in ("train", "dev", "test")] or tsvs
    if not preferred:
        tsvs = sorted(root.glob("*.tsv"))
        preferred = tsvs[:1]
    clips = root / "clips" if (root / "clips").is_dir() else root
    rows: list[_Row] = []
    problems: list[Problem] = []
    listed: set[str] = set()
    for tsv in preferred:
        table, table_problems = _table_rows(tsv, root, "\t", "path", "sentence", "client_id")
        problems += table_problems
        for row in table:
            # The same clip appears in several split files; that is not a duplicate.
            if len(preferred) > 1 and row.audio_rel in listed:
                continue
            listed.add(row.audio_rel)
            row.audio_path = clips / row.audio_rel if row.audio_rel else None
            if row.audio_path is not None:
                row.audio_rel = _rel(row.audio_path, root)
            row.id = _safe_id(Path(row.audio_rel).stem) if row.audio_rel else _safe_id(row.where)
            # Client ids are 128 hex digits; a 16-digit prefix is unique enough and readable.
            row.speaker = row.speaker[:16]
            rows.append(row)
    items, more = _finish(rows, root)
    return items, problems + more


def _read_vctk(root: Path) -> tuple[list[CorpusItem], list[Problem]]:
    txt_root = root / "txt"
    audio_by_id: dict[str, Path] = {}
    speaker_of: dict[str, str] = {}
    for wav_dir in sorted(p for p in root.glob("wav48*") if p.is_dir()):
        for speaker_dir in sorted(p for p in wav_dir.iterdir() if p.is_dir()):
            for audio in sorted(speaker_dir.iterdir()):
                if audio.suffix.lower() not in AUDIO_EXTENSIONS:
                    continue
                # VCTK 0.92 has two microphones per utterance; mic1 is the one most use.
                stem = re.sub(r"_mic[12]$", "", audio.stem)
                if stem in audio_by_id and not audio.stem.endswith("_mic1"):
                    continue
                audio_by_id[stem] = audio
                speaker_of[stem] = speaker_dir.name
    text_by_id: dict[str, tuple[str, bool]] = {}
    if txt_root.is_dir():
        for txt in sorted(txt_root.glob("*/*.txt")):
            if not _inside(txt, root):
                continue
            try:
                data = _read_capped(txt, MAX_TRANSCRIPT_BYTES, "transcript")
            except (OSError, ValueError):
                continue
            data = data.lstrip(b"\xef\xbb\xbf")
            text_by_id[txt.stem] = _decode_line(data)
            speaker_of.setdefault(txt.stem, txt.parent.name)
    rows = []
    for stem in sorted(set(audio_by_id) | set(text_by_id)):
        found = audio_by_id.get(stem)
        text, latin1 = text_by_id.get(stem, (None, False))
        where = f"txt/{speaker_of[stem]}/{stem}.txt" if stem in text_by_id else "the audio folder"
        audio_rel = _rel(found, root) if found else f"wav48/{speaker_of[stem]}/{stem}.wav"
        rows.append(_Row(_safe_id(stem), audio_rel, found, text, speaker_of[stem], where, latin1))
    items, problems = _finish(rows, root)
    # A transcript without audio is a missing file; say which audio we looked for.
    problems = [
        _error(p.item_id, p.path, "missing_file", f"{p.item_id} has a transcript but no audio file")
        if p.code == "missing_file" and p.item_id not in audio_by_id
        else p
        for p in problems
    ]
    return items, problems


_READERS = {
    "ljspeech": _read_ljspeech,
    "vctk": _read_vctk,
    "coqui": _read_coqui,
    "commonvoice": _read_commonvoice,
}


def read_corpus(root: str | Path, fmt: str | None = None) -> tuple[list[CorpusItem], list[Problem]]:
    """Items whose metadata is sound, and a problem for every row that is not.

    `fmt` is one of FORMATS; None detects it. Audio is not decoded here (see `check_audio`).
    """
    base = corpus_root(root)
    if fmt is None:
        fmt = detect_format(base)
    if fmt not in _READERS:
        raise ValueError(f"unknown corpus format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _READERS[fmt](base)


# ---------------------------------------------------------------------------------------------
# Audio


def undecodable(item: CorpusItem, reason: str) -> Problem:
    """The problem for audio the decoder refused (the caller catches the decoder's error)."""
    return _error(item.id, item.audio_path.name, "undecodable", f"{item.audio_path.name}: {reason}")


def _rate_and_duration(
    item: CorpusItem, original_sr: int, duration: float, sr: int
) -> list[Problem]:
    name = item.audio_path.name
    problems = []
    if original_sr != sr:
        problems.append(
            _warning(
                item.id, name, "resampled", f"{name} is {original_sr} Hz; resampled to {sr} Hz"
            )
        )
    if duration < MIN_DURATION_S:
        problems.append(
            _error(
                item.id,
                name,
                "too_short",
                f"{name} lasts {duration:.2f} s; at least {MIN_DURATION_S:g} s is needed",
            )
        )
    elif duration > MAX_DURATION_S:
        problems.append(
            _error(
                item.id,
                name,
                "too_long",
                f"{name} lasts {duration:.1f} s; at most {MAX_DURATION_S:g} s fits a batch "
                "(split it into sentences)",
            )
        )
    return problems


@dataclass(frozen=True)
class AudioInfo:
    duration_s: float
    sample_rate: int


def probe_audio(
    item: CorpusItem, sr: int = TARGET_SAMPLE_RATE
) -> tuple[AudioInfo | None, list[Problem]]:
    """What the file's header says (duration, rate) and the problems visible from it alone.

    Milliseconds per file, so a corpus can be listed and judged before the slower full decode
    of preprocessing, which runs `check_audio` on the samples and has the last word.
    """
    import soundfile as sf

    name = item.audio_path.name
    try:
        info = sf.info(str(item.audio_path))
    except (RuntimeError, TypeError, OSError) as exc:
        reason = str(exc).split(": ", 1)[-1] if str(exc) else type(exc).__name__
        return None, [undecodable(item, f"cannot decode audio ({reason})")]
    if info.frames <= 0 or info.samplerate <= 0:
        return AudioInfo(0.0, int(info.samplerate)), [
            _error(item.id, name, "empty_audio", f"{name} holds no audio samples")
        ]
    audio = AudioInfo(info.frames / info.samplerate, int(info.samplerate))
    problems = _rate_and_duration(item, audio.sample_rate, audio.duration_s, sr)
    return audio, problems


def _frame_db(wav: np.ndarray, frame: int = 1024, hop: int = 256) -> np.ndarray:
    if wav.size < frame:
        wav = np.pad(wav, (0, frame - wav.size))
    n = 1 + (wav.size - frame) // hop
    frames = np.lib.stride_tricks.as_strided(
        wav, shape=(n, frame), strides=(wav.strides[0] * hop, wav.strides[0])
    )
    rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
    return 20.0 * np.log10(rms + 1e-10)


def check_audio(
    item: CorpusItem,
    wav,
    original_sr: int,
    lang: str,
    sr: int = TARGET_SAMPLE_RATE,
) -> list[Problem]:
    """Problems with one decoded utterance.

    `wav` is the mono waveform at `sr` (as `training.audio.load_audio` returns it) and
    `original_sr` the file's own rate. Errors mean the utterance should be dropped.
    """
    name = item.audio_path.name
    samples = np.asarray(wav.detach().cpu() if hasattr(wav, "detach") else wav, dtype=np.float32)
    samples = samples.reshape(-1)
    problems: list[Problem] = []
    if samples.size == 0:
        return [_error(item.id, name, "empty_audio", f"{name} decodes to no samples")]
    if not np.isfinite(samples).all():
        return [_error(item.id, name, "undecodable", f"{name} decodes to NaN or infinite samples")]
    problems += _rate_and_duration(item, original_sr, samples.size / sr, sr)
    db = _frame_db(samples)
    peak_db = float(db.max())
    if peak_db < SILENT_DBFS:
        problems.append(
            _error(
                item.id,
                name,
                "mostly_silence",
                f"{name} holds only digital silence"
                if peak_db < -120
                else f"{name} is silent (loudest part {peak_db:.0f} dBFS)",
            )
        )
    else:
        active = float(np.mean(db > peak_db - ACTIVE_RANGE_DB))
        if active < MIN_ACTIVE_SHARE:
            problems.append(
                _error(
                    item.id,
                    name,
                    "mostly_silence",
                    f"{name} is mostly silence: only {active:.0%} of it has sound",
                )
            )
    clipped = float(np.mean(np.abs(samples) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_SHARE:
        problems.append(
            _warning(
                item.id,
                name,
                "clipping",
                f"{name} is clipped: {clipped:.2%} of samples are at full scale",
            )
        )
    problems += check_text(item, lang)
    return problems


def check_text(item: CorpusItem, lang: str) -> list[Problem]:
    """Characters the text front-end cannot speak; too many of them and the item is dropped."""
    from training.text import unspeakable  # owned by the data side; imported when used

    bad = unspeakable(item.text, lang)
    if not bad:
        return []
    shown = " ".join(sorted(repr(c)[1:-1] for c in bad))
    considered = [c for c in item.text if not c.isspace()]
    share = sum(c in bad for c in considered) / max(1, len(considered))
    name = item.audio_path.name
    if share > MAX_UNSPEAKABLE_SHARE:
        return [
            _error(
                item.id,
                name,
                "unspeakable_chars",
                f"{share:.0%} of the transcript cannot be spoken by the {lang!r} front-end "
                f"({shown}); is the language right?",
            )
        ]
    return [
        _warning(
            item.id,
            name,
            "unspeakable_chars",
            f"the {lang!r} front-end cannot speak {shown}; those characters are skipped",
        )
    ]
