"""A run on several ranks: the gpu worker launches torchrun as its child and supervises it.

    worker (runs.train task, holds the claim, beats the heartbeat)
      └─ python -m torch.distributed.run --standalone --nproc_per_node N -m studio.runs.ranks RUN
           ├─ rank 0: studio.runs.tasks.fit with the studio's callbacks (rows, samples, cancel)
           └─ rank 1..N-1: the same Trainer with silent callbacks (DDP keeps them in step)

The claim stays with the worker's attempt: rank 0 writes its rows fenced by that same claim, so
a run taken over elsewhere stops every rank at its next flush. Cancel reaches rank 0 through
should_stop() and the trainer hands the verdict to every rank. A rank that dies (SIGKILL, a
lost GPU) makes torchrun stop the others and exit non-zero; the worker then starts the group
again and the trainer resumes from the newest checkpoint, at most MAX_RESTARTS times, after
which the run fails with the reason. A run's own verdicts (divergence, an unsafe config) are
recorded by rank 0 and are not retried.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import django

logger = logging.getLogger("studio.training")

MAX_RESTARTS = 3
POLL_SECONDS = 1.0
# A cancel is honoured by rank 0 at its next step; a group that has not stopped by then is stuck.
CANCEL_GRACE_SECONDS = 120
TERM_GRACE_SECONDS = 15


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a worker killed whole never leaves
    ranks training (and writing checkpoints) under a claim that has moved on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def command(run) -> list[str]:
    # Through `launch` (below), so torchrun dies with the worker process that supervises it.
    return [sys.executable, "-m", "studio.runs.ranks", "launch", str(run.ranks), str(run.pk)]


def torchrun_argv(ranks: int, run_id: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port per group: two runs on one machine never collide
        f"--nproc_per_node={ranks}",
        "--max_restarts=0",  # the worker restarts the group itself, and says so on the run
        "-m",
        "studio.runs.ranks",
        str(run_id),
    ]


def check_ranks(run) -> str | None:
    """Why this worker cannot give the run its ranks, or None."""
    import torch

    from training.device import select_device

    try:
        device = select_device(run.config_snapshot.get("device", "auto"))
    except ValueError as exc:
        return str(exc)
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if run.ranks > have:
            return (
                f"the run asks for {run.ranks} ranks but this worker has {have} GPU(s); "
                f"lower ranks to at most {have} or run it on a larger machine"
            )
    return None


def train_ranked(run, publisher) -> str:
    """Launch torchrun for the run and supervise it; the run's status when it ends."""
    from studio import live
    from studio.models import Run
    from studio.runs.callbacks import forget_after
    from studio.runs.tasks import _fail
    from training.checkpoint import step_checkpoints

    if run.kind != Run.Kind.ACOUSTIC:
        return _fail(run, "a vocoder fine-tune trains on one rank: set ranks to 1", publisher)
    problem = check_ranks(run)
    if problem:
        return _fail(run, problem, publisher)
    out_dir = Path(run.out_dir)
    log_path = out_dir / "ranks.log"
    restarts = 0
    while True:
        if restarts and not step_checkpoints(out_dir):
            # Nothing to resume: the next group starts over, so this attempt's rows go too.
            forget_after(run, 0)
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        logger.info("run %s: starting %d ranks: %s", run.pk, run.ranks, " ".join(command(run)))
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                command(run),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one signal reaches torchrun and every rank
            )
            code = _supervise(run, proc)
        run.refresh_from_db()
        if run.status != Run.Status.RUNNING or not run.holds_claim():
            return run.status if run.status in Run.FINISHED else "claim lost"
        tail = _tail(log_path)
        if code == 0 and run.status == Run.Status.RUNNING:
            return _fail(
                run, f"the ranks exited without a verdict; last output:\n{tail}", publisher
            )
        if restarts >= MAX_RESTARTS:
            return _fail(
                run,
                f"the ranks failed {restarts + 1} times (exit code {code}); last output:\n{tail}",
                publisher,
            )
        restarts += 1
        found = step_checkpoints(out_dir)
        where = f"step {int(found[-1].stem.split('_')[-1])}" if found else "the start"
        message = (
            f"a rank stopped (exit code {code}): restarting {run.ranks} ranks from {where} "
            f"({restarts} of {MAX_RESTARTS})"
        )
        logger.warning("run %s: %s", run.pk, message)
        event = run.event("restart", message, run.current_step)
        publisher.add(events=[live.event_dict(event)])


