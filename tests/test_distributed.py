"""Training on several ranks: torchrun on CPU (gloo), one metrics.jsonl, exact resume, verdicts
shared by every rank, fp16 loss scaling, and a studio run on 2 CPU ranks through a real worker.

Each torchrun run is a `tiny` model for a handful of steps on the session's 12-utterance cache,
one torch thread per rank, so the module stays within a minute or two on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.fixtures_audio import feature_cache

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={ranks}", "-m", "training", "train", "--device", "cpu"]
    cmd += ["--threads", "1", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    out: dict[int, float] = {}
    for r in records(run_dir):
        if "loss/total" in r:
            assert r["step"] not in out, f"step {r['step']} written twice"
            out[r["step"]] = r["loss/total"]
    return out


def test_torchrun_two_cpu_ranks_write_once_and_resume_exactly(tmp_path):
    cache = feature_cache()
    run = tmp_path / "run"
    common = ["--data", str(cache), "--out", str(run), "--batch-size", "2", "--seed", "3"]
    common += ["--eval-every", "3", "--checkpoint-every", "3", "--steps", "6"]
    first = torchrun(*common)
    assert "x 2 ranks" in first.stdout + first.stderr
    assert "finished at step 6" in first.stdout
    straight = train_losses(run)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]  # one file, every step once
    assert [r["step"] for r in records(run) if "val/mel" in r] == [3, 6]
    ckpt = torch.load(run / "checkpoints" / "step_0000006.pt", weights_only=True)
    assert ckpt["data_position"]["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2

    # Back to step 3 (as if the group died after that checkpoint): the resumed ranks compute
    # the same losses for steps 4-6 as the uninterrupted ones.
    (run / "checkpoints" / "step_0000006.pt").unlink()
    resumed = torchrun(*common, "--resume")
    assert "finished at step 6" in resumed.stdout
    again = train_losses(run)
    assert sorted(again) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step

    # And a later --resume trains on past the old end.
    torchrun(*[a if a != "6" else "8" for a in common], "--resume")
    assert sorted(train_losses(run)) == list(range(1, 9))


# --------------------------------------------------------------------------- in-process ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_with_a_poisoned_loss(rank: int, world: int, port: int, cache: str, out: str, res: str):
    """One rank; rank 1 alone sees a NaN loss at its third step."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from training import distributed
    from training.config import preset
    from training.trainer import Trainer

    cfg = preset("tiny", "enhanced")
    cfg.steps, cfg.batch_size, cfg.device = 5, 2, "cpu"
    cfg.eval_every = cfg.checkpoint_every = 100
    trainer = Trainer(cfg, cache, out)
    loss_class = type(trainer.loss_fn)

    class Poisoned(loss_class):
        def __call__(self, outputs):
            total, parts = loss_class.__call__(self, outputs)
            if rank == 1 and trainer.step == 2:
                total = total * float("nan")
            return total, parts

    trainer.loss_fn.__class__ = Poisoned
    trainer.run()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(
        {
            "skipped": trainer.guard.skipped,
            "weights": {k: float(v) for k, v in trainer.loss_fn.weights.items()},
            "params": flat,
        },
        Path(res) / f"rank{rank}.pt",
    )
    distributed.cleanup()


