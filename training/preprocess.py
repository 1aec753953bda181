"""Turn a corpus into the feature cache that training reads, once.

Per utterance: decode, check, trim, normalise loudness, then log-mel, pitch, energy, tokens and
the speaker embedding, saved to `feats/<id>.pt`. Training never touches audio again.

The cache is complete when `meta.json` exists: it is removed when a run starts and written
last. A stopped or crashed run leaves finished feature files behind, and the next run keeps
every one whose source file, transcript and settings are unchanged.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from training import audio as A
from training.speaker_embedding import ENCODER_SAMPLE_RATE, embed_wav, mean_embedding
from training.text import Frontend, SymbolTable

# Part of every feature file's source key: bump it when feature extraction changes, so old
# files are redone rather than mixed with new ones.
FORMAT_VERSION = 2
VAL_FRACTION = 0.05


@dataclass
class PreprocessResult:
    out_dir: Path
    total: int = 0
    kept: int = 0
    dropped: int = 0
    reused: int = 0  # feature files from an earlier run that were still valid
    train: int = 0
    val: int = 0
    audio_seconds: float = 0.0  # of the kept utterances, after trimming
    elapsed_s: float = 0.0
    stopped: bool = False
    text_backend: str = ""
    problems: list = field(default_factory=list)  # training.corpus.Problem
    # The quality gate: item id -> clip_quality.Verdict.to_dict() plus its scores, and how
    # many clips of each kind it left out of training.
    verdicts: dict = field(default_factory=dict)
    left_out: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Job:
    """What a worker needs to know about one utterance: plain values, so it pickles."""

    id: str
    audio_path: str
    text: str
    speaker: str
    feats: str  # relative to out_dir
    phonemes: tuple[str, ...] = ()  # the front-end's tokens, made once in the main process


def feature_name(item_id: str) -> str:
    """A file name for an utterance id; ids with unsafe characters get a hash to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", item_id).strip(".") or "item"
    if safe != item_id:
        safe += "-" + hashlib.sha1(item_id.encode()).hexdigest()[:8]
    return f"feats/{safe}.pt"


def split_of(item_id: str, val_fraction: float = VAL_FRACTION) -> str:
    """Stable across runs and machines: depends only on the id, never on order or RNG."""
    return "val" if _unit_hash(item_id) < val_fraction else "train"


