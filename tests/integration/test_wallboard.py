"""The wallboard in-process over real HTTP and a real database: who opens it, what it pushes, many screens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse, ClientSession, ClientTimeout, CookieJar, TCPConnector

from pbx_bridge.api import ApiDatabase, LiveState
from pbx_bridge.tracker import TrackerSettings, TrackerState, apply
from pbx_bridge.trunk import TrunkHealth
from pbx_bridge.web import Wallboard
from pbx_bridge.web.auth import COOKIE
from tests.conftest import scratch_database
from tests.integration.test_api import SECRETS, Api, api_context, serving
from tests.support.env import DevEnv
from tests.support.fixtures import fixture_messages

pytestmark = pytest.mark.integration

SETTINGS = TrackerSettings(hotline_numbers=frozenset({"4008001234"}), trunk="carrier")


@pytest.fixture(scope="module")
def board_dsn(devenv: DevEnv) -> Iterator[str]:
    """A database of the module's own: today's figures start from no call at all."""
    with scratch_database(devenv, "wallboard") as dsn:
        yield dsn


def ringing_state(fixture: str = "answered_7s_talk_4s", upto: int = 12) -> TrackerState:
    """The tracker's state with the fixture's call ringing (both phones)."""
    state = TrackerState()
    for message in fixture_messages(fixture)[:upto]:
        state, _ = apply(state, message, SETTINGS)
    return state


def caller_of(state: TrackerState) -> str:
    [call] = state.calls.values()
    return call.caller_number


@contextlib.asynccontextmanager
async def board_api(dsn: str, **board: Any) -> AsyncIterator[Api]:
    live = LiveState()
    database = ApiDatabase(dsn, max_size=4)
    wallboard = Wallboard(live, database=database, trunk=TrunkHealth("carrier", "Reachable"),
                          figures_every=board.pop("figures_every", 0.5), check_every=0.2, **board)
    async with serving(api_context(dsn, [], live=live, database=database, wallboard=wallboard)) as api:
        yield api


class Events:
    """One SSE connection: its raw bytes, and its events as they arrive."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.raw = b""
        self.events: list[tuple[str, dict[str, Any], float]] = []  # (event, data, monotonic time received)
        self.arrived = asyncio.Event()

    async def read(self) -> None:
        buffer = b""
        async for chunk in self.response.content.iter_any():
            now = time.monotonic()
            self.raw += chunk
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in frame.decode().splitlines() if ": " in line)
                if "event" in fields:
                    self.events.append((fields["event"], json.loads(fields["data"]), now))
                    self.arrived.set()

    async def next(self, name: str, where: Any = None, timeout: float = 5, start: int = 0) -> dict[str, Any]:
        """The first event `name` (from the `start`th on) for which `where(data)` holds."""
        deadline = time.monotonic() + timeout
        index = start
        while True:
            for event, data, _ in self.events[index:]:
                if event == name and (where is None or where(data)):
                    return data
            index = len(self.events)
            self.arrived.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"no {name} event: {self.events[-3:]}"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.arrived.wait()


@contextlib.asynccontextmanager
async def stream(session: ClientSession, api: Api, headers: dict[str, str]) -> AsyncIterator[Events]:
    async with session.get(api.base.rstrip("/") + "/wallboard/stream", headers=headers) as response:
        assert response.status == 200, response.status
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = Events(response)
        reader = asyncio.create_task(events.read())
        try:
            yield events
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


VIEWER = {"Authorization": f"Bearer {SECRETS['viewer']}"}


