"""Step-to-browser latency of live metrics, with many watchers on one fast run.

    python bench/metrics_latency.py [--clients 20] [--rate 50] [--seconds 20] [--modes coalesced,uncoalesced]

A training loop stand-in calls the worker's own callbacks (studio.runs.callbacks.StudioCallbacks:
batched MetricPoint rows + the coalescing live.Publisher) at `--rate` steps a second with the
trainer's metric names. A real uvicorn (as `make run` starts it) serves studio.asgi; `--clients` WebSocket clients signed
in as the run's owner watch the run through the real Redis channel layer. For every step each
client receives, latency = arrival time - the time the step was reported. Lost = steps a client
never received; db_missing = steps absent from the database record.

Modes: `coalesced` (the studio's setting, about ten messages a second: live.max_rate()) and
`uncoalesced` (every step sent at once: the baseline a fast loop would flood browsers with).
Coalescing holds a step back by up to one window minus one step period by construction (80 ms
at 10 messages/s and 50 steps/s, 60 ms at 12.5/s); transport adds to that. `newest_point_ms` is the age of the newest point of
each message, i.e. how stale a chart is right after it redraws.
One JSON line per mode, then a summary line. Target: p95 < 100 ms, nothing lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_environment() -> subprocess.Popen | None:
    """A throw-away data folder; REDIS_URL if it answers, else the embedded Redis."""
    sys.path.insert(0, str(ROOT))
    os.environ["STUDIO_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-latency-")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")
    from studio.runtime import default_redis_url, redis_command, redis_reachable, wait_for_redis

    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    if redis_reachable(url):
        os.environ["REDIS_URL"] = url
        return None
    data = Path(os.environ["STUDIO_DATA_DIR"])
    proc = subprocess.Popen(
        redis_command(data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    os.environ["REDIS_URL"] = default_redis_url(data)
    if not wait_for_redis(os.environ["REDIS_URL"]):
        raise SystemExit("no Redis at REDIS_URL and the embedded one did not start")
    return proc


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def fake_metrics(step: int) -> dict:
    """What Trainer.train_step reports, with plausible values."""
    from training.losses import COMPONENTS

    m = {"step": step, "epoch": step // 100, "loss/total": 20.0 / (1 + step / 200)}
    for i, name in enumerate(COMPONENTS):
        m[f"loss/{name}"] = (i + 1) / (1 + step / 300)
        m[f"weight/{name}"] = 1.0
    m.update(
        {
            "grad_norm": 1.5,
            "lr": 1e-3,
            "time/step": 0.02,
            "time/data": 0.001,
            "data_wait_share": 0.05,
            "samples_per_s": 800.0,
            "guard/skipped": 0.0,
            "guard/rollbacks": 0.0,
            "events": [],
        }
    )
    return m


def make_run(owner, dataset, config, name: str):
    from studio.models import Run
    from training.config import TrainConfig

    values = TrainConfig.from_flat(config.values()).flat()
    return Run.objects.create(
        owner=owner,
        dataset=dataset,
        config=config,
        config_snapshot=values,
        name=name,
        status=Run.Status.RUNNING,
        total_steps=values["steps"],
    )


def produce(run_id: int, rate_limit: float | None, steps: int, steps_per_s: float) -> dict:
    """The training loop stand-in: the worker's callbacks at a fixed step rate."""
    from django.db import connections

    from studio import live
    from studio.models import Run
    from studio.runs.callbacks import StudioCallbacks

    run = Run.objects.get(pk=run_id)
    report: dict = {}
    publisher = live.Publisher(run.pk, rate=rate_limit)
    callbacks = StudioCallbacks(run, publisher)
    start = time.perf_counter()
    worst_lag = 0.0
    for step in range(1, steps + 1):
        due = start + step / steps_per_s
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        worst_lag = max(worst_lag, time.perf_counter() - due)
        callbacks.on_step(fake_metrics(step))
    callbacks.flush()
    report["loop_seconds"] = time.perf_counter() - start
    report["loop_worst_lag_ms"] = worst_lag * 1000
    publisher.close()
    report["messages_sent"] = publisher.messages_sent
    report["send_errors"] = publisher.send_errors
    connections.close_all()
    return report


async def watch(url: str, headers: dict, origin: str, steps: int, out: dict, ready) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers=headers, origin=origin, max_size=2**24) as ws:
        first = json.loads(await ws.recv())
        assert first["type"] == "history", first
        ready()
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout=out["idle_timeout"])
            except TimeoutError:
                return
            now = time.time()
            msg = json.loads(raw)
            if msg.get("type") != "update":
                continue
            out["messages"] += 1
            if msg.get("points"):  # how old the newest point is when a chart redraws
                out["fresh_ms"].append((now - msg["points"][-1]["t"]) * 1000)
            for p in msg.get("points", []):
                out["latency_ms"].append((now - p["t"]) * 1000)
                out["steps"].add(p["step"])
            if steps in out["steps"]:
                return


