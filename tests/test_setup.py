"""The README's first command on a fresh clone: `make run` sets up, serves, stops, and restarts.

This is the slowest test of the suite (a cold `make run` builds a new virtualenv), and the one
that catches an install step someone did by hand.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
from conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
NAV_PAGES = ["/", "/datasets/", "/configs/", "/runs/", "/synthesize/"]
OUTPUT = ROOT / "test-output"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(port: int) -> dict:
    """The environment of a person's shell: none of the test suite's overrides."""
    drop = {
        "REDIS_URL",
        "DATABASE_URL",
        "STUDIO_DATA_DIR",
        "DJANGO_SETTINGS_MODULE",
        "STUDIO_TEST_DB_NAME",
        "STUDIO_ADMIN_PASSWORD",
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if "/.venv/" not in p)
    env["PORT"] = str(port)
    return env


class Studio:
    def __init__(self, folder: Path, port: int):
        self.folder, self.port = folder, port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = folder / f"make-run-{time.time_ns()}.log"
        self.log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            ["make", "run"],
            cwd=folder,
            env=clean_env(port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_first_page(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"make run exited {self.proc.returncode}:\n{self.output()[-5000:]}"
                )
            try:
                if requests.get(self.base + "/accounts/login/", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"no page after {timeout}s:\n{self.output()[-5000:]}")

    def processes(self) -> list[psutil.Process]:
        """Everything started from this checkout (web, workers, embedded Redis)."""
        found = []
        for p in psutil.process_iter(["cmdline", "cwd"]):
            try:
                text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if str(self.folder) in text and p.pid != os.getpid():
                found.append(p)
        return found

    def ctrl_c(self, timeout: float = 60) -> None:
        """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.log.close()


def sign_in(base: str, password: str) -> requests.Session:
    s = requests.Session()
    s.get(base + "/accounts/login/")
    r = s.post(
        base + "/accounts/login/",
        data={
            "username": "admin",
            "password": password,
            "csrfmiddlewaretoken": s.cookies["csrftoken"],
        },
        headers={"Referer": base + "/accounts/login/"},
        allow_redirects=False,
    )
    assert r.status_code == 302, r.text[:500]
    return s


def test_make_run_on_a_fresh_clone(tmp_path):
    folder = tmp_path / "studio"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True)
    port = free_port()
    timings = {}

    studio = Studio(folder, port)
    try:
        timings["cold_first_page_s"] = studio.wait_first_page(timeout=1200)
        out = studio.output()
        assert f"http://localhost:{port}/" in out
        assert "admin_password" in out  # tells the person how to sign in
        password = (folder / "data" / "admin_password").read_text().strip()
        assert password and password not in (ROOT / "README.md").read_text()

        for url in NAV_PAGES:
            r = requests.get(studio.base + url, allow_redirects=False, timeout=10)
            assert r.status_code == 302 and "/accounts/login/" in r.headers["Location"], url

        s = sign_in(studio.base, password)
        for url in [*NAV_PAGES, "/admin/"]:
            assert s.get(studio.base + url, timeout=30).status_code == 200, url

        page = s.get(studio.base + "/configs/new/").text
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = {
            "csrfmiddlewaretoken": token,
            "name": "kept-across-restarts",
            "model_size": "tiny",
            "optimization_level": "basic",
            "batch_size": 16,
            "steps": 100,
            "learning_rate": 0.001,
            "lr_warmup_steps": 10,
            "grad_clip_norm": 1,
            "grad_accum_steps": 1,
            "eval_every": 50,
            "checkpoint_every": 50,
            "seed": 1,
            "mel_loss_weight": 2.5,
            "kl_loss_weight": 1,
            "duration_loss_weight": 1,
            "pitch_loss_weight": 0.1,
            "energy_loss_weight": 0.1,
            "align_loss_weight": 1,
            "bin_loss_weight": 0.1,
        }
        r = s.post(
            studio.base + "/configs/new/",
            data=form,
            headers={"Referer": studio.base},
            allow_redirects=False,
        )
        assert r.status_code == 302, r.text[:1000]
        assert studio.processes(), "expected web, workers and redis to be running"
    finally:
        studio.ctrl_c()
    assert studio.proc.returncode is not None
    wait_until(
        lambda: not [p for p in studio.processes() if p.is_running()],
        timeout=10,
        message="every process to stop after Ctrl-C",
    )

    warm = Studio(folder, port)
    try:
        timings["warm_first_page_s"] = warm.wait_first_page(timeout=300)
        s = sign_in(warm.base, password)
        assert "kept-across-restarts" in s.get(warm.base + "/configs/").text
    finally:
        warm.ctrl_c()

    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "make_run_timings.json").write_text(json.dumps(timings))
    print(json.dumps(timings))
