"""Live messages of runs: group names, message shapes, history, and a coalescing publisher.

A training loop can produce fifty steps a second; a browser needs a handful of redraws. The
`Publisher` buffers what the loop hands it and sends at most `max_rate()` (about ten) messages
a second to each group, from a thread of its own, so the loop never waits on Redis and a slow or missing
broker never slows training (the database keeps the record; clients fill gaps from it).

Messages to a run page (group ``run.<id>``) have a "type":
  history  on connect: the run, its points (downsampled for long runs), events, samples, checkpoints
  gap      reply to {"since": step}: everything after that step
  update   live: new points, events, samples, checkpoints and/or a status change
A point is ``{"step": int, "t": unix seconds the step was recorded, "m": {name: float}}``.
The runs list (group ``runs``) gets ``{"type": "run", ...summary}`` per status/progress change.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

from django.conf import settings
from django.db.models import Q
from django.db.models.functions import Mod
from django.urls import reverse

logger = logging.getLogger(__name__)

RUNS_GROUP = "runs"
# Steps of dense metrics sent on connect; longer runs are downsampled to about this many.
HISTORY_POINTS = 2000
HISTORY_EVENTS = 300
HISTORY_SAMPLES = 24


def run_group(run_id: int) -> str:
    return f"run.{int(run_id)}"


def max_rate() -> float:
    """Messages per second per run page: about ten, so a fast loop never floods a browser.

    12.5 (an 80 ms window) rather than exactly 10: coalescing holds a step back by up to one
    window minus one step period, and at 10/s that alone is 80 ms of the 100 ms p95 budget
    at 50 steps/s, leaving too little for transport on a busy machine (bench/metrics_latency.py:
    p95 ~109 ms at 10/s, ~83 ms at 12.5/s, 20 clients on a loaded 2-core box).
    """
    return settings.STUDIO_LIVE_MAX_RATE


def finite_metrics(metrics: dict) -> tuple[dict[str, float], list[str]]:
    """Split a step's metrics into plottable floats and the names whose value was NaN/Inf.

    Non-finite values can be neither stored (SQLite turns NaN into NULL) nor sent (JSON has no
    NaN), so they are counted instead; the diagnostics read that count as a NaN streak.
    """
    clean: dict[str, float] = {}
    bad: list[str] = []
    for name, value in metrics.items():
        if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            clean[name] = value
        else:
            bad.append(name)
    return clean, bad


# --------------------------------------------------------------------------- message shapes


def run_summary(run) -> dict:
    return {
        "id": run.pk,
        "status": run.status,
        "status_display": run.get_status_display(),
        "error": run.error,
        "step": run.current_step,
        "total_steps": run.total_steps,
        "last_loss": run.last_loss,
        "best_val_loss": run.best_val_loss,
        "attempts": run.attempts,
        "cancel_requested": run.cancel_requested,
        "can_resume": run.can_resume,
        "is_active": run.is_active,
    }


def list_message(run) -> dict:
    """What the runs list needs; owner_id lets the consumer forward it only to who may see it."""
    return dict(run_summary(run), type="run", owner_id=run.owner_id, name=str(run))


def event_dict(event) -> dict:
    return {
        "id": event.pk,
        "step": event.step,
        "kind": event.kind,
        "message": event.message,
        "data": event.data,
        "time": event.created.timestamp(),
    }


def sample_dict(sample) -> dict:
    return {
        "id": sample.pk,
        "step": sample.step,
        "utterance_id": sample.utterance_id,
        "speaker": sample.speaker,
        "text": sample.text,
        "audio_url": reverse("sample_audio", args=[sample.pk]),
        "mel_url": reverse("sample_mel", args=[sample.pk]) if sample.mel_image else "",
    }


def checkpoint_dict(ckpt) -> dict:
    return {
        "id": ckpt.pk,
        "step": ckpt.step,
        "val_loss": ckpt.val_loss,
        "is_best": ckpt.is_best,
        "size_bytes": ckpt.size_bytes,
        "download_url": reverse("checkpoint_download", args=[ckpt.pk]),
        "synthesize_url": f"/synthesize/?checkpoint={ckpt.pk}",
        # Scores are of speech made from text: a vocoder run's checkpoints are not scored.
        "score_url": reverse("checkpoint_score", args=[ckpt.pk])
        if ckpt.run.kind != ckpt.run.Kind.VOCODER
        else None,
        "scores": score_summary(ckpt),
    }


# What a checkpoint row shows of its scores (studio.runs.tasks): the means, not the
# per-utterance rows, which stay in the database.
SCORE_FIELDS = (
    "state",
    "error",
    "scored_at",
    "queued_at",
    "n",
    "n_utterances",
    "secs_seen",
    "secs_unseen",
    "secs_unseen_ceiling",
    "secs_unseen_floor",
    "normalised_secs_unseen",
    "wer_unseen",
    "unseen_speakers",
    "speaker_check",
    "quality",
    "skipped",
    "secs_real_same_speaker",
    "secs_real_different_speakers",
    "mcd_db",
    "wer_output",
    "wer_ground_truth",
    "dnsmos_ovrl",
    "dnsmos_ovrl_ground_truth",
    "ground_truth",
    "rtf",
    "vocoder",
)


def score_summary(ckpt) -> dict:
    scores = ckpt.scores or {}
    summary = {k: scores[k] for k in SCORE_FIELDS if k in scores}
    if summary.get("vocoder") not in (None, "hifigan", "griffin-lim"):
        summary["vocoder"] = "fine-tuned"  # a checkpoint path: never sent to the browser
    summary["pending"] = ckpt.scoring_pending
    return summary


def points_from_rows(rows) -> list[dict]:
    """MetricPoint rows (ordered by step) -> one point per step."""
    points: list[dict] = []
    for step, name, value, when in rows:
        if not points or points[-1]["step"] != step:
            points.append({"step": step, "t": when.timestamp(), "m": {}})
        points[-1]["m"][name] = value
    return points


def history(run, since: int | None = None, max_points: int = HISTORY_POINTS) -> dict:
    """The record of a run from the database, for a page that just connected or reconnected.

    With `since`, only what came after that step (a reconnect filling its gap); otherwise
    everything, with dense metrics thinned to about `max_points` steps. Validation metrics
    are sparse (one per eval) and always sent in full, as are the checkpoints' scores.
    """
    from studio.models import MetricPoint

    rows = MetricPoint.objects.filter(run=run)
    if since is not None:
        rows = rows.filter(step__gt=since)
    last = rows.order_by("-step").values_list("step", flat=True).first()
    first = rows.order_by("step").values_list("step", flat=True).first()
    stride = 1
    if last is not None and first is not None:
        stride = max(1, math.ceil((last - first + 1) / max_points))
    if stride > 1:
        rows = rows.annotate(r=Mod("step", stride)).filter(
            Q(r=0) | Q(name__startswith="val/") | Q(name__startswith="score/") | Q(step=last)
        )
    rows = rows.order_by("step", "name").values_list("step", "name", "value", "time")

    events = run.events.order_by("-step", "-created")
    samples = run.samples.order_by("-step", "utterance_id")
    checkpoints = run.checkpoints.order_by("-step")
    if since is not None:
        events = events.filter(step__gt=since)
        samples = samples.filter(step__gt=since)
    events = list(events[:HISTORY_EVENTS])[::-1]
    return {
        "type": "gap" if since is not None else "history",
        "since": since,
        "run": run_summary(run),
        "points": points_from_rows(rows.iterator(chunk_size=5000)),
        "downsampled": stride > 1,
        "stride": stride,
        "last_step": last if last is not None else (since or 0),
        "events": [event_dict(e) for e in events],
        "samples": [sample_dict(s) for s in samples[:HISTORY_SAMPLES]],
        "checkpoints": [checkpoint_dict(c) for c in checkpoints],
    }


# --------------------------------------------------------------------------- publishing


class _Pending:
    __slots__ = ("checkpoints", "events", "points", "samples", "status", "urgent")

    def __init__(self):
        self.points: list[dict] = []
        self.events: list[dict] = []
        self.samples: list[dict] = []
        self.checkpoints: list[dict] = []
        self.status: dict | None = None
        self.urgent = False

    def empty(self) -> bool:
        return not (self.points or self.events or self.samples or self.checkpoints or self.status)

    def payload(self, run_id: int) -> dict:
        msg: dict = {"type": "update", "run": run_id, "points": self.points}
        for key in ("events", "samples", "checkpoints"):
            if getattr(self, key):
                msg[key] = getattr(self, key)
        if self.status is not None:
            msg["status"] = self.status
        return msg


class Publisher:
    """Sends a run's live updates to its group, coalesced to at most `rate` messages a second.

    The first update after a quiet spell goes out at once; later ones wait until 1/rate has
    passed since the last send and then go out together. A point that arrives in the last
    tenth of the wait goes out with the batch at once: sending on an arrival rather than on a
    timer makes that point's latency zero and keeps the oldest one's under 1/rate minus a
    step (p95 about 80 ms at 10 messages/s and 50 steps/s, instead of about 95). Status
    changes skip the wait. The runs-list summary is coalesced harder (latest wins, ~1/s).

    `rate=None` sends everything as soon as it arrives (the uncoalesced baseline of the bench).
    """

    LIST_INTERVAL = 1.0

    def __init__(self, run_id: int, rate: float | None = 12.5, layer=None):
        self.run_id = int(run_id)
        self.group = run_group(run_id)
        self.interval = 1.0 / rate if rate else 0.0
        self._layer = layer
        self._cond = threading.Condition()
        self._pending = _Pending()
        self._summary: dict | None = None
        self._summary_urgent = False
        self._last_sent = -math.inf
        self._last_arrival = -math.inf
        self._last_summary = -math.inf
        self._closing = False
        self.messages_sent = 0
        self.send_errors = 0
        self._thread = threading.Thread(
            target=self._run, name=f"live-publisher-{run_id}", daemon=True
        )
        self._thread.start()

    # -- called from the training loop: never blocks on the network

    def add_point(self, step: int, metrics: dict[str, float], t: float | None = None) -> None:
        point = {"step": int(step), "t": time.time() if t is None else t, "m": metrics}
        with self._cond:
            self._pending.points.append(point)
            self._last_arrival = time.monotonic()
            self._cond.notify()

    def add(self, *, events=(), samples=(), checkpoints=()) -> None:
        with self._cond:
            self._pending.events.extend(events)
            self._pending.samples.extend(samples)
            self._pending.checkpoints.extend(checkpoints)
            self._cond.notify()

    def status(self, run) -> None:
        """A status change: sent at once to the run page and the runs list."""
        with self._cond:
            self._pending.status = run_summary(run)
            self._pending.urgent = True
            self._summary = list_message(run)
            self._summary_urgent = True
            self._cond.notify()

    def progress(self, run) -> None:
        """Step / last loss for the runs list; latest wins."""
        with self._cond:
            self._summary = list_message(run)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Send whatever is pending, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- the sending thread

    def _take(self):
        """Wait until something is due; return (run payload or None, list payload or None)."""
        with self._cond:
            while True:
                now = time.monotonic()
                wait = None
                payload = summary = None
                if not self._pending.empty():
                    gap = 0.0 if self._pending.urgent else self.interval
                    due = self._last_sent + gap
                    on_arrival = self._last_arrival >= self._last_sent + 0.9 * gap
                    if now >= due or on_arrival or self._closing:
                        payload = self._pending.payload(self.run_id)
                        self._pending = _Pending()
                        self._last_sent = now
                    else:
                        wait = due - now
                if self._summary is not None:
                    due = self._last_summary + (0.0 if self._summary_urgent else self.LIST_INTERVAL)
                    if now >= due or self._closing:
                        summary, self._summary = self._summary, None
                        self._summary_urgent = False
                        self._last_summary = now
                    else:
                        wait = min(wait, due - now) if wait is not None else due - now
                if payload or summary:
                    return payload, summary
                if self._closing:
                    return None, None
                self._cond.wait(wait)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            layer = self._layer
            if layer is None:
                # An instance of its own: its Redis connections belong to this thread's loop,
                # and closing them at the end cannot touch anyone else's.
                from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers

                layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
            while True:
                payload, summary = self._take()
                if payload is None and summary is None:
                    break
                loop.run_until_complete(self._send(layer, payload, summary))
            if hasattr(layer, "close_pools"):
                loop.run_until_complete(layer.close_pools())
        except Exception:
            logger.exception("live publisher for run %s stopped", self.run_id)
        finally:
            loop.close()

    async def _send(self, layer, payload, summary) -> None:
        try:
            if payload is not None:
                await layer.group_send(self.group, {"type": "run.update", "data": payload})
                self.messages_sent += 1
            if summary is not None:
                await layer.group_send(RUNS_GROUP, {"type": "runs.update", "data": summary})
        except Exception as exc:  # a broker hiccup must never stop training
            self.send_errors += 1
            if self.send_errors <= 3 or self.send_errors % 100 == 0:
                logger.warning("live update of run %s not sent: %s", self.run_id, exc)


def publish_status(run) -> None:
    """One-off status message from outside a training (a view cancelling a queued run)."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    try:
        async_to_sync(layer.group_send)(
            run_group(run.pk),
            {
                "type": "run.update",
                "data": {"type": "update", "run": run.pk, "points": [], "status": run_summary(run)},
            },
        )
        async_to_sync(layer.group_send)(
            RUNS_GROUP, {"type": "runs.update", "data": list_message(run)}
        )
    except Exception as exc:
        logger.warning("status of run %s not published: %s", run.pk, exc)


def publish_checkpoints(run, points=()) -> None:
    """One-off checkpoint list from outside a training (scores queued or computed), with the
    metric points the scores made ("score/..."), if any."""
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    checkpoints = [checkpoint_dict(c) for c in run.checkpoints.order_by("-step")]
    try:
        async_to_sync(get_channel_layer().group_send)(
            run_group(run.pk),
            {
                "type": "run.update",
                "data": {
                    "type": "update",
                    "run": run.pk,
                    "points": list(points),
                    "checkpoints": checkpoints,
                },
            },
        )
    except Exception as exc:
        logger.warning("checkpoints of run %s not published: %s", run.pk, exc)
