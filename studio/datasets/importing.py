"""Getting a person's recordings in: import, validation, preprocessing, and what the page shows.

Two steps, each a Celery task on the `cpu` queue (see studio.datasets.tasks):

1. Import: unpack the upload (or take the registered folder), read the metadata with
   `training.corpus`, probe every audio file's header, and store one `Utterance` row per file
   with its problems. Headers only, so a corpus of thousands is listed in seconds.
2. Preprocess: decode, check and cache features with `training.preprocess`, then store the
   final problems, the train/validation split and each speaker's mean embedding.

Both steps can be run again after a worker dies: import skips rows it already wrote, and
preprocessing keeps every finished feature file. Each step first claims the dataset
(`Dataset.claim`, like a run's claim): a second task for a dataset whose worker is alive does
nothing, every write of the step is conditional on the claim, and a heartbeat on the database's
clock tells a dead step from a running one.

Rows of files that are not utterances (a skipped archive member, a metadata file with a
missing column) are stored as unusable `Utterance` rows with an empty audio path and an
item id in parentheses, so the problems table and its CSV show every message in one place.

Each stored problem carries its stage: "archive" (a member left out), "metadata" (from
`read_corpus`), "header" (from `probe_audio` at import) and "audio" (from preprocessing, which
decoded the samples and so replaces the header findings of the utterances it processed).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from studio import workers
from studio.datasets.archives import (
    ArchiveLimits,
    ArchiveRefused,
    extract_archive,
    resolve_server_folder,
)
from studio.models import Dataset, Speaker, Utterance
from training.corpus import CorpusItem, Problem, probe_audio, read_corpus

log = logging.getLogger(__name__)

BATCH = 500
# Progress is written at most this often: each write is also the heartbeat.
PROGRESS_EVERY_S = 1.0
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def stale_after() -> timedelta:
    """A busy dataset whose row has not changed for this long has lost its worker."""
    return timedelta(seconds=settings.STUDIO_DATASET_STALE_SECONDS)


def preprocess_workers() -> int:
    """Processes for feature extraction; one per two cores leaves room for the web and training.

    One inside a daemonic process (a task in Celery's prefork pool): multiprocessing refuses
    to start children there, so the cpu worker must run with `--pool solo` to use more.
    """
    configured = settings.STUDIO_PREPROCESS_WORKERS
    wanted = max(1, configured) if configured else max(1, (os.cpu_count() or 2) // 2)
    if wanted > 1 and multiprocessing.current_process().daemon:
        log.info(
            "preprocessing in 1 process instead of %d: this is a daemonic (prefork) worker "
            "process; start the cpu worker with --pool solo to use more",
            wanted,
        )
        return 1
    return wanted


# --------------------------------------------------------------------------- where files live


def dataset_dir(dataset: Dataset) -> Path:
    return Path(settings.STUDIO_DATASETS_DIR) / str(dataset.pk)


def raw_dir(dataset: Dataset) -> Path:
    """The corpus itself: the registered folder, or where the upload was unpacked."""
    if dataset.source == Dataset.Source.FOLDER:
        return Path(dataset.source_path)
    return dataset_dir(dataset) / "raw"


def features_dir(dataset: Dataset) -> Path:
    return dataset_dir(dataset) / "features"


def _allowed_folder(folder: Path) -> bool:
    roots = [Path(r).resolve() for r in settings.STUDIO_DATASET_ROOTS]
    return any(folder == r or folder.is_relative_to(r) for r in roots)


def inside_dataset(dataset: Dataset, path: str | Path) -> bool:
    """Whether `path`, after following every link, lies inside this dataset's own files: its
    folder under the media root, or its registered folder while that is inside the allowed
    roots. Checked before a file named by metadata is read, and again before it is served."""
    try:
        real = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    folders = [dataset_dir(dataset).resolve()]
    if dataset.source == Dataset.Source.FOLDER and dataset.source_path:
        registered = Path(dataset.source_path).resolve()
        if _allowed_folder(registered):
            folders.append(registered)
    return any(real.is_relative_to(f) for f in folders)


def extraction_record(dataset: Dataset) -> Path:
    return dataset_dir(dataset) / "extracted.json"


def archive_limits() -> ArchiveLimits:
    upload = int(settings.STUDIO_MAX_UPLOAD_BYTES)
    # Audio barely compresses, so ten times the upload limit is generous for real corpora.
    total = int(getattr(settings, "STUDIO_MAX_EXTRACTED_BYTES", 10 * upload))
    return ArchiveLimits(max_total_bytes=total)


def safe_archive_name(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    cleaned = re.sub(r"[^\w.-]+", "_", base).strip("._") or "upload"
    return cleaned[-120:]


# --------------------------------------------------------------------------- creating datasets


def create_from_upload(owner, name: str, uploaded, fmt: str, language: str) -> Dataset:
    """A dataset from an uploaded archive; the import runs in the background."""
    dataset = Dataset.objects.create(
        owner=owner, name=name, source=Dataset.Source.UPLOAD, format=fmt, language=language
    )
    folder = dataset_dir(dataset) / "upload"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / safe_archive_name(uploaded.name)
    temporary = getattr(uploaded, "temporary_file_path", None)
    if temporary is not None:
        # Django already streamed the body to a temp file; moving it avoids a second copy.
        shutil.move(temporary(), target)
    else:
        with open(target, "wb") as out:
            for chunk in uploaded.chunks():
                out.write(chunk)
    dataset.source_path = str(target)
    dataset.save(update_fields=["source_path", "updated"])
    return dataset


def register_folder(owner, name: str, folder: Path, fmt: str, language: str) -> Dataset:
    """A dataset read in place from a folder already checked against STUDIO_DATASET_ROOTS."""
    dataset = Dataset.objects.create(
        owner=owner,
        name=name,
        source=Dataset.Source.FOLDER,
        source_path=str(folder),
        format=fmt,
        language=language,
    )
    return dataset


# --------------------------------------------------------------------------- import


class _Progress:
    """Throttled progress writes with an ETA from the rate of this attempt."""

    def __init__(self, dataset: Dataset, label: str):
        self.dataset = dataset
        self.label = label
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.last_write = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first_done is None:
            # Work reused from an earlier attempt finishes instantly and must not skew the ETA.
            self.first_done, self.started = done, now
        if now - self.last_write < PROGRESS_EVERY_S and done < total:
            return
        self.last_write = now
        fresh = done - self.first_done
        eta = None
        if fresh > 0 and total > done:
            eta = (now - self.started) / fresh * (total - done)
        self.dataset.set_progress(
            done / total if total else 1.0, eta, f"{self.label}: {done} of {total} files"
        )


def _problem_dict(p: Problem, stage: str) -> dict:
    return {"code": p.code, "message": p.message, "severity": p.severity, "stage": stage}


def _fail(dataset: Dataset, message: str) -> int:
    """FAILED with the reason, while this attempt holds the dataset; the rows written (0/1)."""
    written = _rows(dataset).update(
        status=Dataset.Status.FAILED,
        status_message=message,
        eta_seconds=None,
        updated=timezone.now(),
    )
    _reload(dataset)
    return written


def _reload(dataset: Dataset) -> None:
    """Read the row again, all but the claim: the attempt must keep writing under its own claim
    (and so write nothing) even after another attempt has taken the row over."""
    keep = ("id", "worker", "attempts")
    dataset.refresh_from_db(
        fields=[f.attname for f in Dataset._meta.concrete_fields if f.name not in keep]
    )


def _rows(dataset: Dataset):
    """The dataset's row while this attempt holds it (no row once another attempt took it)."""
    return dataset.claimed() if dataset.worker else Dataset.objects.filter(pk=dataset.pk)


@contextmanager
def _claimed(dataset_id: int, step: str, worker: str):
    """The dataset claimed for `step` by the worker process `worker` (this process when empty),
    with its heartbeat beating while the step runs; None when the step is not this task's to do.
    """
    ident = worker or workers.worker_ident(None)
    dataset, how = Dataset.claim(dataset_id, step, ident, workers.host_of(ident.rpartition(":")[0]))
    if dataset is None:
        log.info("dataset %s: %s not started: %s", dataset_id, step, how)
        yield None
        return
    log.info("dataset %s: %s attempt %d on %s (%s)", dataset_id, step, dataset.attempts, ident, how)
    heartbeat = workers.Heartbeat(f"dataset-{dataset_id}", dataset.beat)
    heartbeat.start()
    try:
        yield dataset
    finally:
        heartbeat.stop()


def _extract(dataset: Dataset) -> list[tuple[str, str]]:
    """Unpack the upload once; returns the skipped members and why (kept across restarts)."""
    record = extraction_record(dataset)
    if record.is_file():
        return [tuple(x) for x in json.loads(record.read_text())["skipped"]]
    archive = Path(dataset.source_path)
    raw = raw_dir(dataset)
    if raw.exists():  # a half-finished extraction from a worker that died
        shutil.rmtree(raw)
    if not archive.is_file():
        raise ArchiveRefused("the uploaded archive is gone; upload it again")
    dataset.set_progress(0.0, None, "Unpacking the archive")
    result = extract_archive(archive, raw, archive_limits())
    skipped = [(s.name, s.reason) for s in result.skipped]
    record.write_text(json.dumps({"files": len(result.files), "skipped": skipped}))
    archive.unlink(missing_ok=True)
    return skipped


def import_dataset(dataset_id: int, worker: str = "") -> Dataset | None:
    """Step 1. Returns the dataset, or None when it is gone, past this step, held by a live
    worker, or taken by another attempt meanwhile. `worker` names the calling process."""
    with _claimed(dataset_id, "import", worker) as dataset:
        if dataset is None:
            return None
        return _import(dataset)


def _import(dataset: Dataset) -> Dataset | None:
    _rows(dataset).update(status_message="Reading the metadata", progress=0.0)
    _reload(dataset)
    try:
        skipped = _extract(dataset) if dataset.source == Dataset.Source.UPLOAD else []
        root = raw_dir(dataset)
        if dataset.source == Dataset.Source.FOLDER:
            # Checked again now, not only when the form was sent: a link swapped in since
            # (or a row edited) must not lead the worker out of the allowed folders.
            root = resolve_server_folder(root, settings.STUDIO_DATASET_ROOTS)
        if not root.is_dir():
            raise ValueError(f"the folder {root} is no longer there")
        fmt = None if dataset.format == Dataset.Format.AUTO else dataset.format
        items, problems = read_corpus(root, fmt)
    except (ArchiveRefused, ValueError, OSError) as exc:
        _fail(dataset, f"Import failed: {exc}")
        return dataset
    if fmt is None:
        from training.corpus import detect_format

        _rows(dataset).update(format=detect_format(root))
    _store_items(dataset, items, problems, skipped)
    _refresh_totals(dataset)
    _reload(dataset)
    usable = dataset.utterances.filter(usable=True).count()
    if usable == 0:
        top = _top_messages(dataset)
        finished = _rows(dataset).update(
            status=Dataset.Status.FAILED,
            status_message="No usable utterances. " + top,
            progress=1.0,
            eta_seconds=None,
        )
    else:
        finished = _rows(dataset).update(
            status=Dataset.Status.IMPORTED,
            status_message=f"Imported {usable} utterances.",
            progress=1.0,
            eta_seconds=None,
        )
    if not finished:
        log.warning("dataset %s: another attempt holds it now; leaving it alone", dataset.pk)
        return None
    _reload(dataset)
    return dataset


def _top_messages(dataset: Dataset, n: int = 3) -> str:
    messages = []
    for u in dataset.utterances.filter(usable=False)[: n * 4]:
        for p in u.problems:
            if p.get("severity") == "error" and p["message"] not in messages:
                messages.append(p["message"])
    return " ".join(messages[:n])


def _store_items(
    dataset: Dataset,
    items: list[CorpusItem],
    problems: list[Problem],
    skipped: list[tuple[str, str]],
) -> None:
    existing = set(dataset.utterances.values_list("item_id", flat=True))
    speakers = {s.name: s for s in dataset.speakers.all()}
    for name in sorted({i.speaker for i in items} - set(speakers)):
        speakers[name], _ = Speaker.objects.get_or_create(dataset=dataset, name=name[:200])

    by_item: dict[str, list[Problem]] = {}
    file_rows: list[Utterance] = []
    kept_ids = {i.id for i in items}
    duplicates: Counter[str] = Counter()
    for p in problems:
        if p.item_id in kept_ids and p.code != "duplicate_id":
            by_item.setdefault(p.item_id, []).append(p)
            continue
        if p.code == "duplicate_id":
            duplicates[p.item_id] += 1
            row_id = f"{p.item_id} (duplicate {duplicates[p.item_id]})"
        elif p.item_id:
            row_id = p.item_id
        else:
            row_id = f"({p.path})"
        file_rows.append(_unusable_row(dataset, row_id, p.path, [_problem_dict(p, "metadata")]))
    for name, reason in skipped:
        p = {"code": "archive_skipped", "message": f"{name}: {reason}", "severity": "warning"}
        file_rows.append(
            _unusable_row(dataset, f"(archive) {name}", name, [dict(p, stage="archive")])
        )

    progress = _Progress(dataset, "Checking")
    rows: list[Utterance] = []
    total = len(items)
    for n, item in enumerate(items, start=1):
        if item.id in existing:
            continue
        stored = [_problem_dict(p, "metadata") for p in by_item.get(item.id, [])]
        if inside_dataset(dataset, item.audio_path):
            info, audio_problems = probe_audio(item)
            stored += [_problem_dict(p, "header") for p in audio_problems]
        else:
            # A link inside the corpus that leads out of it: never opened, never served.
            info = None
            stored.append(_outside_problem(item))
        rows.append(
            Utterance(
                dataset=dataset,
                speaker=speakers[item.speaker],
                item_id=item.id[:300],
                audio_path=str(item.audio_path),
                text=item.text,
                duration_seconds=info.duration_s if info else 0.0,
                sample_rate=info.sample_rate if info else None,
                usable=not any(p["severity"] == "error" for p in stored),
                problems=stored,
            )
        )
        if len(rows) >= BATCH:
            Utterance.objects.bulk_create(rows, ignore_conflicts=True)
            rows = []
        progress(n, total)
    rows += [r for r in file_rows if r.item_id not in existing]
    Utterance.objects.bulk_create(rows, ignore_conflicts=True)
    progress(total, total)


def _outside_problem(item: CorpusItem) -> dict:
    return {
        "code": "outside_dataset",
        "message": f"{item.audio_path.name}: the file lies outside the dataset's folder "
        "(a link that leads out of it); it was not read",
        "severity": "error",
        "stage": "header",
    }


def _unusable_row(dataset: Dataset, item_id: str, path: str, problems: list[dict]) -> Utterance:
    return Utterance(
        dataset=dataset,
        item_id=item_id[:300],
        audio_path="",
        text="",
        usable=False,
        problems=problems,
    )


def _refresh_totals(dataset: Dataset) -> None:
    """Counts on the Dataset and Speaker rows from the Utterance rows: one source of truth."""
    from django.db.models import Count, Q, Sum

    usable = Q(utterances__usable=True)
    for speaker in dataset.speakers.annotate(
        n=Count("utterances", filter=usable),
        seconds=Sum("utterances__duration_seconds", filter=usable),
    ):
        Speaker.objects.filter(pk=speaker.pk).update(
            n_utterances=speaker.n, total_seconds=speaker.seconds or 0.0
        )
    kept = dataset.utterances.filter(usable=True)
    totals = kept.aggregate(n=Count("id"), seconds=Sum("duration_seconds"))
    counts: Counter[str] = Counter()
    for problems in dataset.utterances.exclude(problems=[]).values_list("problems", flat=True):
        counts.update(p["code"] for p in problems)
    Dataset.objects.filter(pk=dataset.pk).update(
        n_utterances=totals["n"] or 0,
        total_seconds=totals["seconds"] or 0.0,
        n_speakers=dataset.speakers.filter(n_utterances__gt=0).count(),
        problem_counts=dict(sorted(counts.items())),
    )


# --------------------------------------------------------------------------- preprocessing


def preprocess_dataset(
    dataset_id: int, workers: int | None = None, worker: str = ""
) -> Dataset | None:
    """Step 2. Safe to call again after a crash: finished feature files are kept. None when
    the step is not due, a live worker holds it, or another attempt took it meanwhile."""
    with _claimed(dataset_id, "preprocess", worker) as dataset:
        if dataset is None:
            return None
        return _preprocess(dataset, workers)


def _preprocess(dataset: Dataset, workers: int | None) -> Dataset | None:
    from training.preprocess import preprocess_corpus

    dataset_id = dataset.pk
    _rows(dataset).update(progress=0.0, eta_seconds=None)
    _reload(dataset)
    # The same utterances on every attempt (those the import kept), so a repeated run builds the
    # same symbol table and every finished feature file is reused as it is.
    utterances = [
        u
        for u in dataset.utterances.exclude(audio_path="").select_related("speaker")
        if not any(
            p.get("severity") == "error" and p.get("stage") in ("metadata", "header")
            for p in u.problems
        )
    ]
    items = [
        CorpusItem(u.item_id, Path(u.audio_path), u.text, u.speaker.name if u.speaker else "")
        for u in utterances
    ]
    out = features_dir(dataset)
    last_check = [0.0, False]

    def should_stop() -> bool:
        # A deleted dataset, or one another attempt took over (this worker was thought dead),
        # stops this preprocessing; asking every few seconds is enough and keeps the loop fast.
        now = time.monotonic()
        if now - last_check[0] > 5.0:
            last_check[0] = now
            last_check[1] = not _rows(dataset).exists()
        return last_check[1]

    try:
        # A large corpus: its feature files first, in parts shared by every cpu worker; the
        # pass below then reuses them all (studio.datasets.parts).
        from studio.datasets import parts

        if parts.part_count(len(items)) > 1 and not parts.preprocess_in_parts(
            dataset, items, out, _Progress(dataset, "Preprocessing in parts"), should_stop, "cpu"
        ):
            return None
        result = preprocess_corpus(
            items,
            out,
            lang=dataset.language,
            progress=_Progress(dataset, "Preprocessing"),
            should_stop=should_stop,
            workers=workers or preprocess_workers(),
            # A person's review decisions (the review queue) win over the gate's verdicts.
            overrides={u.item_id: u.review_decision for u in utterances if u.review_decision},
            asr=settings.STUDIO_QUALITY_ASR,
        )
    except Exception as exc:  # a broken corpus must end as a readable status, not a traceback
        log.exception("preprocessing dataset %s failed", dataset_id)
        _fail(dataset, f"Preprocessing failed: {type(exc).__name__}: {exc}")
        return dataset
    if result.stopped:
        return None
    _store_features(dataset, utterances, out, result.problems, result.verdicts)
    _refresh_totals(dataset)
    _reload(dataset)
    if dataset.n_utterances == 0:
        finished = _fail(dataset, "No utterance survived preprocessing. " + _top_messages(dataset))
    else:
        finished = _rows(dataset).update(
            status=Dataset.Status.READY,
            cache_dir=str(out),
            progress=1.0,
            eta_seconds=None,
            status_message=(
                f"Ready: {result.kept} utterances ({result.train} train, {result.val} validation)"
                f" in {result.elapsed_s:.0f} s."
            ),
        )
    if not finished:
        log.warning("dataset %s: another attempt holds it now; leaving it alone", dataset_id)
        return None
    _reload(dataset)
    return dataset


def _store_features(
    dataset: Dataset,
    utterances: list[Utterance],
    out: Path,
    problems: Iterable[Problem],
    verdicts: dict | None = None,
) -> None:
    from training.data import read_items, read_meta

    records = {r["id"]: r for r in read_items(out)}
    by_item: dict[str, list[dict]] = {}
    for p in problems:
        by_item.setdefault(p.item_id, []).append(_problem_dict(p, "audio"))
    for u in utterances:
        # Preprocessing decoded the samples: its findings replace the header-only ones.
        u.problems = [p for p in u.problems if p.get("stage") not in ("header", "audio")]
        u.problems += by_item.get(u.item_id, [])
        record = records.get(u.item_id)
        u.usable = record is not None
        u.split = record["split"] if record else Utterance.Split.NONE
        # The quality gate's verdict; a clip it did not judge (not decoded) has none.
        judged = (verdicts or {}).get(u.item_id)
        u.verdict = judged["verdict"] if judged else Utterance.Verdict.UNJUDGED
        u.verdict_reasons = judged["reasons"] if judged else []
        u.quality = dict(judged["scores"], similarity=judged["similarity"]) if judged else {}
        u.badness = judged["badness"] if judged else 0.0
    Utterance.objects.bulk_update(
        utterances,
        ["problems", "usable", "split", "verdict", "verdict_reasons", "quality", "badness"],
        batch_size=BATCH,
    )
    embeddings = read_meta(out).get("speaker_embeddings", {})
    for speaker in dataset.speakers.all():
        if speaker.name in embeddings:
            Speaker.objects.filter(pk=speaker.pk).update(embedding=embeddings[speaker.name])


def delete_files(folder: Path) -> None:
    """Remove what the studio wrote for a dataset (its `dataset_dir`); a registered folder
    lives elsewhere and is never touched."""
    shutil.rmtree(folder, ignore_errors=True)
