"""Redis Sentinel: one master, one replica and three sentinels started by the test (Debian
``redis-server`` and ``redis-server --sentinel``, one config file each), on ports 16800-16849.

- the guide's form (``REDIS_URL=redis://s1:26379,s2:26379`` + ``REDIS_SENTINEL_NAME``) and
  kombu's (``sentinel://:pw@h1;sentinel://:pw@h2``) with passwords on the master and the
  sentinels: jobs run end to end, results come back over the Sentinel-found master;
- failover: 5,000 jobs in flight, the master SIGKILLed: producers and workers use the new
  master within 30 s, every acknowledged job reaches a final state, no effect twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from synth_workers import app
from synth_workers.errors import ConfigurationError
from synth_workers.redisconn import redis_client, redis_target

from .conftest import ROOT, Worker, stop_group, wait_until

MASTER = "synthmaster"
QUEUE = "sentinel"
FINAL = ("succeeded", "dead", "cancelled")


class Cluster:
    """A master, a replica and three sentinels on ``base``.. (``password``: on every one)."""

    def __init__(
        self, base: int, password: str | None = None, certs: dict[str, Path] | None = None
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="synth-sentinel-"))
        self.password = password
        self.certs = certs  # TLS only (port 0), replication and sentinels included
        self.ports = {"master": base, "replica": base + 1}
        self.sentinel_ports = [base + 10, base + 11, base + 12]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def _tls(self, port: int) -> list[str]:
        if not self.certs:
            return [f"port {port}"]
        return ["port 0", f"tls-port {port}", f"tls-cert-file {self.certs['server']}",
                f"tls-key-file {self.certs['server_key']}",
                f"tls-ca-cert-file {self.certs['ca']}", "tls-auth-clients no",
                "tls-replication yes"]  # fmt: skip

    def _server(self, port: int, *extra: str) -> None:
        auth = ("--requirepass", self.password, "--masterauth", self.password)
        tls: list[str] = []
        argv = ["redis-server", "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--dbfilename", f"{port}.rdb",
                *(auth if self.password else ()), *extra]  # fmt: skip
        for line in self._tls(port):
            name, value = line.split(" ", 1)
            tls += [f"--{name}", value]
        self._start(port, [*argv, *tls])

    def _start(self, port: int, argv: list[str]) -> None:
        log = (self.dir / f"{port}.log").open("wb")
        self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> Cluster:
        master = self.ports["master"]
        self._server(master)
        self._server(self.ports["replica"], "--replicaof", "127.0.0.1", str(master))
        for port in self.sentinel_ports:
            conf = self.dir / f"sentinel-{port}.conf"
            lines = [*self._tls(port), "bind 127.0.0.1", f"dir {self.dir}",
                     f"sentinel monitor {MASTER} 127.0.0.1 {master} 2",
                     f"sentinel down-after-milliseconds {MASTER} 1000",
                     f"sentinel failover-timeout {MASTER} 10000"]  # fmt: skip
            if self.password:
                lines += [f"sentinel auth-pass {MASTER} {self.password}",
                          f"requirepass {self.password}"]  # fmt: skip
            conf.write_text("\n".join(lines) + "\n")
            self._start(port, ["redis-server", str(conf), "--sentinel"])
        ready = wait_until(self._settled, timeout=30, interval=0.2)
        assert ready, self.logs()
        return self

    def sentinel(self, port: int) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.certs:
            tls = {"ssl": True, "ssl_ca_certs": str(self.certs["ca"])}
        return redis.Redis(
            port=port, password=self.password, socket_timeout=2, decode_responses=True, **tls
        )

    def _settled(self) -> bool:
        """Every sentinel knows the master, its replica and the two other sentinels."""
        try:
            for port in self.sentinel_ports:
                info: Any = self.sentinel(port).sentinel_master(MASTER)
                if info["num-slaves"] < 1 or info["num-other-sentinels"] < 2:
                    return False
            return True
        except (redis.RedisError, KeyError):
            return False

    def master_port(self) -> int | None:
        try:
            _host, port = self.sentinel(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(
                MASTER
            )
            return int(port)
        except (redis.RedisError, TypeError):
            return None

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()

    def guide_url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis://{auth}{hosts}/{db}"

    def kombu_url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{p}/{db}" for p in self.sentinel_ports)

    def env(self, url: str) -> dict[str, str]:
        env = {"REDIS_URL": url, "REDIS_SENTINEL_NAME": MASTER}
        if self.password:
            env["REDIS_SENTINEL_PASSWORD"] = self.password
        return env

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in self.dir.glob("*.log"))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """Workers a test started (:func:`start_worker`), stopped when it ends."""
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def start_worker(
    started: list[Worker],
    tmp_path: Path,
    env: dict[str, str],
    concurrency: int = 2,
    queues: str = QUEUE,
) -> Worker:
    """A real worker with the Sentinel settings in its environment; returns once it is ready
    (its "ready." log line: the test's own app does not speak to this Redis)."""
    name = f"sentinel-{uuid.uuid4().hex[:8]}@test"
    log = tmp_path / f"{name.split('@', maxsplit=1)[0]}.log"
    argv = [sys.executable, "-m", "celery", "-A", "synth_workers", "worker", "-Q", queues,
            "-n", name, "-c", str(concurrency), "-l", "INFO", "--without-mingle",
            "--without-gossip"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    worker = Worker(process, name, log)
    started.append(worker)
    ok = wait_until(lambda: "ready." in worker.output() or process.poll() is not None, 60)
    assert ok and process.poll() is None, worker.output()[-4000:]
    return worker


PRODUCER = """
import json, os, sys, time
from synth_workers import enqueue
first, count, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out, priority = sys.argv[4], sys.argv[5]
stop = out + ".stop"
with open(out, "a") as f:
    for n in range(first, first + count):
        if os.path.exists(stop):
            break
        t = time.time()
        try:
            h = enqueue("tests.e2e_tasks.effect", {"n": n}, queue="sentinel", priority=priority)
            f.write(json.dumps({"id": h.id, "t": t, "done": time.time()}) + "\\n")
        except Exception as exc:
            line = {"error": type(exc).__name__, "t": t, "msg": str(exc)[:300]}
            f.write(json.dumps(line) + "\\n")
            time.sleep(0.1)
        f.flush()
        if pause:
            time.sleep(pause)
"""


def produce(
    env: dict[str, str],
    first: int,
    count: int,
    out: Path,
    pause: float = 0.0,
    priority: str = "normal",
) -> Any:
    """A producer process enqueueing ``count`` effect jobs; each enqueue's outcome is a line
    of ``out`` (``{"id", "t", "done"}`` when acknowledged, ``{"error", ...}`` when refused)."""
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, str(first), str(count), str(pause), str(out), priority],
        cwd=ROOT,
        env={**os.environ, **env},
        start_new_session=True,
    )


