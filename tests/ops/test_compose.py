"""compose.yaml: valid against the official Compose specification schema (the copy that
check-jsonschema ships), every image pinned to an exact version, every command and
environment variable it gives our image exists, the worker's health check checks the
worker, Prometheus scrapes the workers; the image installs only from requirements.lock.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import opentelemetry.environment_variables as api_env
import opentelemetry.sdk.environment_variables as sdk_env
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from jobstream.consumers.cli.main import build_parser
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.payloads import PAYLOADS
from tests.helpers import jobstream, run

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CHECK_JSONSCHEMA = [sys.executable, "-m", "check_jsonschema"]


async def check_compose(path: Path) -> Any:
    """check-jsonschema with its vendored copy of the Compose specification's schema."""
    return await run(*CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec", str(path))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def ours(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the project's image."""
    return {n: s for n, s in compose["services"].items() if "build" in s}


def jobstream_commands(service: dict[str, Any]) -> list[list[str]]:
    """Every `jobstream ...` invocation of a service: command, healthcheck, shell scripts."""
    argvs: list[list[str]] = []
    for raw in (service.get("command"), service.get("healthcheck", {}).get("test")):
        if raw is None:
            continue
        argv = shlex.split(raw) if isinstance(raw, str) else list(raw)
        if argv[:1] in (["CMD"], ["CMD-SHELL"]):
            argv = argv[1:] if argv[0] == "CMD" else shlex.split(" ".join(argv[1:]))
        if argv[:2] == ["sh", "-c"]:
            for line in argv[2].splitlines():
                if line.strip().startswith("jobstream "):
                    argvs.append(shlex.split(line.replace("$$", "$")))
        elif argv[:1] == ["jobstream"]:
            argvs.append(argv)
    return argvs


def known_env_names() -> set[str]:
    settings = {f.encode_name for f in msgspec.structs.fields(Settings)}
    otel = {getattr(m, n) for m in (sdk_env, api_env) for n in dir(m) if n.startswith("OTEL_")}
    return settings | otel


async def test_compose_yaml_is_valid_against_the_compose_specification():
    out = await check_compose(ROOT / "compose.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok -- validation done" in out.stdout


async def test_the_specification_check_rejects_what_the_specification_rejects(tmp_path: Path):
    text = (ROOT / "compose.yaml").read_text()
    broken = {
        "unknown top-level key": text.replace("services:", "servces:", 1),
        "replicas outside deploy": text.replace(
            "    deploy:\n      replicas: 3", "    replicas: 3"
        ),
        "replicas a list": text.replace("replicas: 3", "replicas: [3]"),
        "healthcheck with an unknown key": text.replace("retries: 3", "retry: 3"),
        "unknown depends_on condition": text.replace("service_healthy", "started", 1),
    }
    for what, variant in broken.items():
        assert variant != text, what
        path = tmp_path / "compose.yaml"
        path.write_text(variant)
        out = await check_compose(path)
        assert out.returncode == 1, f"{what}: {out.stdout}"


def test_every_jobstream_command_parses(compose: dict[str, Any]):
    seen: set[str] = set()
    for name, service in ours(compose).items():
        argvs = jobstream_commands(service)
        assert argvs, f"{name} runs no jobstream command"
        for argv in argvs:
            args = build_parser().parse_args(argv[1:])  # exits (fails the test) if unknown
            seen.add(args.command)
            if args.command == "publish":  # the payload, with shell variables filled in
                payload = re.sub(r"\$now", "2026-11-30T10:00:00Z", args.payload)
                payload = re.sub(r"\$\w+", "x", payload)
                msgspec.json.decode(payload, type=PAYLOADS[args.queue])
    assert {"migrate", "worker", "health", "publish"} <= seen


def test_every_environment_variable_exists(compose: dict[str, Any]):
    known = known_env_names()
    for name, service in ours(compose).items():
        env = service.get("environment", {})
        names = set(env) if isinstance(env, dict) else {e.split("=", 1)[0] for e in env}
        assert {"REDIS_URL", "DATABASE_URL"} <= names, name
        assert names <= known, f"{name}: unknown {sorted(names - known)}"
        assert any(n.startswith("OTEL_EXPORTER_OTLP") for n in names), name


def test_the_stack_has_what_the_issue_asks(compose: dict[str, Any]):
    s = compose["services"]
    assert s["redis"]["command"][s["redis"]["command"].index("--appendonly") + 1] == "yes"
    jaeger_ports = {p.split(":")[0] for p in s["jaeger"]["ports"]}
    assert {"16686", "4317", "4318"} <= jaeger_ports
    assert "mailpit" in s["mailpit"]["image"]
    assert "postgres" in s["postgres"]["image"]
    worker = s["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["healthcheck"]["test"][1:3] == ["jobstream", "health"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["command"] == ["jobstream", "migrate"]
    assert "demo-producer" in s
    assert worker["environment"]["SMTP_URL"].startswith("smtp://")


# An exact release: three parts (PostgreSQL's have had two since version 10), an optional
# variant suffix (`-alpine`); never `latest`, never a bare major or minor.
_EXACT = re.compile(r"(?P<repo>[a-z0-9./_-]+):v?(?P<version>\d+\.\d+(?:\.\d+)?)(?:-[a-z0-9.]+)?")


def exact_version(image: str) -> str | None:
    """The version an image reference pins, or None when it floats."""
    match = _EXACT.fullmatch(image)
    if match is None:
        return None
    parts = match["version"].count(".") + 1
    return match["version"] if parts == 3 or match["repo"] == "postgres" else None


def test_the_pin_check_refuses_floating_tags():
    floating = [
        "redis:7-alpine", "redis:latest", "redis", "axllent/mailpit:v1.20",
        "postgres:16-alpine", "jaegertracing/jaeger:2", "python:3.11-slim", "jobstream:latest",
    ]  # fmt: skip
    assert [f for f in floating if exact_version(f) is not None] == []
    assert exact_version("redis:7.4.11-alpine") == "7.4.11"
    assert exact_version("postgres:16.15-alpine") == "16.15"


def test_every_image_is_pinned_to_an_exact_version(compose: dict[str, Any]):
    images = {name: service["image"] for name, service in compose["services"].items()}
    assert set(images) == set(compose["services"]), "every service names its image"
    for name, image in images.items():
        assert exact_version(image) is not None, f"{name}: {image} is not an exact version"
    for name in ours(compose):  # the project's image carries the project's version
        assert images[name] == f"jobstream:{PYPROJECT['project']['version']}"
    base = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
            if line.startswith("FROM ")]  # fmt: skip
    assert base
    assert all(exact_version(image) for image in base), base


def test_jaeger_is_v2_with_otlp_listening_on_the_network(compose: dict[str, Any]):
    jaeger = compose["services"]["jaeger"]
    repo, _, tag = jaeger["image"].partition(":")
    assert repo == "jaegertracing/jaeger"  # v2's one image; v1's all-in-one reached its end
    assert tag.split(".")[0] == "2"
    assert "environment" not in jaeger  # v1's COLLECTOR_OTLP_ENABLED means nothing to v2
    command = jaeger["command"]
    assert "--set=receivers.otlp.protocols.grpc.endpoint=0.0.0.0:4317" in command
    assert "--set=receivers.otlp.protocols.http.endpoint=0.0.0.0:4318" in command
    worker_env = compose["services"]["worker"]["environment"]
    assert worker_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert worker_env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"


async def test_the_worker_health_check_fails_without_a_running_worker(
    compose: dict[str, Any], deps: Deps, env_for, tmp_path: Path
):
    worker = compose["services"]["worker"]
    assert worker["healthcheck"]["test"] == ["CMD", "jobstream", "health"]
    health_file = worker["environment"].get("JOBSTREAM_HEALTH_FILE")
    assert health_file, "without it `jobstream health` says ok with no worker running"
    assert health_file.startswith("/tmp/")  # writable by the image's unprivileged user

    # The health check as the worker's container runs it, against this test's servers,
    # with the file where this test can see it, and no worker.
    servers = {"REDIS_URL", "DATABASE_URL", "JOBSTREAM_HEALTH_FILE"}
    own = {k: str(v) for k, v in worker["environment"].items() if k not in servers}
    env = env_for(**own, JOBSTREAM_HEALTH_FILE=str(tmp_path / "health.json"))
    argv = worker["healthcheck"]["test"][2:]
    down = await jobstream(env, *argv)
    assert (down.returncode, down.stdout.strip()) == (
        1,
        f"no health file at {tmp_path / 'health.json'}: the worker is not running",
    )
    stale = {"consumer": "w-gone", "pid": 1, "written_at": 1.0, "problem": None}
    (tmp_path / "health.json").write_bytes(msgspec.json.encode(stale))
    old = await jobstream(env, *argv)
    assert old.returncode == 1
    assert "worker w-gone last reported" in old.stdout


def test_prometheus_scrapes_every_worker_replica(compose: dict[str, Any]):
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_path = ROOT / mounts["/etc/prometheus/prometheus.yml"]
    assert config_path.is_file()
    config = yaml.safe_load(config_path.read_text())
    command = services["worker"]["command"]
    port = int(command[command.index("--metrics-port") + 1])
    processes = int(command[command.index("--processes") + 1])
    ports = [port + i for i in range(processes)]  # process i of a replica serves port + i
    assert [str(p) for p in services["worker"]["expose"]] == [str(p) for p in ports]
    # Loopback is the default: Prometheus, in its own container, needs every interface.
    assert services["worker"]["environment"]["JOBSTREAM_METRICS_HOST"] == "0.0.0.0"
    assert Settings().metrics_host == "127.0.0.1"
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "jobstream-worker"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # One DNS A record a replica, one config a process: every process of every replica is a
    # target, however many replicas there are.
    found = [(sd["names"], sd["type"], sd["port"]) for sd in job["dns_sd_configs"]]
    assert found == [(["worker"], "A", p) for p in ports]


def test_compose_runs_one_engine_process_per_core_under_a_supervisor(compose: dict[str, Any]):
    command = compose["services"]["worker"]["command"]
    assert command[:2] == ["jobstream", "worker"]
    assert int(command[command.index("--processes") + 1]) >= 2
    # The supervisor drains its processes within their grace period before compose kills it.
    env = compose["services"]["worker"]["environment"]
    grace = float(env["JOBSTREAM_SHUTDOWN_GRACE_S"])
    stop = compose["services"]["worker"]["stop_grace_period"]
    assert grace < float(stop.removesuffix("s"))


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: name → (pinned version, hashes)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        head = block.split(" ", 1)[0].strip()
        if "==" not in head:
            continue
        name, version = head.split("==")
        entries[canonicalize_name(name)] = (
            version,
            re.findall(r"--hash=sha256:([0-9a-f]{64})", block),
        )
    return entries


def test_the_lock_pins_and_hashes_every_runtime_dependency():
    lock = locked()
    assert lock, "requirements.lock has no entries"
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), name
        assert hashes, f"{name} has no hash"
    needed = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    build = PYPROJECT["build-system"]["requires"]  # the image builds without isolation
    needed += [Requirement(r) for r in build]
    for req in needed:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is not in requirements.lock: run scripts/lock"
        assert req.specifier.contains(lock[name][0], prereleases=True), f"{req}: {lock[name][0]}"
        for extra in req.extras:  # e.g. redis[hiredis] needs hiredis locked too
            for raw in importlib.metadata.requires(req.name) or []:
                dep = Requirement(raw)
                if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                    if dep.marker.evaluate({"extra": ""}):
                        continue  # needed without the extra too: not the extra's own
                    assert canonicalize_name(dep.name) in lock, f"{req}: {dep.name}"
    header = (ROOT / "requirements.lock").read_text()
    assert "autogenerated by pip-compile with Python 3.11" in header
    assert "scripts/lock" in header


def test_the_image_installs_only_from_the_lock():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    [base] = [line for line in lines if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim", base)  # the lock's Python
    copy_lock = lines.index("COPY requirements.lock ./")
    install_lock = lines.index("RUN pip install --require-hashes -r requirements.lock")
    install_project = next(
        i for i, line in enumerate(lines) if line.startswith("RUN pip install --no-deps ")
    )
    assert copy_lock < install_lock < install_project
    assert "--no-build-isolation ." in lines[install_project]  # the build backend: locked too
    assert sum("pip install" in line for line in lines) == 2  # nothing else installed
    assert PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"] == ["jobstream*"]
    linked = [p.readlink().name for p in (ROOT / "jobstream").iterdir() if p.is_symlink()]
    assert sorted(linked) == ["consumers", "otel", "schema", "streams"]
    for top in ("jobstream", *linked):  # the package folder and every folder it links to
        assert f"COPY {top} ./{top}" in lines, top
