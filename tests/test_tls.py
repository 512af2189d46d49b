"""TLS end to end: a Redis that speaks only TLS (``--port 0 --tls-port``) and a Postgres with
``ssl=on`` whose pg_hba.conf refuses unencrypted connections, both started by the test with
certificates the test signs with its own CA (ports 16860-16879). Jobs are enqueued and run
over both; a plaintext connection to either is refused.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from synth_workers.connsettings import redis_tls_url
from synth_workers.errors import ConfigurationError
from synth_workers.redisconn import redis_client, redis_target

from .conftest import ROOT, Worker, wait_until

REDIS_PORT = 16860
PG_PORT = 16870
QUEUE = "tls"
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _write_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, both
    signed by it, as PEM files: ``ca``, ``server``, ``server_key``, ``client``, ``client_key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synth-workers test CA")])

    def builder(subject: x509.Name, public: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca = builder(ca_name, ca_key.public_key()).add_extension(
        x509.BasicConstraints(ca=True, path_length=None), critical=True
    )
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(
        ca.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"localhost {role}")])
        cert = (
            builder(subject, key.public_key())
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[role], paths[f"{role}_key"] = folder / f"{role}.pem", folder / f"{role}.key"
        paths[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{role}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        paths[f"{role}_key"].chmod(0o600)
    return paths


@dataclass
class Servers:
    certs: dict[str, Path]
    redis_url: str  # the guide's form: ?ssl=true, CA in REDIS_SSL_CA_CERTS
    database_url: str

    @property
    def ca(self) -> Path:
        return self.certs["ca"]

    def env(self) -> dict[str, str]:
        return {
            "REDIS_URL": self.redis_url,
            "REDIS_SSL_CA_CERTS": str(self.ca),
            "DATABASE_URL": self.database_url,
        }


def _as_postgres(*argv: str) -> subprocess.CompletedProcess[str]:
    """Debian's Postgres binaries refuse root: run them as the ``postgres`` user."""
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    folder = Path(tempfile.mkdtemp(prefix="synth-tls-"))
    folder.chmod(0o755)
    certs = _write_certs(folder)
    ca, cert, key = certs["ca"], certs["server"], certs["server_key"]
    # two TLS-only Redis servers: one that checks client certificates (REDIS_PORT + 1)
    redis_procs = [
        subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
             str(ca), "--tls-auth-clients", auth, "--save", "", "--appendonly", "no",
             "--dir", str(folder), "--dbfilename", f"{port}.rdb"],
            stdout=(folder / f"redis-{port}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for port, auth in ((REDIS_PORT, "no"), (REDIS_PORT + 1, "yes"))
    ]  # fmt: skip
    data = folder / "pgdata"
    try:
        data.mkdir()
        for path in (data, cert, key):
            shutil.chown(path, "postgres", "postgres")
        done = _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                            "--auth=trust")  # fmt: skip
        assert done.returncode == 0, done.stderr
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostnossl all all 127.0.0.1/32 reject\n"
        )
        options = (f"-c port={PG_PORT} -c listen_addresses=127.0.0.1 -c ssl=on "
                   f"-c ssl_cert_file={cert} -c ssl_key_file={key} "
                   f"-c unix_socket_directories={data} -c fsync=off")  # fmt: skip
        started = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                               "-l", str(data / "pg.log"), "start")  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        database_url = (
            f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres"
            f"?sslmode=verify-full&sslrootcert={ca}"
        )
        yield Servers(certs, f"redis://127.0.0.1:{REDIS_PORT}/0?ssl=true", database_url)
    finally:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        for proc in redis_procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _run(env: dict[str, str], code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_plaintext_connections_are_refused(servers: Servers) -> None:
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=REDIS_PORT, socket_timeout=3, socket_connect_timeout=3).ping()
    plain = f"postgresql://postgres@127.0.0.1:{PG_PORT}/postgres?sslmode=disable"
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(plain, connect_timeout=5)
    # TLS without the test's CA: the server's certificate is not trusted, so no connection
    untrusted = redis_target(f"rediss://127.0.0.1:{REDIS_PORT}/0?ssl_cert_reqs=required")
    with pytest.raises(redis.ConnectionError):
        redis_client(untrusted, socket_timeout=3).ping()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(plain.replace("sslmode=disable", "sslmode=verify-full"), connect_timeout=5)
    # sslmode=require: encrypted, the certificate not checked
    with psycopg.connect(plain.replace("disable", "require"), connect_timeout=5) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert row.fetchone() == (True,)
    # the CA as the URL's query (rediss://...?ssl_ca_certs=) or the REDIS_SSL_CA_CERTS variable
    query_form = f"rediss://127.0.0.1:{REDIS_PORT}/0?ssl_ca_certs={servers.ca}"
    assert redis_client(redis_target(query_form), socket_timeout=3).ping()
    # TLS options on a URL that is not TLS: a clear error, not a plaintext connection
    with pytest.raises(ConfigurationError, match="REDIS_SSL_"):
        redis_target("redis://127.0.0.1:6379/0", tls={"ssl_ca_certs": str(servers.ca)})