def records(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]


def states_of(ids: list[str]) -> dict[str, int]:
    with app.ledger.connection() as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM synth_jobs WHERE id = ANY(%s::uuid[]) GROUP BY state",
            (ids,),
        ).fetchall()
    return dict(rows)


def effects_of(ids: list[str]) -> tuple[int, int]:
    with app.ledger.connection() as conn:
        effects = conn.execute(
            "SELECT count(*) FROM test_effects WHERE job_id = ANY(%s::uuid[])", (ids,)
        ).fetchone()
        dups = conn.execute("SELECT count(*) FROM test_duplicates").fetchone()
    assert effects is not None and dups is not None
    return int(effects[0]), int(dups[0])


@pytest.fixture(scope="module")
def guarded() -> Iterator[Cluster]:
    """A cluster with a password on the master, the replica and the sentinels."""
    cluster = Cluster(16800, password="s3cret-pw").start()
    yield cluster
    cluster.stop()


def test_sentinel_url_without_master_name_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match="REDIS_SENTINEL_NAME"):
        redis_target("redis://127.0.0.1:26379,127.0.0.1:26380/0")
    with pytest.raises(ConfigurationError, match="REDIS_SENTINEL_NAME"):
        redis_target("sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380")
    target = redis_target("redis://:pw@127.0.0.1:26379,127.0.0.1:26380/3", "m")
    assert target.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert (target.password, target.db, target.master_name) == ("pw", 3, "m")
    assert "pw" not in repr(target)
    # passwords masked in every one of the URLs (messages, logs, settings' repr)
    from synth_workers.settings import mask_url

    assert mask_url("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379") == (
        "sentinel://:***@h1:26379;sentinel://:***@h2:26379"
    )
    assert mask_url("redis://u:pw@h1:26379,h2:26379/0") == "redis://u:***@h1:26379,h2:26379/0"


