"""TLS for real, with certificates of a private CA: SMTP (STARTTLS and smtps), HTTPS
webhooks through the pinned address, `rediss://` and PostgreSQL with `sslmode=verify-full`.

Every server here holds a certificate for `localhost` only, so reaching the very same server
as `127.0.0.1` is the wrong host name, and must be refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import msgspec
import pytest
import redis.exceptions
import trustme

from jobstream.consumers.demo.http_sink import http_sink, verify_signature
from jobstream.consumers.demo.smtp_sink import smtp_sink
from jobstream.consumers.queues.sending import send_email
from jobstream.consumers.queues.webhook import deliver_webhook
from jobstream.consumers.store.mailboxes import add_mailbox
from jobstream.consumers.store.webhooks import add_endpoint
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.runtime import connect
from jobstream.consumers.worker.settings import Settings
from jobstream.consumers.worker.tls import client_context, database_dsn
from jobstream.schema.payloads import SendEmail
from jobstream.streams import ConfigError, Job, RetryableError
from tests.helpers import delivery, job, jobstream
from tests.servers import OwnPostgres, OwnRedis, _wait_port

PASSWORD = "tls-relay-pw"


@dataclass
class Pki:
    """A private CA (its PEM in `ca_file`) and server certificates it issued."""

    ca: trustme.CA
    ca_file: str
    localhost: trustme.LeafCert  # valid for the name `localhost` only
    elsewhere: trustme.LeafCert  # valid for `elsewhere.test` only

    def server(self, leaf: trustme.LeafCert, sni: list[str | None] | None = None) -> ssl.SSLContext:
        """A server-side context presenting `leaf`; the names clients ask for go to `sni`."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(ctx)
        if sni is not None:

            def seen(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
                sni.append(name)

            ctx.sni_callback = seen
        return ctx

    def files(self, leaf: trustme.LeafCert, folder: pathlib.Path) -> tuple[str, str]:
        """Write `leaf`'s certificate chain and key into `folder`; their paths."""
        cert, key = folder / "server.crt", folder / "server.key"
        for blob in leaf.cert_chain_pems:
            with cert.open("ab") as f:
                f.write(blob.bytes())
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, str(ca_file), ca.issue_cert("localhost"), ca.issue_cert("elsewhere.test"))


def trusting(deps: Deps, pki: Pki | None, **kw: object) -> Deps:
    """The same deps with the private CA trusted (None: only the system's CAs)."""
    s = msgspec.structs.replace(deps.settings, tls_ca_file=pki and pki.ca_file, **kw)
    return dataclasses.replace(deps, settings=s)


def sending_job(job_id: str) -> Job:
    return Job(job_id, "email-sending", 1, "0-1", int(time.time() * 1000))


def message() -> SendEmail:
    return SendEmail(mailbox_id="mb-tls", to=["r@example.net"], subject="over TLS", text="t")


# --- SMTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
async def test_smtp_over_tls_verified_against_the_private_ca(deps: Deps, pki: Pki, mode: str):
    deps = trusting(deps, pki)
    tls = pki.server(pki.localhost)
    kw = {"starttls": tls} if mode == "starttls" else {"implicit_tls": tls}
    async with smtp_sink(users={"relay-user": PASSWORD}, **kw) as sink:
        url = (
            f"smtp://relay-user:{PASSWORD}@localhost:{sink.port}?starttls"
            if mode == "starttls"
            else f"smtps://relay-user:{PASSWORD}@localhost:{sink.port}"
        )
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-tls", smtp_url=url)
        result = await send_email.fn(message(), sending_job(f"tls-{mode}"), deps)
    assert result["status"] == "sent"
    (got,) = sink.messages
    assert got.tls is not None
    assert got.tls.startswith("TLSv1.")
    assert got.rcpt_tos == ["r@example.net"]
    assert sink.logins == [("relay-user", PASSWORD)]  # AUTH went over the encrypted channel


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
@pytest.mark.parametrize(
    ("host", "trust", "why"),
    [
        ("127.0.0.1", True, "certificate is not valid for '127.0.0.1'"),
        ("localhost", False, "unable to get local issuer certificate"),
    ],
)
async def test_smtp_refuses_a_certificate_for_another_name_or_from_an_unknown_ca(
    deps: Deps, pki: Pki, mode: str, host: str, trust: bool, why: str
):
    deps = trusting(deps, pki if trust else None)
    tls = pki.server(pki.localhost)
    kw = {"starttls": tls} if mode == "starttls" else {"implicit_tls": tls}
    async with smtp_sink(users={"relay-user": PASSWORD}, **kw) as sink:
        url = (
            f"smtp://relay-user:{PASSWORD}@{host}:{sink.port}?starttls"
            if mode == "starttls"
            else f"smtps://relay-user:{PASSWORD}@{host}:{sink.port}"
        )
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-tls", smtp_url=url)
        with pytest.raises(RetryableError) as err:
            await send_email.fn(message(), sending_job(f"bad-{mode}"), deps)
    text = str(err.value)
    assert f"relay smtp{'s' if mode == 'smtps' else ''}://relay-user:***@{host}" in text
    assert "TLS certificate of the relay refused" in text
    assert why in text
    assert PASSWORD not in text
    assert sink.logins == []  # the password never went to a server we could not verify
    assert sink.messages == []


