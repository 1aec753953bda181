"""Import and preprocessing: the services the Celery tasks call, then the tasks themselves
through a real worker and real Redis (marked integration)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from conftest import wait_until
from django.db.models.functions import Now
from django.utils import timezone
from test_corpus import SR, speechlike, write_audio

from studio.datasets import importing, tasks
from studio.models import Dataset, Utterance


@pytest.fixture
def media(settings, tmp_path: Path, monkeypatch) -> Path:
    """A media folder of this test, for this process and any worker started after it."""
    root = tmp_path / "media"
    settings.STUDIO_DATASETS_DIR = root / "datasets"
    monkeypatch.setenv("STUDIO_MEDIA_ROOT", str(root))
    # The import checks a registered folder against the allowed roots again: the tests' own
    # folders and the shared corpora are the roots here.
    from conftest import CORPORA

    settings.STUDIO_DATASET_ROOTS = [tmp_path.resolve(), CORPORA.resolve()]
    monkeypatch.setenv("STUDIO_DATASET_ROOTS", f"{tmp_path.resolve()},{CORPORA.resolve()}")
    monkeypatch.setenv("STUDIO_PREPROCESS_WORKERS", "1")
    settings.STUDIO_PREPROCESS_WORKERS = 1
    return root


def make_corpus(root: Path, speakers=("anna", "ben"), per_speaker: int = 3, seconds=1.0) -> Path:
    lines = ["audio_file|text|speaker_name"]
    for s, spk in enumerate(speakers):
        for n in range(per_speaker):
            path = root / "wavs" / f"{spk}_{n}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, speechlike(seconds, seed=10 * s + n) * (0.6 + 0.3 * s), SR)
            lines.append(f"wavs/{spk}_{n}.wav|Hello number {n}, from {spk}.|{spk}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def folder_dataset(owner, folder: Path, **fields) -> Dataset:
    return Dataset.objects.create(
        owner=owner,
        name=fields.pop("name", folder.name),
        source=Dataset.Source.FOLDER,
        source_path=str(folder),
        **fields,
    )


def dead_worker() -> str:
    """The ident of a worker process on this machine that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"celery@{socket.gethostname()}:{child.pid}"


def problems_of(dataset: Dataset) -> dict[str, list[str]]:
    return {u.item_id: u.problem_codes for u in dataset.utterances.exclude(problems=[])}


# --------------------------------------------------------------------------- import (service)


