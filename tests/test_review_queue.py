"""The quality gate in the studio: verdicts stored per utterance, the review queue on the dataset
page, decisions recorded (who, when) and applied at the next preprocessing, the problems CSV,
the score pictures and what a run page says was left out.

A real dataset throughout: a registered folder imported and preprocessed by the same services
the Celery tasks call.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from studio.datasets import importing
from studio.models import Dataset, Utterance
from tests.fixtures_audio import SR, TEXTS, voiced_clip

pytestmark = pytest.mark.django_db

NOISE_ID = "wavs/anna_noise"


@pytest.fixture(autouse=True)
def private_media(settings, tmp_path: Path):
    settings.STUDIO_DATASETS_DIR = tmp_path / "media" / "datasets"
    settings.STUDIO_DATASET_ROOTS = [tmp_path / "imports"]
    (tmp_path / "imports").mkdir()
    return tmp_path


def make_corpus(root: Path) -> Path:
    """Two voices of six clips each, and one clip of anna's that is only noise."""
    (root / "wavs").mkdir(parents=True)
    lines = ["audio_file|text|speaker_name"]
    for s, (spk, f0) in enumerate((("anna", 200), ("ben", 110))):
        for n in range(6):
            sf.write(root / "wavs" / f"{spk}_{n}.wav", voiced_clip(f0 + 3 * n, 1.2, seed=n + s), SR)
            lines.append(f"wavs/{spk}_{n}.wav|{TEXTS[n]}|{spk}")
    noise = np.random.default_rng(0).normal(0, 0.05, SR * 2).astype(np.float32)
    sf.write(root / "wavs" / "anna_noise.wav", noise, SR)
    lines.append("wavs/anna_noise.wav|The cat sat on the mat.|anna")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def ready(dataset: Dataset) -> Dataset:
    importing.preprocess_dataset(dataset.pk)
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.READY, dataset.status_message
    return dataset


@pytest.fixture
def gated(user, private_media) -> Dataset:
    folder = make_corpus(private_media / "imports" / "voice")
    dataset = Dataset.objects.create(
        owner=user, name="Voice", source=Dataset.Source.FOLDER, source_path=str(folder)
    )
    importing.import_dataset(dataset.pk)
    return ready(dataset)


def _noise(dataset: Dataset) -> Utterance:
    return dataset.utterances.get(audio_path__endswith="anna_noise.wav")


def test_preprocessing_stores_a_verdict_per_clip_and_drops_the_noise(gated):
    noise = _noise(gated)
    assert noise.verdict == "drop" and not noise.usable and noise.split == ""
    assert noise.verdict_reasons[0]["code"] == "no_speech"
    assert noise.quality["voiced_share"] < 0.05 and "similarity" in noise.quality
    others = gated.utterances.exclude(pk=noise.pk)
    assert set(others.values_list("verdict", flat=True)) == {"keep"}
    assert gated.n_utterances == 12


def test_the_queue_shows_the_worst_clips_with_audio_mel_scores_and_reasons(client_user, gated):
    noise = _noise(gated)
    page = client_user.get(f"/datasets/{gated.pk}/").content.decode()
    assert 'id="review"' in page and f'id="review-{noise.pk}"' in page
    assert "no voiced speech" in page and "SNR" in page
    audio = f"/datasets/{gated.pk}/utterances/{noise.pk}/audio"
    assert audio in page
    # A dropped clip still plays and has its picture: that is how a person judges it.
    assert client_user.get(audio).status_code == 200
    mel = client_user.get(f"/datasets/{gated.pk}/utterances/{noise.pk}/mel.png")
    assert mel.status_code == 200 and mel["Content-Type"] == "image/png"


def test_decisions_are_recorded_and_applied_at_the_next_preprocessing(
    client_user, user, gated, django_capture_on_commit_callbacks
):
    clean = gated.utterances.get(audio_path__endswith="ben_2.wav")
    url = f"/datasets/{gated.pk}/utterances/{clean.pk}/review/"
    assert client_user.post(url, {"decision": "drop"}).status_code == 302
    edited = gated.utterances.get(audio_path__endswith="anna_1.wav")
    client_user.post(
        f"/datasets/{gated.pk}/utterances/{edited.pk}/review/",
        {"decision": "", "text": "A bird sat at dawn."},
    )
    clean.refresh_from_db()
    edited.refresh_from_db()
    assert clean.review_decision == "drop" and clean.reviewed_by == user
    assert clean.reviewed_at is not None and clean.verdict == "keep"  # not applied yet
    assert edited.text == "A bird sat at dawn." and edited.original_text == TEXTS[1]

    with django_capture_on_commit_callbacks() as callbacks:
        response = client_user.post(f"/datasets/{gated.pk}/review/apply/")
    assert response.status_code == 302 and len(callbacks) == 1
    gated.refresh_from_db()
    assert gated.status == Dataset.Status.IMPORTED
    features = Path(gated.cache_dir) / "feats"
    before = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    ready(gated)  # what the queued task does
    clean.refresh_from_db()
    assert clean.verdict == "drop" and not clean.usable
    assert clean.verdict_reasons[0]["code"] == "reviewed_drop"
    after = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    redone = {name for name in before if after[name] != before[name]}
    # Only the edited clip is extracted again (its words add no new sound to the symbol table,
    # which would re-save every file's tokens, though still without touching the audio).
    assert redone == {"anna_1.pt"}


def test_bad_review_input_gets_a_message_not_an_error(client_user, gated):
    noise = _noise(gated)
    url = f"/datasets/{gated.pk}/utterances/{noise.pk}/review/"
    response = client_user.post(url, {"decision": "maybe"}, follow=True)
    assert response.status_code == 200 and "Choose keep or drop" in response.content.decode()
    response = client_user.post(url, {"decision": "", "text": "   "}, follow=True)
    assert "cannot be empty" in response.content.decode()
    noise.refresh_from_db()
    assert noise.review_decision == "" and noise.text == "The cat sat on the mat."
    assert client_user.get(url).status_code == 405


def test_another_persons_queue_is_a_404(client, other_user, gated):
    client.force_login(other_user)
    noise = _noise(gated)
    url = f"/datasets/{gated.pk}/utterances/{noise.pk}/review/"
    assert client.post(url, {"decision": "keep"}).status_code == 404
    assert client.post(f"/datasets/{gated.pk}/review/apply/").status_code == 404
    assert client.get(f"/datasets/{gated.pk}/quality.png").status_code == 404


def test_problems_csv_lists_flagged_clips_with_verdict_and_reason(client_user, gated):
    body = client_user.get(f"/datasets/{gated.pk}/problems.csv").content.decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    flagged = [r for r in rows if r["code"] == "quality_drop"]
    assert len(flagged) == 1
    assert flagged[0]["verdict"] == "drop" and flagged[0]["reason"] == "no_speech"
    assert flagged[0]["file"] == "wavs/anna_noise.wav" and flagged[0]["kept"] == "no"


def test_score_histograms_per_speaker(client_user, gated):
    response = client_user.get(f"/datasets/{gated.pk}/quality.png?speaker=anna")
    assert response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_page_says_what_was_left_out(client_user, user, gated):
    from fixtures_runs import tiny_run

    from studio.runs.tasks import record_left_out

    run = tiny_run(user, dataset=gated)
    record_left_out(run)
    record_left_out(run)  # a resumed run does not record it twice
    assert run.events.filter(kind="data").count() == 1
    page = client_user.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="run-left-out"' in page and "1 no speech" in page
