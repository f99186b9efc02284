"""A tiny real file system (tmpfs) that tests fill up, to see what a full disk does."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_tmpfs(mount: Path, size: str = "64k") -> Iterator[Path]:
    """Mount a tmpfs of `size` at `mount` (root only) and unmount it afterwards."""
    mount.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the file system of `directory` but for about `leave` bytes; return the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
        with contextlib.suppress(OSError):
            os.write(fd, b"\0" * max(0, free - leave))
    finally:
        os.close(fd)
    return filler
