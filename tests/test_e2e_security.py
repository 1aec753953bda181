"""In a real browser, the Content-Security-Policy blocks nothing the studio itself needs: the
dataset page (progress script, delete confirmation), the run pages (uPlot charts) and the
Gradio page under /synthesize/ run without a single CSP violation or page error.

Served by uvicorn as `make run` starts it; Debian's Chromium through Playwright.
"""

from __future__ import annotations

import pytest

from studio.models import Dataset
from studio.security import GRADIO_CSP
from tests.test_e2e_runs import CHROMIUM, browser, live_studio  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not __import__("pathlib").Path(CHROMIUM).exists(),
        reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)",
    ),
]


@pytest.fixture
def busy_dataset(user):
    return Dataset.objects.create(
        owner=user, name="busy", status=Dataset.Status.IMPORTING, progress=0.25
    )


def test_pages_and_the_gradio_mount_run_under_the_policy(busy_dataset, live_studio, browser):  # noqa: F811
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"error: {e}"))
    page.on(
        "console",
        lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(live_studio + "/accounts/login/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-pass-123")
    page.click("button[type=submit]")
    page.wait_for_url(live_studio + "/")

    page.goto(f"{live_studio}/datasets/{busy_dataset.pk}/")
    # The progress script (a static file now, not inline) polls and fills in the numbers.
    page.wait_for_function(
        "() => document.getElementById('progress-percent').textContent === '25%'"
    )
    asked = []
    page.on("dialog", lambda d: (asked.append(d.message), d.dismiss()))
    page.click("button.danger")
    assert asked == ["Delete this dataset and its cached features?"]
    assert page.url.endswith(f"/datasets/{busy_dataset.pk}/")  # dismissed: nothing deleted

    page.goto(live_studio + "/runs/")
    response = page.goto(live_studio + "/synthesize/")
    assert response.headers["content-security-policy"] == GRADIO_CSP  # Gradio's own page
    assert response.headers["x-content-type-options"] == "nosniff"
    # Gradio boots from its inline scripts; its form appears once the app has rendered.
    page.wait_for_selector("textarea", timeout=180_000)
    assert problems == []
