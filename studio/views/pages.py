from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render

from studio.forms import TrainingConfigForm
from studio.models import Dataset, Run, TrainingConfig, safe_ranges_table


def home(request):
    runs = Run.objects.visible_to(request.user).select_related("dataset", "config")[:8]
    datasets = Dataset.objects.visible_to(request.user)[:8]
    return render(request, "home.html", {"runs": runs, "datasets": datasets})


def config_list(request):
    configs = TrainingConfig.objects.visible_to(request.user).select_related("owner")
    return render(request, "configs/list.html", {"configs": configs})


def config_edit(request, pk=None):
    config = None
    if pk is not None:
        config = get_object_or_404(TrainingConfig.objects.visible_to(request.user), pk=pk)
    form = TrainingConfigForm(request.POST or None, instance=config)
    if request.method == "POST" and form.is_valid():
        config = form.save(commit=False)
        if config.owner_id is None:
            config.owner = request.user
        config.save()
        messages.success(request, f"Saved config “{config.name}”.")
        return redirect("config_list")
    warning = form.instance.batch_warning if form.instance.model_size else None
    return render(
        request,
        "configs/edit.html",
        {"form": form, "config": config, "ranges": safe_ranges_table(), "batch_warning": warning},
        status=400 if request.method == "POST" else 200,
    )


def not_found(request, exception=None):
    return render(request, "404.html", status=404)