def test_adopted_app_with_kombus_sentinel_options(guarded: Cluster, rclient: Any) -> None:
    """An app of one's own with kombu's Sentinel configuration: install() reads the master
    name and the sentinels' password from its transport options."""
    from celery import Celery
    from kombu import Queue

    from synth_workers import install

    own = Celery(
        "adopted",
        broker=guarded.kombu_url(db=3),
        broker_transport_options={
            "master_name": MASTER,
            "sentinel_kwargs": {"password": guarded.password},
        },
    )
    try:
        platform = install(own)
        assert platform.settings.redis_sentinel_name == MASTER
        assert own.conf.broker_transport == "synth_workers.broker:SentinelTransport"
        master = redis.Redis(port=guarded.ports["master"], password=guarded.password, db=3)
        master.delete("adopted", "adopted-q")
        platform.redis.set("adopted", "1")
        assert master.get("adopted") == b"1"
        with own.producer_or_acquire() as producer:
            producer.publish({"n": 1}, routing_key="adopted-q", declare=[Queue("adopted-q")])
            assert type(producer.connection.transport).__name__ == "SentinelTransport"
        assert master.llen("adopted-q") == 1
    finally:
        own.close()


@pytest.mark.parametrize("form", ["guide", "kombu"])
def test_jobs_run_through_sentinel_with_passwords(
    form: str, guarded: Cluster, rclient: Any, workers: list[Worker], tmp_path: Path
) -> None:
    url = guarded.guide_url(db=2) if form == "guide" else guarded.kombu_url(db=2)
    env = guarded.env(url)
    master = redis.Redis(port=guarded.ports["master"], password=guarded.password, db=2)
    master.flushdb()
    start_worker(workers, tmp_path, env)
    out = tmp_path / "acked.jsonl"
    assert produce(env, 0, 20, out).wait(timeout=120) == 0
    ids = [r["id"] for r in records(out) if "id" in r]
    assert len(ids) == 20, records(out)
    assert wait_until(lambda: states_of(ids).get("succeeded", 0) == 20, timeout=60), states_of(ids)
    assert effects_of(ids) == (20, 0)
    # the worker's events reached the master the sentinels name (its events client too)
    assert master.xlen("synth:events:all") > 0
    # the sentinels refuse a client without their password: the password was what let it in
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=guarded.sentinel_ports[0]).sentinel_masters()
    # a client built from the same settings, and Celery's result backend (pub/sub + reads),
    # reach the master through the sentinels
    client = redis_client(redis_target(url, MASTER, guarded.password))
    assert client.ping() and client.connection_pool.connection_kwargs["db"] == 2
    # Celery's API through the Sentinel-found master: send_task publishes with the platform's
    # Sentinel transport, get() waits on the result backend's pub/sub; the task itself
    # writes with the worker's platform client (app.redis)
    key = uuid.uuid4().hex
    assert _result_through_sentinel(env, key) == key
    assert master.get(f"test:count:{key}") == b"1"
    if form == "guide":
        _events_served_through_sentinel(env, tmp_path)
        asyncio.run(_bounded_pool(redis_target(url, MASTER, guarded.password)))


async def _bounded_pool(target: Any) -> None:
    """The events server's pool on Sentinel: bounded, and a caller waits for a connection
    up to the pool's timeout (here two BLPOPs of 1 s hold both connections)."""
    from synth_workers.redisconn import BlockingSentinelPool, async_redis_client

    for wait, third_gets_one in ((0.2, False), (5.0, True)):
        client = async_redis_client(target, max_connections=2, pool_timeout=wait)
        assert isinstance(client.connection_pool, BlockingSentinelPool)
        calls = [client.blpop([f"empty-{uuid.uuid4().hex}"], timeout=1) for _ in range(3)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, redis.ConnectionError)]
        assert len(failed) == (0 if third_gets_one else 1), results
        await client.aclose()