@pytest.mark.django_db
def test_import_stores_utterances_speakers_and_problems(user, media, tmp_path):
    root = make_corpus(tmp_path / "corpus")
    write_audio(root / "wavs" / "cd.wav", 1.0, sr=44100)
    (root / "wavs" / "zero.wav").write_bytes(b"")
    (root / "wavs" / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt junk" + bytes(32))
    with (root / "metadata.csv").open("ab") as f:
        f.write(b"wavs/cd.wav|Caf\xe9 au lait.|anna\n")  # Latin-1, not UTF-8
        f.write(b"wavs/zero.wav|Nothing.|ben\nwavs/corrupt.wav|Broken.|ben\n")
        f.write(b"wavs/anna_0.wav|Listed twice.|anna\n")
    dataset = importing.import_dataset(folder_dataset(user, root).pk)
    assert dataset.status == Dataset.Status.IMPORTED
    assert dataset.format == "coqui"  # detected and remembered
    assert dataset.n_utterances == 7 and dataset.n_speakers == 2
    assert dataset.total_seconds == pytest.approx(7.0, abs=0.01)
    found = problems_of(dataset)
    assert sorted(found["cd"]) == ["bad_encoding", "resampled"]
    assert found["zero"] == ["empty_audio"] and found["corrupt"] == ["undecodable"]
    assert found["anna_0 (duplicate 1)"] == ["duplicate_id"]
    cd = dataset.utterances.get(item_id="cd")
    assert cd.usable and cd.text == "Café au lait." and cd.sample_rate == 44100
    assert dataset.problem_counts == {
        "bad_encoding": 1,
        "duplicate_id": 1,
        "empty_audio": 1,
        "resampled": 1,
        "undecodable": 1,
    }
    anna = dataset.speakers.get(name="anna")
    assert anna.n_utterances == 4 and anna.total_seconds == pytest.approx(4.0, abs=0.01)


@pytest.mark.django_db
@pytest.mark.parametrize("layout", ["ljspeech", "vctk", "commonvoice"])
def test_import_other_layouts(user, media, tmp_path, layout):
    root = tmp_path / layout
    if layout == "ljspeech":
        for n in range(3):
            write_audio(root / "wavs" / f"LJ{n}.wav")
        (root / "metadata.csv").write_text("".join(f"LJ{n}|Hi {n}.|Hi {n}.\n" for n in range(3)))
    elif layout == "vctk":
        for spk in ("p225", "p226"):
            write_audio(root / "wav48" / spk / f"{spk}_001.wav")
            (root / "txt" / spk).mkdir(parents=True)
            (root / "txt" / spk / f"{spk}_001.txt").write_text("Please call Stella.")
    else:
        for n in range(3):
            write_audio(root / "clips" / f"c{n}.wav")
        rows = "".join(f"client{n % 2}\tc{n}.wav\tHello {n}.\n" for n in range(3))
        (root / "validated.tsv").write_text("client_id\tpath\tsentence\n" + rows)
    dataset = importing.import_dataset(folder_dataset(user, root).pk)
    assert dataset.status == Dataset.Status.IMPORTED and dataset.format == layout
    assert dataset.n_utterances in (2, 3) and problems_of(dataset) == {}


@pytest.mark.django_db
def test_missing_column_fails_the_import_with_the_reason(user, media, tmp_path):
    root = make_corpus(tmp_path / "corpus")
    (root / "metadata.csv").write_text("audio_file|speaker_name\nwavs/anna_0.wav|anna\n")
    dataset = importing.import_dataset(folder_dataset(user, root).pk)
    assert dataset.status == Dataset.Status.FAILED
    assert "No usable utterances" in dataset.status_message
    assert "no 'text' column" in dataset.status_message
    assert problems_of(dataset) == {"(metadata.csv)": ["missing_column"]}


@pytest.mark.django_db
def test_unrecognised_folder_fails_with_the_expected_layouts(user, media, tmp_path):
    (tmp_path / "junk").mkdir()
    dataset = importing.import_dataset(folder_dataset(user, tmp_path / "junk").pk)
    assert dataset.status == Dataset.Status.FAILED
    assert "could not recognise a corpus" in dataset.status_message


@pytest.mark.django_db
def test_import_resumes_without_duplicates(user, media, tmp_path):
    root = make_corpus(tmp_path / "corpus")
    dataset = importing.import_dataset(folder_dataset(user, root).pk)
    first = dict(dataset.utterances.values_list("item_id", "pk"))
    # A worker died half way: some rows written, status still "importing".
    dataset.utterances.filter(item_id__startswith="ben").delete()
    Dataset.objects.filter(pk=dataset.pk).update(
        status=Dataset.Status.IMPORTING, worker=dead_worker()
    )
    dataset = importing.import_dataset(dataset.pk)
    assert dataset.status == Dataset.Status.IMPORTED and dataset.n_utterances == 6
    again = dict(dataset.utterances.values_list("item_id", "pk"))
    assert {k: v for k, v in again.items() if k.startswith("anna")} == {
        k: v for k, v in first.items() if k.startswith("anna")
    }
    # A repeated delivery of a finished import does nothing.
    assert importing.import_dataset(dataset.pk) is None


@pytest.mark.django_db
def test_progress_writes_fraction_eta_and_heartbeat(user, media, monkeypatch):
    clock = iter([1000.0, 1000.0, 1002.0])  # a patched clock: 20 files in 2 s
    monkeypatch.setattr(importing.time, "monotonic", lambda: next(clock))
    dataset = Dataset.objects.create(owner=user, name="p", status=Dataset.Status.PREPROCESSING)
    before = Dataset.objects.get(pk=dataset.pk).updated
    progress = importing._Progress(dataset, "Preprocessing")
    progress(10, 100)  # the first call marks where this attempt started (reused work)
    progress(30, 100)
    row = Dataset.objects.get(pk=dataset.pk)
    assert row.progress == pytest.approx(0.3)
    assert row.eta_seconds == pytest.approx(7.0)  # 20 files in 2 s, 70 to go
    assert row.status_message == "Preprocessing: 30 of 100 files"
    assert row.updated > before


@pytest.mark.django_db
def test_stale_busy_datasets_are_queued_again(user, media, django_capture_on_commit_callbacks):
    from datetime import timedelta

    from django.utils import timezone

    old = timezone.now() - importing.stale_after() - timedelta(seconds=5)
    dead = Dataset.objects.create(owner=user, name="dead", status=Dataset.Status.PREPROCESSING)
    alive = Dataset.objects.create(owner=user, name="alive", status=Dataset.Status.IMPORTING)
    Dataset.objects.filter(pk=dead.pk).update(updated=old)
    with django_capture_on_commit_callbacks() as callbacks:
        assert tasks.resume_stale() == [dead.pk]
    assert len(callbacks) == 1
    dead.refresh_from_db()
    assert tasks.is_stale(dead) is False  # claimed: a second worker starting now skips it
    assert tasks.resume_stale() == []
    assert tasks.is_stale(alive) is False


# --------------------------------------------------------------------------- claims and heartbeats


def hold(dataset: Dataset, status: str, worker: str, seconds_ago: float = 0.0) -> None:
    """The dataset as a worker left it: `status`, held by `worker`, whose last heartbeat was
    `seconds_ago` by the database's clock."""
    Dataset.objects.filter(pk=dataset.pk).update(
        status=status, worker=worker, attempts=1, heartbeat=Now() - timedelta(seconds=seconds_ago)
    )
    dataset.refresh_from_db()


@pytest.mark.django_db
def test_a_second_import_cannot_start_while_one_is_alive(user, media, tmp_path):
    dataset = folder_dataset(user, make_corpus(tmp_path / "corpus"))
    alive_here = f"celery@{socket.gethostname()}:{os.getpid()}"
    for holder in (alive_here, "celery@elsewhere:4242"):
        hold(dataset, Dataset.Status.IMPORTING, holder, seconds_ago=5)
        assert tasks.import_dataset(dataset.pk, False) == "skipped"
        row = Dataset.objects.get(pk=dataset.pk)
        assert (row.status, row.worker, row.attempts) == ("importing", holder, 1)
        assert not row.utterances.exists()
    # Its worker gone (the pid on this machine has exited), the next task takes over.
    hold(dataset, Dataset.Status.IMPORTING, dead_worker(), seconds_ago=5)
    assert tasks.import_dataset(dataset.pk, False) == Dataset.Status.IMPORTED
    row = Dataset.objects.get(pk=dataset.pk)
    assert row.n_utterances == 6 and row.attempts == 2 and row.retries == 1


@pytest.mark.django_db
def test_retry_is_offered_only_when_stale_by_the_database_clock(
    user, media, monkeypatch, django_capture_on_commit_callbacks
):
    dataset = Dataset.objects.create(owner=user, name="d")
    hold(dataset, Dataset.Status.IMPORTING, "celery@elsewhere:4242", seconds_ago=10)
    # This web machine's clock runs an hour ahead of the database's: no reason to retry.
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(hours=1))
    assert not tasks.is_stale(dataset) and not tasks.can_retry(dataset)
    with django_capture_on_commit_callbacks() as sent:
        assert tasks.retry(dataset) == ""
    assert not sent and Dataset.objects.get(pk=dataset.pk).status == "importing"
    assert tasks.resume_stale() == []

    stale = importing.stale_after().total_seconds() + 5
    hold(dataset, Dataset.Status.IMPORTING, "celery@elsewhere:4242", seconds_ago=stale)
    assert tasks.is_stale(dataset) and tasks.can_retry(dataset)
    # On the worker's own machine a dead pid says so at once.
    hold(dataset, Dataset.Status.PREPROCESSING, dead_worker(), seconds_ago=1)
    assert tasks.is_stale(dataset)
    with django_capture_on_commit_callbacks() as sent:
        assert tasks.retry(dataset) == "preprocess"
    assert len(sent) == 1
    row = Dataset.objects.get(pk=dataset.pk)
    assert row.status == "imported" and row.is_busy and not tasks.can_retry(row)


