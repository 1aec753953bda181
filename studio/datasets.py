"""Getting a person's recordings in: import, validation, preprocessing, and what the page shows.

Two steps, each a Celery task on the `cpu` queue (see studio.tasks_datasets):

1. Import: unpack the upload (or take the registered folder), read the metadata with
   `training.corpus`, probe every audio file's header, and store one `Utterance` row per file
   with its problems. Headers only, so a corpus of thousands is listed in seconds.
2. Preprocess: decode, check and cache features with `training.preprocess`, then store the
   final problems, the train/validation split and each speaker's mean embedding.

Both steps can be run again after a worker dies: import skips rows it already wrote, and
preprocessing keeps every finished feature file. The `updated` time of the Dataset row is the
heartbeat that tells a dead step from a running one.

Rows of files that are not utterances (a skipped archive member, a metadata file with a
missing column) are stored as unusable `Utterance` rows with an empty audio path and an
item id in parentheses, so the problems table and its CSV show every message in one place.

Each stored problem carries its stage: "archive" (a member left out), "metadata" (from
`read_corpus`), "header" (from `probe_audio` at import) and "audio" (from preprocessing, which
decoded the samples and so replaces the header findings of the utterances it processed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from studio.archives import ArchiveLimits, ArchiveRefused, extract_archive
from studio.models import Dataset, Speaker, Utterance
from training.corpus import CorpusItem, Problem, probe_audio, read_corpus

log = logging.getLogger(__name__)

BATCH = 500
# Progress is written at most this often: each write is also the heartbeat.
PROGRESS_EVERY_S = 1.0
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def stale_after() -> timedelta:
    """A busy dataset whose row has not changed for this long has lost its worker."""
    return timedelta(seconds=float(os.environ.get("STUDIO_DATASET_STALE_SECONDS", 300)))


def preprocess_workers() -> int:
    """Processes for feature extraction; one per two cores leaves room for the web and training.

    One inside a daemonic process (a task in Celery's prefork pool): multiprocessing refuses
    to start children there, so the cpu worker must run with `--pool solo` to use more.
    """
    configured = os.environ.get("STUDIO_PREPROCESS_WORKERS")
    wanted = max(1, int(configured)) if configured else max(1, (os.cpu_count() or 2) // 2)
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


def _extraction_record(dataset: Dataset) -> Path:
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


def create_from_upload(
    owner, name: str, uploaded, fmt: str, language: str, preprocess: bool = True
) -> Dataset:
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
    queue_import(dataset, preprocess=preprocess)
    return dataset


def register_folder(
    owner, name: str, folder: Path, fmt: str, language: str, preprocess: bool = True
) -> Dataset:
    """A dataset read in place from a folder already checked against STUDIO_DATASET_ROOTS."""
    dataset = Dataset.objects.create(
        owner=owner,
        name=name,
        source=Dataset.Source.FOLDER,
        source_path=str(folder),
        format=fmt,
        language=language,
    )
    queue_import(dataset, preprocess=preprocess)
    return dataset


def queue_import(dataset: Dataset, preprocess: bool = True) -> None:
    from studio.tasks_datasets import QUEUE, import_dataset_task

    pk = dataset.pk
    transaction.on_commit(lambda: import_dataset_task.apply_async((pk, preprocess), queue=QUEUE))


def queue_preprocess(dataset: Dataset) -> None:
    from studio.tasks_datasets import QUEUE, preprocess_dataset_task

    pk = dataset.pk
    transaction.on_commit(lambda: preprocess_dataset_task.apply_async((pk,), queue=QUEUE))


def is_stale(dataset: Dataset) -> bool:
    return dataset.is_busy and dataset.updated < timezone.now() - stale_after()


def retry(dataset: Dataset) -> str:
    """Start the step that failed or lost its worker again; finished work is kept.

    Returns what was queued ("import" or "preprocess"), or "" when nothing needs doing.
    """
    if dataset.status in (Dataset.Status.NEW, Dataset.Status.READY):
        return ""
    if dataset.is_busy and not is_stale(dataset):
        return ""
    # The feature folder exists only once an import has finished and preprocessing began.
    preprocessing_began = features_dir(dataset).is_dir()
    if dataset.status == Dataset.Status.PREPROCESSING or (
        dataset.status in (Dataset.Status.FAILED, Dataset.Status.IMPORTED) and preprocessing_began
    ):
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.IMPORTED, status_message="Preprocessing queued again."
        )
        queue_preprocess(dataset)
        return "preprocess"
    if dataset.status == Dataset.Status.IMPORTED:
        queue_preprocess(dataset)
        return "preprocess"
    if dataset.status == Dataset.Status.FAILED:
        # A failed import is cheap to redo from scratch, and the person may have fixed the files.
        dataset.utterances.all().delete()
        dataset.speakers.all().delete()
        _extraction_record(dataset).unlink(missing_ok=True)
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.NEW, status_message="Import queued again."
    )
    queue_import(dataset)
    return "import"


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


def _fail(dataset: Dataset, message: str) -> None:
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.FAILED,
        status_message=message,
        eta_seconds=None,
        updated=timezone.now(),
    )
    dataset.refresh_from_db()


def _extract(dataset: Dataset) -> list[tuple[str, str]]:
    """Unpack the upload once; returns the skipped members and why (kept across restarts)."""
    record = _extraction_record(dataset)
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


def import_dataset(dataset_id: int) -> Dataset | None:
    """Step 1. Returns the dataset, or None when it is gone or already past this step."""
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return None
    if dataset.status not in (Dataset.Status.NEW, Dataset.Status.IMPORTING):
        return None
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.IMPORTING, status_message="Reading the metadata", progress=0.0
    )
    dataset.refresh_from_db()
    try:
        skipped = _extract(dataset) if dataset.source == Dataset.Source.UPLOAD else []
        root = raw_dir(dataset)
        if not root.is_dir():
            raise ValueError(f"the folder {root} is no longer there")
        fmt = None if dataset.format == Dataset.Format.AUTO else dataset.format
        items, problems = read_corpus(root, fmt)
    except (ArchiveRefused, ValueError, OSError) as exc:
        _fail(dataset, f"Import failed: {exc}")
        return dataset
    if fmt is None:
        from training.corpus import detect_format

        Dataset.objects.filter(pk=dataset.pk).update(format=detect_format(root))
    _store_items(dataset, items, problems, skipped)
    _refresh_totals(dataset)
    dataset.refresh_from_db()
    usable = dataset.utterances.filter(usable=True).count()
    if usable == 0:
        top = _top_messages(dataset)
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.FAILED,
            status_message="No usable utterances. " + top,
            progress=1.0,
            eta_seconds=None,
        )
    else:
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.IMPORTED,
            status_message=f"Imported {usable} utterances.",
            progress=1.0,
            eta_seconds=None,
        )
    dataset.refresh_from_db()
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
        info, audio_problems = probe_audio(item)
        stored = [_problem_dict(p, "metadata") for p in by_item.get(item.id, [])]
        stored += [_problem_dict(p, "header") for p in audio_problems]
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


def preprocess_dataset(dataset_id: int, workers: int | None = None) -> Dataset | None:
    """Step 2. Safe to call again after a crash: finished feature files are kept."""
    from training.preprocess import preprocess_corpus

    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None or dataset.status not in (
        Dataset.Status.IMPORTED,
        Dataset.Status.PREPROCESSING,
    ):
        return None
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.PREPROCESSING, progress=0.0, eta_seconds=None
    )
    dataset.refresh_from_db()
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
        # A deleted dataset stops its preprocessing; asking the database every few seconds is
        # enough for that and keeps the loop fast.
        now = time.monotonic()
        if now - last_check[0] > 5.0:
            last_check[0] = now
            last_check[1] = not Dataset.objects.filter(pk=dataset_id).exists()
        return last_check[1]

    try:
        result = preprocess_corpus(
            items,
            out,
            lang=dataset.language,
            progress=_Progress(dataset, "Preprocessing"),
            should_stop=should_stop,
            workers=workers or preprocess_workers(),
        )
    except Exception as exc:  # a broken corpus must end as a readable status, not a traceback
        log.exception("preprocessing dataset %s failed", dataset_id)
        _fail(dataset, f"Preprocessing failed: {type(exc).__name__}: {exc}")
        return dataset
    if result.stopped:
        return None
    _store_features(dataset, utterances, out, result.problems)
    _refresh_totals(dataset)
    dataset.refresh_from_db()
    if dataset.n_utterances == 0:
        _fail(dataset, "No utterance survived preprocessing. " + _top_messages(dataset))
    else:
        Dataset.objects.filter(pk=dataset.pk).update(
            status=Dataset.Status.READY,
            cache_dir=str(out),
            progress=1.0,
            eta_seconds=None,
            status_message=(
                f"Ready: {result.kept} utterances ({result.train} train, {result.val} validation)"
                f" in {result.elapsed_s:.0f} s."
            ),
        )
    dataset.refresh_from_db()
    return dataset


def _store_features(
    dataset: Dataset, utterances: list[Utterance], out: Path, problems: Iterable[Problem]
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
    Utterance.objects.bulk_update(utterances, ["problems", "usable", "split"], batch_size=BATCH)
    embeddings = read_meta(out).get("speaker_embeddings", {})
    for speaker in dataset.speakers.all():
        if speaker.name in embeddings:
            Speaker.objects.filter(pk=speaker.pk).update(embedding=embeddings[speaker.name])


def resume_stale() -> list[int]:
    """Queue again every busy dataset whose worker stopped writing; called when a worker starts."""
    resumed = []
    cutoff = timezone.now() - stale_after()
    busy = (Dataset.Status.IMPORTING, Dataset.Status.PREPROCESSING)
    for dataset in Dataset.objects.filter(status__in=busy, updated__lt=cutoff):
        with transaction.atomic():
            # Touch the row first so a second worker starting at the same time skips it.
            claimed = Dataset.objects.filter(pk=dataset.pk, updated=dataset.updated).update(
                updated=timezone.now(), status_message="Resumed after the worker stopped."
            )
            if not claimed:
                continue
            if dataset.status == Dataset.Status.IMPORTING:
                queue_import(dataset)
            else:
                queue_preprocess(dataset)
        resumed.append(dataset.pk)
    return resumed


# --------------------------------------------------------------------------- reading for pages


def problem_table(dataset: Dataset) -> list[dict]:
    """Counts by problem code with severity and one example message, most frequent first."""
    rows: dict[str, dict] = {}
    for problems in dataset.utterances.exclude(problems=[]).values_list("problems", flat=True):
        for p in problems:
            row = rows.setdefault(
                p["code"],
                {"code": p["code"], "count": 0, "errors": 0, "example": p["message"]},
            )
            row["count"] += 1
            row["errors"] += p.get("severity") == "error"
    return sorted(rows.values(), key=lambda r: (-r["count"], r["code"]))


def problem_csv_rows(dataset: Dataset) -> Iterator[list[str]]:
    yield ["item_id", "speaker", "file", "code", "severity", "kept", "message"]
    utterances = dataset.utterances.exclude(problems=[]).select_related("speaker")
    for u in utterances.iterator(chunk_size=BATCH):
        for p in u.problems:
            yield [
                u.item_id,
                u.speaker.name if u.speaker else "",
                u.audio_path,
                p["code"],
                p.get("severity", ""),
                "yes" if u.usable else "no",
                p["message"],
            ]


def csv_line(row: list[str]) -> str:
    """One CSV line; cells that a spreadsheet would run as a formula get a leading quote."""
    buffer = io.StringIO()
    safe = ["'" + c if c[:1] in ("=", "+", "-", "@") else c for c in map(str, row)]
    csv.writer(buffer).writerow(safe)
    return buffer.getvalue()


def split_counts(dataset: Dataset) -> dict[str, dict]:
    from django.db.models import Count, Sum

    counts = {"train": {"n": 0, "seconds": 0.0}, "val": {"n": 0, "seconds": 0.0}}
    rows = (
        dataset.utterances.filter(usable=True)
        .exclude(split="")
        .values("split")
        .annotate(n=Count("id"), seconds=Sum("duration_seconds"))
    )
    for row in rows:
        counts[row["split"]] = {"n": row["n"], "seconds": row["seconds"] or 0.0}
    for value in counts.values():
        value["minutes"] = value["seconds"] / 60.0
    return counts


def examples(dataset: Dataset, n: int = 4) -> list[Utterance]:
    """One usable utterance from each of the first speakers, so the page sounds like the set."""
    picked: list[Utterance] = []
    usable = dataset.utterances.filter(usable=True).exclude(audio_path="")
    for speaker in dataset.speakers.filter(n_utterances__gt=0)[:n]:
        u = usable.filter(speaker=speaker).first()
        if u is not None:
            picked.append(u)
    if len(picked) < n:
        seen = {u.pk for u in picked}
        picked += [u for u in usable[: n * 2] if u.pk not in seen][: n - len(picked)]
    return picked


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="tight")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def duration_histogram_png(dataset: Dataset) -> bytes:
    durations = list(
        dataset.utterances.filter(usable=True).values_list("duration_seconds", flat=True)
    )
    fig = _figure(6.0, 2.4)
    ax = fig.add_subplot()
    if durations:
        ax.hist(durations, bins=min(40, max(5, len(durations) // 10)), color="#4f6bed")
    else:
        ax.text(0.5, 0.5, "no usable utterances yet", ha="center", va="center", color="#777")
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("utterances")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def utterance_mel(utterance: Utterance):
    """The log-mel of an utterance: from the feature cache when it is there, else from audio."""
    import torch

    dataset = utterance.dataset
    if dataset.cache_dir:
        from training.preprocess import feature_name

        path = Path(dataset.cache_dir) / feature_name(utterance.item_id)
        if path.is_file():
            feats = torch.load(path, map_location="cpu", weights_only=True)
            return feats["mel"].float().numpy()
    from training.audio import load_audio, mel_spectrogram

    wav, _ = load_audio(utterance.audio_path)
    return mel_spectrogram(wav).numpy()


def mel_png(utterance: Utterance) -> bytes:
    mel = utterance_mel(utterance)
    fig = _figure(6.0, 1.8)
    ax = fig.add_subplot()
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_axis_off()
    return _png(fig)


def delete_files(folder: Path) -> None:
    """Remove what the studio wrote for a dataset (its `dataset_dir`); a registered folder
    lives elsewhere and is never touched."""
    shutil.rmtree(folder, ignore_errors=True)