def _events_served_through_sentinel(env: dict[str, str], tmp_path: Path) -> None:
    """`events serve` with the Sentinel settings streams a job's events to its user."""
    import httpx

    from synth_workers.events import issue_token

    from .events_server import SECRET, EventsServer

    code = (
        "from synth_workers import enqueue\n"
        "h = enqueue('tests.e2e_tasks.effect', {'n': 7}, queue='sentinel', user_id='ursula')\n"
        "h.wait(timeout=60)\nprint(h.id)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=90)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.split()[-1]
    server = EventsServer(tmp_path, env).start()
    try:
        token = issue_token(SECRET, "ursula")
        params = {"job": job_id, "since": "0", "access_token": token}
        seen = []
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", f"{server.url}/events", params=params) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                seen.append(line)
                if line.startswith("data:") and '"succeeded"' in line:
                    break
        assert any("succeeded" in line for line in seen), seen
    finally:
        assert server.stop() == 0, server.output()


def _result_through_sentinel(env: dict[str, str], key: str) -> Any:
    """``send_task(...).get()`` in a process configured with ``env`` (its result backend is
    Celery's Sentinel backend on the ledger)."""
    code = (
        "from synth_workers import app\n"
        "from synth_workers.backend import LedgerSentinelBackend\n"
        "assert isinstance(app.backend, LedgerSentinelBackend), type(app.backend)\n"
        f"r = app.send_task('tests.e2e_tasks.side_effect', args=[{key!r}], queue={QUEUE!r})\n"
        "print(r.get(timeout=30))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


_beats: list[subprocess.Popen[bytes]] = []


def start_beat(env: dict[str, str], tmp_path: Path) -> subprocess.Popen[bytes]:
    """``celery beat`` with the 1 s test entries (tests.beat_fast) and ``env``."""
    env = {**os.environ, **env, "SYNTH_INCLUDE": "tests.e2e_tasks,tests.beat_fast"}
    argv = [sys.executable, "-m", "celery", "-A", "synth_workers", "beat", "-s",
            str(tmp_path / "beat-schedule"), "--max-interval", "1", "-l", "INFO"]  # fmt: skip
    with (tmp_path / "beat.log").open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _beats.append(proc)
    return proc


def beat_log(tmp_path: Path) -> str:
    return (tmp_path / "beat.log").read_text(errors="replace")[-4000:]


def _status(env: dict[str, str]) -> Any:
    done = subprocess.run([sys.executable, "-m", "synth_workers.cli", "status", "--json"],
                          cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_sentinel_over_tls(rclient: Any, workers: list[Worker], tmp_path: Path) -> None:
    """Master, replica and sentinels speaking TLS only: the guide's URL with ``?ssl=true``
    and REDIS_SSL_CA_CERTS reach the sentinels and the master over TLS."""
    from .test_tls import _write_certs

    folder = Path(tempfile.mkdtemp(prefix="synth-sentinel-tls-"))
    cluster = Cluster(16840, password="tls-pw", certs=_write_certs(folder))
    try:
        cluster.start()
        ca = str(folder / "ca.pem")
        env = {**cluster.env(cluster.guide_url(db=1) + "?ssl=true"), "REDIS_SSL_CA_CERTS": ca}
        start_worker(workers, tmp_path, env)
        out = tmp_path / "acked.jsonl"
        assert produce(env, 0, 10, out).wait(timeout=120) == 0
        ids = [r["id"] for r in records(out) if "id" in r]
        assert len(ids) == 10, records(out)
        assert wait_until(lambda: states_of(ids).get("succeeded", 0) == 10, timeout=60)
        key = uuid.uuid4().hex
        assert _result_through_sentinel(env, key) == key
        # nothing answers in plaintext: neither the sentinels nor the master
        for port in (cluster.sentinel_ports[0], cluster.ports["master"]):
            with pytest.raises(redis.ConnectionError):
                redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2).ping()
    finally:
        for worker in workers:
            worker.stop()
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _republished(workers: list[Worker]) -> int:
    """Jobs the reconciler re-published, from the workers' logs (the sweeper's warning)."""
    found = re.findall(r"re-published (\d+) queued jobs missing from Redis",
                       "".join(w.output() for w in workers))  # fmt: skip
    return sum(int(n) for n in found)


def test_master_sigkill_mid_run_fails_over_losing_nothing(
    rclient: Any, workers: list[Worker], tmp_path: Path
) -> None:
    cluster = Cluster(16820).start()
    try:
        _failover_run(cluster, workers, tmp_path)
    finally:
        for proc in _beats:
            stop_group(proc)
        for worker in workers:
            worker.stop()
        cluster.stop()


def _failover_run(cluster: Cluster, workers: list[Worker], tmp_path: Path) -> None:
    total = 5000
    env = cluster.env(cluster.guide_url())
    first_port = cluster.ports["master"]
    # clients built before the failover, used after it (metrics collectors, events writers)
    platform_client = redis_client(redis_target(cluster.guide_url(), MASTER), socket_timeout=5)
    assert platform_client.ping()
    backlog = [tmp_path / f"backlog-{i}.jsonl" for i in range(2)]
    half = total // 2
    producers = [produce(env, i * half, half, out) for i, out in enumerate(backlog)]
    for _ in range(2):  # "default": the beat entries' queue
        start_worker(workers, tmp_path, env, concurrency=3, queues=f"{QUEUE},default")
    start_beat(env, tmp_path)
    for proc in producers:
        assert proc.wait(timeout=300) == 0
    acked = [r["id"] for out in backlog for r in records(out) if "id" in r]
    assert len(acked) == total, [r for out in backlog for r in records(out) if "error" in r][:3]
    # a steady producer through the failover, its jobs ahead of the backlog (strict priority)
    steady = tmp_path / "steady.jsonl"
    live = produce(env, total, 100_000, steady, pause=0.02, priority="high")
    assert wait_until(lambda: states_of(acked).get("succeeded", 0) >= 500, timeout=120)
    in_flight = total - states_of(acked).get("succeeded", 0)
    killed_at = time.time()
    cluster.kill(first_port)
    assert wait_until(lambda: cluster.master_port() == cluster.ports["replica"], timeout=30), (
        cluster.logs()
    )
    promoted = time.time() - killed_at

    def first_after() -> dict[str, Any] | None:
        return next((r for r in records(steady) if "id" in r and r["t"] > killed_at + 0.5), None)

    assert wait_until(lambda: first_after() is not None, timeout=60)
    first = first_after()
    assert first is not None
    producer_back = first["done"] - killed_at
    # a job enqueued after the kill completes: a worker consumes from the new master
    assert wait_until(lambda: states_of([first["id"]]).get("succeeded") == 1, timeout=60)
    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT finished_at FROM synth_jobs WHERE id = %s", (first["id"],)
        ).fetchone()
    assert row is not None
    worker_back = row[0].timestamp() - killed_at
    assert platform_client.ping()  # the same client, now on the new master
    assert platform_client.connection_pool.get_master_address()[1] == cluster.ports["replica"]
    # beat keeps publishing its 1 s entry (high priority), a worker runs it and counts it on
    # the new master with its own platform client
    new_master = redis.Redis(port=cluster.ports["replica"])
    counted = int(new_master.get("test:count:beat") or 0)
    assert wait_until(
        lambda: int(new_master.get("test:count:beat") or 0) >= counted + 3, timeout=30
    ), beat_log(tmp_path)
    # the workers' heartbeats reach the new master; `status` (the metrics collectors'
    # snapshot) reads them through the sentinels (a worker's heartbeat thread may still be in
    # its reconnect back-off when the first snapshot is taken: wait for both, bounded)
    seen: dict[str, Any] = {}

    def both_workers_beat() -> bool:
        seen["status"] = status = _status(env)
        beats = [w["heartbeat_age_seconds"] for w in status["workers"]]
        return len(beats) == 2 and all(age < 15 for age in beats)

    assert wait_until(both_workers_beat, timeout=30, interval=1), seen.get("status")
    time.sleep(2)  # a little more traffic on the new master
    (steady.parent / (steady.name + ".stop")).touch()
    assert live.wait(timeout=60) == 0
    steady_records = records(steady)
    acked += [r["id"] for r in steady_records if "id" in r]
    refused = sum("error" in r for r in steady_records)
    assert wait_until(
        lambda: sum(states_of(acked).get(s, 0) for s in FINAL) == len(acked), timeout=300
    ), states_of(acked)
    states = states_of(acked)
    effects, duplicates = effects_of(acked)
    republished = _republished(workers)
    print(
        f"\nsentinel failover: {in_flight} of {total} backlog jobs in flight at the kill; "
        f"replica promoted after {promoted:.1f} s; producer back after {producer_back:.1f} s "
        f"({refused} enqueues refused meanwhile); first post-kill job done after "
        f"{worker_back:.1f} s; {len(acked)} acknowledged jobs: {states}; effects {effects}, "
        f"duplicates {duplicates}; reconciler re-published {republished}"
    )
    assert producer_back < 30
    assert worker_back < 30
    assert states == {"succeeded": len(acked)}
    assert effects == len(acked)
    assert duplicates == 0
