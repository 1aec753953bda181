"""In a real browser: the checkpoint rows of a run page show scores, errors, and the Score button
whose result arrives over the WebSocket without a reload.

The page's script redraws every row from the live history on connect, so what is asserted here
is the script's rendering (the server-rendered rows are checked in test_scores.py).
"""

from __future__ import annotations

import pytest

from studio.models import Checkpoint
from tests import test_e2e_runs, test_scores
from tests.conftest import wait_until
from tests.fixtures_runs import tiny_run

# The browser, the daphne server and the two-step checkpoint, as the neighbouring modules build them.
browser = test_e2e_runs.browser
live_studio = test_e2e_runs.live_studio
trained_checkpoint = test_scores.trained_checkpoint

pytestmark = test_e2e_runs.pytestmark


@pytest.fixture
def rows(user, trained_checkpoint) -> dict[str, Checkpoint]:
    run = tiny_run(user)
    make = Checkpoint.objects.create
    return {
        "fresh": make(run=run, step=2, path=str(trained_checkpoint), is_best=True),
        "broken": make(
            run=run,
            step=4,
            path=str(trained_checkpoint),
            scores={"state": "error", "error": "the checkpoint file /x.pt is missing"},
        ),
        "scored": make(run=run, step=6, path=str(trained_checkpoint), scores=test_scores.DONE),
    }


def test_score_button_fills_the_row_live(rows, start_worker, live_studio, browser):
    start_worker("cpu")
    run_url = live_studio + rows["fresh"].run.get_absolute_url()
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    test_e2e_runs.sign_in(page, live_studio, run_url.removeprefix(live_studio))
    wait_until(lambda: page.inner_text("#conn-state") == "live", 30, message="the socket")

    def row(name: str):
        return page.locator(f'#checkpoints tr[data-checkpoint-id="{rows[name].pk}"]')

    scored = row("scored").inner_text()
    assert "SECS 0.63" in scored and "MCD 6.09 dB" in scored and "RTF 0.040" in scored
    assert "WER 100 % vs 50 % GT" in scored and "on 3 utterances" in scored
    assert "Not scored: the checkpoint file /x.pt is missing" in row("broken").inner_text()
    assert row("broken").locator("button", has_text="Score").count() == 1  # may try again

    row("fresh").locator("button", has_text="Score").click()
    page.wait_for_url(run_url)
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads from here on
    wait_until(
        lambda: "SECS" in row("fresh").inner_text() or "Not scored" in row("fresh").inner_text(),
        120,
        message="the scores over the socket",
    )
    text = row("fresh").inner_text()
    assert "SECS" in text and "MCD" in text and "dB" in text and "RTF" in text, text
    assert "scoring…" not in text and row("fresh").locator("button").count() == 1
    assert page.evaluate("window.__sameDocument === true")
    assert not errors, errors

    test_e2e_runs.OUTPUT.mkdir(exist_ok=True)
    page.locator("#checkpoints").screenshot(
        path=str(test_e2e_runs.OUTPUT / "checkpoint-scores.png")
    )


@pytest.fixture
def quality_run(user, trained_checkpoint):
    """Three scored checkpoints and their score points (made before the browser's event loop
    runs: the ORM is not for async contexts)."""
    from studio.models import MetricPoint

    run = tiny_run(user)
    for step, quality in ((2, 0.41), (4, 0.52), (6, 0.47)):
        MetricPoint.record(run.pk, step, {"val/mel": 1.0 / step, "score/quality": quality})
        MetricPoint.record(run.pk, step, {"score/mcd_db": 9.0 - step / 2})
        Checkpoint.objects.create(
            run=run,
            step=step,
            path=str(trained_checkpoint),
            scores=dict(
                test_scores.DONE,
                quality=quality,
                normalised_secs_unseen=0.33,
                skipped={"dnsmos": "DNSMOS needs the 'speechmos' and 'onnxruntime' packages"},
            ),
        )
    return run


def test_quality_by_step_is_drawn_beside_the_losses(quality_run, live_studio, browser):
    run_url = live_studio + quality_run.get_absolute_url()
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    test_e2e_runs.sign_in(page, live_studio, run_url.removeprefix(live_studio))
    wait_until(lambda: page.inner_text("#conn-state") == "live", 30, message="the socket")
    wait_until(
        lambda: page.get_attribute("#chart-quality", "data-points") == "3",
        30,
        message="three quality points on the chart",
    )
    assert page.get_attribute("#chart-mcd", "data-points") == "3"
    assert "step 4" in page.inner_text("#best-quality")
    # The rows as the script redraws them from the history carry the new scores too.
    row = page.locator("#checkpoints tr").first.inner_text()
    assert "Q 0.470" in row and "unseen 0.33" in row and "dnsmos skipped: DNSMOS needs" in row
    assert not errors, errors
    test_e2e_runs.OUTPUT.mkdir(exist_ok=True)
    page.locator("#charts").screenshot(path=str(test_e2e_runs.OUTPUT / "quality-by-step.png"))
