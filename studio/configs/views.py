"""Pages of the configs area: the list of saved training configs and the editor."""

import functools
import json
from pathlib import Path

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render

from studio.configs.forms import TrainingConfigForm
from studio.models import TrainingConfig, safe_ranges_table

# Written by `python bench/adaptive.py --summary ...`: fixed weights against the adaptive
# controller, so whoever chooses between them sees what the choice was measured to do.
ABLATION_FILE = Path(__file__).with_name("adaptive_ablation.json")


@functools.cache
def adaptive_ablation() -> dict | None:
    try:
        return json.loads(ABLATION_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
        {
            "form": form,
            "config": config,
            "ranges": safe_ranges_table(),
            "batch_warning": warning,
            "ablation": adaptive_ablation(),
        },
        status=400 if request.method == "POST" else 200,
    )