@pytest.mark.django_db
def test_a_step_whose_worker_keeps_dying_fails_with_the_reason(user, media, settings):
    settings.STUDIO_MAX_ATTEMPTS = 3
    dataset = Dataset.objects.create(owner=user, name="d")
    hold(dataset, Dataset.Status.PREPROCESSING, dead_worker(), seconds_ago=1)
    Dataset.objects.filter(pk=dataset.pk).update(retries=2, queued_at=Now())
    assert tasks.preprocess_dataset(dataset.pk) == "skipped"
    row = Dataset.objects.get(pk=dataset.pk)
    assert row.status == Dataset.Status.FAILED and row.retries == 3
    assert "Gave up after 3 attempts in a row at the preprocess step" in row.status_message
    assert not row.is_busy and tasks.can_retry(row)


@pytest.mark.django_db
def test_an_attempt_that_lost_its_claim_writes_nothing(user, media, tmp_path):
    dataset = folder_dataset(user, make_corpus(tmp_path / "corpus"))
    host = socket.gethostname()
    first, how = Dataset.claim(dataset.pk, "import", dead_worker(), host)
    assert how == "start" and first.beat()
    second, how = Dataset.claim(dataset.pk, "import", f"celery@{host}:{os.getpid()}", host)
    assert how == "resume" and second.attempts == 2
    # The first attempt was only slow: its heartbeat and progress no longer land anywhere.
    assert not first.beat()
    first.set_progress(0.9, 1.0, "Checking: 9 of 10 files")
    assert importing._fail(first, "Import failed: late") == 0
    row = Dataset.objects.get(pk=dataset.pk)
    assert (row.status, row.worker, row.progress) == ("importing", second.worker, 0.0)
    assert row.status_message == ""