async def test_a_relay_that_does_not_offer_starttls_gets_nothing_in_clear(deps: Deps):
    async with smtp_sink(users={"relay-user": PASSWORD}) as sink:
        url = f"smtp://relay-user:{PASSWORD}@localhost:{sink.port}?starttls"
        await add_mailbox(deps.pool, "a@example.com", mailbox_id="mb-tls", smtp_url=url)
        with pytest.raises(RetryableError, match="STARTTLS extension not supported") as err:
            await send_email.fn(message(), sending_job("no-starttls"), deps)
    assert PASSWORD not in str(err.value)
    assert sink.logins == []
    assert sink.messages == []


# --- HTTPS webhooks -----------------------------------------------------------------------


async def test_https_webhook_goes_to_the_pinned_address_with_sni_and_name_check(
    deps: Deps, pki: Pki
):
    deps = trusting(deps, pki, webhook_allow_private=True)
    sni: list[str | None] = []
    async with http_sink(tls=pki.server(pki.localhost, sni)) as sink:
        ep, secret = await add_endpoint(deps.pool, sink.url(host="localhost"))
        result = await deliver_webhook.fn(delivery(ep), job(), deps)
    assert result["status"] == "delivered"
    (req,) = sink.requests
    assert req.peer == "127.0.0.1"  # the address resolved and checked, not a second lookup
    assert req.headers["host"] == f"localhost:{sink.port}"
    assert sni == ["localhost"]  # the certificate was asked for, and checked, by name
    assert verify_signature(secret, req.headers, req.body)


async def test_https_webhook_with_a_certificate_for_another_name_is_a_clear_failure(
    deps: Deps, pki: Pki
):
    deps = trusting(deps, pki, webhook_allow_private=True)
    async with http_sink(tls=pki.server(pki.elsewhere)) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url(host="localhost"))
        with pytest.raises(RetryableError) as err:
            await deliver_webhook.fn(delivery(ep), job(), deps)
    assert sink.requests == []
    text = str(err.value)
    assert "TLS certificate of the endpoint refused" in text
    assert "certificate is not valid for 'localhost'" in text
    error = await deps.pool.fetchval("SELECT error FROM webhook_deliveries")
    assert "certificate is not valid for 'localhost'" in error


async def test_https_webhook_from_an_unknown_ca_is_refused(deps: Deps, pki: Pki):
    deps = trusting(deps, None, webhook_allow_private=True)
    async with http_sink(tls=pki.server(pki.localhost)) as sink:
        ep, _ = await add_endpoint(deps.pool, sink.url(host="localhost"))
        with pytest.raises(RetryableError, match="unable to get local issuer certificate"):
            await deliver_webhook.fn(delivery(ep), job(), deps)
    assert sink.requests == []


def test_a_missing_ca_file_is_a_config_error_naming_the_variable(tmp_path: pathlib.Path):
    s = Settings(tls_ca_file=str(tmp_path / "nope.pem"))
    with pytest.raises(ConfigError, match="JOBSTREAM_TLS_CA_FILE"):
        client_context(s, "smtp")


# --- rediss:// ----------------------------------------------------------------------------

EVENT = (
    '{"event_id":"tls-1","type":"open","mailbox_id":"mb-1","occurred_at":"2026-11-30T10:00:00Z"}'
)


