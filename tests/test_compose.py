"""compose.yaml: valid against the Compose specification schema, and every command and
environment variable it gives our image exists in the project.

tests/data/compose-spec.json is a hand-written subset of the specification's schema (see
its `$comment`): the keys this file uses, with the specification's shapes and constraints.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import opentelemetry.environment_variables as api_env
import opentelemetry.sdk.environment_variables as sdk_env
import pytest
import yaml

from consumers.cli import build_parser
from consumers.settings import Settings
from schema.payloads import PAYLOADS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((Path(__file__).parent / "data" / "compose-spec.json").read_text())
_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")

checker = jsonschema.FormatChecker()


@checker.checks("duration")
def _is_duration(value: object) -> bool:
    return not isinstance(value, str) or bool(_DURATION.match(value))


@checker.checks("expose")
def _is_expose(value: object) -> bool:
    return bool(re.fullmatch(r"\d{1,5}(-\d{1,5})?(/(tcp|udp))?", str(value)))


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


def test_the_schema_is_valid_and_compose_yaml_matches_it(compose: dict[str, Any]):
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA, format_checker=checker).validate(compose)


def test_the_schema_rejects_what_the_specification_rejects(compose: dict[str, Any]):
    validator = jsonschema.Draft7Validator(SCHEMA, format_checker=checker)
    worker = compose["services"]["worker"]
    bad = [
        {**compose, "servces": {}},
        {**compose, "services": {"worker": {**worker, "replicas": 3}}},
        {**compose, "services": {"worker": {**worker, "deploy": {"replicas": "three"}}}},
        {**compose, "services": {"w": {"depends_on": {"redis": {"condition": "started"}}}}},
        {**compose, "services": {"w": {"healthcheck": {"interval": "ten seconds"}}}},
    ]
    for doc in bad:
        assert not validator.is_valid(doc), doc["services"].keys()


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
    assert s["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
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


def test_the_image_is_built_from_the_project():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "FROM python:3.11-slim" in lines
    assert any(re.match(r"RUN pip install \.", line) for line in lines)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for package in re.findall(r"^packages = \[(.*)\]$", pyproject, re.MULTILINE)[0].split(","):
        top = package.strip().strip('"').split(".")[0]
        assert f"COPY {top} ./{top}" in lines, top
