"""A stand-in Asterisk AMI server for the benchmark: it streams prepared events to the real daemon
and answers the actions the daemon sends (login, ping, the channel snapshot, the guard's checks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pbx_bridge.ami.wire import AmiFramer, AmiMessage

BANNER = b"Asterisk Call Manager/11.0.0\r\n"


@dataclass
class Seen:
    """What the daemon did on the AMI connection, with this host's monotonic times."""

    hangups: dict[str, float] = field(default_factory=dict)  # channel -> when its Hangup action arrived
    actions: int = 0


class FakeAmi:
    """One AMI client at a time (the daemon). `ready` is set once the daemon has logged in and
    taken the channel snapshot: events sent after it are applied after the snapshot."""

    def __init__(self, key_id: str, linkedid_of: Callable[[str], str] | None = None) -> None:
        self._key_id = key_id
        self._linkedid_of = linkedid_of or (lambda _: "")
        self.ready = asyncio.Event()
        self.seen = Seen()
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen on a free loopback port; return it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Stop listening and drop the connection."""
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def writer(self) -> asyncio.StreamWriter:
        """The daemon's connection (once it connected)."""
        assert self._writer is not None, "the daemon is not connected"
        return self._writer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        writer.write(BANNER)
        framer = AmiFramer()
        framer.banner = ""  # actions come without a banner
        while data := await reader.read(65536):
            for action in framer.feed(data):
                self.seen.actions += 1
                writer.write(self._reply(action))

    def _reply(self, action: AmiMessage) -> bytes:
        name = action.get("Action").lower()
        head = f"Response: Success\r\nActionID: {action.get('ActionID')}\r\n"
        if name == "hangup":
            self.seen.hangups.setdefault(action.get("Channel"), time.monotonic())
            return (head + "Message: Channel Hungup\r\n\r\n").encode()
        if name == "coreshowchannels":
            self.ready.set()
            return (head + "EventList: start\r\nMessage: Channels will follow\r\n\r\n"
                    f"Event: CoreShowChannelsComplete\r\nActionID: {action.get('ActionID')}\r\n"
                    "EventList: Complete\r\nListItems: 0\r\n\r\n").encode()
        if name == "getvar":
            variable = action.get("Variable")
            if variable == "PBX_BRIDGE_EVENT_KEY_ID":
                value = self._key_id
            elif variable == "CHANNEL(linkedid)":
                value = self._linkedid_of(action.get("Channel"))
            else:
                value = ""
            return (head + f"Variable: {variable}\r\nValue: {value}\r\n\r\n").encode()
        if name == "ping":
            return (head + "Ping: Pong\r\n\r\n").encode()
        if name == "login":
            return (head + "Message: Authentication accepted\r\n\r\n").encode()
        return (head + "Message: OK\r\n\r\n").encode()
