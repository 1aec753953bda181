"""In a real browser: the synthesis page offers HiFi-GAN universal, Griffin-Lim as the fast
preview and the user's fine-tuned vocoders; speaking through HiFi-GAN gives audio that plays,
and the predicted naturalness (DNSMOS) appears beside it.

The studio runs in a subprocess on the test database (tests/test_e2e_runs.py's fixtures);
a screenshot goes to test-output/.
"""

from __future__ import annotations

import pytest

from tests.test_api_synthesize import studio_checkpoint, vocoder_checkpoint
from tests.test_e2e_runs import OUTPUT, browser, live_studio, pytestmark, sign_in  # noqa: F401

pytestmark = [*pytestmark, pytest.mark.slow]


@pytest.fixture
def voices(user, tmp_path):
    """An (untrained) acoustic checkpoint and a fine-tuned vocoder, both alice's."""
    return studio_checkpoint(user, tmp_path, "alice-run"), vocoder_checkpoint(
        user, tmp_path, "alice-voc"
    )


def test_speak_through_hifigan_and_hear_it(voices, live_studio, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    sign_in(page, live_studio, "/synthesize/")
    vocoder = page.get_by_label("Vocoder", exact=False)
    vocoder.wait_for(timeout=90_000)  # the first visit builds the Gradio page
    # Opens on the studio's default (Griffin-Lim in tests); the menu holds all three kinds.
    page.wait_for_function(
        "() => [...document.querySelectorAll('input')].some(i => i.value.startsWith('Griffin-Lim'))",
        timeout=30_000,
    )
    vocoder.click()
    options = page.get_by_role("option")
    labels = [text.split("\n")[-1] for text in options.all_inner_texts()]  # no "✓" mark
    assert labels[0].startswith("HiFi-GAN universal"), labels
    assert any("alice-voc" in label for label in labels), labels
    assert labels[-1].startswith("Griffin-Lim (fast preview)"), labels
    options.first.click()

    # Four sentences: an untrained model says little, the pauses make it long enough for DNSMOS.
    page.get_by_label("Text").fill(
        "Hello there. How are you today? Fine, thanks. See you soon.", timeout=90_000
    )
    page.wait_for_function(
        "() => [...document.querySelectorAll('input')].some(i => i.value === 'narrator')",
        timeout=30_000,
    )  # the checkpoint's seen speaker, once the checkpoint is chosen
    page.get_by_role("button", name="Synthesise").click()
    page.get_by_text("vocoder: HiFi-GAN universal").wait_for(timeout=120_000)

    # Gradio's player (WaveSurfer) keeps its media element out of the page: decode the file
    # the page offers, as the browser would play it, then press the player's own Play.
    decoded = page.evaluate(
        """async () => {
            const link = [...document.querySelectorAll('a[href]')]
                .find((a) => a.getAttribute('href').endsWith('.wav'));
            const data = await (await fetch(link.href)).arrayBuffer();
            const audio = await new OfflineAudioContext(1, 1, 22050).decodeAudioData(data);
            const samples = audio.getChannelData(0);
            let peak = 0;
            for (const x of samples) peak = Math.max(peak, Math.abs(x));
            return {rate: audio.sampleRate, seconds: audio.duration, peak: peak};
        }"""
    )
    assert decoded["seconds"] > 0.3 and decoded["peak"] > 0, decoded
    controls = page.locator('[data-testid="waveform-Output"] [data-testid="waveform-controls"]')
    controls.get_by_role("button", name="Play", exact=True).click()
    page.wait_for_function(
        """() => {
            const box = document.querySelector('[data-testid="waveform-Output"]');
            return box.querySelector('#time').textContent !== '0:00'
                || !!box.querySelector('button[aria-label*="Pause"]');
        }""",
        timeout=10_000,
    )
    # DNSMOS comes after the audio, off the request path.
    mos = page.get_by_label("Predicted naturalness (DNSMOS overall, 1-5)")
    page.wait_for_function(
        "(input) => input.value !== '' && +input.value >= 1 && +input.value <= 5",
        arg=mos.element_handle(timeout=10_000),
        timeout=60_000,
    )
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "synthesis-page.png"), full_page=True)
