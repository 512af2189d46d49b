"""Workers on separate hosts: three network namespaces the test creates, each with its own
link and address, running one worker each against a private Redis and Postgres reached over
those links (tests/hosts_net.py). A normal run, a host cut off for 60 s (self-fencing, late
completions refused, consuming again without a restart) and one host's Redis traffic frozen.

Skipped, with the reason, where network namespaces cannot be made (not root, no ``ip``);
``.ci/run`` runs as root, so they run in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from synth_workers import enqueue
from synth_workers.app import SynthCelery, create_app
from synth_workers.settings import load_settings
from tests.conftest import ROOT, stop_group, wait_for_worker, wait_until
from tests.hosts_net import Network, Servers, missing_prerequisite

_SKIP = missing_prerequisite()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=f"separate hosts: {_SKIP}")

QUEUE = "hosts16"
TASK = "tests.hosts_tasks.work"
SCHEMA = "synth_hosts"
#: Short leases and timeouts, so that a partition plays out in seconds (see the docstrings
#: of synth_workers.selffence and synth_workers.liveness for what each one bounds).
LEASE = 4.0
GRACE = 7.0  # >= 2 x SYNTH_DB_TCP_TIMEOUT + a poll: a job caught in a ledger call stops too
REDIS_TIMEOUT = 3.0
TIMINGS = {
    "SYNTH_LEASE_SECONDS": str(LEASE),
    "SYNTH_LEASE_GRACE": str(GRACE),
    "SYNTH_SWEEP_INTERVAL": "0.3",
    "SYNTH_RECONCILE_GRACE": "3",
    "SYNTH_REDIS_TIMEOUT": str(REDIS_TIMEOUT),
    "SYNTH_DB_CONNECT_TIMEOUT": "2",
    "SYNTH_DB_TCP_TIMEOUT": "3",
}


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.net = Network(3)
        self.servers = Servers(folder / "servers")
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.app: SynthCelery | None = None

    def start(self) -> None:
        self.net.create()
        self.servers.start()
        self.app = create_app(
            load_settings(
                redis_url=self.servers.redis_url,
                database_url=self.servers.database_url,
                db_schema=SCHEMA,
                lease_seconds=LEASE,
                include=["tests.hosts_tasks"],
            )
        )
        self.app.ledger.migrate()
        with self.app.ledger.connection() as conn:
            conn.execute(
                "CREATE TABLE host_effects (job_id uuid PRIMARY KEY, n integer NOT NULL, "
                "owner text NOT NULL, host text NOT NULL)"
            )
            conn.execute("CREATE TABLE host_duplicates (job_id uuid NOT NULL)")

    def stop(self) -> None:
        for host in list(self.workers):
            self.stop_worker(host)
        if self.app is not None:
            self.app.close()
        self.servers.stop()
        self.net.destroy()

    def log(self, host: int) -> Path:
        return self.folder / f"host{host}.events"

    def worker_log(self, host: int) -> Path:
        return self.folder / f"host{host}.worker.log"

    def start_worker(self, host: int, concurrency: int = 3) -> subprocess.Popen[bytes]:
        name = f"host{host}-{uuid.uuid4().hex[:6]}@hosts16"
        env = {
            **os.environ,
            **TIMINGS,
            "REDIS_URL": self.servers.redis_url,
            "DATABASE_URL": self.servers.database_url,
            "SYNTH_DB_SCHEMA": SCHEMA,
            "SYNTH_INCLUDE": "tests.hosts_tasks",
            "SYNTH_TEST_HOST": f"host{host}",
            "SYNTH_TEST_HOST_LOG": str(self.log(host)),
        }
        argv = ["ip", "netns", "exec", self.net.namespaces[host], sys.executable, "-m",
                "celery", "-A", "synth_workers", "worker", "-Q", f"{QUEUE},{QUEUE}.h{host}",
                "-n", name, "-P", "prefork", "-c", str(concurrency), "-l", "INFO",
                "--without-mingle", "--without-gossip"]  # fmt: skip
        with self.worker_log(host).open("ab") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.workers[host] = process
        wait_for_worker(
            name, process=process, log=self.worker_log(host), broker_url=self.servers.redis_url
        )
        return process

    def stop_worker(self, host: int) -> None:
        process = self.workers.pop(host)
        stop_group(process, timeout=20)

    # --- what happened ------------------------------------------------------------------------
    def events(self, host: int) -> list[tuple[float, str, str, int]]:
        """The host's job events: (wall time, event, job id, attempt)."""
        path = self.log(host)
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            t, event, job, attempt = line.split()
            rows.append((float(t), event, job, int(attempt)))
        return rows

    def states(self) -> dict[str, int]:
        assert self.app is not None
        with self.app.ledger.connection() as conn:
            rows = conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY state")
            return {str(state): int(n) for state, n in rows.fetchall()}

    def effects(self) -> tuple[dict[str, int], int]:
        """Effect rows per host, and duplicate effects."""
        assert self.app is not None
        with self.app.ledger.connection() as conn:
            rows = conn.execute("SELECT host, count(*) FROM host_effects GROUP BY host")
            per_host = {str(host): int(n) for host, n in rows.fetchall()}
            dups = conn.execute("SELECT count(*) FROM host_duplicates").fetchone()
        assert dups is not None
        return per_host, int(dups[0])

    def state(self, job_id: str) -> str | None:
        assert self.app is not None
        with self.app.ledger.connection() as conn:
            row = conn.execute("SELECT state FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()
        return None if row is None else str(row[0])

    def late(self) -> list[tuple[str, int, str, str]]:
        assert self.app is not None
        with self.app.ledger.connection() as conn:
            rows = conn.execute(
                "SELECT job_id::text, attempt, owner, outcome FROM synth_late_completions"
            )
            return [(str(a), int(b), str(c), str(d)) for a, b, c, d in rows.fetchall()]

    def enqueue(self, count: int, start: int = 0, **payload: Any) -> list[str]:
        queue = payload.pop("queue", QUEUE)

        def one(n: int) -> str:
            return enqueue(TASK, {"n": n, **payload}, queue=queue, app=self.app).id

        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(one, range(start, start + count)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    built = Cluster(tmp_path_factory.mktemp("hosts"))
    try:
        built.start()
        yield built
    finally:
        built.stop()


@pytest.fixture
def hosts(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster with a clean ledger and three workers, one per host."""
    assert cluster.app is not None
    with cluster.app.ledger.connection() as conn:
        conn.execute(
            "TRUNCATE synth_jobs, synth_late_completions, synth_effects, host_effects, "
            "host_duplicates"
        )
    cluster.app.redis.flushdb()
    for host in range(3):
        cluster.log(host).unlink(missing_ok=True)
    try:
        yield cluster
    finally:
        for host in list(cluster.workers):
            cluster.stop_worker(host)


def test_three_hosts_run_3000_jobs_once_each(hosts: Cluster) -> None:
    for host in range(3):
        hosts.start_worker(host)
    total = 3000
    hosts.enqueue(total)
    assert wait_until(lambda: hosts.states().get("succeeded", 0) == total, timeout=300), (
        hosts.states()
    )
    assert hosts.states() == {"succeeded": total}
    per_host, duplicates = hosts.effects()
    assert sum(per_host.values()) == total
    assert duplicates == 0
    assert sorted(per_host) == ["host0", "host1", "host2"], per_host  # each host ran some
    print(f"jobs per host: {per_host}")


def _running(events: list[tuple[float, str, str, int]]) -> set[tuple[str, int]]:
    """(job, attempt) started and not yet ended, by a host's events."""
    started = {(job, attempt) for _, event, job, attempt in events if event == "start"}
    ended = {(job, attempt) for _, event, job, attempt in events if event != "start"}
    return started - ended


def test_a_host_cut_off_for_60s_stops_its_jobs_and_consumes_again(hosts: Cluster) -> None:
    cut_seconds = 60.0
    restored_flag = hosts.folder / "link-restored"
    restored_flag.unlink(missing_ok=True)
    cut_off = hosts.start_worker(0, concurrency=5)
    # Two jobs on host 0 that ignore stop requests (and wait for the link to return): what
    # they try to write afterwards must be refused.
    stubborn = hosts.enqueue(2, start=100_000, until=str(restored_flag), queue=f"{QUEUE}.h0")
    assert wait_until(lambda: len(_running(hosts.events(0))) == 2, timeout=60)
    hosts.start_worker(1)
    hosts.start_worker(2)
    total = 300
    hosts.enqueue(total, seconds=1.0)
    # Mid-run, with cooperative jobs running on host 0 beside the stubborn two.
    assert wait_until(
        lambda: hosts.states().get("succeeded", 0) >= 30 and len(_running(hosts.events(0))) >= 4,
        timeout=120,
    ), hosts.states()
    t_cut = time.time()
    hosts.net.cut(0)
    try:
        # Self-fencing: host 0 stops every cooperative job it was running once its leases
        # are over on its own clock (LEASE, plus a poll and a hung statement at most).
        assert wait_until(lambda: len(_running(hosts.events(0))) == 2, timeout=LEASE + 15), (
            _running(hosts.events(0))
        )
        t_fenced = time.time()
        # The others go on meanwhile (they reap host 0's jobs and run them).
        done_at_cut = hosts.states().get("succeeded", 0)
        assert wait_until(
            lambda: hosts.states().get("succeeded", 0) > done_at_cut + 20, timeout=cut_seconds
        )
        time.sleep(max(0.0, t_cut + cut_seconds - time.time()))  # the partition lasts 60 s
    finally:
        hosts.net.restore(0)
    t_restored = time.time()
    restored_flag.touch()
    assert wait_until(lambda: hosts.states().get("succeeded", 0) == total + 2, timeout=240), (
        hosts.states()
    )
    # After the link returns host 0 consumes again, without a restart: jobs only it takes.
    again = hosts.enqueue(5, start=200_000, queue=f"{QUEUE}.h0")
    assert wait_until(lambda: hosts.states().get("succeeded", 0) == total + 7, timeout=120), (
        hosts.states()
    )
    assert cut_off.poll() is None and hosts.workers[0] is cut_off

    def done_after_restore() -> set[str]:
        return {j for t, e, j, _ in hosts.events(0) if e == "done" and t > t_restored}

    # (noted just after the effect commits)
    assert wait_until(lambda: done_after_restore() >= set(again), timeout=10)
    events0 = hosts.events(0)
    # 0 lost, every effect exactly once.
    assert hosts.states() == {"succeeded": total + 7}
    per_host, duplicates = hosts.effects()
    assert sum(per_host.values()) == total + 7
    assert duplicates == 0
    # The jobs host 0 stopped (self-fenced) ran again only after it stopped them.
    stopped = {(job, attempt): t for t, event, job, attempt in events0 if event == "stop"}
    assert stopped, "host 0 stopped none of its jobs"
    # Its next attempt ran on another host, or on host 0 itself once the link was back: a
    # reaped job goes to the back of its queue, and 300 one-second jobs on hosts 1 and 2 last
    # about as long as the partition.
    starts_again = {
        (job, attempt): t
        for host in (0, 1, 2)
        for t, event, job, attempt in (events0 if host == 0 else hosts.events(host))
        if event == "start" and (host != 0 or t > t_restored)
    }
    for (job, attempt), t_stop in stopped.items():
        assert t_cut < t_stop <= t_fenced
        t_next = starts_again.get((job, attempt + 1))
        assert t_next is not None, f"job {job} never ran again"
        assert t_next > t_stop, f"job {job} ran again {t_stop - t_next:.2f}s before it stopped"
    # The stubborn jobs' late effects were refused by the ledger (fencing by attempt) and
    # recorded; their effects were written once, by the run on another host.

    def refused() -> set[str]:
        return {j for _, e, j, attempt in hosts.events(0) if e == "refused" and attempt == 1}

    assert wait_until(lambda: refused() == set(stubborn), timeout=60), refused()
    late = {(job, attempt, outcome) for job, attempt, _, outcome in hosts.late()}
    assert {(job, 1, "effect") for job in stubborn} <= late
    host0_pids = {str(p.pid) for p in psutil.Process(cut_off.pid).children(recursive=True)}
    assert {
        owner.split(":")[1] for job, _, owner, _ in hosts.late() if job in stubborn
    } <= host0_pids
    print(
        f"cut at {t_cut:.1f}: host 0 stopped {len(stopped)} jobs within "
        f"{max(stopped.values()) - t_cut:.1f}s; late refused: {len(late)}; "
        f"effects per host {per_host}"
    )


#: What a worker logs when it finds its Redis connection dead (kombu's BRPOP check, Celery's
#: consumer, a failed reconnect).
NOTICED = ("dropping stale connection", "Connection to broker lost", "Cannot connect to redis")


def test_frozen_redis_traffic_to_one_host_is_noticed_and_recovered(hosts: Cluster) -> None:
    for host in range(3):
        hosts.start_worker(host)
    warmup = hosts.enqueue(3, queue=f"{QUEUE}.h1")
    assert wait_until(lambda: hosts.states().get("succeeded", 0) == len(warmup), timeout=60)
    log = hosts.worker_log(1)
    before = len(log.read_bytes())

    def noticed() -> bool:
        text = log.read_bytes()[before:].decode(errors="replace")
        return any(sign in text for sign in NOTICED)

    t_freeze = time.monotonic()
    hosts.net.freeze_redis(1)  # host 1's packets to Redis are dropped; Postgres still flows
    try:
        # Jobs sent meanwhile for host 1 only, and for anyone: the others run theirs.
        held = hosts.enqueue(5, start=1000, queue=f"{QUEUE}.h1")
        shared = hosts.enqueue(30, start=2000)
        bound = REDIS_TIMEOUT + 30
        assert wait_until(noticed, timeout=bound + 5), "host 1 never noticed"
        t_noticed = time.monotonic() - t_freeze
        assert t_noticed <= bound, f"noticed after {t_noticed:.1f}s, more than {bound:.0f}s"
        # At most the one message a BRPOP sent before the freeze was waiting for reached it
        # (Redis's packets to the host still flow); the others wait in Redis.
        assert sum(hosts.state(job) == "succeeded" for job in held) <= 1
    finally:
        hosts.net.thaw_redis(1)
    t_thawed = time.monotonic()
    # It recovers without a restart: the jobs only it consumes run.
    assert wait_until(
        lambda: all(hosts.state(job) == "succeeded" for job in held + shared), timeout=120
    ), hosts.states()
    t_recovered = time.monotonic() - t_thawed
    assert hosts.workers[1].poll() is None
    assert hosts.states() == {"succeeded": len(warmup) + len(held) + len(shared)}
    per_host, duplicates = hosts.effects()
    assert duplicates == 0
    assert sum(per_host.values()) == len(warmup) + len(held) + len(shared)
    print(f"host 1 noticed the frozen Redis after {t_noticed:.1f}s, recovered {t_recovered:.1f}s")