class TlsRedis(OwnRedis):
    """A redis-server that speaks only TLS (no plain port), with a certificate for localhost."""

    def __init__(self, folder: pathlib.Path, pki: Pki) -> None:
        super().__init__(folder)
        self.cert, self.key = pki.files(pki.localhost, folder)
        self.ca_file = pki.ca_file

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0"

    async def start(self) -> None:
        with (self.folder / "stderr.log").open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                "redis-server", "--port", "0", "--tls-port", str(self.port),
                "--bind", "127.0.0.1", "-::1", "--tls-cert-file", self.cert,
                "--tls-key-file", self.key, "--tls-ca-cert-file", self.ca_file,
                "--tls-auth-clients", "no", "--dir", str(self.folder), "--save", "",
                "--appendonly", "no", "--logfile", str(self.folder / "redis.log"),
                stdout=err, stderr=err,
            )  # fmt: skip
        waiting = asyncio.create_task(_wait_port(self.port, timeout_s=10))
        exited = asyncio.create_task(self.proc.wait())
        await asyncio.wait({waiting, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            said = " ".join(
                (self.folder / name).read_text(errors="replace")
                for name in ("stderr.log", "redis.log")
                if (self.folder / name).exists()
            )
            if "tls" in said.lower():
                pytest.skip(f"this redis-server has no TLS support: {said.strip()[-200:]}")
            raise AssertionError(f"redis-server with TLS did not start: {said.strip()[-500:]}")
        exited.cancel()
        waiting.result()


@pytest.fixture
async def tls_redis(pki: Pki) -> AsyncIterator[TlsRedis]:
    with tempfile.TemporaryDirectory(prefix="jobstream-rediss-") as folder:
        server = TlsRedis(pathlib.Path(folder), pki)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


async def test_rediss_publisher_and_worker_end_to_end(
    tls_redis: TlsRedis, pki: Pki, deps: Deps, env_for: Callable[..., dict[str, str]]
):
    """`jobstream publish` and `jobstream worker` over TLS only, configured by environment:
    the CA given by the standard `SSL_CERT_FILE`, then by `JOBSTREAM_TLS_CA_FILE`."""
    by_openssl = env_for(REDIS_URL=tls_redis.url, SSL_CERT_FILE=pki.ca_file)
    out = await jobstream(by_openssl, "publish", "analytics", EVENT, "--id", "tls-job-1")
    assert out.returncode == 0, out.stderr
    env = env_for(REDIS_URL=tls_redis.url, JOBSTREAM_TLS_CA_FILE=pki.ca_file)
    worker = await jobstream(env, "worker", "--queues", "analytics", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "job completed job=tls-job-1 queue=analytics" in worker.stderr
    row = await deps.pool.fetchrow("SELECT status, attempts FROM jobs WHERE id = 'tls-job-1'")
    assert (row["status"], row["attempts"]) == ("completed", 1)
    s = msgspec.structs.replace(deps.settings, redis_url=tls_redis.url, tls_ca_file=pki.ca_file)
    async with connect(s, wait=False) as over_tls:
        view = await over_tls.redis.hget(over_tls.keys.job("tls-job-1"), "status")
        assert view == b"completed"
        assert await over_tls.redis.xlen(over_tls.keys.stream("analytics")) <= 1
        assert (await over_tls.redis.xpending(over_tls.keys.stream("analytics"), "workers"))[
            "pending"
        ] == 0


@pytest.mark.parametrize(
    ("host", "trust", "why"),
    [
        ("127.0.0.1", True, "certificate is not valid for '127.0.0.1'"),
        ("localhost", False, "certificate verify failed"),
    ],
)
async def test_rediss_refuses_a_wrong_name_or_an_unknown_ca(
    tls_redis: TlsRedis,
    pki: Pki,
    settings: Settings,
    env_for: Callable[..., dict[str, str]],
    host: str,
    trust: bool,
    why: str,
):
    url = f"rediss://{host}:{tls_redis.port}/0"
    s = msgspec.structs.replace(settings, redis_url=url, tls_ca_file=pki.ca_file if trust else None)
    async with connect(s, wait=False) as deps:
        with pytest.raises(redis.exceptions.ConnectionError, match=re.escape(why)):
            await deps.redis.ping()
    env = env_for(REDIS_URL=url, JOBSTREAM_TLS_CA_FILE=pki.ca_file if trust else "")
    if not trust:
        del env["JOBSTREAM_TLS_CA_FILE"]
    out = await jobstream(env, "publish", "analytics", EVENT)
    assert out.returncode == 1
    assert why in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# --- PostgreSQL, sslmode=verify-full ------------------------------------------------------


class TlsPostgres(OwnPostgres):
    """A private cluster with `ssl=on` and a certificate for localhost."""

    def __init__(self, folder: pathlib.Path, pki: Pki) -> None:
        super().__init__(folder)
        self.pki = pki

    def init(self) -> None:
        super().init()
        cert, key = self.pki.files(self.pki.localhost, self.folder)
        if self._as:  # the server runs as postgres and reads its key only if it owns it
            for path in (cert, key):
                shutil.chown(path, "postgres")
        self.ssl_options = f"-c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"{self.ssl_options}"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                  str(self.folder / "pg.log"), "-w", "start")  # fmt: skip

    def verify_full(self, host: str) -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres?sslmode=verify-full"


@pytest.fixture(scope="module")
def tls_pg(pki: Pki) -> Iterator[TlsPostgres]:
    """One cluster for the module (initdb is the slow part); only one test writes to it."""
    with tempfile.TemporaryDirectory(prefix="jobstream-pg-tls-") as folder:
        pg = TlsPostgres(pathlib.Path(folder), pki)
        pg.init()
        pg.start()
        try:
            yield pg
        finally:
            pg.stop()


async def test_postgres_verify_full_migrate_and_a_job_end_to_end(
    tls_pg: TlsPostgres, pki: Pki, settings: Settings, env_for: Callable[..., dict[str, str]]
):
    url = tls_pg.verify_full("localhost")
    env = env_for(DATABASE_URL=url, JOBSTREAM_TLS_CA_FILE=pki.ca_file)
    migrated = await jobstream(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "migrations applied" in migrated.stdout
    assert (await jobstream(env, "publish", "analytics", EVENT, "--id", "pg-tls-1")).returncode == 0
    worker = await jobstream(env, "worker", "--queues", "analytics", "--burst")
    assert worker.returncode == 0, worker.stderr
    assert "job completed job=pg-tls-1 queue=analytics" in worker.stderr
    s = msgspec.structs.replace(settings, database_url=url, tls_ca_file=pki.ca_file)
    async with connect(s, wait=False) as deps:
        row = await deps.pool.fetchrow("SELECT status, attempts FROM jobs WHERE id = 'pg-tls-1'")
        assert (row["status"], row["attempts"]) == ("completed", 1)
        assert await deps.pool.fetchval("SELECT count(*) FROM job_executions") == 1
        encrypted = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        assert await deps.pool.fetchval(encrypted) is True


@pytest.mark.parametrize(
    ("host", "trust", "why"),
    [
        ("127.0.0.1", True, "certificate is not valid for '127.0.0.1'"),
        ("localhost", False, "root certificate file"),
    ],
)
async def test_postgres_verify_full_refuses_a_wrong_name_or_no_ca(
    tls_pg: TlsPostgres,
    pki: Pki,
    settings: Settings,
    env_for: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    host: str,
    trust: bool,
    why: str,
):
    url = tls_pg.verify_full(host)
    env = env_for(DATABASE_URL=url, JOBSTREAM_TLS_CA_FILE=pki.ca_file, HOME=str(tls_pg.folder))
    if not trust:
        del env["JOBSTREAM_TLS_CA_FILE"]
    migrated = await jobstream(env, "migrate")
    assert migrated.returncode == (1 if trust else 2)  # 2: a configuration to fix
    assert why in migrated.stderr
    assert len(migrated.stderr.strip().splitlines()) == 1
    s = msgspec.structs.replace(settings, database_url=url, tls_ca_file=pki.ca_file)
    if trust:
        with pytest.raises(ConfigError, match=re.escape(why)):
            async with connect(s, wait=False):
                raise AssertionError("connected without a trusted root certificate")
    else:
        # A worker waits for a server that is down, but not for a root certificate.
        monkeypatch.setenv("HOME", str(tls_pg.folder))  # no ~/.postgresql/root.crt there
        no_ca = msgspec.structs.replace(s, tls_ca_file=None)
        with pytest.raises(ConfigError, match="DATABASE_URL: root certificate file"):
            async with asyncio.timeout(10), connect(no_ca):
                raise AssertionError("connected without a root certificate")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://h/db", "postgresql://h/db?sslrootcert=/ca%20dir/ca.pem"),
        (
            "postgresql://u:p@h:5/db?sslmode=verify-full",
            "postgresql://u:p@h:5/db?sslmode=verify-full&sslrootcert=/ca%20dir/ca.pem",
        ),
        ("postgres://h/db?", "postgres://h/db?sslrootcert=/ca%20dir/ca.pem"),
        ("postgresql://h/db?sslrootcert=/own.pem", "postgresql://h/db?sslrootcert=/own.pem"),
    ],
)
def test_the_ca_file_is_the_database_root_certificate_unless_the_url_names_one(
    url: str, expected: str
):
    s = Settings(database_url=url, tls_ca_file="/ca dir/ca.pem")
    assert database_dsn(s) == expected
    assert database_dsn(msgspec.structs.replace(s, tls_ca_file=None)) == url
