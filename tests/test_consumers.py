"""The runs WebSockets on the real Redis channel layer: who may connect, history, gaps, live.

Most tests drive the consumers through the URL router with the user put in the scope; one
goes through the whole ASGI stack with a real session cookie and origin check.
"""

from __future__ import annotations

import time

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser

from studio import live
from studio.models import Checkpoint, MetricPoint, Run, RunEvent
from studio.routing import websocket_urlpatterns
from tests.fixtures_runs import tiny_run

pytestmark = pytest.mark.django_db(transaction=True)


def communicator(path: str, user) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(URLRouter(websocket_urlpatterns), path)
    comm.scope["user"] = user
    return comm


async def refused_with(comm: WebsocketCommunicator) -> int:
    """The code a refused socket was closed with (it is accepted first, so a browser sees it)."""
    connected, _ = await comm.connect()
    assert connected
    message = await comm.receive_output(timeout=3)
    assert message["type"] == "websocket.close", message
    await comm.disconnect()  # end the consumer, or its channel-layer read outlives the test
    return message["code"]


@pytest.fixture
def run(user):
    run = tiny_run(user)
    for step in range(1, 6):
        MetricPoint.record(run.pk, step, {"loss/total": 10.0 - step, "grad_norm": 1.0})
    RunEvent.objects.create(run=run, step=3, kind="adaptive", message="mel weight 2.5 -> 2.625")
    Checkpoint.objects.create(run=run, step=4, path="/nowhere/step_0000004.pt")
    Run.objects.filter(pk=run.pk).update(status=Run.Status.RUNNING, current_step=5)
    return Run.objects.get(pk=run.pk)


async def test_owner_gets_history_then_coalesced_live_points(run, user):
    comm = communicator(f"/ws/runs/{run.pk}/", user)
    connected, _ = await comm.connect(timeout=3)
    assert connected
    history = await comm.receive_json_from(timeout=3)
    assert history["type"] == "history" and history["run"]["status"] == "running"
    assert [p["step"] for p in history["points"]] == [1, 2, 3, 4, 5]
    assert history["points"][0]["m"] == {"loss/total": 9.0, "grad_norm": 1.0}
    assert [e["message"] for e in history["events"]] == ["mel weight 2.5 -> 2.625"]
    assert [c["step"] for c in history["checkpoints"]] == [4]

    publisher = live.Publisher(run.pk, rate=10)
    sent_at = time.time()
    for step in range(6, 56):  # 50 steps in a burst: a fast loop
        publisher.add_point(step, {"loss/total": 1.0 / step})
        time.sleep(0.002)
    steps, messages = [], 0
    while len(steps) < 50:
        msg = await comm.receive_json_from(timeout=3)
        assert msg["type"] == "update"
        messages += 1
        steps += [p["step"] for p in msg["points"]]
    elapsed = time.time() - sent_at
    publisher.close()
    assert steps == list(range(6, 56))  # nothing lost, in order
    # At most ~10 messages a second, plus the first one that goes out at once.
    assert messages <= 1 + int(elapsed * 10) + 1, (messages, elapsed)
    assert messages < 50
    await comm.disconnect()


async def test_status_changes_skip_the_wait_and_reach_the_runs_list(run, user, other_user):
    page = communicator(f"/ws/runs/{run.pk}/", user)
    mine = communicator("/ws/runs/", user)
    theirs = communicator("/ws/runs/", other_user)
    for comm in (page, mine, theirs):
        assert (await comm.connect(timeout=3))[0]
    await page.receive_json_from(timeout=3)  # history

    await sync_to_async(Run.objects.filter(pk=run.pk).update)(status=Run.Status.SUCCEEDED)
    fresh = await sync_to_async(Run.objects.get)(pk=run.pk)
    publisher = live.Publisher(run.pk, rate=10)
    publisher.add_point(6, {"loss/total": 1.0})
    publisher.status(fresh)
    publisher.close()
    got = []
    while not any("status" in m for m in got):
        got.append(await page.receive_json_from(timeout=3))
    assert got[-1]["status"]["status"] == "succeeded"
    listed = await mine.receive_json_from(timeout=3)
    assert listed["type"] == "run" and listed["id"] == run.pk and listed["status"] == "succeeded"
    assert "owner_id" not in listed
    assert await theirs.receive_nothing(timeout=0.5)  # not their run
    for comm in (page, mine, theirs):
        await comm.disconnect()


