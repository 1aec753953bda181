"""A new voice from a few minutes: the few-shot fine-tune preset, two clicks from the dataset
page, frozen text encoder, and the speaker's SECS before (the base checkpoint) and after."""

from __future__ import annotations

import json
import re

import pytest
import torch

from studio.models import Checkpoint, Dataset, Run, RunEvent, Speaker, Utterance
from studio.runs.tasks import score_checkpoint, scoring_inputs
from tests import test_scores
from tests.fixtures_audio import feature_cache
from tests.fixtures_runs import ready_dataset, tiny_run
from training.config import check_safe, few_shot_preset, preset
from training.trainer import Trainer

trained_checkpoint = test_scores.trained_checkpoint


def test_the_preset_fine_tunes_gently_and_freezes_the_text_side():
    for size in ("tiny", "small", "normal", "big"):
        cfg = few_shot_preset(size)
        check_safe(cfg.flat())
        assert cfg.learning_rate < preset(size, "enhanced").learning_rate
        assert cfg.steps <= 500 and cfg.eval_every <= 100 and not cfg.loss.use_adaptive_weights
        assert cfg.freeze == ["embed", "encoder"] and cfg.size == size


def test_frozen_parameters_do_not_move_and_the_rest_learns(tmp_path):
    cfg = few_shot_preset("tiny")
    cfg.steps, cfg.batch_size, cfg.lr_warmup_steps, cfg.device = 2, 4, 1, "cpu"
    cfg.eval_every = cfg.checkpoint_every = 2
    trainer = Trainer(cfg, feature_cache(), tmp_path / "run")
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    assert trainer.run().status == "finished"
    after = dict(trainer.model.named_parameters())

    def frozen(name: str) -> bool:
        return name.startswith(("embed", "encoder")) and not ("cond" in name or "speaker" in name)

    frozen_names = [n for n in before if frozen(n)]
    assert frozen_names and "embed.weight" in frozen_names
    for name in frozen_names:
        assert torch.equal(before[name], after[name]), name
        assert not after[name].requires_grad
    moved = [n for n in before if not frozen(n) and not torch.equal(before[n], after[n])]
    assert any(n.startswith("decoder") for n in moved)


def one_voice_dataset(owner, n_clips: int = 40, speakers=("newvoice",)) -> Dataset:
    dataset = Dataset.objects.create(
        owner=owner,
        name="my voice",
        status=Dataset.Status.READY,
        cache_dir=str(feature_cache()),
        n_utterances=n_clips * len(speakers),
        n_speakers=len(speakers),
    )
    for name in speakers:
        Speaker.objects.create(dataset=dataset, name=name, n_utterances=n_clips)
    return dataset


def base_checkpoint(owner, path) -> Checkpoint:
    """A finished multi-speaker run's best checkpoint (the session's two-voice dataset)."""
    run = tiny_run(owner, dataset=ready_dataset(owner, "many voices"))
    Run.objects.filter(pk=run.pk).update(status=Run.Status.SUCCEEDED)
    return Checkpoint.objects.create(run=run, step=2, path=str(path), is_best=True)


@pytest.mark.django_db
def test_two_clicks_from_the_dataset_page_start_the_fine_tune(
    client_user, user, trained_checkpoint
):
    base = base_checkpoint(user, trained_checkpoint)
    dataset = one_voice_dataset(user)

    # Click 1: the dataset page's link opens the form with everything chosen.
    page = client_user.get(dataset.get_absolute_url()).content.decode()
    link = re.search(r'id="fewshot-link" href="([^"]+)"', page).group(1).replace("&amp;", "&")
    form = client_user.get(link).content.decode()
    assert re.search(r'value="fewshot"[^>]*checked', form)
    assert re.search(r'value="finetune"[^>]*checked', form)
    assert re.search(rf'<option value="{base.pk}" selected', form)
    assert re.search(rf'<option value="{dataset.pk}" selected', form)

    # Click 2: "Start the run" posts what the form holds.
    answer = client_user.post(
        "/runs/new/",
        {
            "kind": "acoustic",
            "dataset": dataset.pk,
            "source": "fewshot",
            "start": "finetune",
            "checkpoint": base.pk,
            "model_size": "tiny",
            "optimization_level": "enhanced",
        },
        follow=True,
    )
    run = Run.objects.get(dataset=dataset)
    assert run.init_from_id == base.pk and run.resume_from_id is None and run.config is None
    snap = run.config_snapshot
    assert snap["freeze"] == ["embed", "encoder"] and snap["steps"] == few_shot_preset("tiny").steps
    assert snap["learning_rate"] == pytest.approx(few_shot_preset("tiny").learning_rate)
    assert "made for one speaker" not in answer.content.decode()


