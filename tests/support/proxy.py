"""A TCP relay the tests put between pbx-bridge and a server (AMI, PostgreSQL) to break the link:
cut it (both sides see a reset), hold it down (new connections refused), or partition it
(packets silently dropped by the kernel, as when a network fails: nobody sees a reset)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess


class TcpProxy:
    """Relays 127.0.0.1:<port> to 127.0.0.1:<target_port>."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.down = False
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._upstream_ports: set[int] = set()
        self._rules: list[list[str]] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.heal()
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every relayed connection at once (both sides see a reset)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def partition(self) -> None:
        """From now on, the kernel drops every packet between the relay and the server, both ways,
        and new connections are refused: a network failure, with TCP keepalives left to notice it."""
        self.down = True
        for port in sorted(self._upstream_ports):
            for match in ("--sport", "--dport"):
                rule = ["OUTPUT", "-o", "lo", "-p", "tcp", match, str(port), "-j", "DROP"]
                subprocess.run(["iptables", "-I", *rule], check=True)
                self._rules.append(rule)

    def heal(self) -> None:
        """Remove the partition's packet filters (connections it broke stay broken)."""
        for rule in self._rules:
            subprocess.run(["iptables", "-D", *rule], check=False)
        self._rules.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            upstream = socket.socket()
            upstream.setblocking(False)
            upstream.bind(("127.0.0.1", 0))
            await asyncio.get_running_loop().sock_connect(upstream, ("127.0.0.1", self.target_port))
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except OSError:
            writer.transport.abort()
            return
        self._upstream_ports.add(upstream.getsockname()[1])
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()