async def test_the_wallboard_and_its_stream_need_a_token_or_the_wallboard_key(board_dsn: str) -> None:
    async with board_api(board_dsn) as api:
        status, page = await api.call("GET", "/wallboard", role=None)
        assert status == 401 and 'action="/wallboard/login"' in page  # the screen's login form
        assert (await api.call("GET", "/wallboard/stream", role=None))[0] == 401
        assert (await api.call("GET", "/wallboard/link", role=None))[0] == 401
        assert (await api.call("GET", "/wallboard", token="wrong-token-wrong-token"))[0] == 401
        status, page = await api.call("GET", "/wallboard", role="viewer")
        assert status == 200 and "三声内接听率" in page and "/wallboard/static/wallboard.js" in page
        assert (await api.call("GET", "/wallboard/static/wallboard.js", role=None))[0] == 200  # no data in it
        assert (await api.call("GET", "/wallboard/static/..%2Fboard.py", role=None))[0] == 404

        # A long-lived link: its key goes to a cookie that opens the page and the stream, nothing else.
        status, link = await api.call("GET", "/wallboard/link", role="viewer")
        assert status == 200 and link["token"] == "wallboard"
        assert link["path"].startswith("/wallboard/login?key=wallboard.")
        assert SECRETS["viewer"] not in link["path"]
        async with ClientSession(timeout=ClientTimeout(total=10), cookie_jar=CookieJar(unsafe=True)) as browser:
            async with browser.get(api.base.rstrip("/") + link["path"], allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/wallboard"
                cookie = response.cookies[COOKIE]
                assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/wallboard"
            async with browser.get(api.base.rstrip("/") + "/wallboard") as response:
                assert response.status == 200
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            async with browser.get(api.base.rstrip("/") + "/calls/live") as response:
                assert response.status == 401  # the cookie is no API token
            async with browser.get(api.base.rstrip("/") + "/wallboard/link") as response:
                assert response.status == 401
        async with ClientSession() as browser, browser.get(
                api.base.rstrip("/") + "/wallboard/login?key=wallboard.0000", allow_redirects=False) as response:
            assert response.status == 401 and COOKIE not in response.cookies
        # The login form: the token once, then the cookie.
        async with ClientSession() as browser:
            async with browser.post(api.base.rstrip("/") + "/wallboard/login", data={"token": "not-a-real-token-xx"},
                                    allow_redirects=False) as response:
                assert response.status == 401
            async with browser.post(api.base.rstrip("/") + "/wallboard/login", data={"token": SECRETS["viewer"]},
                                    allow_redirects=False) as response:
                assert response.status == 303 and response.cookies[COOKIE].value == link["path"].split("=", 1)[1]


async def test_the_stream_pushes_a_ringing_call_at_once_with_its_number_masked(board_dsn: str) -> None:
    async with board_api(board_dsn) as api, ClientSession() as session, stream(session, api, VIEWER) as events:
        first = await events.next("live")
        assert first["calls"] == [] and first["trunk"] == {"reachable": True, "status": "Reachable"}
        assert first["ring"] == {"period": 5.0, "max_rings": 3}
        figures = await events.next("figures")
        assert figures["ok"] is True and figures["kpi"]["calls"] == 0 and figures["callbacks"]["due"] == 0

        state = ringing_state()
        number = caller_of(state)
        published = time.monotonic()
        api.context.live.publish(state)
        live = await events.next("live", lambda d: d["calls"])
        [call] = live["calls"]
        assert call["state"] == "ringing" and call["ring_seconds"] > 0 and call["did"] == "4008001234"
        assert call["caller"] == number[:3] + "*" * (len(number) - 7) + number[-4:]
        assert set(call) == {"id", "caller", "did", "state", "stage", "ring_seconds", "who", "on_mobile",
                             "talk_seconds"}  # no caller name: nothing personal beyond the masked number
        received = next(t for e, d, t in events.events if e == "live" and d["calls"])
        assert received - published < 0.2

        whole = ringing_state(upto=len(fixture_messages("answered_7s_talk_4s")))
        talking = ringing_state(upto=next(i for i, m in enumerate(fixture_messages("answered_7s_talk_4s"))
                                          if m.event == "DialEnd" and m.get("DialStatus") == "ANSWER") + 1)
        api.context.live.publish(talking)
        live = await events.next("live", lambda d: d["calls"] and d["calls"][0]["state"] == "talking")
        assert live["calls"][0]["who"] and live["calls"][0]["talk_seconds"] is not None
        api.context.live.publish(whole)
        await events.next("live", lambda d: d["calls"] == [])
        assert number.encode() not in events.raw and number[3:].encode() not in events.raw


async def test_nothing_is_pushed_while_nothing_changes_but_a_ping(board_dsn: str) -> None:
    async with board_api(board_dsn, ping_every=0.5) as api, ClientSession() as session, \
            stream(session, api, VIEWER) as events:
        api.context.live.publish(ringing_state())
        await events.next("live", lambda d: d["calls"])
        before = len([e for e, _, _ in events.events if e == "live"])
        await events.next("ping")
        await asyncio.sleep(1.0)  # the ring counter runs on the screen: the same call is not pushed again
        assert len([e for e, _, _ in events.events if e == "live"]) == before


async def test_figures_follow_the_views_and_mask_numbers(board_dsn: str) -> None:
    conn = await asyncpg.connect(board_dsn)
    try:
        await conn.execute(
            """INSERT INTO calls (linkedid, did, trunk, caller_number, caller_name, started_at, ring_started_at,
                                  ended_at, ring_seconds, rings, within_ring_limit, disposition, source)
               VALUES ('wb-1.1', '4008001234', 'carrier', '13912345678', '', now(), now(),
                       now() + interval '20 s', 20, 5, false, 'missed', 'ami')""")
        await conn.execute("INSERT INTO policy_violations (kind, occurred_at, linkedid, details) "
                           "VALUES ('ring_limit', now(), 'wb-1.1', '{}')")
        async with board_api(board_dsn) as api, ClientSession() as session, stream(session, api, VIEWER) as events:
            figures = await events.next("figures", lambda d: d["ok"] and d["kpi"]["calls"] >= 1)
            assert figures["callbacks"]["due"] >= 1 and figures["violations"]["total"] >= 1
            [latest] = [v for v in figures["violations"]["latest"] if v["caller"] == "139****5678"]
            assert latest["kind"] == "ring_limit" and latest["label"]
            assert b"13912345678" not in events.raw
    finally:
        await conn.execute("DELETE FROM policy_violations WHERE linkedid = 'wb-1.1'")
        await conn.execute("DELETE FROM calls WHERE linkedid = 'wb-1.1'")
        await conn.close()


SCREENS = int(os.environ.get("PBX_BRIDGE_WALLBOARD_SCREENS", "200"))


async def test_many_screens_get_each_update_within_a_second(board_dsn: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """SCREENS streams on one app (and their clients, in the same process): every one gets each
    change of a call well within 1 s."""
    async with board_api(board_dsn, figures_every=1.0) as api, ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=60)) as session:
        async with contextlib.AsyncExitStack() as stack:
            screens = [await stack.enter_async_context(stream(session, api, VIEWER)) for _ in range(SCREENS)]
            await asyncio.gather(*(s.next("figures") for s in screens))
            board = api.context.wallboard
            assert board is not None and board.clients == SCREENS
            latencies = []
            for round_ in range(5):
                state = ringing_state() if round_ % 2 == 0 else TrackerState()
                marks = [len(s.events) for s in screens]
                published = time.monotonic()
                api.context.live.publish(state)
                want = bool(state.calls)
                await asyncio.gather(*(s.next("live", lambda d, w=want: bool(d["calls"]) == w, start=mark)
                                       for s, mark in zip(screens, marks, strict=True)))
                latencies += [min(t for e, d, t in s.events[mark:] if e == "live") - published
                              for s, mark in zip(screens, marks, strict=True)]
                await asyncio.sleep(0.1)
        worst, median = max(latencies), statistics.median(latencies)
        with capsys.disabled():
            print(f"\nwallboard: {SCREENS} SSE clients on one app, {len(latencies)} deliveries: "
                  f"median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
        assert worst < 1.0, worst
