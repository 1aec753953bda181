"""Preprocessing a large corpus on every cpu worker at once: parts, a Celery group, one board.

The preprocess task that holds the dataset's claim splits the utterances into n parts
(STUDIO_PREPROCESS_PART_ITEMS each, at most), sends a group of `datasets.preprocess_part`
tasks, and then works through the parts itself too. A part is done by whoever claims it first
on a small Redis board (SET NX with a time-to-live that the worker doing it keeps fresh), so:

- with idle cpu workers the parts run in parallel, one per worker process;
- with none (a single busy `-c 1` worker) the claiming task does every part itself and the
  queued part tasks find nothing left: no deadlock, no waiting on a queue;
- a part whose worker dies is claimed again when its time-to-live runs out.

Each part writes feature files only (training.preprocess with part=(k, n)); the board sums the
parts' progress for the dataset page. When every part is done, the claiming task runs the
ordinary pass over the whole corpus, which reuses every feature file and writes items, stats
and meta as for a small corpus.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import redis
from django.conf import settings

from studio.celery import app

log = logging.getLogger(__name__)

PART_TASK = "datasets.preprocess_part"
CLAIM_TTL_S = 120  # a part unrefreshed this long lost its worker
WAIT_POLL_S = 1.0


def part_count(n_items: int) -> int:
    per = settings.STUDIO_PREPROCESS_PART_ITEMS
    return 1 if per <= 0 or n_items <= per else math.ceil(n_items / per)


class Board:
    """Claims, progress and completion of one attempt's parts, in Redis."""

    def __init__(self, dataset_id: int, attempt: int, client: redis.Redis | None = None):
        self.key = f"studio:preprocess:{dataset_id}:{attempt}"
        self.r = client or redis.Redis.from_url(settings.REDIS_URL)

    def claim(self, k: int, who: str) -> bool:
        if self.r.sismember(f"{self.key}:done", k):
            return False
        return bool(self.r.set(f"{self.key}:claim:{k}", who, nx=True, ex=CLAIM_TTL_S))

    def refresh(self, k: int) -> None:
        self.r.expire(f"{self.key}:claim:{k}", CLAIM_TTL_S)

    def progress(self, k: int, done: int) -> None:
        self.r.hset(f"{self.key}:progress", k, done)

    def finish(self, k: int, who: str) -> None:
        pipe = self.r.pipeline()
        pipe.sadd(f"{self.key}:done", k)
        pipe.hset(f"{self.key}:by", k, who)
        pipe.delete(f"{self.key}:claim:{k}")
        for suffix in ("done", "by", "progress"):
            pipe.expire(f"{self.key}:{suffix}", 7 * 24 * 3600)
        pipe.execute()

    def done(self) -> set[int]:
        return {int(k) for k in self.r.smembers(f"{self.key}:done")}

    def claimed(self, k: int) -> bool:
        return bool(self.r.exists(f"{self.key}:claim:{k}"))

    def items_done(self) -> int:
        return sum(int(v) for v in self.r.hvals(f"{self.key}:progress"))

    def done_by(self) -> dict[int, str]:
        return {int(k): v.decode() for k, v in self.r.hgetall(f"{self.key}:by").items()}


def _items_file(out: Path) -> Path:
    return out / "parts" / "items.json"


def run_part(dataset_id: int, attempt: int, k: int, n: int, who: str, board: Board) -> bool:
    """Extract part k of n if nobody else has it; True when this call did it."""
    from studio.models import Dataset
    from training.corpus import CorpusItem
    from training.preprocess import preprocess_corpus

    if not board.claim(k, who):
        return False
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return False
    from studio.datasets.importing import features_dir

    out = features_dir(dataset)
    rows = json.loads(_items_file(out).read_text(encoding="utf-8"))
    items = [CorpusItem(i, Path(p), t, s) for i, p, t, s in rows]
    last = [0.0, False]

    def should_stop() -> bool:
        # The attempt that sent this part is over (taken over, deleted): stop writing for it.
        now = time.monotonic()
        if now - last[0] > 5.0:
            last[0] = now
            board.refresh(k)
            last[1] = not Dataset.objects.filter(pk=dataset_id, attempts=attempt).exists()
        return last[1]

    def progress(done: int, total: int) -> None:
        board.progress(k, done)

    result = preprocess_corpus(
        items,
        out,
        lang=dataset.language,
        progress=progress,
        should_stop=should_stop,
        workers=1,
        part=(k, n),
    )
    if result.stopped:
        return False
    board.finish(k, who)
    log.info(
        "dataset %s: part %d of %d done by %s (%d files)", dataset_id, k + 1, n, who, result.total
    )
    return True


@app.task(bind=True, name=PART_TASK, acks_late=True, reject_on_worker_lost=True)
def preprocess_part(self, dataset_id: int, attempt: int, k: int, n: int) -> str:
    from studio import workers

    who = workers.worker_ident(self.request.hostname)
    did = run_part(dataset_id, attempt, k, n, who, Board(dataset_id, attempt))
    return "done" if did else "taken"


def preprocess_in_parts(dataset, items, out: Path, progress, should_stop, queue: str) -> bool:
    """Extract the features of `items` in parts across the cpu workers; False if stopped.

    Called by the task holding the dataset's claim (its heartbeat keeps beating meanwhile).
    """
    from celery import group

    from studio import workers

    n = part_count(len(items))
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    rows = [[str(i.id), str(i.audio_path), str(i.text), str(i.speaker)] for i in items]
    _items_file(out).write_text(json.dumps(rows), encoding="utf-8")
    board = Board(dataset.pk, dataset.attempts)
    who = workers.worker_ident(None)
    log.info("dataset %s: %d utterances in %d parts", dataset.pk, len(items), n)
    try:
        group(preprocess_part.s(dataset.pk, dataset.attempts, k, n) for k in range(n)).apply_async(
            queue=queue
        )
    except Exception as exc:  # no broker: this task does every part itself
        log.warning("dataset %s: parts not sent (%s); doing them here", dataset.pk, exc)
    while True:
        done = board.done()
        if len(done) == n:
            break
        if should_stop():
            return False
        # Any part nobody holds (not started, or its worker died) is ours.
        for k in range(n):
            if k not in done and not board.claimed(k):
                run_part(dataset.pk, dataset.attempts, k, n, who, board)
                break
        else:
            time.sleep(WAIT_POLL_S)  # every part is being done elsewhere: show their progress
        progress(min(board.items_done(), len(items)), len(items))
    progress(len(items), len(items))
    return True
