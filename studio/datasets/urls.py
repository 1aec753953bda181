"""URLs of the datasets area (included under /datasets/ by studio.urls)."""

from django.urls import path

from studio.datasets import views

urlpatterns = [
    path("", views.dataset_list, name="dataset_list"),
    path("new/", views.dataset_new, name="dataset_new"),
    path("upload/", views.dataset_upload, name="dataset_upload"),
    path("register/", views.dataset_register, name="dataset_register"),
    path("<int:pk>/", views.dataset_detail, name="dataset_detail"),
    path("<int:pk>/progress.json", views.dataset_progress, name="dataset_progress"),
    path("<int:pk>/problems.csv", views.dataset_problems_csv, name="dataset_problems_csv"),
    path("<int:pk>/durations.png", views.dataset_durations_png, name="dataset_durations_png"),
    path("<int:pk>/retry/", views.dataset_retry, name="dataset_retry"),
    path("<int:pk>/held-out/", views.dataset_held_out, name="dataset_held_out"),
    path("<int:pk>/delete/", views.dataset_delete, name="dataset_delete"),
    path("<int:pk>/quality.png", views.dataset_quality_png, name="dataset_quality_png"),
    path("<int:pk>/review/apply/", views.dataset_apply_review, name="dataset_apply_review"),
    path("<int:pk>/utterances/<int:uid>/review/", views.utterance_review, name="utterance_review"),
    path("<int:pk>/utterances/<int:uid>/audio", views.utterance_audio, name="utterance_audio"),
    path("<int:pk>/utterances/<int:uid>/mel.png", views.utterance_mel_png, name="utterance_mel"),
]
