"""Settings for the test suite: a throw-away data folder and a real Redis.

Chosen here rather than in conftest.py because pytest-django reads settings before any
conftest runs. Celery workers started by tests inherit this environment, so they agree.
"""

import atexit
import os
import subprocess
import tempfile
from pathlib import Path

from studio.runtime import default_redis_url, redis_command, redis_reachable, wait_for_redis

os.environ.setdefault("STUDIO_DATA_DIR", tempfile.mkdtemp(prefix="studio-test-"))
os.environ.setdefault("STUDIO_ADMIN_PASSWORD", "not-used-in-tests")


def _pick_redis() -> str:
    """The Redis at REDIS_URL (default: db 15 of the local one), else the embedded one."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    if redis_reachable(url):
        return url
    data_dir = Path(tempfile.mkdtemp(prefix="studio-redis-"))
    proc = subprocess.Popen(
        redis_command(data_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    atexit.register(proc.terminate)
    url = default_redis_url(data_dir)
    if not wait_for_redis(url):
        proc.kill()
        raise RuntimeError("no Redis at REDIS_URL and the embedded one did not start")
    return url


os.environ["REDIS_URL"] = _pick_redis()

from studio.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in tests

# Each test builds the Gradio page it needs; a background build per test would only slow them.
STUDIO_SYNTH_PREWARM = False

# Griffin-Lim where speed matters; the tests that need HiFi-GAN ask for it by name.
STUDIO_VOCODER = "griffin-lim"
STUDIO_EVAL_VOCODER = "griffin-lim"
