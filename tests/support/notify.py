"""A NOTIFY_SOCKET a test owns, to read what pbx-bridge tells systemd (sd_notify datagrams)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator


class NotifySocket:
    """A NOTIFY_SOCKET of the test's own: a thread receives every datagram and notes its arrival time."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self._messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self._messages.append((time.monotonic(), fields))

    def drain(self) -> list[tuple[float, dict[str, str]]]:
        """What has arrived so far (a moment's grace for the thread)."""
        time.sleep(0.06)
        with self._lock:
            return list(self._messages)

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        """Messages carrying `key`."""
        return [(at, m) for at, m in self.drain() if key in m]

    def close(self) -> None:
        """Stop receiving, remove the socket."""
        self._done.set()
        self._thread.join(1)
        self.sock.close()
        os.unlink(self.path)


@contextlib.contextmanager
def listening() -> Iterator[NotifySocket]:
    """A NotifySocket bound in a short temporary directory (a socket path has at most 107 bytes)."""
    folder = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
    receiver = NotifySocket(folder)
    try:
        yield receiver
    finally:
        receiver.close()
        os.rmdir(folder)