def _unit_hash(item_id: str) -> float:
    digest = hashlib.sha1(item_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _symbols_sha(symbols: list[str]) -> str:
    return hashlib.sha1("\x00".join(symbols).encode()).hexdigest()


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- one utterance (in a worker)

_WORKER: dict = {}


def _init_worker(settings: dict) -> None:
    # One thread per process: on a shared CPU, torch's thread pool spinning in several
    # processes at once is several times slower than one thread each (measured on the LSTM
    # of the speaker encoder: 0.04 s vs 0.35 s per call).
    torch.set_num_threads(1)
    _WORKER.clear()
    _WORKER.update(settings)
    _WORKER["cfg"] = A.AudioConfig.from_dict(settings["audio"])
    _WORKER["table"] = SymbolTable.from_list(settings["symbols"])


def _source_key(job: _Job, settings: dict) -> str:
    """Changes when anything that shaped the features changes: the file, its transcript,
    the speaker, the audio settings or the text front-end."""
    try:
        st = os.stat(job.audio_path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    parts = [
        str(FORMAT_VERSION),
        job.audio_path,
        stamp,
        job.text,
        job.speaker,
        json.dumps(settings["audio"], sort_keys=True),
        settings["lang"],
        settings["backend"],
    ]
    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def _problem_dict(p) -> dict:
    return {
        "item_id": p.item_id,
        "path": p.path,
        "code": p.code,
        "message": p.message,
        "severity": p.severity,
    }


def _summary(feats: dict, job: _Job, reused: bool) -> dict:
    pitch = feats["pitch"].double()
    voiced = pitch[pitch > 0]
    en = feats["energy"].double()
    return {
        "ok": True,
        "reused": reused,
        "record": {
            "id": job.id,
            "speaker": job.speaker,
            "text": job.text,
            "n_tokens": int(feats["tokens"].numel()),
            "n_frames": int(feats["mel"].shape[-1]),
            "duration_s": round(float(feats["duration_s"]), 4),
            "feats": job.feats,
            # The real recording: the ground truth of the scores' WER (synthesis.evaluate).
            "audio_path": os.path.abspath(job.audio_path),
        },
        "problems": feats["problems"],
        "quality": feats.get("quality"),
        "spk_emb": feats["spk_emb"].numpy(),
        "sums": (
            float(voiced.sum()),
            float(voiced.pow(2).sum()),
            int(voiced.numel()),
            float(en.sum()),
            float(en.pow(2).sum()),
            int(en.numel()),
        ),
    }


def _reuse(job: _Job, path: Path, key: str) -> dict | None:
    try:
        feats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is simply redone
        return None
    if not isinstance(feats, dict) or feats.get("source_key") != key:
        return None
    phonemes = list(job.phonemes)
    if feats.get("symbols_sha") != _WORKER["symbols_sha"] or feats.get("phonemes") != phonemes:
        # Same audio, but a different corpus-wide symbol table or a changed front-end:
        # only the tokens are redone.
        tokens = _WORKER["table"].encode(phonemes)
        if not tokens:
            return None
        feats["tokens"] = torch.tensor(tokens, dtype=torch.long)
        feats["phonemes"] = phonemes
        feats["symbols_sha"] = _WORKER["symbols_sha"]
        atomic_torch_save(feats, path)
    if _needs_quality(feats.get("quality")):
        # A cache from before the quality gate (or without a recogniser then): score the clip
        # once from its audio, and keep every feature as it is.
        cfg: A.AudioConfig = _WORKER["cfg"]
        raw, _ = A.load_audio(job.audio_path, cfg.sample_rate)
        trimmed = A.normalise_loudness(A.trim_silence(raw, cfg.sample_rate))
        feats["quality"] = _quality(raw, trimmed, feats["pitch"], job)
        atomic_torch_save(feats, path)
    return _summary(feats, job, reused=True)


def _needs_quality(quality) -> bool:
    if not _WORKER.get("quality", True):
        return False
    # A cache scored before transcripts were aligned (or with alignment off then) is scored
    # again once alignment is wanted; the features themselves stay.
    return not isinstance(quality, dict) or bool(_WORKER.get("align") and "align" not in quality)


def _quality(raw, trimmed, f0, job: _Job, trimmed_16k=None) -> dict | None:
    """The gate's scores of one clip; `trimmed_16k`, when the caller has it, is `trimmed` at
    16 kHz (the speaker encoder's rate and the recogniser's), so it is not resampled twice."""
    if not _WORKER.get("quality", True):
        return None
    from training import clip_quality

    cfg: A.AudioConfig = _WORKER["cfg"]
    scores = clip_quality.score_clip(raw, trimmed, f0, cfg.sample_rate, job.phonemes)
    if _WORKER.get("align"):
        if trimmed_16k is None:
            trimmed_16k = A.resample(trimmed, cfg.sample_rate, clip_quality.ASR_SAMPLE_RATE)
        try:
            scores.update(
                clip_quality.alignment_scores(
                    trimmed_16k,
                    clip_quality.ASR_SAMPLE_RATE,
                    job.text,
                    job.phonemes,
                    f0,
                )
            )
        except Exception as exc:  # the recogniser must never cost a clip its features
            scores.update({"align": "skipped", "align_error": f"{type(exc).__name__}: {exc}"})
    return scores


def process_item(job: _Job) -> dict:
    """Features for one utterance, or the problems that drop it. Runs inside a worker."""
    try:
        return _process_item(job)
    except Exception as exc:  # one odd file must not end a run over thousands
        name = Path(job.audio_path).name
        problem = {
            "item_id": job.id,
            "path": name,
            "code": "preprocess_failed",
            "message": f"{name}: feature extraction failed ({type(exc).__name__}: {exc})",
            "severity": "error",
        }
        return {"ok": False, "problems": [problem]}


def _process_item(job: _Job) -> dict:
    from training.corpus import CorpusItem, check_audio, undecodable

    out_dir = Path(_WORKER["out_dir"])
    path = out_dir / job.feats
    key = _source_key(job, _WORKER)
    if path.exists():
        done = _reuse(job, path, key)
        if done is not None:
            return done

    cfg: A.AudioConfig = _WORKER["cfg"]
    item = CorpusItem(job.id, Path(job.audio_path), job.text, job.speaker)
    try:
        wav, original_sr = A.load_audio(job.audio_path, cfg.sample_rate)
    except A.AudioError as exc:
        return {"ok": False, "problems": [_problem_dict(undecodable(item, str(exc)))]}
    problems = [_problem_dict(p) for p in check_audio(item, wav, original_sr, _WORKER["lang"])]
    if any(p["severity"] == "error" for p in problems):
        return {"ok": False, "problems": problems}

    phonemes = list(job.phonemes)
    tokens = _WORKER["table"].encode(phonemes)
    if not tokens:
        problems.append(
            {
                "item_id": job.id,
                "path": Path(job.audio_path).name,
                "code": "missing_transcript",
                "message": f"{Path(job.audio_path).name}: the transcript has nothing speakable",
                "severity": "error",
            }
        )
        return {"ok": False, "problems": problems}

    raw = wav
    wav = A.normalise_loudness(A.trim_silence(wav, cfg.sample_rate))
    with torch.inference_mode():
        mel, en = A.mel_and_energy(wav, cfg)
        f0 = A.pitch(wav, cfg.sample_rate, cfg.hop_length)
        # The wav is already trimmed and normalised: embed_speech's steps, done once here
        # because the mel, pitch and energy need them too. At 16 kHz it also feeds the
        # gate's transcript alignment.
        wav_16k = A.resample(wav, cfg.sample_rate, ENCODER_SAMPLE_RATE)
        spk = embed_wav(wav_16k, ENCODER_SAMPLE_RATE, device=_WORKER["device"])
    feats = {
        "mel": mel.to(torch.float16),
        "pitch": f0.float(),
        "energy": en.float(),
        "tokens": torch.tensor(tokens, dtype=torch.long),
        "spk_emb": torch.from_numpy(spk).float(),
        "phonemes": phonemes,
        "duration_s": wav.numel() / cfg.sample_rate,
        "problems": problems,
        "source_key": key,
        "symbols_sha": _WORKER["symbols_sha"],
        "quality": _quality(raw, wav, f0, job, wav_16k),
    }
    atomic_torch_save(feats, path)
    return _summary(feats, job, reused=False)


# ---------------------------------------------------------------- the corpus


def _jobs(items: Iterable, frontend: Frontend) -> list[_Job]:
    """Accepts training.corpus.CorpusItem or anything with id, audio_path, text, speaker.
    Phonemising here (~1 ms a line) gives the symbol table before any audio is touched, so
    token ids go straight into each feature file, and workers never load espeak-ng."""
    jobs, seen = [], set()
    for it in items:
        if it.id in seen:
            continue  # read_corpus already reported the duplicate; first one wins
        seen.add(it.id)
        jobs.append(_Job(str(it.id), str(it.audio_path), str(it.text), str(it.speaker), ""))
    names = [feature_name(j.id) for j in jobs]
    return [
        _Job(j.id, j.audio_path, j.text, j.speaker, name, tuple(frontend.tokens(j.text)))
        for j, name in zip(jobs, names, strict=True)
    ]


def _split(ids: list[str], val_fraction: float) -> dict[str, str]:
    split = {i: split_of(i, val_fraction) for i in ids}
    if len(ids) >= 2 and val_fraction > 0 and "val" not in split.values():
        # A tiny corpus still gets one validation item: the one whose hash is lowest, so the
        # choice is as stable as the hash split itself.
        split[min(ids, key=_unit_hash)] = "val"
    if ids and "train" not in split.values():
        split[max(ids, key=_unit_hash)] = "train"
    return split


def _mean_std(total: float, total_sq: float, n: int) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    mean = total / n
    var = max(0.0, total_sq / n - mean * mean)
    return mean, max(math.sqrt(var), 1e-5)


def preprocess_corpus(
    items: Iterable,
    out_dir: str | Path,
    lang: str = "en",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    workers: int = 1,
    text_backend: str = "auto",
    audio_cfg: A.AudioConfig = A.DEFAULT,
    val_fraction: float = VAL_FRACTION,
    device: str = "cpu",
    known_problems: Iterable = (),
    quality: bool = True,
    overrides: dict[str, str] | None = None,
    asr: str = "inconclusive",
    part: tuple[int, int] | None = None,
) -> PreprocessResult:
    """Build (or finish) the feature cache of `items` in `out_dir`.

    `part=(k, n)` extracts only every n-th utterance from the k-th on (one of n workers sharing
    a large corpus) and stops there: its feature files are named and stamped with the whole
    corpus's symbol table, so a last pass over all `items` reuses them and writes the cache.

    `known_problems` (e.g. read_corpus's metadata problems) go into problems.jsonl too.
    `workers` > 1 uses that many processes (spawned, so CUDA and espeak state are never
    shared by a fork). `quality` runs the quality gate (training.clip_quality): clips it
    drops, or that `overrides` (item id -> "keep" | "drop", a person's review) drop, stay out
    of items.jsonl; every verdict goes to quality/verdicts.jsonl. `asr` is the English
    transcript check: "inconclusive" aligns every transcript and recognises the clips whose
    transcript goes to review (clip_quality.asr_targets), "all" recognises every clip too,
    "off" does neither.
    """
    from training.corpus import Problem

    started = time.perf_counter()
    out = Path(out_dir)
    (out / "feats").mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # from here until the end: not a usable cache
    # Half-written files of a process killed mid-write: never read (names start with "."),
    # but they would pile up with every crash.
    for leftover in (out / "feats").glob(".*.tmp"):
        leftover.unlink(missing_ok=True)

    from training.clip_quality import asr_available

    frontend = Frontend(lang, text_backend)
    jobs = _jobs(items, frontend)
    table = SymbolTable.from_tokens(j.phonemes for j in jobs)
    settings = {
        "out_dir": str(out),
        "lang": lang,
        "backend": frontend.backend,
        "audio": audio_cfg.to_dict(),
        "symbols": table.to_list(),
        "symbols_sha": _symbols_sha(table.to_list()),
        "device": device,
        "quality": quality,
        # English transcripts are force-aligned in the workers (training.clip_quality): the
        # check that catches a wrong transcript on every clip at a third of the recogniser's
        # cost. The same switch as the recogniser's, so "off" really is off.
        "align": bool(quality and asr != "off" and lang == "en" and asr_available()),
    }
    if part is not None and not 0 <= part[0] < part[1]:
        raise ValueError(f"part {part[0]} of {part[1]} does not exist")
    todo = jobs if part is None else jobs[part[0] :: part[1]]
    result = PreprocessResult(out_dir=out, total=len(todo), text_backend=frontend.backend)
    result.problems = [p if isinstance(p, Problem) else Problem(**p) for p in known_problems]
    outcomes: dict[str, dict] = {}
    if progress:
        progress(0, len(todo))

    def collect(job: _Job, outcome: dict) -> None:
        outcomes[job.id] = outcome
        if progress:
            progress(len(outcomes), len(todo))

    if workers > 1 and multiprocessing.current_process().daemon:
        # A daemonic process (e.g. a task in Celery's prefork pool) may not start children.
        workers = 1
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            _init_worker(settings)
            for job in todo:
                if should_stop and should_stop():
                    result.stopped = True
                    break
                collect(job, process_item(job))
        finally:
            torch.set_num_threads(threads)
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(settings,)
        ) as pool:
            pending = {pool.submit(process_item, job): job for job in todo}
            try:
                for fut in cf.as_completed(pending):
                    collect(pending[fut], fut.result())
                    if should_stop and should_stop():
                        result.stopped = True
                        break
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    for job in jobs:  # corpus order, not completion order
        for p in outcomes.get(job.id, {}).get("problems", []):
            result.problems.append(Problem(**p))
    result.elapsed_s = time.perf_counter() - started
    if result.stopped or part is not None:
        result.kept = sum(o["ok"] for o in outcomes.values())
        return result

    kept = [(job, outcomes[job.id]) for job in jobs if outcomes[job.id]["ok"]]
    if quality:
        kept = _apply_gate(kept, out, result, overrides or {}, settings, asr)
    result.kept = len(kept)
    result.dropped = len(jobs) - len(kept)
    result.reused = sum(o["reused"] for _, o in kept)
    split = _split([job.id for job, _ in kept], val_fraction)
    result.train = sum(s == "train" for s in split.values())
    result.val = sum(s == "val" for s in split.values())
    result.audio_seconds = sum(o["record"]["duration_s"] for _, o in kept)

    sums = np.sum([o["sums"] for _, o in kept], axis=0) if kept else np.zeros(6)
    pitch_mean, pitch_std = _mean_std(sums[0], sums[1], int(sums[2]))
    energy_mean, energy_std = _mean_std(sums[3], sums[4], int(sums[5]))
    by_speaker: dict[str, list] = {}
    for job, o in kept:
        by_speaker.setdefault(job.speaker, []).append(o["spk_emb"])
    speakers = sorted(by_speaker)

    lines = []
    for job, o in kept:
        rec = dict(o["record"], split=split[job.id])
        lines.append(json.dumps(rec, ensure_ascii=False))
    _atomic_write_text(out / "items.jsonl", "".join(line + "\n" for line in lines))
    _atomic_write_text(
        out / "problems.jsonl",
        "".join(json.dumps(_problem_dict(p), ensure_ascii=False) + "\n" for p in result.problems),
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "audio": audio_cfg.to_dict(),
        "language": lang,
        "text": {"lang": lang, "backend": frontend.backend},
        "symbols": table.to_list(),
        "speakers": speakers,
        "speaker_embeddings": {
            s: [round(float(v), 6) for v in mean_embedding(by_speaker[s])] for s in speakers
        },
        "stats": {
            "pitch_mean": pitch_mean,
            "pitch_std": pitch_std,
            "energy_mean": energy_mean,
            "energy_std": energy_std,
        },
        "val_fraction": val_fraction,
        "counts": {
            "items": result.kept,
            "train": result.train,
            "val": result.val,
            "dropped": result.dropped,
        },
        "audio_seconds": round(result.audio_seconds, 3),
    }
    _atomic_write_text(out / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1))
    result.elapsed_s = time.perf_counter() - started
    return result


