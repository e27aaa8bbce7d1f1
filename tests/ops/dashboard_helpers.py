"""The dashboard as a real server for tests: `jobstream dashboard` in a subprocess."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO

import httpx

TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def dashboard(env: dict[str, str], port: int | None = None) -> Iterator[str]:
    """Serve the dashboard with `env` on a free loopback port; yield its base URL."""
    port = port or free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobstream.consumers.cli", "dashboard", "--port", str(port)],
            env={"JOBSTREAM_DASHBOARD_TOKEN": TOKEN, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield _ready(proc, log, f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(proc: subprocess.Popen[bytes], log: IO[bytes], base: str) -> str:
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            log.seek(0)
            out = log.read().decode(errors="replace")
            raise AssertionError(f"the dashboard exited with {proc.returncode}: {out}")
        try:
            httpx.get(f"{base}/login", timeout=2)
            return base
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}
