"""A real Redis Cluster a test owns: 3 masters, each with a replica, on free loopback ports.

Made from the installed `redis-server` and `redis-cli --cluster create`, with a short
`cluster-node-timeout` so a killed master's replica takes over within seconds. Methods
block (call them through `asyncio.to_thread` from a running event loop).
"""

from __future__ import annotations

import pathlib
import random
import socket
import subprocess
import time


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (+10000) is free too (so at most 55535)."""
    while True:
        port = random.randrange(20_000, 45_000)
        if port not in taken and _free(port) and _free(port + 10_000):
            taken.add(port)
            return port


__all__ = ["OwnCluster"]


def _wait_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class OwnCluster:
    """Six `redis-server`s in cluster mode, three of them replicas."""

    def __init__(self, folder: pathlib.Path, node_timeout_ms: int = 1000) -> None:
        self.folder = folder
        self.node_timeout_ms = node_timeout_ms
        taken: set[int] = set()
        self.ports = [free_cluster_port(taken) for _ in range(6)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """One node: the client finds the rest."""
        return f"redis://127.0.0.1:{self.alive()[0]}/0"

    def _start_node(self, port: int) -> None:
        home = self.folder / str(port)
        home.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-config-file", str(home / "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(home),
             "--appendonly", "no", "--save", "", "--logfile", str(home / "redis.log"),
             # a replica may always take over, however long since it heard its master
             "--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0"],
        )  # fmt: skip

    def start(self) -> None:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            _wait_port(port)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, timeout=10, check=False
        )
        return done.stdout.decode()

    def alive(self) -> list[int]:
        return [p for p in self.ports if p in self.procs and self.procs[p].poll() is None]

    def wait_ok(self, timeout_s: float = 60) -> None:
        """Until every live node sees the whole cluster (every slot served, state ok) and
        every replica is linked to its master."""
        deadline = time.monotonic() + timeout_s
        while True:
            infos = [self.cli(p, "cluster", "info") for p in self.alive()]
            links = [self.cli(p, "info", "replication") for p in self.alive()]
            if all(
                "cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos
            ) and all("master_link_status:down" not in r for r in links):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok: {infos}")
            time.sleep(0.1)

    def roles(self) -> dict[int, str]:
        """Port → `master` or `slave`, as the first live node sees them (failed ones left out)."""
        out: dict[int, str] = {}
        for line in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = line.split()
            port = int(parts[1].split("@")[0].rsplit(":", 1)[1])
            if "fail" not in parts[2]:
                out[port] = "master" if "master" in parts[2] else "slave"
        return out

    def master_of(self, key: str) -> int:
        """The port of the master serving `key` now."""
        slot = int(self.cli(self.alive()[0], "cluster", "keyslot", key).strip())
        for line in self.cli(self.alive()[0], "cluster", "nodes").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                lo, _, hi = span.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no master serves slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL one node: whatever its replica had not received is gone."""
        self.procs[port].kill()
        self.procs[port].wait()

    def restart(self, port: int) -> None:
        """Start a killed node again; it rejoins (as a replica, once failed over)."""
        self._start_node(port)
        _wait_port(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