# ---------------------------------------------------------------- the quality gate


def _apply_gate(
    kept: list, out: Path, result: PreprocessResult, overrides: dict, settings: dict, asr: str
) -> list:
    """Judge every decoded clip against its speaker; return those that still train.

    The cheap scores came from the workers. pocketsphinx, the one expensive score, runs here
    afterwards on the clips that need it, since which ones do depends on the speaker's
    medians, known only once every clip is scored.
    """
    from training import clip_quality
    from training.corpus import Problem

    scores = {job.id: o["quality"] for job, o in kept if o.get("quality")}
    speakers = {job.id: job.speaker for job, _ in kept}
    embeddings = {job.id: o["spk_emb"] for job, o in kept}
    if asr != "off" and settings["lang"] == "en" and clip_quality.asr_available():
        cheap = clip_quality.judge(scores, speakers, embeddings)
        wanted = clip_quality.asr_targets(cheap, speakers, asr)
        targets = [job for job, _ in kept if job.id in wanted]
        heard = _hear(targets, [job for job, _ in kept], out, settings)
        for job in targets:
            if job.id in heard:
                said = clip_quality.asr_scores(job.text, heard[job.id])
                scores[job.id] = dict(scores[job.id], **said)
    verdicts = clip_quality.judge(scores, speakers, embeddings, overrides)
    still, lines = [], []
    left_out: dict[str, int] = {}
    for job, o in kept:
        v = verdicts.get(job.id)
        if v is None:
            still.append((job, o))
            continue
        record = dict(v.to_dict(), id=job.id, speaker=job.speaker, scores=scores[job.id])
        result.verdicts[job.id] = record
        lines.append(json.dumps(record, ensure_ascii=False))
        if v.verdict == "drop":
            kind = clip_quality.primary_kind(v)
            left_out[kind] = left_out.get(kind, 0) + 1
        else:
            still.append((job, o))
        if v.verdict in ("review", "drop"):
            name = Path(job.audio_path).name
            result.problems.append(
                Problem(
                    item_id=job.id,
                    path=name,
                    code=f"quality_{v.verdict}",
                    message=f"{name}: {v.verdict} ({v.reasons[0]['code']}): "
                    + "; ".join(r["message"] for r in v.reasons),
                    severity="error" if v.verdict == "drop" else "warning",
                )
            )
    (out / "quality").mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "quality" / "verdicts.jsonl", "".join(x + "\n" for x in lines))
    result.left_out = dict(sorted(left_out.items()))
    return still


