"""URLs of the runs area."""

from django.urls import path

from studio.runs import views as runs

urlpatterns = [
    path("", runs.run_list, name="run_list"),
    path("new/", runs.run_new, name="run_new"),
    path("compare/", runs.run_compare, name="run_compare"),
    path("<int:pk>/", runs.run_detail, name="run_detail"),
    path("<int:pk>/cancel/", runs.run_cancel, name="run_cancel"),
    path("<int:pk>/resume/", runs.run_resume, name="run_resume"),
    path("<int:pk>/log/", runs.run_log, name="run_log"),
    path("<int:pk>/metrics.json", runs.run_metrics, name="run_metrics"),
    path("checkpoints/<int:pk>/download/", runs.checkpoint_download, name="checkpoint_download"),
    path("checkpoints/<int:pk>/score/", runs.checkpoint_score, name="checkpoint_score"),
    path("samples/<int:pk>/audio.wav", runs.sample_audio, name="sample_audio"),
    path("samples/<int:pk>/mel.png", runs.sample_mel, name="sample_mel"),
]