def test_a_fault_on_one_rank_is_a_verdict_for_every_rank(tmp_path):
    # A NaN on rank 1 only: the all-reduced loss is NaN on both, both skip the same step, and
    # the replicas end with identical weights (DDP would otherwise carry on with a rank that
    # stepped and one that did not).
    cache = str(feature_cache())
    mp.spawn(
        _rank_with_a_poisoned_loss,
        args=(2, _free_port(), cache, str(tmp_path / "run"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["skipped"] == r1["skipped"] == 1
    assert r0["weights"] == r1["weights"]
    assert torch.equal(r0["params"], r1["params"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "loss/total" in line]
    assert len(steps) == len(set(steps))  # rank 0 alone wrote


# --------------------------------------------------------------------------- precision


def test_autocast_dtype_follows_the_device(monkeypatch):
    from training.device import autocast_dtype

    assert autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda")) is torch.float16


def test_fp16_scaler_overflow_skips_without_counting_as_a_fault(tmp_path, monkeypatch):
    # fp16 autocast on the CPU stands in for a GPU without bf16: the same GradScaler path.
    import training.trainer as trainer_module
    from training.config import preset

    monkeypatch.setattr(trainer_module, "autocast_dtype", lambda device: torch.float16)
    cfg = preset("tiny", "enhanced")
    cfg.steps, cfg.batch_size, cfg.device = 4, 2, "cpu"
    cfg.eval_every = cfg.checkpoint_every = 100
    trainer = trainer_module.Trainer(cfg, feature_cache(), tmp_path / "run")
    assert trainer.scaler.is_enabled()
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # sure to overflow
    first = trainer.train_step()
    assert any("fp16 gradient overflow" in e["message"] for e in first["events"])
    assert trainer.guard.skipped == 0 and trainer.guard.consecutive_skips == 0
    assert trainer.scaler.get_scale() < 2.0**100
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    second = trainer.train_step()
    assert not second["events"] or all(e["kind"] != "skip" for e in second["events"])
    assert torch.isfinite(torch.tensor(second["loss/total"]))
    path = trainer.save()
    assert torch.load(path, weights_only=True)["scaler"]["scale"] == trainer.scaler.get_scale()


# --------------------------------------------------------------------------- from the studio


def _loss_steps(run) -> list[int]:
    from studio.models import MetricPoint

    rows = MetricPoint.objects.filter(run=run, name="loss/total").order_by("step")
    return list(rows.values_list("step", flat=True))


def _rank_pid(run_id: int, rank: int) -> int | None:
    """The pid of one rank of the run's torchrun group (its environment names the rank)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if b"studio.runs.ranks" not in cmdline or str(run_id).encode() not in cmdline:
                continue
            if b"torch.distributed.run" in cmdline:
                continue  # torchrun itself
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_studio_run_on_two_cpu_ranks_survives_a_killed_rank_and_completes(user, start_worker):
    import signal

    from django.db.models import Count

    from studio.models import MetricPoint, Run
    from tests.conftest import wait_until
    from tests.fixtures_runs import tiny_run

    worker = start_worker("gpu")
    run = tiny_run(user, steps=16, checkpoint_every=4, eval_every=8, batch_size=2)
    Run.objects.filter(pk=run.pk).update(ranks=2)
    run.enqueue()

    def status() -> str:
        return Run.objects.values_list("status", flat=True).get(pk=run.pk)

    # SIGKILL rank 1 once the first checkpoint is on disk: the group is restarted from it.
    out = Path(run.out_dir)
    try:
        wait_until(
            lambda: (out / "checkpoints" / "step_0000004.pt").exists() or status() in Run.FINISHED,
            240,
            message="the first checkpoint",
        )
    except AssertionError as exc:
        logs = [worker.log_path, out / "ranks.log"]
        tails = [p.read_text(errors="replace")[-3000:] for p in logs if p.exists()]
        raise AssertionError(f"{exc}; status {status()}\n" + "\n".join(tails)) from None
    pid = _rank_pid(run.pk, 1)
    assert pid is not None and status() == "running", "rank 1 not found mid-run"
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: status() in ("succeeded", "failed", "cancelled"), 300, message="the end")
    run.refresh_from_db()
    log = (out / "worker.log").read_text(errors="replace")
    ranks_log = (out / "ranks.log").read_text(errors="replace")
    assert run.status == Run.Status.SUCCEEDED, f"{run.error}\n{log[-3000:]}\n{ranks_log[-3000:]}"
    assert run.current_step == 16 and run.attempts == 1
    assert _loss_steps(run) == list(range(1, 17))
    dupes = MetricPoint.objects.filter(run=run).values("step", "name").annotate(n=Count("id"))
    assert not dupes.filter(n__gt=1).exists()
    assert train_losses(out).keys() == set(range(1, 17))  # one metrics.jsonl, no step twice
    assert run.checkpoints.filter(step=16).exists()
    assert "rank 0 of 2" in log
    restart = run.events.get(kind="restart")
    assert "restarting 2 ranks from step" in restart.message, restart.message
    assert run.samples.exists()  # eval audio from rank 0


@pytest.mark.django_db
def test_the_run_form_takes_ranks_in_their_range(client_user, user):
    from studio.models import RANKS_RANGE, Run
    from tests.fixtures_runs import ready_dataset

    dataset = ready_dataset(user)
    base = dict(
        dataset=dataset.pk,
        source="preset",
        model_size="tiny",
        optimization_level="enhanced",
        steps=30,
        start="scratch",
    )
    assert 'name="ranks"' in client_user.get("/runs/new/").content.decode()
    high = RANKS_RANGE[1] + 1
    page = client_user.post("/runs/new/", dict(base, name="too many", ranks=high))
    assert page.status_code == 400  # the form again, with the range in the refusal
    assert f"Ranks must be between 1 and {RANKS_RANGE[1]} (got {high})." in page.content.decode()
    assert not Run.objects.filter(name="too many").exists()
    page = client_user.post("/runs/new/", dict(base, name="vocoder", kind="vocoder", ranks=2))
    assert "A vocoder fine-tune trains on one rank" in page.content.decode()
    page = client_user.post("/runs/new/", dict(base, name="two", ranks=2))
    assert page.status_code == 302 and Run.objects.get(name="two").ranks == 2
    client_user.post("/runs/new/", dict(base, name="default"))
    assert Run.objects.get(name="default").ranks == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_cancelling_a_run_on_two_ranks_stops_every_rank_with_a_checkpoint(user, start_worker):
    from studio.models import Run
    from tests.conftest import wait_until
    from tests.fixtures_runs import tiny_run

    start_worker("gpu")
    run = tiny_run(user, steps=400, checkpoint_every=400, eval_every=400, batch_size=2)
    Run.objects.filter(pk=run.pk).update(ranks=2)
    run.enqueue()
    wait_until(lambda: _loss_steps(run), 240, message="the first steps")
    run.request_cancel()
    wait_until(lambda: Run.objects.get(pk=run.pk).status in Run.FINISHED, 120, message="the cancel")
    run.refresh_from_db()
    assert run.status == Run.Status.CANCELLED, run.error
    assert 0 < run.current_step < 400
    assert run.checkpoints.filter(step=run.current_step).exists()
    # Rank 0 records the cancel just before it leaves: then every rank is gone, none left behind.
    wait_until(
        lambda: _rank_pid(run.pk, 0) is None and _rank_pid(run.pk, 1) is None,
        60,
        message="the ranks to exit",
    )