def _hear(targets: list[_Job], everyone: list[_Job], out: Path, settings: dict) -> dict:
    """What pocketsphinx hears in each target clip, reusing what an earlier run heard in a clip
    whose audio and transcript are unchanged (quality/asr.jsonl)."""
    from training import clip_quality

    folder = out / "quality"
    folder.mkdir(parents=True, exist_ok=True)
    cache_path = folder / "asr.jsonl"
    cache: dict[str, dict] = {}
    if cache_path.is_file():
        for line in cache_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                cache[row["id"]] = row
            except (ValueError, KeyError):
                continue  # a torn line from a crash: that clip is simply heard again
    heard: dict[str, str] = {}
    todo = []
    for job in targets:
        key = _source_key(job, settings)
        if cache.get(job.id, {}).get("key") == key:
            heard[job.id] = cache[job.id]["heard"]
        else:
            todo.append((job, key))
    if todo:
        lm = folder / "corpus.arpa"
        _atomic_write_text(lm, clip_quality.corpus_language_model(j.text for j in everyone))
        recogniser = clip_quality.CorpusRecogniser(lm)
        cfg = A.AudioConfig.from_dict(settings["audio"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for job, key in todo:
                try:
                    raw, _ = A.load_audio(job.audio_path, cfg.sample_rate)
                    wav = A.normalise_loudness(A.trim_silence(raw, cfg.sample_rate))
                    heard[job.id] = recogniser.transcribe(wav, cfg.sample_rate)
                except Exception:  # a file gone since its features were made: judged without
                    continue
                cache[job.id] = {"id": job.id, "key": key, "heard": heard[job.id]}
        finally:
            torch.set_num_threads(threads)
            recogniser.close()
        _atomic_write_text(
            cache_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cache.values())
        )
    return heard