async def one_mode(mode: str, args, base: str, cookie: str, owner, dataset, config) -> dict:
    from asgiref.sync import sync_to_async

    from studio import live
    from studio.models import MetricPoint

    rate_limit = (args.coalesce_rate or live.max_rate()) if mode == "coalesced" else None
    run = await sync_to_async(make_run)(owner, dataset, config, f"bench {mode}")
    steps = int(args.rate * args.seconds)
    url = base.replace("http", "ws", 1) + f"/ws/runs/{run.pk}/"
    clients = [
        {"messages": 0, "latency_ms": [], "fresh_ms": [], "steps": set(), "idle_timeout": 10.0}
        for _ in range(args.clients)
    ]
    connected = asyncio.Event()
    count = [0]

    def ready():
        count[0] += 1
        if count[0] == args.clients:
            connected.set()

    tasks = [
        asyncio.create_task(watch(url, {"Cookie": cookie}, base, steps, c, ready)) for c in clients
    ]
    await asyncio.wait_for(connected.wait(), 60)
    # The loop runs in a process of its own, as a worker would: its GIL, its DB writes and its
    # publishing thread must not slow the clients' event loop and inflate what they measure.
    producer = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--produce",
        str(run.pk),
        "--rate",
        str(args.rate),
        "--steps",
        str(steps),
        "--limit",
        str(rate_limit or 0),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    started = time.time()
    await asyncio.gather(*tasks)
    out, _ = await producer.communicate()
    elapsed = time.time() - started
    report = json.loads(out.decode().strip().splitlines()[-1])

    db_steps = set(
        await sync_to_async(
            lambda: list(
                MetricPoint.objects.filter(run=run, name="loss/total").values_list(
                    "step", flat=True
                )
            )
        )()
    )
    latencies = [x for c in clients for x in c["latency_ms"]]
    fresh = [x for c in clients for x in c["fresh_ms"]]
    lost = sum(steps - len(c["steps"] & set(range(1, steps + 1))) for c in clients)
    p95 = percentile(latencies, 0.95)
    return {
        "bench": "metrics_latency",
        "mode": mode,
        "max_messages_per_s": rate_limit,
        "clients": args.clients,
        "steps_per_s": args.rate,
        "steps": steps,
        "latency_ms": {
            "p50": round(percentile(latencies, 0.5), 1),
            "p95": round(p95, 1),
            "max": round(max(latencies), 1) if latencies else None,
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
        },
        # Per message: the age of its newest point, i.e. how stale the chart is after a redraw.
        "newest_point_ms": {
            "p50": round(percentile(fresh, 0.5), 1),
            "p95": round(percentile(fresh, 0.95), 1),
        },
        "messages_per_client_per_s": round(
            statistics.fmean(c["messages"] for c in clients) / report["loop_seconds"], 2
        ),
        "seconds": round(elapsed, 1),
        "messages_sent_per_s": round(report.get("messages_sent", 0) / report["loop_seconds"], 2),
        "lost": lost,
        "db_missing": steps - len(db_steps & set(range(1, steps + 1))),
        "loop_worst_lag_ms": round(report["loop_worst_lag_ms"], 1),
        "send_errors": report.get("send_errors", 0),
        "target_p95_ms": 100,
        "ok": p95 < 100 and lost == 0 and len(db_steps) == steps,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rate", type=float, default=50.0, help="training steps per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each mode")
    parser.add_argument("--modes", default="coalesced,uncoalesced")
    parser.add_argument(
        "--coalesce-rate",
        type=float,
        default=None,
        help="messages per second of the coalesced mode (default: the studio's, live.max_rate())",
    )
    # Internal: the producer process (run id, steps, rate limit; 0 = uncoalesced).
    parser.add_argument("--produce", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.produce:
        sys.path.insert(0, str(ROOT))
        import django

        django.setup()
        report = produce(args.produce, args.limit or None, args.steps, args.rate)
        print(json.dumps(report), flush=True)
        return 0

    redis_proc = setup_environment()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from studio.models import Dataset, TrainingConfig
    from studio.runtime import start_web

    call_command("migrate", verbosity=0)
    owner = get_user_model().objects.create_user("bench", password="bench-pass-123")
    dataset = Dataset.objects.create(
        owner=owner, name="bench", status="ready", cache_dir="/nonexistent"
    )
    config = TrainingConfig.objects.create(owner=owner, name="bench", steps=10**6)
    web = Client()
    web.force_login(owner)
    cookie = f"sessionid={web.cookies['sessionid'].value}"

    port = free_port()
    try:
        server = start_web(port)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    base = f"http://127.0.0.1:{port}"
    try:
        results = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            result = asyncio.run(one_mode(mode, args, base, cookie, owner, dataset, config))
            print(json.dumps(result), flush=True)
            results.append(result)
        print(
            json.dumps(
                {
                    "bench": "metrics_latency",
                    "summary": True,
                    "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    **{f"{r['mode']}_p95_ms": r["latency_ms"]["p95"] for r in results},
                    **{
                        f"{r['mode']}_msgs_per_client_per_s": r["messages_per_client_per_s"]
                        for r in results
                    },
                    "ok": all(r["ok"] for r in results if r["mode"] == "coalesced"),
                }
            ),
            flush=True,
        )
    finally:
        server.terminate()
        server.wait(10)
        if redis_proc is not None:
            redis_proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
