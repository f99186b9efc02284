"""The wallboard's state: live calls pushed from memory, today's figures cached, fanned out to every screen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import structlog
from aiohttp import web

from pbx_bridge.aio import wait_set, within
from pbx_bridge.routing import RoutingState
from pbx_bridge.tracker.tracker import TrackerState, live_calls
from pbx_bridge.trunk import TrunkHealth
from pbx_bridge.web.changes import Changes
from pbx_bridge.web.figures import read_figures
from pbx_bridge.web.mask import looks_like_number, mask_number

log = structlog.get_logger("pbx_bridge.web")


class LiveSource(Protocol):
    """The tracker's latest state and its change counter (api.LiveState)."""

    @property
    def state(self) -> TrackerState: ...

    @property
    def changes(self) -> Changes: ...


class Connections(Protocol):
    """Where database connections come from (api.ApiDatabase: the API's own small pool)."""

    def connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]: ...


def _no_routing() -> RoutingState | None:
    return None


def live_payload(state: TrackerState, now: datetime, *, routing: RoutingState | None, trunk: TrunkHealth | None,
                 period: float, max_rings: int, timezone: str = "Asia/Shanghai") -> tuple[str, dict[str, Any]]:
    """What the screens show of the live state, and a key that changes only when that does (not
    with the passing of time: screens count ring and talk seconds themselves). Numbers are masked
    here, so no screen ever receives one; line probes are left out."""
    calls = []
    for call in live_calls(state, now):
        tracked = state.calls.get(call.linkedid)
        if tracked is None or tracked.probe_nonce is not None:
            continue
        leg = tracked.legs.get(tracked.answered_leg) if tracked.answered_leg else None
        answered_at = leg.answered_at if leg is not None else None
        on_mobile = call.stage == "mobile" or looks_like_number(call.answered_by)
        who = None
        if call.answered_by is not None:
            who = (tracked.duty_holder or mask_number(call.answered_by)) if on_mobile else call.answered_by
        calls.append({
            "id": call.linkedid, "caller": mask_number(call.caller_number), "did": call.did, "state": call.state,
            "stage": call.stage, "ring_seconds": call.ring_seconds, "who": who,
            "on_mobile": on_mobile and who is not None,
            "talk_seconds": None if answered_at is None else round(max((now - answered_at).total_seconds(), 0.0), 1),
        })
    shown_routing = None if routing is None else {"open": routing.open, "holder": routing.holder,
                                                  "reason": routing.reason}
    shown_trunk = None if trunk is None else {"reachable": trunk.reachable, "status": trunk.status}
    steady = [{k: v for k, v in c.items() if k not in ("ring_seconds", "talk_seconds")}
              | {"ringing_since_known": c["ring_seconds"] is not None} for c in calls]
    key = json.dumps([steady, shown_routing, shown_trunk], ensure_ascii=False, sort_keys=True)
    return key, {"at": now.isoformat(), "calls": calls, "routing": shown_routing, "trunk": shown_trunk,
                 "ring": {"period": period, "max_rings": max_rings}, "timezone": timezone}


