"""The studio's URLs: each area brings its own; the Gradio page is mounted in studio.asgi."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from studio import views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("configs/", include("studio.configs.urls")),
    path("datasets/", include("studio.datasets.urls")),
    path("runs/", include("studio.runs.urls")),
    path("", include("studio.synthesis.urls")),
    path("admin/", admin.site.urls),
]

handler404 = "studio.views.not_found"
