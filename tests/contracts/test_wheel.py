"""The built distribution: one import package, `jobstream`, with real files and its package
data, installed into a fresh virtual environment where `jobstream --help` runs (DESIGN.md,
Packaging)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "jobstream", "streams", "consumers", "schema", "otel"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline from a copy of the sources (the repository stays clean)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=skip)
        else:
            shutil.copy2(ROOT / name, src / name)
    out = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--wheel-dir", str(out), str(src)],
        check=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    (built,) = out.glob("jobstream-*.whl")
    return built


def test_the_wheel_holds_only_jobstream_with_real_files_and_package_data(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/", 1)[0] for n in names}
        assert {t for t in tops if not t.endswith(".dist-info")} == {"jobstream"}
        record = zf.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode()
        for member in (
            "jobstream/py.typed",
            "jobstream/streams/__init__.py",
            "jobstream/streams/lua/settle.lua",
            "jobstream/schema/migrations/0001_jobs.sql",
            "jobstream/schema/jsonschema/envelope.json",
            "jobstream/consumers/queues/sending.py",
            "jobstream/consumers/cli/main.py",
            "jobstream/otel/logs.py",
        ):
            assert member in names, member
            assert member in record, member
            assert zf.getinfo(member).file_size > 0 or member.endswith("py.typed"), member
        # every package under the folders is in the wheel: found, never listed by hand
        for init in ROOT.glob("*/**/__init__.py"):
            rel = init.relative_to(ROOT)
            if rel.parts[0] in ("streams", "consumers", "schema", "otel"):
                assert f"jobstream/{rel.as_posix()}" in names, rel
        for sql in (ROOT / "schema" / "migrations").glob("*.sql"):
            assert f"jobstream/schema/migrations/{sql.name}" in names
        for lua in (ROOT / "streams" / "lua").glob("*.lua"):
            assert f"jobstream/streams/lua/{lua.name}" in names


def test_installed_into_a_fresh_venv_only_jobstream_lands_and_the_command_runs(
    wheel: Path, tmp_path: Path
):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", str(wheel)],
        check=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    landed = {p.name for p in Path(purelib).iterdir()} - {"__pycache__"}
    assert {n for n in landed if not n.endswith(".dist-info")} == {"jobstream"}
    assert {n for n in landed if n.endswith(".dist-info")} == {"jobstream-0.1.0.dist-info"}
    assert not any(p.is_symlink() for p in (Path(purelib) / "jobstream").rglob("*"))

    # The dependencies come from this environment's site-packages (which holds no `jobstream`
    # folder of its own: the development install is a path finder), run from an empty folder.
    deps = sysconfig.get_paths()["purelib"]
    assert not (Path(deps) / "jobstream").exists()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": deps, "HOME": str(tmp_path)}
    where = subprocess.run(
        [str(python), "-c", "import jobstream.consumers.cli.main as m; print(m.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=env,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(purelib)
    helped = subprocess.run(
        [str(env_dir / "bin" / "jobstream"), "--help"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert helped.returncode == 0, helped.stderr
    assert "usage: jobstream" in helped.stdout
    assert "worker" in helped.stdout