async def test_reconnect_fills_the_gap_only(run, user):
    comm = communicator(f"/ws/runs/{run.pk}/?since=3", user)
    assert (await comm.connect(timeout=3))[0]
    gap = await comm.receive_json_from(timeout=3)
    assert gap["type"] == "gap" and gap["since"] == 3
    assert [p["step"] for p in gap["points"]] == [4, 5] and gap["events"] == []
    await comm.send_json_to({"since": 1})
    again = await comm.receive_json_from(timeout=3)
    assert [p["step"] for p in again["points"]] == [2, 3, 4, 5]
    # Junk from a page is answered, and the socket stays usable.
    await comm.send_to(text_data="{not json")
    assert (await comm.receive_json_from(timeout=3))["type"] == "error"
    await comm.send_json_to({"since": "yesterday"})
    assert (await comm.receive_json_from(timeout=3))["type"] == "error"
    await comm.send_json_to({"since": 4})
    assert [p["step"] for p in (await comm.receive_json_from(timeout=3))["points"]] == [5]
    await comm.disconnect()


async def test_other_users_and_anonymous_are_refused_with_clear_codes(run, other_user, staff_user):
    assert await refused_with(communicator(f"/ws/runs/{run.pk}/", other_user)) == 4403
    assert await refused_with(communicator(f"/ws/runs/{run.pk}/", AnonymousUser())) == 4401
    assert await refused_with(communicator("/ws/runs/", AnonymousUser())) == 4401
    assert await refused_with(communicator("/ws/runs/999999/", other_user)) == 4403
    staff = communicator(f"/ws/runs/{run.pk}/", staff_user)
    assert (await staff.connect(timeout=3))[0]
    assert (await staff.receive_json_from(timeout=3))["type"] == "history"
    await staff.disconnect()


def session_headers(client, user) -> list:
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    return [(b"cookie", cookie.encode()), (b"origin", b"http://localhost"), (b"host", b"localhost")]


async def test_the_real_asgi_stack_checks_the_session(run, user, other_user, client):
    from studio.asgi import application

    owner = await sync_to_async(session_headers)(client, user)
    comm = WebsocketCommunicator(application, f"/ws/runs/{run.pk}/", headers=owner)
    assert (await comm.connect(timeout=5))[0]
    assert (await comm.receive_json_from(timeout=5))["type"] == "history"
    await comm.disconnect()

    intruder = await sync_to_async(session_headers)(client, other_user)
    comm = WebsocketCommunicator(application, f"/ws/runs/{run.pk}/", headers=intruder)
    assert await refused_with(comm) == 4403
    # A page from another origin is refused before the handshake.
    foreign = [h for h in owner if h[0] != b"origin"] + [(b"origin", b"http://evil.example")]
    comm = WebsocketCommunicator(application, f"/ws/runs/{run.pk}/", headers=foreign)
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect()


def test_history_of_a_long_run_is_downsampled_but_keeps_every_eval(user):
    run = tiny_run(user)
    rows = [
        MetricPoint(run=run, step=s, name="loss/total", value=1.0 / s) for s in range(1, 10001)
    ] + [MetricPoint(run=run, step=s, name="val/total", value=2.0) for s in range(500, 10001, 500)]
    MetricPoint.objects.bulk_create(rows, batch_size=2000)
    data = live.history(run)
    steps = [p["step"] for p in data["points"]]
    assert data["downsampled"] and data["stride"] == 5
    assert 2000 <= len(steps) <= 2101 and steps == sorted(steps)
    assert steps[-1] == 10000
    assert sum("val/total" in p["m"] for p in data["points"]) == 20


async def test_history_requests_are_throttled_and_recheck_access(run, user, monkeypatch):
    from studio import consumers

    comm = communicator(f"/ws/runs/{run.pk}/", user)
    assert (await comm.connect(timeout=10))[0]
    await comm.receive_json_from(timeout=10)  # history on connect
    monkeypatch.setattr(consumers, "HISTORY_PER_MINUTE", 3)
    answers = []
    for _ in range(4):
        await comm.send_json_to({"since": 1})
        answers.append((await comm.receive_json_from(timeout=10))["type"])
    assert answers == ["gap", "gap", "gap", "error"]
    await comm.disconnect()

    # Access is asked again on every request: a run that is no longer theirs closes the socket.
    comm = communicator(f"/ws/runs/{run.pk}/", user)
    assert (await comm.connect(timeout=10))[0]
    await comm.receive_json_from(timeout=10)
    other = await sync_to_async(type(user).objects.create_user)("mallory", password="x-pass-123")
    await sync_to_async(Run.objects.filter(pk=run.pk).update)(owner=other)
    await comm.send_json_to({"since": 1})
    message = await comm.receive_output(timeout=10)
    assert message["type"] == "websocket.close" and message["code"] == 4403
    await comm.disconnect()
