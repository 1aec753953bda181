"""In a real browser: sign in, start a tiny run, watch the loss chart grow live, play a sample.

Debian's Chromium (never a downloaded browser) driven by Playwright, against the studio served
by uvicorn in a subprocess on the test database, with a real Celery worker training the run.
A screenshot of the run page goes to test-output/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.runtime import start_web
from tests.conftest import ROOT, wait_until
from tests.fixtures_runs import ready_dataset

CHROMIUM = os.environ.get("STUDIO_CHROMIUM", "/usr/bin/chromium")
OUTPUT = ROOT / "test-output"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_studio(django_db_blocker):
    """uvicorn serving studio.asgi on a free port, as `make run` does, on the test database;
    yields its base URL."""
    from django.conf import settings
    from django.db import connection

    env = dict(os.environ, STUDIO_TEST_DB_NAME=str(connection.settings_dict["NAME"]))
    env["PYTHONUNBUFFERED"] = "1"
    # Static files as production serves them (WhiteNoise from STATIC_ROOT), uPlot included.
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    assert (Path(settings.STATIC_ROOT) / "vendor" / "uplot" / "uPlot.iife.min.js").exists(), (
        "uPlot is missing: run `npm ci` (package-lock.json) before the browser tests"
    )
    port = free_port()
    log = open(Path(settings.DATA_DIR) / f"web-{port}.log", "wb")
    proc = start_web(port, env=env, log=log)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def dataset(user):
    return ready_dataset(user, name="synthetic voices")


@pytest.fixture
def gpu_worker(start_worker):
    return start_worker("gpu")


# Playwright's sync API runs an event loop in this thread, where Django refuses database
# calls: everything that touches the database is a fixture set up before the browser.
def test_start_a_run_watch_it_learn_and_hear_it(dataset, gpu_worker, live_studio, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(live_studio + "/runs/new/")  # signed out: the login page, then back here
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url("**/runs/new/")

    page.select_option("select[name=dataset]", str(dataset.pk))
    page.check("input[name=source][value=preset]")
    page.select_option("select[name=model_size]", "tiny")
    page.select_option("select[name=optimization_level]", "enhanced")
    page.fill("input[name=steps]", "14")
    page.fill("input[name=batch_size]", "4")
    assert "outside the recommended 8-16" in page.inner_text("#batch-warning")
    page.fill("input[name=eval_every]", "7")
    page.fill("input[name=checkpoint_every]", "7")
    page.click("#run-form button[type=submit]")
    page.wait_for_url("**/runs/*/")
    assert page.inner_text("#run-status") in ("Queued", "Running")  # the worker may be quick
    page.evaluate("window.__sameDocument = true")  # gone if the page ever reloads

    chart = page.locator("#chart-loss")
    wait_until(lambda: int(chart.get_attribute("data-points")) > 0, 240, message="first points")
    first = int(chart.get_attribute("data-points"))
    wait_until(lambda: int(chart.get_attribute("data-points")) > first, 240, message="new points")
    assert page.locator("#chart-loss canvas").count() == 1  # uPlot drew it
    assert page.inner_text("#conn-state") == "live"

    audio = page.locator("#samples audio").first
    audio.wait_for(state="attached", timeout=240_000)
    played = page.evaluate(
        """async () => {
            const a = document.querySelector('#samples audio');
            await a.play();
            await new Promise((ok) => setTimeout(ok, 300));
            return {paused: a.paused, time: a.currentTime, ended: a.ended, duration: a.duration};
        }"""
    )
    assert played["time"] > 0 or played["ended"], played
    assert page.locator("#samples img.picture").count() >= 1

    deadline = time.monotonic() + 240
    while page.inner_text("#run-status") != "Succeeded" and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    assert page.inner_text("#run-status") == "Succeeded"
    assert page.evaluate("window.__sameDocument === true")
    assert int(chart.get_attribute("data-points")) >= 14
    assert page.locator("#checkpoints tr").count() >= 1
    assert not errors, errors

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "run-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


@pytest.fixture
def two_runs(user, dataset):
    from studio.models import MetricPoint, Run
    from tests.fixtures_runs import tiny_run

    runs = []
    for k in range(2):
        run = tiny_run(user, dataset)
        for step in range(1, 31):
            MetricPoint.record(run.pk, step, {"loss/total": (k + 1) * 10.0 / step})
        MetricPoint.record(run.pk, 30, {"val/total": 1.0 + k})
        Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, current_step=30)
        runs.append(Run.objects.get(pk=run.pk))
    return runs


def sign_in(page, base: str, then: str) -> None:
    page.goto(base + then)
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url("**" + then.split("?")[0] + "*")


def test_runs_list_updates_live_and_compare_draws_both_runs(two_runs, live_studio, browser):
    import threading

    from studio import live
    from studio.models import Run

    a, b = two_runs
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in(page, live_studio, "/runs/")
    row = page.locator(f'tr[data-run-id="{a.pk}"]')
    assert row.locator('[data-field="status"]').inner_text() == "Running"
    # Predicates are functions, not bare expressions: a bare one is run through eval, which
    # the studio's Content-Security-Policy forbids.
    page.wait_for_function("() => document.getElementById('live-state').textContent === 'live'")

    # The worker's status message, sent from another thread (this one runs Playwright's loop).
    a.status, a.last_loss, a.current_step = Run.Status.SUCCEEDED, 0.3333, 30
    sender = threading.Thread(target=live.publish_status, args=(a,))
    sender.start()
    sender.join()
    page.wait_for_function(
        f"""() => document.querySelector('tr[data-run-id="{a.pk}"] [data-field="status"]')
            .textContent === 'Succeeded'"""
    )
    assert row.locator('[data-field="last_loss"]').inner_text() == "0.3333"

    page.check(f'input[name=ids][value="{a.pk}"]')
    page.check(f'input[name=ids][value="{b.pk}"]')
    page.click("#compare-form button[type=submit]")
    page.wait_for_url("**/runs/compare/**")
    page.wait_for_function("() => +document.getElementById('compare-chart').dataset.points === 30")
    assert page.locator("#compare-chart canvas").count() == 1
    legend = page.inner_text("#compare-chart")
    assert str(a) in legend and str(b) in legend
    page.select_option("#compare-metric", "val/total")
    page.wait_for_function(
        "() => document.getElementById('compare-title').textContent === 'val/total'"
    )
    assert page.get_attribute("#compare-chart", "data-points") == "1"
    assert not errors, errors
