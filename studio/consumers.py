"""WebSockets of the runs area: one run's live metrics, and status changes for the runs list.

Refusals are sent as close codes after the handshake (a browser never sees the code of a
refused handshake), so the page can say why and stop reconnecting:
4401 not signed in, 4403 not the owner (or no such run: the code does not tell them apart).
"""

from __future__ import annotations

import time
from collections import deque
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from studio import live
from studio.models import Run

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
# History requests per connection and minute: a page asks once per reconnect or missed update;
# each answer can be thousands of points read from the database.
HISTORY_PER_MINUTE = 20


def _int_or_none(value) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 else None


@database_sync_to_async
def _visible_run(user, run_id: int) -> Run | None:
    return Run.objects.visible_to(user).filter(pk=run_id).first()


@database_sync_to_async
def _still_visible(user_id, run_id: int) -> bool:
    """The user as the database has them now (still active?) and the run as it is now."""
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    return user is not None and Run.objects.visible_to(user).filter(pk=run_id).exists()


@database_sync_to_async
def _history(run_id: int, since: int | None) -> dict:
    return live.history(Run.objects.get(pk=run_id), since=since)


class _TolerantJsonConsumer(AsyncJsonWebsocketConsumer):
    """A malformed or binary frame from a page is answered, never allowed to kill the socket."""

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        try:
            content = await self.decode_json(text_data) if text_data else None
        except ValueError:
            content = None
        await self.receive_json(content, **kwargs)

    async def accept_signed_in(self):
        """Accept, then close with 4401 unless a user is signed in; the user or None."""
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return None
        return user


class RunConsumer(_TolerantJsonConsumer):
    """ws/runs/<id>/: history on connect (or only the gap after ?since=N), then live updates.

    The group is joined before the history is read, so nothing published in between is lost;
    live updates queued meanwhile are delivered after the history, and the page drops points
    it already has.
    """

    group = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.asked: deque[float] = deque()

    def _allowed_now(self) -> bool:
        now = time.monotonic()
        while self.asked and now - self.asked[0] > 60:
            self.asked.popleft()
        if len(self.asked) >= HISTORY_PER_MINUTE:
            return False
        self.asked.append(now)
        return True

    async def connect(self):
        user = await self.accept_signed_in()
        if user is None:
            return
        self.run_id = int(self.scope["url_route"]["kwargs"]["run_id"])
        if await _visible_run(user, self.run_id) is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.group = live.run_group(self.run_id)
        await self.channel_layer.group_add(self.group, self.channel_name)
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        since = _int_or_none((query.get("since") or [None])[0])
        await self.send_json(await _history(self.run_id, since))

    async def disconnect(self, code):
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        """{"since": step} asks for everything after `step` (a page that missed updates)."""
        if not self.group:
            return
        since = _int_or_none(content.get("since")) if isinstance(content, dict) else None
        if since is None:
            await self.send_json({"type": "error", "message": 'expected {"since": <step>}'})
            return
        if not self._allowed_now():
            await self.send_json(
                {
                    "type": "error",
                    "message": f"at most {HISTORY_PER_MINUTE} history requests a minute; "
                    "live updates keep coming meanwhile",
                }
            )
            return
        # Asked again, not remembered from connect: the run may have been deleted, or the
        # user signed out or lost access since.
        if not await _still_visible(self.scope["user"].pk, self.run_id):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.send_json(await _history(self.run_id, since))

    async def run_update(self, event):
        await self.send_json(event["data"])


class RunsListConsumer(_TolerantJsonConsumer):
    """ws/runs/: status and progress of the runs this user may see."""

    joined = False

    async def connect(self):
        user = await self.accept_signed_in()
        if user is None:
            return
        self.user_id = user.pk
        self.is_staff = user.is_staff
        await self.channel_layer.group_add(live.RUNS_GROUP, self.channel_name)
        self.joined = True

    async def disconnect(self, code):
        if self.joined:
            await self.channel_layer.group_discard(live.RUNS_GROUP, self.channel_name)

    async def receive_json(self, content, **kwargs):
        pass  # nothing to ask for: the page renders the list, this only pushes changes

    async def runs_update(self, event):
        data = dict(event["data"])
        owner_id = data.pop("owner_id", None)
        if self.is_staff or owner_id == self.user_id:
            await self.send_json(data)
