from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from studio.views import pages

urlpatterns = [
    path("", pages.home, name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("configs/", pages.config_list, name="config_list"),
    path("configs/new/", pages.config_edit, name="config_new"),
    path("configs/<int:pk>/", pages.config_edit, name="config_edit"),
    path("datasets/", include("studio.urls_datasets")),
    path("runs/", include("studio.urls_runs")),
    path("", include("studio.urls_synthesis")),
    path("admin/", admin.site.urls),
]

handler404 = "studio.views.pages.not_found"
