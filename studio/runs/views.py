"""Pages of the runs area: list, start, watch, stop, resume, compare, and private downloads.

Every lookup goes through `visible_to(user)`, so another user's run, checkpoint or sample is a
404, not a 403: its existence is not revealed. Media is private and streamed from here.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.db import transaction
from django.http import FileResponse, Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from studio import live
from studio.models import AudioSample, Checkpoint, Dataset, Run, safe_ranges_table
from studio.runs import scores
from studio.runs.forms import ResumeForm, RunForm, preset_summaries
from training.config import BATCH_RANGES, batch_warning
from training.losses import HOLD_REASONS

LOG_TAIL_BYTES = 256 * 1024
COMPARE_MAX_RUNS = 8


def _run(request, pk) -> Run:
    return get_object_or_404(
        Run.objects.visible_to(request.user).select_related("dataset", "config", "owner"), pk=pk
    )


def run_list(request):
    runs = Run.objects.visible_to(request.user).select_related("dataset", "config", "owner")
    return render(request, "runs/list.html", {"runs": runs[:200]})


def run_new(request):
    data = request.POST if request.method == "POST" else None
    form = RunForm(request.user, data, initial=_initial(request))
    if request.method == "POST" and form.is_valid():
        run = form.save()
        run.enqueue()
        for w in form.warnings:
            messages.warning(request, w)
        run.refresh_from_db(fields=["status", "error"])
        if run.status == Run.Status.INTERRUPTED:
            messages.error(request, f"{run} was saved but not queued: {run.error}")
        else:
            messages.success(request, f"{run} is queued.")
        return redirect(run)
    ready = form.fields["dataset"].queryset.exists()
    return render(
        request,
        "runs/new.html",
        {
            "form": form,
            "ranges": safe_ranges_table(),
            "batch_ranges": {k: list(v) for k, v in BATCH_RANGES.items()},
            "presets": preset_summaries(),
            "has_ready_dataset": ready,
            "other_datasets": Dataset.objects.visible_to(request.user).exclude(
                status=Dataset.Status.READY
            )[:10],
        },
        status=400 if request.method == "POST" else 200,
    )


def _initial(request) -> dict:
    """?dataset=, ?config=, ?checkpoint=&start= prefill the form from links elsewhere."""
    initial = {}
    for key in ("dataset", "config", "checkpoint"):
        value = request.GET.get(key, "")
        if value.isdigit():
            initial[key] = int(value)
    if "config" in initial:
        initial["source"] = "config"
    if request.GET.get("start") in ("resume", "finetune") and "checkpoint" in initial:
        initial["start"] = request.GET["start"]
    if request.GET.get("preset") == "fewshot":
        # From the dataset page's "New voice" link: one more click starts the run.
        initial.update(source="fewshot", start="finetune")
        if "checkpoint" not in initial:
            base = few_shot_base(request.user, initial.get("dataset"))
            if base is not None:
                initial["checkpoint"] = base.pk
    return initial


def few_shot_base(user, dataset_id) -> Checkpoint | None:
    """The checkpoint a new voice starts from by default: the newest best checkpoint of a
    finished acoustic run on another dataset with the most speakers."""
    candidates = (
        Checkpoint.objects.visible_to(user)
        .filter(is_best=True, run__kind=Run.Kind.ACOUSTIC, run__status=Run.Status.SUCCEEDED)
        .exclude(run__dataset_id=dataset_id)
        .select_related("run__dataset")
        .order_by("-run__dataset__n_speakers", "-created")
    )
    return next((c for c in candidates if Path(c.path).is_file()), None)


def controller_summary(run: Run) -> dict | None:
    """What the adaptive controller did: its decisions and, per reason, how often it held.

    The trainer's rate-limited hold reports carry the run's running totals (`holds_total`), so the
    newest report alone gives every count; decisions are one event each.
    """
    adaptive = run.events.filter(kind="adaptive")
    latest = adaptive.filter(data__has_key="holds_total").order_by("-step", "-created").first()
    applied = adaptive.filter(data__applied=True).count()
    rejected = adaptive.filter(data__applied=False).count()
    if latest is None and not applied and not rejected:
        return None
    totals = latest.data.get("holds_total", {}) if latest else {}
    holds = [
        {"code": code, "reason": HOLD_REASONS.get(code, code), "count": count}
        for code, count in sorted(totals.items(), key=lambda kv: -kv[1])
        if count
    ]
    return {
        "applied": applied,
        "rejected": rejected,
        "holds": holds,
        "weight": latest.data.get("weight") if latest else None,
        "as_of": latest.step if latest else None,
    }


def run_detail(request, pk):
    run = _run(request, pk)
    snapshot = run.config_snapshot or {}
    size, batch = snapshot.get("size"), snapshot.get("batch_size")
    warning = (
        batch_warning(size, batch) if size in BATCH_RANGES and isinstance(batch, int) else None
    )
    diagnoses = {}
    for e in run.events.filter(kind="diagnosis").order_by("step"):
        diagnoses[e.data.get("code", e.pk)] = e  # the latest per pattern
    checkpoints = [live.checkpoint_dict(c) for c in run.checkpoints.order_by("-step")]
    return render(
        request,
        "runs/detail.html",
        {
            "run": run,
            "snapshot": sorted(snapshot.items()),
            "batch_warning": warning,
            "diagnoses": list(diagnoses.values()),
            "checkpoints": checkpoints,
            # Which checkpoint to keep, by a score of free-running synthesis (issue 14).
            "best_quality": scores.best_by_quality(checkpoints),
            "quality_formula": scores.QUALITY_FORMULA,
            "overfitting": scores.overfitting(run),
            "speaker_check": scores.speaker_before_after(run, checkpoints),
            "samples": run.samples.order_by("-step", "utterance_id")[: live.HISTORY_SAMPLES],
            "events": run.events.exclude(kind="diagnosis").order_by("-step", "-created")[:100],
            "controller": controller_summary(run),
            "resume_form": ResumeForm(run),
            "has_log": (Path(run.out_dir) / "worker.log").is_file() if run.out_dir else False,
            "ws_path": f"/ws/runs/{run.pk}/",
            "left_out": _left_out(run),
        },
    )


def _left_out(run) -> dict[str, int]:
    """Clips of the dataset the run does not train on, by kind: as recorded when it started,
    else (not started yet) as the dataset stands now."""
    from studio.datasets.reports import left_out

    recorded = run.events.filter(kind="data").order_by("created").first()
    if recorded is not None:
        return recorded.data.get("left_out", {})
    return left_out(run.dataset)


@require_POST
def run_cancel(request, pk):
    run = _run(request, pk)
    if not run.is_active:
        messages.info(request, f"{run} is {run.get_status_display().lower()}: nothing to cancel.")
        return redirect(run)
    run.request_cancel()
    run.event("status", f"cancel requested by {request.user.get_username()}")
    if run.status == Run.Status.CANCELLED:
        live.publish_status(run)
        messages.success(request, f"{run} was cancelled before it started.")
    else:
        messages.success(
            request, f"Stopping {run}: it saves a checkpoint and stops within seconds."
        )
    return redirect(run)


@require_POST
def run_resume(request, pk):
    run = _run(request, pk)
    form = ResumeForm(run, request.POST)
    if not run.can_resume:
        messages.error(
            request, f"{run} is {run.get_status_display().lower()}: it cannot be resumed."
        )
        return redirect(run)
    if not form.is_valid():
        for e in form.errors.get("steps", []):
            messages.error(request, e)
        return redirect(run)
    if not run.requeue(by=request.user.get_username(), steps=form.cleaned_data.get("steps")):
        return redirect(run)  # a second click, or the worker got there first
    live.publish_status(run)
    messages.success(request, f"{run} is queued to resume from its last checkpoint.")
    return redirect(run)


def run_log(request, pk):
    """The worker log of the run (the tail of it: a days-long run's log is long)."""
    run = _run(request, pk)
    path = Path(run.out_dir) / "worker.log" if run.out_dir else None
    text, truncated = "", False
    if path and path.is_file():
        size = path.stat().st_size
        with path.open("rb") as f:
            if size > LOG_TAIL_BYTES:
                f.seek(size - LOG_TAIL_BYTES)
                truncated = True
            text = f.read().decode("utf-8", errors="replace")
    if request.GET.get("format") == "text":
        return HttpResponse(text, content_type="text/plain; charset=utf-8")
    return render(request, "runs/log.html", {"run": run, "text": text, "truncated": truncated})


def run_metrics(request, pk):
    """The run's record as JSON points (downsampled like the live history); ?since=N for a gap."""
    run = _run(request, pk)
    since = request.GET.get("since", "")
    data = live.history(run, since=int(since) if since.isdigit() else None)
    names = [n for n in request.GET.getlist("name") if n]
    if names:
        for p in data["points"]:
            p["m"] = {k: v for k, v in p["m"].items() if k in names}
        data["points"] = [p for p in data["points"] if p["m"]]
    return JsonResponse(data)


def run_compare(request):
    ids = []
    for raw in request.GET.getlist("ids"):
        for part in raw.split(","):
            if part.strip().isdigit() and int(part) not in ids:
                ids.append(int(part))
    runs = list(
        Run.objects.visible_to(request.user)
        .filter(pk__in=ids[:COMPARE_MAX_RUNS])
        .select_related("dataset", "config")
    )
    runs.sort(key=lambda r: ids.index(r.pk))
    series = [
        {"id": r.pk, "name": str(r), "url": reverse("run_metrics", args=[r.pk])} for r in runs
    ]
    return render(
        request,
        "runs/compare.html",
        {
            "runs": runs,
            "series": series,
            "all_runs": Run.objects.visible_to(request.user)[:100],
            "selected": {r.pk for r in runs},
        },
    )


# --------------------------------------------------------------------------- private files


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def checkpoint_download(request, pk):
    ckpt = get_object_or_404(
        Checkpoint.objects.visible_to(request.user).select_related("run"), pk=pk
    )
    path = Path(ckpt.path)
    # Only files the studio wrote: a row edited to point elsewhere must not leak a file.
    if not (_inside(path, settings.STUDIO_RUNS_DIR) and path.is_file()):
        raise Http404("checkpoint file not found")
    name = f"run{ckpt.run_id}_step{ckpt.step:07d}{'_best' if ckpt.is_best else ''}.pt"
    return FileResponse(
        path.open("rb"), as_attachment=True, filename=name, content_type="application/octet-stream"
    )


@require_POST
def checkpoint_score(request, pk):
    """Queue the objective scores (SECS, MCD, WER, RTF) of one checkpoint on a cpu worker."""
    ckpt = get_object_or_404(
        Checkpoint.objects.visible_to(request.user).select_related("run"), pk=pk
    )
    if ckpt.run.kind == Run.Kind.VOCODER:
        # Scoring synthesises from text with the checkpoint; a vocoder has no text side.
        messages.error(
            request,
            f"Step {ckpt.step} is a vocoder checkpoint: scores are for acoustic models. "
            "Pick it as the vocoder on the synthesis page to hear it.",
        )
        return redirect(ckpt.run)
    if ckpt.queue_scoring():
        transaction.on_commit(lambda: live.publish_checkpoints(ckpt.run))
        messages.success(request, f"Scoring step {ckpt.step}: the row fills in within seconds.")
    else:
        messages.info(request, f"Step {ckpt.step} is already being scored.")
    return redirect(ckpt.run)


def _sample(request, pk) -> AudioSample:
    return get_object_or_404(AudioSample.objects.visible_to(request.user), pk=pk)


def _media_file(field, content_type: str):
    if not field:
        raise Http404("no such file")
    try:
        handle = field.open("rb")
    except FileNotFoundError as exc:
        raise Http404("file missing") from exc
    response = FileResponse(handle, content_type=content_type)
    response["Cache-Control"] = "private, max-age=3600"
    return response


def sample_audio(request, pk):
    return _media_file(_sample(request, pk).audio, "audio/wav")


def sample_mel(request, pk):
    return _media_file(_sample(request, pk).mel_image, "image/png")