@pytest.mark.django_db
def test_a_failed_enqueue_leaves_a_reason_and_a_retry(
    user, media, monkeypatch, django_capture_on_commit_callbacks
):
    from kombu.exceptions import OperationalError

    def refuse(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(tasks.import_dataset, "apply_async", refuse)
    dataset = Dataset.objects.create(owner=user, name="d")
    with django_capture_on_commit_callbacks(execute=True):
        tasks.queue_import(dataset)
    row = Dataset.objects.get(pk=dataset.pk)
    assert row.status == Dataset.Status.FAILED and not row.is_busy
    assert row.status_message.startswith("Could not reach the task queue (OperationalError")
    assert tasks.can_retry(row)


# --------------------------------------------------------------------------- preprocessing (service)


@pytest.mark.django_db
def test_preprocess_stores_split_embeddings_and_audio_problems(user, media, tmp_path):
    root = make_corpus(tmp_path / "corpus", per_speaker=4)
    sf.write(root / "wavs" / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    sf.write(root / "wavs" / "loud.wav", np.clip(speechlike(1.0) * 8, -1, 1), SR)
    with (root / "metadata.csv").open("a") as f:
        f.write("wavs/silent.wav|Nothing to hear.|anna\nwavs/loud.wav|Far too loud.|ben\n")
    dataset = importing.import_dataset(folder_dataset(user, root).pk)
    assert dataset.n_utterances == 10  # headers look fine; the samples decide below
    dataset = importing.preprocess_dataset(dataset.pk, workers=1)
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    assert dataset.is_ready and Path(dataset.cache_dir, "meta.json").is_file()
    assert dataset.n_utterances == 9
    found = problems_of(dataset)
    assert found == {"silent": ["mostly_silence"], "loud": ["clipping"]}
    assert not dataset.utterances.get(item_id="silent").usable
    splits = dict(dataset.utterances.filter(usable=True).values_list("item_id", "split"))
    assert set(splits.values()) == {"train", "val"}
    for speaker in dataset.speakers.all():
        vector = np.array(speaker.embedding)
        assert vector.shape == (256,) and abs(np.linalg.norm(vector) - 1) < 1e-3
    assert dataset.problem_counts == {"clipping": 1, "mostly_silence": 1}

    # Running it again (a repeated delivery, or a retry) reuses every feature file.
    feats = sorted(Path(dataset.cache_dir, "feats").glob("*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in feats}
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.IMPORTED)
    dataset = importing.preprocess_dataset(dataset.pk, workers=1)
    assert dataset.status == Dataset.Status.READY
    assert {p: p.stat().st_mtime_ns for p in feats} == stamps


@pytest.mark.django_db
def test_preprocess_is_skipped_unless_imported(user, media):
    dataset = Dataset.objects.create(owner=user, name="new")
    assert importing.preprocess_dataset(dataset.pk) is None
    assert importing.preprocess_dataset(999_999) is None


def _workers_in_child(queue) -> None:
    queue.put(importing.preprocess_workers())


def test_several_preprocess_processes_only_where_children_are_allowed(settings):
    settings.STUDIO_PREPROCESS_WORKERS = 3
    assert importing.preprocess_workers() == 3
    # A task in Celery's prefork pool runs in a daemonic process, like this one.
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_workers_in_child, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=30) == 1
    child.join(timeout=30)


@pytest.mark.django_db
def test_preprocess_task_with_two_processes(user, media, tmp_path, settings):
    """The task body as a solo-pool worker runs it: in a process that may start children."""
    settings.STUDIO_PREPROCESS_WORKERS = 2
    dataset = importing.import_dataset(folder_dataset(user, make_corpus(tmp_path / "c")).pk)
    assert tasks.preprocess_dataset(dataset.pk) == Dataset.Status.READY
    dataset.refresh_from_db()
    assert dataset.n_utterances == 6 and all(s.embedding for s in dataset.speakers.all())


# --------------------------------------------------------------------------- through a real worker


def _wait_status(pk: int, statuses, timeout: float) -> Dataset:
    def done():
        row = Dataset.objects.get(pk=pk)
        return row if row.status in statuses else None

    return wait_until(done, timeout=timeout, interval=0.5, message=f"dataset {pk} in {statuses}")


FINAL = (Dataset.Status.IMPORTED, Dataset.Status.READY, Dataset.Status.FAILED)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_dev_corpus_imports_through_the_worker(user, media, corpora_dir, start_worker):
    worker = start_worker(queues="cpu")
    dataset = folder_dataset(user, corpora_dir / "dev-en-8spk")
    tasks.queue_import(dataset, preprocess=False)  # preprocessing is measured by the bench
    dataset = _wait_status(dataset.pk, FINAL, timeout=180)
    assert dataset.status == Dataset.Status.IMPORTED, (dataset.status_message, worker.log()[-3000:])
    assert dataset.n_utterances == 800 and dataset.n_speakers == 8
    assert Utterance.objects.filter(dataset=dataset, usable=True).count() == 800
    assert sorted(dataset.speakers.values_list("n_utterances", flat=True)) == [100] * 8
    assert dataset.problem_counts == {}
    assert dataset.total_seconds == pytest.approx(2890, rel=0.01)  # 0.8 h, from the headers


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_upload_imports_and_preprocesses_through_the_worker(user, media, tmp_path, start_worker):
    import io
    import zipfile

    from django.core.files.uploadedfile import SimpleUploadedFile

    root = make_corpus(tmp_path / "corpus")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in root.rglob("*"):
            if path.is_file():
                zf.write(path, f"mine/{path.relative_to(root)}")
        zf.writestr("../../escape.txt", "x")
    start_worker(queues="cpu")
    archive = SimpleUploadedFile("mine.zip", buffer.getvalue())
    dataset = importing.create_from_upload(user, "Mine", archive, "auto", "en")
    tasks.queue_import(dataset)
    dataset = _wait_status(dataset.pk, (Dataset.Status.READY, Dataset.Status.FAILED), 240)
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    assert dataset.n_utterances == 6 and dataset.n_speakers == 2
    assert problems_of(dataset) == {"(archive) ../../escape.txt": ["archive_skipped"]}
    assert all(s.embedding for s in dataset.speakers.all())
    assert not (media / "escape.txt").exists() and not (tmp_path / "escape.txt").exists()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_preprocessing_resumes_after_the_worker_is_killed(
    user, media, tmp_path, start_worker, monkeypatch
):
    root = make_corpus(tmp_path / "corpus", speakers=("anna", "ben", "cleo"), per_speaker=10)
    dataset = folder_dataset(user, root)
    first = start_worker(queues="cpu", name="first")
    tasks.queue_import(dataset)
    feats = media / "datasets" / str(dataset.pk) / "features" / "feats"
    wait_until(lambda: len(list(feats.glob("*.pt"))) >= 4, timeout=180, message="some features")
    first.kill()
    done_before = {p: p.stat().st_mtime_ns for p in feats.glob("*.pt")}
    assert 4 <= len(done_before) < 30
    assert Dataset.objects.get(pk=dataset.pk).status == Dataset.Status.PREPROCESSING

    # The next worker to start finds the dataset stale and takes it up again.
    # Its row went quiet long ago, as far as the next worker can tell (no sleeping).
    monkeypatch.setenv("STUDIO_DATASET_STALE_SECONDS", "1")
    Dataset.objects.filter(pk=dataset.pk).update(updated=timezone.now() - timedelta(seconds=60))
    start_worker(queues="cpu", name="second")
    dataset = _wait_status(dataset.pk, (Dataset.Status.READY, Dataset.Status.FAILED), 240)
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    assert dataset.n_utterances == 30
    assert len(list(feats.glob("*.pt"))) == 30
    # Every file finished before the kill was kept as it was.
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    assert not list(feats.glob(".*.tmp"))
