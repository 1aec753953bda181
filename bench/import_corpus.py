"""Import + preprocessing time of a corpus through the studio's dataset services, as JSON lines.

    .venv/bin/python bench/import_corpus.py                       # dev-en-8spk, 1 vs 2 workers
    .venv/bin/python bench/import_corpus.py --workers 1 2 4 --limit 200

Runs the same code the Celery tasks run (studio.datasets.importing.import_dataset and
preprocess_dataset) against a throw-away SQLite database and media folder, without the
broker hop (milliseconds). Every preprocessing configuration starts from an empty feature
cache; the first worker count given is the baseline the others are compared with. A last
line times a repeated preprocessing over the finished cache (what a resumed task costs).

Throughput is audio-hours (from the file headers, before trimming) per wall-clock minute.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "dev-en-8spk"


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def setup_django(data_dir: Path) -> None:
    os.environ["STUDIO_DATA_DIR"] = str(data_dir)
    os.environ.pop("STUDIO_MEDIA_ROOT", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--limit", type=int, default=0, help="only the first N utterances")
    parser.add_argument("--language", default="en")
    args = parser.parse_args()

    corpus = args.corpus.resolve()
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        tmp = Path(tmp)
        if args.limit:
            corpus = _subset(corpus, tmp / "subset", args.limit)
        # The import checks the folder against the allowed roots, as registering it would.
        os.environ["STUDIO_DATASET_ROOTS"] = str(corpus.parent)
        setup_django(tmp / "data")
        run(corpus, args.workers, args.language)


def _subset(corpus: Path, target: Path, limit: int) -> Path:
    """A Coqui-style copy of the first `limit` rows. Copies, not links: the import refuses
    audio that links out of the corpus folder."""
    lines = (corpus / "metadata.csv").read_text(encoding="utf-8").splitlines()[: limit + 1]
    target.mkdir(parents=True)
    (target / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines[1:]:
        rel = line.split("|", 1)[0]
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(corpus / rel, target / rel)
    return target


def run(corpus: Path, worker_counts: list[int], language: str) -> None:
    from django.contrib.auth import get_user_model

    from studio.datasets import importing
    from studio.models import Dataset

    owner = get_user_model().objects.create_user("bench")
    dataset = Dataset.objects.create(
        owner=owner,
        name=corpus.name,
        source=Dataset.Source.FOLDER,
        source_path=str(corpus),
        language=language,
    )
    common = {
        "bench": "import_corpus",
        "corpus": corpus.name,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }

    started = time.perf_counter()
    dataset = importing.import_dataset(dataset.pk)
    import_s = time.perf_counter() - started
    hours = dataset.total_seconds / 3600
    emit(
        common
        | {
            "stage": "import",
            "status": dataset.status,
            "utterances": dataset.n_utterances,
            "speakers": dataset.n_speakers,
            "audio_hours": round(hours, 4),
            "seconds": round(import_s, 2),
            "audio_hours_per_min": round(hours / (import_s / 60), 2),
        }
    )
    if dataset.status != Dataset.Status.IMPORTED:
        sys.exit(f"import failed: {dataset.status_message}")

    baseline = None
    for workers in worker_counts:
        shutil.rmtree(importing.features_dir(dataset), ignore_errors=True)
        Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.IMPORTED)
        started = time.perf_counter()
        done = importing.preprocess_dataset(dataset.pk, workers=workers)
        seconds = time.perf_counter() - started
        baseline = baseline or seconds
        emit(
            common
            | {
                "stage": "preprocess",
                "workers": workers,
                "status": done.status,
                "kept": done.n_utterances,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "seconds": round(seconds, 2),
                "per_utterance_ms": round(1000 * seconds / max(1, done.n_utterances), 1),
                "audio_hours_per_min": round(hours / (seconds / 60), 3),
                "import_plus_preprocess_s": round(import_s + seconds, 2),
                "total_audio_hours_per_min": round(hours / ((import_s + seconds) / 60), 3),
                "speedup_vs_first": round(baseline / seconds, 2),
            }
        )

    # A task delivered again, or resumed after its worker died once everything was done.
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.IMPORTED)
    started = time.perf_counter()
    done = importing.preprocess_dataset(dataset.pk, workers=worker_counts[-1])
    seconds = time.perf_counter() - started
    emit(
        common
        | {
            "stage": "preprocess_again_all_cached",
            "workers": worker_counts[-1],
            "status": done.status,
            "seconds": round(seconds, 2),
        }
    )


if __name__ == "__main__":
    main()
