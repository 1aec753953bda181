"""URLs of the configs area (included under /configs/ by studio.urls)."""

from django.urls import path

from studio.configs import views

urlpatterns = [
    path("", views.config_list, name="config_list"),
    path("new/", views.config_edit, name="config_new"),
    path("<int:pk>/", views.config_edit, name="config_edit"),
]
