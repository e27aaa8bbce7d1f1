"""Contracts of the codebase: public surfaces, layering, registry, migrations, settings."""

from __future__ import annotations

import ast
import asyncio
import importlib
import pathlib
import re

import asyncpg
import msgspec
import pytest

from jobstream import consumers, schema
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.settings import Settings
from jobstream.schema.migrate import apply_migrations, load_migrations
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import ConfigError, Publisher

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("schema", "streams", "consumers", "otel")
ALLOWED = {
    "schema": set(),
    "otel": set(),
    "streams": {"schema", "otel"},
    "consumers": {"streams", "schema", "otel"},
}


def test_packages_resolve_inside_the_repo():
    for mod in (schema, consumers):
        assert pathlib.Path(str(mod.__file__)).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("package", PACKAGES)
def test_layering(package: str):
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in PACKAGES, f"{path.relative_to(ROOT)}: {name}"
                top = name.removeprefix("jobstream.").split(".")[0]
                if name.startswith("jobstream.") and top != package:
                    assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("package", ["streams", "otel", "consumers"])
def test_public_all_is_sorted_and_complete(package: str):
    mod = importlib.import_module(f"jobstream.{package}")
    names = list(mod.__all__)
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    for name in names:
        assert hasattr(mod, name), name


ROOMS = ("queues", "mail", "store", "cli", "dashboard", "demo", "worker")
IO_LIBRARIES = {"asyncpg", "redis", "httpx", "aiosmtplib", "socket", "subprocess"}


def test_consumers_is_one_folder_per_concern_each_saying_what_it_holds():
    folders = sorted(p.parent.name for p in (ROOT / "consumers").glob("*/__init__.py"))
    assert folders == sorted(ROOMS)
    assert [p.name for p in (ROOT / "consumers").glob("*.py")] == ["__init__.py"]
    for room in ROOMS:
        doc = ast.get_docstring(ast.parse((ROOT / "consumers" / room / "__init__.py").read_text()))
        assert doc is not None, room
        assert "\n" not in doc.strip(), room


def test_mail_code_does_no_io_and_imports_no_other_room():
    for path in (ROOT / "consumers" / "mail").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in IO_LIBRARIES, f"{path.name} imports {name}"
                if name.startswith("jobstream.consumers."):
                    inside = f"{name}.".startswith("jobstream.consumers.mail.")
                    assert inside, f"{path.name} imports {name}"


def test_the_cli_modules_import_each_other_without_a_cycle():
    """Command families import the renderer and the worker runtime, never each other back."""
    cli = ROOT / "consumers" / "cli"
    edges: dict[str, set[str]] = {}
    for path in cli.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "jobstream.consumers.cli":
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "jobstream.consumers.cli."
            ):
                found.add(str(node.module).rpartition(".")[2])
        edges[path.stem] = found

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(
            n == goal or (n not in seen and reaches(n, goal, seen | {n}))
            for n in edges.get(start, set())
        )

    assert [m for m in edges if reaches(m, m, set())] == []


def test_the_engine_knows_no_payload_struct_of_the_application():
    """`streams` gets its queues from the application; it never imports the payloads."""
    for path in (ROOT / "streams").rglob("*.py"):
        text = path.read_text()
        assert "schema.payloads" not in text, path.relative_to(ROOT)
    with pytest.raises(TypeError):
        Publisher(None)  # type: ignore[call-arg, arg-type]


def test_registry_has_each_queue_once_with_its_payload():
    queues = [spec.queue for spec in HANDLERS]
    assert sorted(queues) == sorted(PAYLOADS)  # the six queues, each exactly once
    for spec in HANDLERS:
        assert PAYLOADS[spec.queue] is spec.payload


def test_queues_holds_one_module_per_queue_and_nothing_else():
    """Each module of consumers/queues defines the handler of one queue; every queue's
    handler lives in one of them."""
    modules = sorted(p.stem for p in (ROOT / "consumers" / "queues").glob("*.py"))
    modules.remove("__init__")
    defined = [spec.fn if spec.batch_fn is None else spec.batch_fn for spec in HANDLERS]
    assert {fn.__module__.rsplit(".", 1)[0] for fn in defined} == {"jobstream.consumers.queues"}
    assert sorted(fn.__module__.rsplit(".", 1)[1] for fn in defined) == modules


# settings.py reads the configuration; the demo passes its environment on to the workers
# it spawns; otel/ reads only the standard OTEL_* variables of the OpenTelemetry SDK.
ENV_READERS = {"consumers/worker/settings.py", "consumers/demo/main.py"}


def test_only_settings_reads_the_environment():
    offenders = []
    for package in ("schema", "streams", "consumers"):
        for path in (ROOT / package).rglob("*.py"):
            if str(path.relative_to(ROOT)) in ENV_READERS:
                continue
            if re.search(r"os\.environ|os\.getenv", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_migrations_have_one_number_each_in_order():
    """Numbers go up and are never shared. They may skip one (0009: a number given
    out to work that landed under another): a number once released is never reused or
    renamed, since databases record it (`MigrationMismatch`)."""
    found = load_migrations()
    versions = [m.version for m in found]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    assert len({m.name for m in found}) == len(found)


async def test_migrating_twice_and_concurrently_is_safe(database: str):
    """Three replicas migrate an empty schema at once: one applies all, the others nothing."""
    conns = [await asyncpg.connect(database) for _ in range(3)]
    try:
        await conns[0].execute("CREATE SCHEMA fresh")
        for conn in conns:
            await conn.execute("SET search_path TO fresh")
        results = await asyncio.gather(*(apply_migrations(conn) for conn in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(load_migrations())]
        assert await apply_migrations(conns[0]) == []
        n = await conns[0].fetchval("SELECT count(*) FROM fresh.schema_migrations")
        assert n == len(load_migrations())
    finally:
        for conn in conns:
            await conn.close()


def test_settings_errors_name_the_variable_and_hide_secrets():
    with pytest.raises(ConfigError, match=r"JOBSTREAM_MAX_DELIVERIES"):
        Settings.from_env({"JOBSTREAM_MAX_DELIVERIES": "many"})
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": "http://nope"})
    s = Settings.from_env({"DATABASE_URL": "postgresql://app:hunter2@db:5432/app"})
    assert "hunter2" not in repr(s)
    assert "app:***@db" in repr(s)
    assert Settings.from_env({}).redis_url == "redis://127.0.0.1:6379/0"
    assert msgspec.structs.replace(s, group="g").group == "g"


def test_readme_configuration_table_matches_settings():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == set(Settings.__struct_encode_fields__)


async def test_migrations_numbered_alike_by_two_branches_are_refused(database: str):
    """A version recorded under another name means one of two migrations would be skipped
    for good: refuse, applying nothing, with a line naming both."""
    import asyncpg

    from jobstream.schema.migrate import MigrationMismatch, apply_migrations

    conn = await asyncpg.connect(database)
    try:
        await conn.execute("UPDATE schema_migrations SET name = 'other_branch' WHERE version = 2")
        with pytest.raises(MigrationMismatch, match="0002 is 'other_branch' in the database"):
            await apply_migrations(conn)
    finally:
        await conn.close()
