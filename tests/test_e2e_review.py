"""In a real browser: the review queue on the dataset page. The worst clip is listed with its
audio, mel picture, scores and reasons; a person corrects a transcript, drops a clip, applies
the review, and a real cpu worker preprocesses again with those decisions."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from studio.datasets import importing
from studio.models import Dataset, Utterance
from tests import test_e2e_runs
from tests.conftest import wait_until
from tests.test_review_queue import make_corpus

browser = test_e2e_runs.browser
live_studio = test_e2e_runs.live_studio

pytestmark = test_e2e_runs.pytestmark


@pytest.fixture
def gated(user) -> Dataset:
    from django.conf import settings

    # Under the allowed roots the web server process sees too (it shares STUDIO_DATA_DIR).
    folder = make_corpus(Path(settings.STUDIO_DATASET_ROOTS[0]) / f"review-{uuid.uuid4().hex}")
    dataset = Dataset.objects.create(
        owner=user, name="Voice", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    importing.preprocess_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    return dataset


def _db(fn):
    """Run an ORM call off this thread: Playwright's sync API keeps an event loop running in
    it, where Django refuses database access."""

    def call():
        from django.db import connection

        try:
            return fn()
        finally:
            connection.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def _row(pk: int) -> Utterance:
    return _db(lambda: Utterance.objects.select_related("reviewed_by").get(pk=pk))


def test_review_queue_in_the_browser(gated, start_worker, live_studio, browser):
    noise = _db(lambda: gated.utterances.get(audio_path__endswith="anna_noise.wav"))
    clean = _db(lambda: gated.utterances.get(audio_path__endswith="ben_3.wav"))
    url = live_studio + gated.get_absolute_url()
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    test_e2e_runs.sign_in(page, live_studio, gated.get_absolute_url())

    item = page.locator(f"#review-{noise.pk}")
    assert "no voiced speech" in item.inner_text() and "SNR" in item.inner_text()
    assert "1 dropped" in page.inner_text("#review-counts")
    # The audio answers and the mel picture draws.
    audio_src = item.locator("audio").get_attribute("src")
    assert page.request.get(live_studio + audio_src).status == 200
    mel = item.locator("img.picture")
    mel.scroll_into_view_if_needed()
    wait_until(
        lambda: mel.evaluate("img => img.complete && img.naturalWidth > 0"), 30, message="mel"
    )

    # Correct the noise clip's transcript: recorded, but a clip without speech stays dropped.
    item.locator("textarea").fill("Only noise here.")
    item.locator("button", has_text="Save transcript").click()
    page.wait_for_url(url + "#review")
    assert "saved" in page.inner_text(".messages, body")
    noise = _row(noise.pk)
    assert noise.text == "Only noise here." and noise.original_text == "The cat sat on the mat."
    assert noise.reviewed_by is not None and noise.reviewed_at is not None

    # Drop an ordinary clip through the same form (it is judged, so it can be reviewed).
    page.goto(url)
    page.evaluate(
        """([action, token]) => {
            const f = document.createElement('form');
            f.method = 'post'; f.action = action;
            for (const [k, v] of [['decision', 'drop'], ['csrfmiddlewaretoken', token]]) {
                const i = document.createElement('input'); i.name = k; i.value = v; f.appendChild(i);
            }
            document.body.appendChild(f); f.submit();
        }""",
        [
            f"/datasets/{gated.pk}/utterances/{clean.pk}/review/",
            page.locator("input[name=csrfmiddlewaretoken]").first.get_attribute("value"),
        ],
    )
    page.wait_for_url(url + "#review")
    assert "(1 pending)" in page.inner_text("#apply-review")

    start_worker("cpu")
    page.click("#apply-review")
    page.wait_for_url(url)

    def applied() -> bool:
        return _db(lambda: Dataset.objects.get(pk=gated.pk).status) == Dataset.Status.READY

    wait_until(applied, 300, message="the review applied by the cpu worker")
    page.goto(url)
    assert "2 dropped" in page.inner_text("#review-counts")
    clean = _row(clean.pk)
    assert clean.verdict == "drop" and not clean.usable
    dropped = page.locator(f"#review-{clean.pk}")
    assert "dropped by a person in review" in dropped.inner_text()
    assert "Dropped by a person" in dropped.inner_text() and "alice" in dropped.inner_text()
    assert errors == []
