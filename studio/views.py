"""Pages that belong to no one area: the home page and the not-found page."""

from django.shortcuts import render

from studio.models import Dataset, Run


def home(request):
    runs = Run.objects.visible_to(request.user).select_related("dataset", "config")[:8]
    datasets = Dataset.objects.visible_to(request.user)[:8]
    return render(request, "home.html", {"runs": runs, "datasets": datasets})


def not_found(request, exception=None):
    return render(request, "404.html", status=404)