def sse(event: str, data: Any) -> bytes:
    """One Server-Sent Events frame (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class Wallboard:
    """Builds each update once and lets every connected screen write the same bytes.

    The live frame is rebuilt when the tracker's state changes (LiveState.changes) and checked
    every `check_every` seconds for the routing state and the trunk; today's figures are read by
    one query set every `figures_every` seconds, only while a screen is connected. A screen more
    costs one socket write per update. Runs inside the API app (`lifespan`, a cleanup context)."""

    def __init__(self, live: LiveSource, *, database: Connections | None,
                 routing: Callable[[], RoutingState | None] = _no_routing, trunk: TrunkHealth | None = None,
                 period: float = 5.0, max_rings: int = 3, figures_every: float = 3.0, check_every: float = 1.0,
                 ping_every: float = 10.0, timezone: str = "Asia/Shanghai", min_interval: float = 0.2) -> None:
        self._live = live
        self._database = database
        self._routing = routing
        self._trunk = trunk
        self.period = period
        self.max_rings = max_rings
        self.figures_every = figures_every
        self.check_every = check_every
        self.ping_every = ping_every
        self.min_interval = min_interval  # between two live frames (a burst of events: one frame)
        self.timezone = timezone  # the hotline's: the screen's clock shows it
        self.updated = Changes()  # bumped when a frame changes, or at close
        self.closing = asyncio.Event()
        self.clients = 0
        self.max_clients_seen = 0
        self._clients_changed = Changes()
        self._live_key = ""
        self.live_seq = 0
        self.live_frame = b""
        self.figures_seq = 0
        self.figures_frame = b""
        self._figures: dict[str, Any] | None = None  # the last figures read
        self._shown_figures: dict[str, Any] | None = None  # what the figures frame shows

    # -- building ------------------------------------------------------------------------------

    def build_live(self) -> tuple[str, bytes]:
        """The live frame as of now, and its key."""
        key, payload = live_payload(self._live.state, datetime.now(UTC), routing=self._routing(),
                                    trunk=self._trunk, period=self.period, max_rings=self.max_rings,
                                    timezone=self.timezone)
        return key, sse("live", payload)

    def refresh_live(self) -> None:
        """Rebuild the live frame; publish it if what it shows changed."""
        key, frame = self.build_live()
        if key != self._live_key or not self.live_frame:
            self._live_key, self.live_frame = key, frame
            self.live_seq += 1
            self.updated.bump()

    async def refresh_figures(self) -> None:
        """Read today's figures (bounded); on failure keep the last ones, marked stale."""
        figures: dict[str, Any]
        if self._database is None:
            figures = {"ok": False, "error": "no database"}
        else:
            try:
                async with self._database.connection() as conn:
                    figures = {"ok": True, **await within(read_figures(conn), 10)}
            except Exception as exc:  # the board shows the figures as stale; the live part goes on
                log.warning("wallboard_figures_failed", error=type(exc).__name__)
                figures = {**(self._figures or {}), "ok": False, "error": "database unavailable"}
        if figures.get("ok"):
            self._figures = figures
        frame = sse("figures", figures | {"as_of": datetime.now(UTC).isoformat()})
        if figures != self._shown_figures or not self.figures_frame:
            self._shown_figures = figures
            self.figures_frame = frame
            self.figures_seq += 1
            self.updated.bump()

    # -- running -------------------------------------------------------------------------------

    async def _live_loop(self) -> None:
        """Rebuild the live frame after each change, only while a screen is connected, and at
        most every `min_interval` seconds: a burst of AMI events makes one frame, not one each."""
        changes = self._live.changes
        while not self.closing.is_set():
            if self.clients == 0:  # nobody watches: build nothing (a new screen gets a fresh frame)
                self.live_frame, self._live_key = b"", ""
                await self._clients_changed.wait(self._clients_changed.version, self.check_every)
                continue
            seen, started = changes.version, time.monotonic()
            try:
                self.refresh_live()
            except Exception:  # a bug here must not end the board: logged, tried again
                log.exception("wallboard_live_failed")
            await changes.wait(seen, self.check_every)
            if (rest := self.min_interval - (time.monotonic() - started)) > 0:
                await wait_set(self.closing, rest)

    async def _figures_loop(self) -> None:
        while not self.closing.is_set():
            if self.clients == 0:
                await self._clients_changed.wait(self._clients_changed.version, self.check_every)
                continue
            await self.refresh_figures()
            await wait_set(self.closing, self.figures_every)

    async def run(self) -> None:
        """Until `close`: keep the frames current."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._live_loop())
            group.create_task(self._figures_loop())

    def close(self) -> None:
        """Stop `run` and let every stream end."""
        self.closing.set()
        self.updated.bump()
        self._clients_changed.bump()

    async def on_shutdown(self, app: web.Application) -> None:
        """aiohttp on_shutdown: end the streams before the server waits for its handlers."""
        self.close()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the board's task runs while the app does, awaited at cleanup."""
        self.closing.clear()
        task = asyncio.create_task(self.run(), name="wallboard")
        try:
            yield
        finally:
            self.close()
            await task

    # -- streaming -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def client(self) -> Iterator[None]:
        """Count a connected screen for as long as the block runs."""
        self.clients += 1
        self.max_clients_seen = max(self.max_clients_seen, self.clients)
        self._clients_changed.bump()
        try:
            yield
        finally:
            self.clients -= 1
            self._clients_changed.bump()

    async def stream(self, response: web.StreamResponse) -> None:
        """Write the board's frames to one prepared SSE response until the board closes or the
        screen goes away: first the current state (built fresh), then each change, and a ping
        every `ping_every` seconds so the screen knows the daemon is there."""
        _, first = self.build_live()
        await response.write(b"retry: 2000\n\n" + first)
        live_seq, figures_seq = self.live_seq, 0
        last_write = time.monotonic()
        while not self.closing.is_set():
            seen = self.updated.version
            out = b""
            if self.live_seq != live_seq:
                out += self.live_frame
                live_seq = self.live_seq
            if self.figures_seq != figures_seq and self.figures_frame:
                out += self.figures_frame
                figures_seq = self.figures_seq
            if not out and time.monotonic() - last_write >= self.ping_every:
                out = sse("ping", {"at": datetime.now(UTC).isoformat()})
            if out:
                await response.write(out)
                last_write = time.monotonic()
            await self.updated.wait(seen, max(0.05, self.ping_every - (time.monotonic() - last_write)))