def _supervise(run, proc: subprocess.Popen) -> int:
    """Wait for the group; stop it when the claim moves elsewhere or a cancel goes unanswered."""
    from studio.models import Run

    cancel_seen = None
    while True:
        try:
            return proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        row = Run.objects.filter(pk=run.pk).values(
            "worker", "attempts", "status", "cancel_requested"
        )
        row = row.first()
        held = (
            row is not None
            and row["worker"] == run.worker
            and row["attempts"] == run.attempts
            and row["status"] == Run.Status.RUNNING
        )
        if row is not None and row["cancel_requested"] and cancel_seen is None:
            cancel_seen = time.monotonic()
        stuck = cancel_seen is not None and time.monotonic() - cancel_seen > CANCEL_GRACE_SECONDS
        if not held or stuck:
            logger.warning(
                "run %s: %s; stopping its ranks",
                run.pk,
                "claim lost" if not held else "cancel not answered",
            )
            _stop_group(proc)
            if stuck and held:
                run.finish_claimed(Run.Status.CANCELLED)
            return proc.returncode


def _stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=TERM_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- one rank


def rank_main(run_id: int) -> int:
    """One rank of the group, started by torchrun (RANK, WORLD_SIZE, ... in the environment)."""
    _die_with_parent()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    django.setup()
    from django.db import close_old_connections

    from studio import live, workers
    from studio.models import Run
    from studio.runs.tasks import fit
    from training import distributed
    from training.checkpoint import step_checkpoints
    from training.config import UnsafeConfig
    from training.trainer import Callbacks, Trainer, TrainingDiverged

    run = Run.objects.select_related("dataset", "init_from").get(pk=run_id)
    device = distributed.setup(run.train_config().device)
    try:
        if distributed.is_main():
            publisher = live.Publisher(run.pk, rate=live.max_rate())
            with workers.RunLog(Path(run.out_dir)):
                logger.info("rank 0 of %d on %s", distributed.world_size(), device)
                try:
                    # The run's own verdicts are final; anything else (a peer lost mid-step)
                    # goes up to the supervisor, which restarts the group from a checkpoint.
                    fit(run, publisher, fail_on=(TrainingDiverged, UnsafeConfig, ValueError))
                finally:
                    publisher.close()
        else:
            resume = bool(step_checkpoints(run.out_dir))
            init_from = run.init_from.path if (run.init_from_id and not resume) else None
            try:
                # No eval vocoder here: rank 0 alone renders eval samples.
                cfg, cache = run.train_config(), run.dataset.cache_dir
                Trainer(cfg, cache, run.out_dir, Callbacks(), resume, init_from).run()
            except (TrainingDiverged, UnsafeConfig, ValueError) as exc:
                # Rank 0 met the same verdict and records it; this rank only leaves quietly.
                print(f"rank {distributed.rank()}: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        distributed.cleanup()
        close_old_connections()
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "launch" and args[1].isdigit() and args[2].isdigit():
        # The parent-death signal is set here, in the child, and survives exec: no
        # preexec_fn in the worker, which is unsafe while its heartbeat thread runs.
        _die_with_parent()
        argv = torchrun_argv(int(args[1]), int(args[2]))
        os.execv(argv[0], argv)
    if len(args) != 1 or not args[0].isdigit():
        sys.exit("usage: python -m studio.runs.ranks launch RANKS RUN_ID | (torchrun) RUN_ID")
    sys.exit(rank_main(int(args[0])))