def test_jobs_run_over_tls_to_redis_and_postgres(servers: Servers, tmp_path: Path) -> None:
    env = servers.env()
    _run(env, "from synth_workers import app\napp.ledger.migrate()\n")
    name = f"tls-{uuid.uuid4().hex[:8]}@test"
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "celery", "-A", "synth_workers", "worker", "-Q", QUEUE,
            "-n", name, "-c", "2", "-l", "INFO", "--without-mingle",
            "--without-gossip"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    worker = Worker(process, name, log)
    try:
        ready = wait_until(lambda: "ready." in worker.output() or process.poll() is not None, 60)
        assert ready and process.poll() is None, worker.output()[-4000:]
        key = uuid.uuid4().hex
        # enqueue (ledger row over TLS, publish over TLS); Celery's result API over TLS too
        code = (
            "from synth_workers import app, enqueue\n"
            f"hs = [enqueue('tests.e2e_tasks.side_effect', {{'key': {key!r}}}, queue={QUEUE!r})"
            " for _ in range(20)]\n"
            "for h in hs:\n    h.wait(timeout=60)\n"
            f"r = app.send_task('tests.e2e_tasks.side_effect', args=[{key!r}], queue={QUEUE!r})\n"
            "print(r.get(timeout=30), len(hs))\n"
        )
        try:
            out = _run(env, code)
        except AssertionError as exc:  # the worker's side of it, for a clean-clone run's report
            raise AssertionError(f"{exc}\nworker log:\n{worker.output()[-8000:]}") from None
        assert out.split() == [key, "20"]
    finally:
        worker.stop()
    with psycopg.connect(servers.database_url, connect_timeout=5) as conn:
        rows: Any = conn.execute(
            "SELECT state, count(*) FROM synth_test.synth_jobs GROUP BY state"
        ).fetchall()
        assert dict(rows) == {"succeeded": 21}
        ssl_in_use = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert ssl_in_use.fetchone() == (True,)
    # each run counted on the TLS-only Redis by the worker's own client (app.redis)
    tls_url = redis_tls_url(servers.redis_url)  # ?ssl=true made rediss://, as settings do
    tls_client = redis_target(tls_url, tls={"ssl_ca_certs": str(servers.ca)})
    assert redis_client(tls_client).get(f"test:count:{key}") == b"21"


def test_redis_client_certificate_from_settings(servers: Servers) -> None:
    """REDIS_SSL_CERTFILE/KEYFILE: a Redis with tls-auth-clients yes lets the client in with
    its certificate, and not without."""
    from synth_workers.redisconn import target_of
    from synth_workers.settings import load_settings

    url = f"redis://127.0.0.1:{REDIS_PORT + 1}/0?ssl=true"
    with_cert = load_settings(
        redis_url=url,
        redis_ssl_ca_certs=str(servers.ca),
        redis_ssl_certfile=str(servers.certs["client"]),
        redis_ssl_keyfile=str(servers.certs["client_key"]),
    )
    assert redis_client(target_of(with_cert), socket_timeout=5).ping()
    without = load_settings(redis_url=url, redis_ssl_ca_certs=str(servers.ca))
    with pytest.raises(redis.ConnectionError):
        redis_client(target_of(without), socket_timeout=5).ping()
