"""Several worker hosts on one machine, for tests/test_hosts.py: network namespaces the test
creates (a bridge in the root namespace, one veth link per host, addresses in
:data:`SUBNET`), and a private Redis and Postgres listening on the bridge's address.

Only addresses assigned here (and loopback) are ever contacted. Needs root, ``ip``
(iproute2), ``redis-server`` and Debian's Postgres binaries (``pg_config --bindir``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

#: The test's own subnet; the bridge is ``.1`` (Postgres) and ``.2`` (Redis: an address of
#: its own, so that one host's Redis traffic can be frozen alone), host ``i`` is ``.(10 + i)``.
SUBNET = "10.231.16"
BRIDGE_ADDRESS = f"{SUBNET}.1"
REDIS_ADDRESS = f"{SUBNET}.2"
#: A MAC address nobody has: a host told that Redis lives there sends its packets nowhere.
NOWHERE_MAC = "02:16:00:00:00:01"
#: Private servers, on ports in this test's range.
REDIS_PORT = 17016
POSTGRES_PORT = 17017


def missing_prerequisite() -> str | None:
    """Why these tests cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "redis-server", "pg_config", "runuser"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    if not (postgres_bindir() / "initdb").exists():
        return "needs Debian's Postgres binaries (initdb in `pg_config --bindir`)"
    probe = f"synthprobe{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "`ip netns add` is not permitted here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def postgres_bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
    return Path(out.stdout.strip())


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


class Network:
    """A bridge and ``count`` hosts (namespaces), each with its own veth link."""

    def __init__(self, count: int) -> None:
        tag = uuid.uuid4().hex[:4]
        self.bridge = f"s16b{tag}"
        self.namespaces = [f"synth16-{tag}-h{i}" for i in range(1, count + 1)]
        #: Root-side end of each host's link: ``ip link set DEV down`` cuts the host off.
        self.links = [f"s16r{tag}{i}" for i in range(1, count + 1)]
        self.inner = [f"s16n{tag}{i}" for i in range(1, count + 1)]
        self.addresses = [f"{SUBNET}.{10 + i}" for i in range(1, count + 1)]

    def create(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        sh("ip", "addr", "add", f"{REDIS_ADDRESS}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for ns, outer, inner, address in zip(
            self.namespaces, self.links, self.inner, self.addresses, strict=True
        ):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", ns)
            sh("ip", "link", "set", outer, "master", self.bridge)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", inner)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def destroy(self) -> None:
        for ns, outer in zip(self.namespaces, self.links, strict=True):
            sh("ip", "link", "del", outer, check=False)  # its peer goes with it
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def cut(self, host: int) -> None:
        """Bring host ``host``'s link down: its packets are dropped, nothing is refused."""
        sh("ip", "link", "set", self.links[host], "down")

    def restore(self, host: int) -> None:
        sh("ip", "link", "set", self.links[host], "up")

    def freeze_redis(self, host: int) -> None:
        """Host ``host``'s packets to Redis go to a MAC address nobody has (a permanent
        neighbour entry in its namespace): dropped silently, nothing refused; its other
        traffic (Postgres) flows."""
        sh("ip", "-n", self.namespaces[host], "neigh", "replace", REDIS_ADDRESS, "lladdr",
           NOWHERE_MAC, "dev", self.inner[host], "nud", "permanent")  # fmt: skip

    def thaw_redis(self, host: int) -> None:
        sh("ip", "-n", self.namespaces[host], "neigh", "del", REDIS_ADDRESS, "dev",
           self.inner[host])  # fmt: skip


class Servers:
    """A private Redis and Postgres listening on the bridge's address."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.redis: subprocess.Popen[bytes] | None = None
        self.postgres: subprocess.Popen[bytes] | None = None
        self.pg_home: Path | None = None
        self.redis_url = f"redis://{REDIS_ADDRESS}:{REDIS_PORT}/0"
        self.database_url = f"postgresql://postgres@{BRIDGE_ADDRESS}:{POSTGRES_PORT}/postgres"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "redis.log").open("wb") as log:
            self.redis = subprocess.Popen(
                ["redis-server", "--port", str(REDIS_PORT), "--bind", REDIS_ADDRESS,
                 "--save", "", "--appendonly", "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        # Postgres runs as the `postgres` user: its folder lies outside the test's (root-only)
        # temporary folders.
        self.pg_home = Path(tempfile.mkdtemp(prefix="synth-hosts-pg-"))
        data = self.pg_home / "data"
        data.mkdir()
        shutil.chown(self.pg_home, "postgres")
        shutil.chown(data, "postgres")
        bindir = postgres_bindir()
        sh("runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data), "-A",
           "trust", "-U", "postgres")  # fmt: skip
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        with (self.folder / "postgres.log").open("wb") as log:
            self.postgres = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(bindir / "postgres"), "-D", str(data),
                 "-p", str(POSTGRES_PORT), "-c", f"listen_addresses={BRIDGE_ADDRESS}",
                 "-c", f"unix_socket_directories={data}", "-c", "max_connections=300",
                 "-c", "fsync=off", "-c", "synchronous_commit=off"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        import psycopg
        import redis

        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(self.redis_url, socket_timeout=1).ping()
                psycopg.connect(self.database_url, connect_timeout=2).close()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        for process in (self.redis, self.postgres):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, 15)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, 9)
                    process.wait()
        if self.pg_home is not None:
            shutil.rmtree(self.pg_home, ignore_errors=True)
