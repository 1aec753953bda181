"""Held-out speakers: marked on the dataset page, frozen into the runs made from it, never
trained on, and handed to the scores (with every clip) to be cloned as unseen voices.

The session's feature cache has two voices, "low" and "high", six clips each; the dataset's
Speaker and Utterance rows are made here to match it, as the import would.
"""

from __future__ import annotations

import json
import re

import pytest

from studio.models import Run, Speaker, Utterance
from studio.runs.tasks import build_trainer, scoring_inputs
from tests.fixtures_runs import ready_dataset, tiny_config, tiny_run


def dataset_with_rows(owner, name: str = "two voices"):
    """A ready dataset on the session cache, with its Speaker and Utterance rows."""
    dataset = ready_dataset(owner, name)
    cache = dataset.cache_dir
    records = [json.loads(x) for x in open(f"{cache}/items.jsonl").read().splitlines() if x]
    for rec in records:
        speaker, _ = Speaker.objects.get_or_create(dataset=dataset, name=rec["speaker"])
        Speaker.objects.filter(pk=speaker.pk).update(n_utterances=speaker.n_utterances + 1)
        speaker.n_utterances += 1
        Utterance.objects.create(
            dataset=dataset,
            speaker=speaker,
            item_id=rec["id"],
            audio_path=rec["audio_path"],
            text=rec["text"],
            split=rec["split"],
        )
    return dataset


def speaker_ids(dataset, *names) -> list[str]:
    return [str(s.pk) for s in dataset.speakers.filter(name__in=names)]


@pytest.mark.django_db
def test_the_dataset_page_marks_speakers_held_out(client_user, user):
    dataset = dataset_with_rows(user)
    url = f"/datasets/{dataset.pk}/held-out/"
    page = client_user.get(dataset.get_absolute_url()).content.decode()
    assert f'action="{url}"' in page and 'name="held_out"' in page
    assert "high (6)" in page and "low (6)" in page

    answer = client_user.post(url, {"held_out": speaker_ids(dataset, "high")}, follow=True)
    assert answer.status_code == 200
    assert "Held out: high." in answer.content.decode()
    assert dataset.held_out_speakers() == ["high"]
    checked = re.search(r'<input[^>]*name="held_out"[^>]*checked[^>]*>', answer.content.decode())
    assert checked and speaker_ids(dataset, "high")[0] in checked.group(0)

    # Unticking every box holds nobody out again.
    client_user.post(url, {})
    assert dataset.held_out_speakers() == []


@pytest.mark.django_db
def test_bad_choices_are_refused_with_a_reason(client_user, user):
    dataset = dataset_with_rows(user)
    url = f"/datasets/{dataset.pk}/held-out/"
    everyone = client_user.post(url, {"held_out": speaker_ids(dataset, "high", "low")}, follow=True)
    assert "Keep at least one speaker for training" in everyone.content.decode()
    assert dataset.held_out_speakers() == []

    Speaker.objects.filter(dataset=dataset, name="high").update(n_utterances=3)
    few = client_user.post(url, {"held_out": speaker_ids(dataset, "high")}, follow=True)
    assert "high: a held-out speaker needs at least 4 usable clips" in few.content.decode()
    assert dataset.held_out_speakers() == []

    stranger = client_user.post(url, {"held_out": ["not-a-number"]}, follow=True)
    assert stranger.status_code == 200 and dataset.held_out_speakers() == []


@pytest.mark.django_db
def test_only_the_owner_may_mark_and_only_by_post(client, user, other_user):
    dataset = dataset_with_rows(user)
    url = f"/datasets/{dataset.pk}/held-out/"
    client.force_login(other_user)
    assert client.post(url, {"held_out": speaker_ids(dataset, "high")}).status_code == 404
    client.force_login(user)
    assert client.get(url).status_code == 405
    assert dataset.held_out_speakers() == []


@pytest.mark.django_db
def test_a_run_made_from_the_dataset_never_trains_on_them(client_user, user):
    dataset = dataset_with_rows(user)
    Speaker.objects.filter(dataset=dataset, name="high").update(held_out=True)
    config = tiny_config(user)
    answer = client_user.post(
        "/runs/new/",
        {"dataset": dataset.pk, "source": "config", "config": config.pk, "start": "scratch"},
    )
    assert answer.status_code == 302, answer.content.decode()[:2000]
    run = Run.objects.get(dataset=dataset)
    assert run.config_snapshot["held_out_speakers"] == ["high"]
    assert run.train_config().held_out_speakers == ["high"]

    # Changing the dataset later does not change the run: a resume holds out the same voice.
    Speaker.objects.filter(dataset=dataset).update(held_out=False)
    trainer = build_trainer(run, None, False, None)
    for split in (trainer.train_set, trainer.val_set):
        speakers = {split.dataset.items[i]["speaker"] for i in split.indices}
        assert speakers <= {"low"}, speakers
    assert len(trainer.train_set) > 0


@pytest.mark.django_db
def test_a_run_without_the_field_takes_the_datasets_choice(user):
    dataset = dataset_with_rows(user)
    Speaker.objects.filter(dataset=dataset, name="low").update(held_out=True)
    run = tiny_run(user, dataset=dataset)
    run.config_snapshot.pop("held_out_speakers", None)
    trainer = build_trainer(run, None, False, None)
    assert trainer.cfg.held_out_speakers == ["low"]
    speakers = {trainer.train_set.dataset.items[i]["speaker"] for i in trainer.train_set.indices}
    assert speakers == {"high"}


@pytest.mark.django_db
def test_the_scores_get_every_clip_of_the_held_out_voices(user):
    dataset = dataset_with_rows(user)
    run = tiny_run(user, dataset=dataset, held_out_speakers=["high"])
    inputs = scoring_inputs(run)
    assert list(inputs["held_out"]) == ["high"] and len(inputs["held_out"]["high"]) == 6
    assert all(p.endswith(".wav") and "/high_" in p for p in inputs["held_out"]["high"])
    # The floor: real clips of other speakers (clone_scores leaves the speaker's own out).
    assert set(inputs["floor_clips"]) == {"high", "low"}
    assert inputs["language"] == "en" and inputs["speaker_check"] is None
