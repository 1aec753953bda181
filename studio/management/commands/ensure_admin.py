"""Make sure an admin account exists without a password in the repo.

The password comes from STUDIO_ADMIN_PASSWORD, or is generated once and written (mode 0600)
to the data folder, where `make run` tells the person to find it.
"""

import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin account if there is none; never changes an existing one."

    def add_arguments(self, parser):
        parser.add_argument("--username", default=settings.STUDIO_ADMIN_USER)

    def handle(self, *args, username, **options):
        User = get_user_model()
        if User.objects.filter(is_superuser=True).exists():
            self.stdout.write("An admin account exists.")
            return
        password_file = settings.DATA_DIR / "admin_password"
        password = os.environ.get("STUDIO_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, email="", password=password)
        if not os.environ.get("STUDIO_ADMIN_PASSWORD"):
            fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            self.stdout.write(f"Created admin '{username}'; password in {password_file}")
        else:
            self.stdout.write(f"Created admin '{username}' with STUDIO_ADMIN_PASSWORD")