@pytest.mark.django_db
def test_the_preset_says_what_it_is_made_for(client_user, user, trained_checkpoint):
    base = base_checkpoint(user, trained_checkpoint)
    crowd = one_voice_dataset(user, n_clips=10, speakers=("a", "b"))
    data = {"dataset": crowd.pk, "source": "fewshot", "start": "scratch", "checkpoint": base.pk}
    page = client_user.post("/runs/new/", data, follow=True).content.decode()
    assert (
        "made for one speaker&#x27;s 30-100 clips; this dataset has 2 speaker(s) and 20 clips"
        in (page)
    )
    # "start" is forced to a fine-tune: the preset is nothing without its base.
    assert Run.objects.get(dataset=crowd).init_from_id == base.pk

    missing = client_user.post("/runs/new/", dict(data, checkpoint=""))
    assert missing.status_code == 400
    assert "Pick the multi-speaker checkpoint the new voice starts from." in (
        missing.content.decode()
    )


@pytest.mark.django_db
def test_the_run_page_shows_secs_before_and_after(client_user, user, trained_checkpoint):
    base = base_checkpoint(user, trained_checkpoint)
    dataset = one_voice_dataset(user, n_clips=6, speakers=())
    # One voice's clips ("low" of the session cache): 4 to train on, 2 it never trains on.
    voice = Speaker.objects.create(dataset=dataset, name="low", n_utterances=6)
    cache = feature_cache()
    records = [json.loads(x) for x in (cache / "items.jsonl").read_text().splitlines() if x]
    low = [r for r in records if r["speaker"] == "low"]
    for i, rec in enumerate(low):
        Utterance.objects.create(
            dataset=dataset,
            speaker=voice,
            item_id=rec["id"],
            audio_path=rec["audio_path"],
            text=rec["text"],
            split="val" if i >= 4 else "train",
        )
    run = tiny_run(user, dataset=dataset, freeze=["embed", "encoder"])
    Run.objects.filter(pk=run.pk).update(init_from=base)
    run.refresh_from_db()
    check = scoring_inputs(run)["speaker_check"]
    assert check["speaker"] == "low" and len(check["reference"]) == 3
    assert len(check["targets"]) == 2 and not set(check["reference"]) & set(check["targets"])

    ckpt = Checkpoint.objects.create(run=run, step=2, path=str(trained_checkpoint))
    assert score_checkpoint(ckpt.pk) == "done"
    after = Checkpoint.objects.get(pk=ckpt.pk).scores["speaker_check"]
    assert after["speaker"] == "low" and -1.0 <= after["secs"] <= 1.0
    before = RunEvent.objects.get(run=run, kind="fewshot")
    assert -1.0 <= before.data["secs"] <= 1.0 and before.data["base"] == base.pk
    # Scoring again does not score the base again.
    assert score_checkpoint(ckpt.pk) == "done"
    assert RunEvent.objects.filter(run=run, kind="fewshot").count() == 1
    after = Checkpoint.objects.get(pk=ckpt.pk).scores["speaker_check"]  # the newest scores

    page = client_user.get(run.get_absolute_url()).content.decode()
    assert "New voice: low" in page
    assert f'<strong id="secs-before">{before.data["secs"]:.3f}</strong>' in page
    row = re.search(
        r'id="secs-after".*?<td>2</td><td>([-0-9.]+)</td><td>([-+0-9.]+)</td>', page, re.S
    )
    assert row, page[page.find('id="speaker-check"') :][:1500]
    assert float(row.group(1)) == pytest.approx(after["secs"], abs=1e-3)
    assert float(row.group(2)) == pytest.approx(after["secs"] - before.data["secs"], abs=1e-3)
