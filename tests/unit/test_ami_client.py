"""The AMI adapter over panoramisk, against a scripted AMI server on loopback.

Each test pins one panoramisk 1.4 defect that the adapter neutralises.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from panoramisk.ami_protocol import AMIProtocol

from pbx_bridge.ami.client import AmiClient, AmiError, SessionHook
from pbx_bridge.ami.wire import AmiFramer, AmiMessage

NAME = "张三客户"


class FakeAmi:
    """A minimal AMI server: banner, Login, Ping; the test pushes events as raw bytes."""

    def __init__(self, *, accept_login: bool = True) -> None:
        self.accept_login = accept_login
        self.answer_pings = True
        self.connections = 0
        self.actions: list[AmiMessage] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        framer = AmiFramer()
        framer.banner = ""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                for action in framer.feed(data):
                    self.actions.append(action)
                    await self.reply(action, writer)

    async def reply(self, action: AmiMessage, writer: asyncio.StreamWriter) -> None:
        action_id = action.get("ActionID")
        name = action.get("Action")
        if name == "Login":
            status = "Success" if self.accept_login else "Error"
            text = "Authentication accepted" if self.accept_login else "Authentication failed"
            writer.write(f"Response: {status}\r\nActionID: {action_id}\r\nMessage: {text}\r\n\r\n".encode())
        elif name == "Ping" and self.answer_pings:
            writer.write(f"Response: Success\r\nActionID: {action_id}\r\nPing: Pong\r\n\r\n".encode())
        elif name not in ("Ping",):
            writer.write(f"Response: Success\r\nActionID: {action_id}\r\n\r\n".encode())
        await writer.drain()

    async def push(self, data: bytes, chunk: int = 0) -> None:
        writer = self.writers[-1]
        pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0)

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()


def event(n: int, name: str = NAME) -> bytes:
    """A Newchannel with the whole channel snapshot, shaped as Asterisk 22 sends it (debug = on)."""
    return (f"Event: Newchannel\r\nPrivilege: call,all\r\nTimestamp: 1795429737.{n:06d}\r\n"
            f"SequenceNumber: {100 + n}\r\nChannel: PJSIP/carrier-{n:08x}\r\nChannelState: 4\r\n"
            f"ChannelStateDesc: Ring\r\nCallerIDNum: 13800000000\r\nCallerIDName: {name}\r\n"
            "ConnectedLineNum: <unknown>\r\nConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
            f"Context: from-carrier\r\nExten: 4008001234\r\nPriority: 1\r\n"
            f"Uniqueid: pbx-{n}\r\nLinkedid: pbx-{n}\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def running(fake: FakeAmi, received: list[AmiMessage], *, ping_interval: float = 10.0,
                  ping_timeout: float = 5.0, on_session: SessionHook | None = None) -> AsyncIterator[AmiClient]:
    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    client = AmiClient(host="127.0.0.1", port=fake.port, username="u", secret="s", on_event=received.append,
                       ping_interval=ping_interval, ping_timeout=ping_timeout, on_session=on_session)
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        client.stop()
        await asyncio.wait_for(task, 5)
        fake.server.close()


async def until(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_events_split_byte_by_byte_arrive_whole_and_in_order() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()
    async with running(fake, received) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        await fake.push(b"".join(event(n) for n in range(5)), chunk=1)
        await until(lambda: len(received) == 5)
    assert [m.get("Uniqueid") for m in received] == [f"pbx-{n}" for n in range(5)]
    assert {m.get("CallerIDName") for m in received} == {NAME}


async def test_a_failing_handler_does_not_kill_the_connection() -> None:
    fake, seen = FakeAmi(), list[AmiMessage]()

    def handler(message: AmiMessage) -> None:
        if message.get("Uniqueid") == "pbx-1":
            raise RuntimeError("handler bug")
        seen.append(message)

    fake.server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    client = AmiClient(host="127.0.0.1", port=fake.port, username="u", secret="s", on_event=handler)
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), 5)
    await fake.push(event(0) + event(1) + event(2))
    await until(lambda: len(seen) == 2)
    assert client.sessions == 1 and fake.connections == 1
    assert await client.send_action({"Action": "CoreStatus"}) is not None  # still usable
    client.stop()
    await task
    fake.server.close()


async def test_unanswered_ping_drops_the_connection_and_reconnects() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()
    async with running(fake, received, ping_interval=0.1, ping_timeout=0.2) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        fake.answer_pings = False
        await until(lambda: fake.connections >= 2)
        fake.answer_pings = True
        await until(lambda: client.sessions >= 2)
    assert client.reconnects >= 1


async def test_server_closing_the_connection_leads_to_a_new_session() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()
    async with running(fake, received) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        fake.drop_connections()
        await until(lambda: client.sessions == 2)
        await fake.push(event(7))
        await until(lambda: len(received) == 1)


async def test_refused_login_is_retried_with_backoff_never_connected() -> None:
    fake, received = FakeAmi(accept_login=False), list[AmiMessage]()
    async with running(fake, received) as client:
        await until(lambda: fake.connections >= 2, timeout=5)
        assert not client.connected.is_set()
        assert client.sessions == 0


async def test_actions_are_sent_as_utf8() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()
    async with running(fake, received) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        await client.send_action({"Action": "UserEvent", "UserEvent": "Note", "Name": NAME})
    assert any(a.get("Name") == NAME for a in fake.actions)


async def test_header_injection_fails_the_action_instead_of_hanging() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()
    async with running(fake, received) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        with pytest.raises(AmiError, match="line break"):
            await client.send_action({"Action": "Originate", "CallerID": "x\r\nAction: Hangup"},
                                     response_timeout=1)
    assert not any(a.get("Action") == "Hangup" for a in fake.actions)


async def test_send_without_session_is_a_clear_error() -> None:
    client = AmiClient(host="127.0.0.1", port=1, username="u", secret="s", on_event=lambda m: None)
    with pytest.raises(AmiError, match="not connected"):
        await client.send_action({"Action": "Ping"})


def test_stock_panoramisk_still_loses_chinese_names() -> None:
    """Pins the upstream defect the adapter exists for; if this fails, panoramisk fixed it."""
    got: list[str] = []

    class Factory:
        def dispatch(self, message: dict[str, str]) -> None:
            got.append(message["CallerIDName"])

    protocol = AMIProtocol()
    protocol.connection_made(transport=None)
    protocol.factory = Factory()
    protocol.data_received(event(1))
    assert got == [""]


async def test_session_hook_runs_after_every_login() -> None:
    fake, received, calls = FakeAmi(), list[AmiMessage](), list[int]()

    async def hook(client: AmiClient) -> None:
        calls.append(client.sessions)
        await client.send_action({"Action": "CoreStatus"})

    async with running(fake, received, on_session=hook) as client:
        await until(lambda: calls == [1])
        fake.drop_connections()
        await until(lambda: calls == [1, 2])
        assert client.connected.is_set()


async def test_session_hook_ami_error_is_contained() -> None:
    fake, received = FakeAmi(), list[AmiMessage]()

    async def hook(client: AmiClient) -> None:
        raise AmiError("listing failed")

    async with running(fake, received, on_session=hook) as client:
        await asyncio.wait_for(client.connected.wait(), 5)
        await fake.push(event(3))
        await until(lambda: len(received) == 1)
        assert client.sessions == 1
