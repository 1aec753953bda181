"""Production configuration: `check --deploy` is clean and the compose file is accepted."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_check_deploy_reports_nothing_serious(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DJANGO_SETTINGS_MODULE", "STUDIO_TEST_DB_NAME")
    }
    env.update(
        DJANGO_SETTINGS_MODULE="studio.settings",
        STUDIO_DATA_DIR=str(tmp_path),
        SECRET_KEY="a-production-secret-" + "x" * 50,
        STUDIO_HTTPS="1",
        ALLOWED_HOSTS="studio.example.org",
    )
    out = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # HSTS preload (W021) is the site owner's choice (SECURE_HSTS_PRELOAD=1); nothing else may show.
    issues = [
        line for line in out.stderr.splitlines() + out.stdout.splitlines() if line.startswith("?:")
    ]
    assert [i for i in issues if "security.W021" not in i] == [], out.stderr


def test_secret_key_is_generated_once_and_private(tmp_path):
    from studio.runtime import load_or_create_secret_key

    key = load_or_create_secret_key(tmp_path / "secret_key")
    assert len(key) >= 50
    assert load_or_create_secret_key(tmp_path / "secret_key") == key
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_unix_socket_urls_translate_for_celery():
    from studio.runtime import celery_broker_url

    assert (
        celery_broker_url("unix:///d/redis.sock?db=0")
        == "redis+socket:///d/redis.sock?virtual_host=0"
    )
    assert celery_broker_url("redis://h:6379/3") == "redis://h:6379/3"


def compose_command():
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_accepted():
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed (.ci/run installs it)"
        )
    env = dict(os.environ, POSTGRES_PASSWORD="pw", SECRET_KEY="sk")
    out = subprocess.run(
        [*cmd, "-f", "docker-compose.yml", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for service in ("postgres", "redis", "web", "worker-cpu", "worker-gpu"):
        assert f"{service}:" in out.stdout
    assert "nvidia" in out.stdout and "-Q" in out.stdout
