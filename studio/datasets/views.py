"""Pages of the datasets area. Thin: the work is in importing, reports and tasks; every lookup goes through
Dataset.objects.visible_to, so another person's dataset is a 404, never a peek."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.db.models import Q
from django.db.models.deletion import ProtectedError
from django.http import (
    Http404,
    HttpResponse,
    JsonResponse,
)
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_POST

from studio.datasets import importing, reports, tasks
from studio.datasets.forms import HeldOutSpeakersForm, RegisterFolderForm, UploadDatasetForm
from studio.models import Dataset, Utterance
from studio.security import audio_file_response


class SizeLimitedUploadHandler(FileUploadHandler):
    """Stops reading an upload as soon as it passes the limit, before it is copied anywhere.

    Placed first, it passes every chunk on to Django's own handlers, which stream large files
    to a temporary file on disk.
    """

    def __init__(self, request, limit: int):
        super().__init__(request)
        self.limit = limit
        self.exceeded = False

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        # The declared length is only a hint; the chunks below are what is enforced.
        self.exceeded = content_length > self.limit + 64 * 1024

    def receive_data_chunk(self, raw_data, start):
        if self.exceeded or start + len(raw_data) > self.limit:
            self.exceeded = True
            raise StopUpload(connection_reset=True)
        return raw_data

    def file_complete(self, file_size):
        return None


def _datasets(request):
    return Dataset.objects.visible_to(request.user).select_related("owner")


def _dataset(request, pk: int) -> Dataset:
    return get_object_or_404(_datasets(request), pk=pk)


def _new_page(request, upload_form=None, register_form=None, status=200):
    return render(
        request,
        "datasets/new.html",
        {
            "upload_form": upload_form or UploadDatasetForm(),
            "register_form": register_form or RegisterFolderForm(),
            "roots": settings.STUDIO_DATASET_ROOTS,
            "max_upload": settings.STUDIO_MAX_UPLOAD_BYTES,
        },
        status=status,
    )


@require_GET
def dataset_list(request):
    datasets = _datasets(request)
    return render(request, "datasets/list.html", {"datasets": datasets})


@require_GET
def dataset_new(request):
    return _new_page(request)


@csrf_exempt
def dataset_upload(request):
    # The size limit must be in place before anything reads the body, and the CSRF middleware
    # reads it; hence exempt here and protect the inner view (Django's documented pattern).
    if request.method != "POST":
        return redirect("dataset_new")
    limiter = SizeLimitedUploadHandler(request, settings.STUDIO_MAX_UPLOAD_BYTES)
    request.upload_handlers.insert(0, limiter)
    return _upload(request, limiter)


@csrf_protect
def _upload(request, limiter: SizeLimitedUploadHandler):
    form = UploadDatasetForm(request.POST, request.FILES)
    if limiter.exceeded:
        form.is_valid()
        form.errors.pop("archive", None)
        form.add_error(
            "archive",
            f"The archive is larger than the limit of "
            f"{filesizeformat(settings.STUDIO_MAX_UPLOAD_BYTES)}. Register the folder on the "
            "server instead.",
        )
        return _new_page(request, upload_form=form, status=413)
    if not form.is_valid():
        return _new_page(request, upload_form=form, status=400)
    data = form.cleaned_data
    dataset = importing.create_from_upload(
        request.user, data["name"], data["archive"], data["format"], data["language"]
    )
    tasks.queue_import(dataset)
    messages.success(request, f"Uploaded “{dataset.name}”; it is being imported.")
    return redirect(dataset.get_absolute_url())


@require_POST
def dataset_register(request):
    form = RegisterFolderForm(request.POST)
    if not form.is_valid():
        return _new_page(request, register_form=form, status=400)
    data = form.cleaned_data
    dataset = importing.register_folder(
        request.user, data["name"], data["path"], data["format"], data["language"]
    )
    tasks.queue_import(dataset)
    messages.success(request, f"Registered “{dataset.name}”; it is being imported.")
    return redirect(dataset.get_absolute_url())


@require_GET
def dataset_detail(request, pk: int):
    dataset = _dataset(request, pk)
    speakers = dataset.speakers.filter(n_utterances__gt=0).order_by("name")
    longest = max((s.total_seconds for s in speakers), default=0.0) or 1.0
    return render(
        request,
        "datasets/detail.html",
        {
            "dataset": dataset,
            "speakers": [(s, 100.0 * s.total_seconds / longest) for s in speakers],
            "problems": reports.problem_table(dataset),
            "not_used": dataset.utterances.filter(usable=False).count(),
            "split": reports.split_counts(dataset),
            "examples": reports.examples(dataset),
            "stale": tasks.is_stale(dataset),
            "can_retry": tasks.can_retry(dataset),
            "held_out_form": HeldOutSpeakersForm(dataset),
            "review_queue": reports.review_queue(dataset),
            "review_counts": reports.review_counts(dataset),
        },
    )


@require_POST
def dataset_held_out(request, pk: int):
    """Mark the speakers kept out of training; runs created afterwards leave them out."""
    dataset = _dataset(request, pk)
    form = HeldOutSpeakersForm(dataset, request.POST)
    if not form.is_valid():
        for error in form.errors.get("held_out", []) + form.non_field_errors():
            messages.error(request, error)
        return redirect(dataset.get_absolute_url())
    names = form.save()
    if names:
        messages.success(
            request,
            f"Held out: {', '.join(names)}. Runs created from now on never train on them; "
            "their scores clone them from 3 clips.",
        )
    else:
        messages.success(request, "No speaker is held out: runs train on every speaker.")
    return redirect(dataset.get_absolute_url())


@require_GET
def dataset_progress(request, pk: int):
    dataset = _dataset(request, pk)
    return JsonResponse(
        {
            "status": dataset.status,
            "status_display": dataset.get_status_display(),
            "busy": dataset.is_busy,
            "progress": round(dataset.progress, 4),
            "eta_seconds": None if dataset.eta_seconds is None else round(dataset.eta_seconds),
            "message": dataset.status_message,
            "utterances": dataset.n_utterances,
            "speakers": dataset.n_speakers,
            "hours": round(dataset.hours, 4),
            "stale": tasks.is_stale(dataset),
        }
    )


@require_GET
def dataset_problems_csv(request, pk: int):
    dataset = _dataset(request, pk)
    # Built whole: even 100,000 problems are a few MB, and under ASGI a synchronous streaming
    # iterator would be buffered by Django anyway.
    body = "".join(reports.csv_line(row) for row in reports.problem_csv_rows(dataset))
    response = HttpResponse(body, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="dataset-{dataset.pk}-problems.csv"'
    return response


@require_GET
def dataset_durations_png(request, pk: int):
    dataset = _dataset(request, pk)
    response = HttpResponse(reports.duration_histogram_png(dataset), content_type="image/png")
    response["Cache-Control"] = "private, max-age=10"
    return response


def _utterance(request, pk: int, uid: int) -> Utterance:
    """A usable utterance of a visible dataset: rows a problem dropped (a file that did not
    decode as audio, say a page.html named by the metadata) are never served in any form.
    Clips the quality gate judged decoded fine, so the review queue may play those it dropped."""
    dataset = _dataset(request, pk)
    decoded = Q(usable=True) | ~Q(verdict="")
    usable = dataset.utterances.filter(decoded, sample_rate__isnull=False)
    utterance = get_object_or_404(usable.exclude(audio_path=""), pk=uid)
    utterance.dataset = dataset
    return utterance


def _audio_path(utterance: Utterance) -> Path:
    """The file, provided it still lies inside the dataset's own folder (after following
    links): a row edited to point elsewhere, or a link swapped in later, leaks nothing."""
    path = Path(utterance.audio_path)
    if not importing.inside_dataset(utterance.dataset, path) or not path.is_file():
        raise Http404("the audio file is no longer there")
    return path


@require_GET
def utterance_audio(request, pk: int, uid: int):
    utterance = _utterance(request, pk, uid)
    response = audio_file_response(_audio_path(utterance), f"utterance-{utterance.pk}")
    if response is None:
        raise Http404("the file does not decode as audio")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@require_GET
def utterance_mel_png(request, pk: int, uid: int):
    utterance = _utterance(request, pk, uid)
    _audio_path(utterance)
    try:
        png = reports.mel_png(utterance)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        # An undecodable file has no picture; the problems table already says why.
        raise Http404(f"no mel picture: {exc}") from exc
    response = HttpResponse(png, content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@require_POST
def dataset_retry(request, pk: int):
    dataset = _dataset(request, pk)
    step = tasks.retry(dataset)
    if step:
        messages.success(request, f"{step.capitalize()} queued again; finished work is kept.")
    else:
        messages.info(request, "Nothing to retry: the dataset is ready or still being worked on.")
    return redirect(dataset.get_absolute_url())


@require_POST
def dataset_delete(request, pk: int):
    dataset = _dataset(request, pk)
    name, url, folder = dataset.name, dataset.get_absolute_url(), importing.dataset_dir(dataset)
    try:
        dataset.delete()
    except ProtectedError:
        messages.error(request, f"“{name}” has training runs; delete those first.")
        return redirect(url)
    importing.delete_files(folder)
    messages.success(request, f"Deleted “{name}”.")
    return redirect("dataset_list")


# --------------------------------------------------------------------------- the review queue


@require_GET
def dataset_quality_png(request, pk: int):
    dataset = _dataset(request, pk)
    speaker = request.GET.get("speaker", "")[:200]
    response = HttpResponse(
        reports.quality_histogram_png(dataset, speaker), content_type="image/png"
    )
    response["Cache-Control"] = "private, max-age=10"
    return response


@require_POST
def utterance_review(request, pk: int, uid: int):
    """Keep, drop or correct the transcript of a clip the quality gate flagged; recorded with
    who and when, applied at the next preprocessing."""
    dataset = _dataset(request, pk)
    utterance = get_object_or_404(dataset.utterances.exclude(verdict=""), pk=uid)
    decision = request.POST.get("decision", "")
    text = request.POST.get("text")
    if decision not in ("", "keep", "drop"):
        messages.error(request, "Choose keep or drop.")
        return redirect(dataset.get_absolute_url() + "#review")
    if text is not None and len(text) > 5000:
        messages.error(request, "That transcript is too long (5000 characters at most).")
        return redirect(dataset.get_absolute_url() + "#review")
    try:
        utterance.review(request.user, decision, text)
    except ValidationError as exc:
        messages.error(request, " ".join(exc.messages))
        return redirect(dataset.get_absolute_url() + "#review")
    done = {"keep": "kept", "drop": "dropped"}.get(decision, "saved")
    messages.success(
        request,
        f"“{utterance.item_id}” {done}. Apply the review to preprocess again; only changed "
        "clips are redone.",
    )
    return redirect(dataset.get_absolute_url() + "#review")


@require_POST
def dataset_apply_review(request, pk: int):
    """Preprocess again so review decisions and corrected transcripts take effect: every
    unchanged clip's features and scores are reused, only edited clips are redone."""
    dataset = _dataset(request, pk)
    moved = Dataset.objects.filter(pk=dataset.pk, status=Dataset.Status.READY).update(
        status=Dataset.Status.IMPORTED, status_message="Preprocessing again to apply the review."
    )
    if not moved:
        messages.info(request, "The dataset is busy; apply the review once it is ready.")
        return redirect(dataset.get_absolute_url())
    tasks.queue_preprocess(dataset)
    messages.success(request, "Applying the review: preprocessing reuses every unchanged clip.")
    return redirect(dataset.get_absolute_url())
