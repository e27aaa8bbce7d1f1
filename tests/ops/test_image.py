"""The Dockerfile's install, replayed where no Docker engine runs: its COPY and `pip` steps,
in the order it gives them, into a fresh virtual environment with only the package index
(no local wheels, no configuration of this machine). So the lock installs with its hashes,
the project installs from it resolving nothing, and the result runs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import run

ROOT = Path(__file__).resolve().parents[2]
_OFFLINE = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "No route to host",
    "ProxyError",
)


def _steps() -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """The base image, the COPY and RUN steps in order, and the ENV of the Dockerfile."""
    base, steps, env = "", [], {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            base = rest.strip()
        elif word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
        elif word in ("COPY", "RUN"):
            steps.append((word, rest.strip()))
    return base, steps, env


@pytest.mark.timeout(600)
async def test_the_image_install_replayed_installs_from_the_lock_and_runs(
    tmp_path: Path, database: str
):
    base, steps, image_env = _steps()
    version = re.fullmatch(r"python:(\d+)\.(\d+)\.\d+-slim", base)
    assert version is not None, base
    if (int(version[1]), int(version[2])) != sys.version_info[:2]:
        pytest.skip(f"the image runs Python {version[1]}.{version[2]}: replay it with that one")
    app = tmp_path / "app"
    app.mkdir()
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= image_env | {"PIP_CONFIG_FILE": os.devnull, "PATH": f"{bin_dir}:{env['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    pip_runs = 0
    for word, rest in steps:
        if word == "COPY":
            *sources, target = rest.split()
            for source in sources:
                src, dst = ROOT / source, app / target
                if src.is_dir():
                    shutil.copytree(src, dst if target != "./" else app / source)
                else:
                    shutil.copy(src, app / Path(source).name)
            continue
        for command in rest.split("&&"):
            argv = shlex.split(command)
            if argv[0] != "pip":  # useradd and the like: not about what is installed
                continue
            pip_runs += 1
            done = await run(str(bin_dir / "python"), "-m", *argv, env=env, limit_s=480, cwd=app)
            output = done.stdout + done.stderr
            if done.returncode != 0 and any(sign in output for sign in _OFFLINE):
                pytest.skip(f"the package index is unreachable: {output.strip()[-300:]}")
            assert done.returncode == 0, f"{command.strip()}:\n{output[-3000:]}"
    assert pip_runs == 3  # the lock, the project, pip check

    # What the image runs, from outside the copied sources: the installed package only.
    outside = {**env, "DATABASE_URL": database}
    jobstream = str(bin_dir / "jobstream")
    schema = await run(jobstream, "schema", "analytics", env=outside, cwd=tmp_path)
    assert schema.returncode == 0, schema.stderr
    assert '"event_id"' in schema.stdout
    migrate = await run(jobstream, "migrate", env=outside, cwd=tmp_path)  # SQL files shipped
    assert migrate.returncode == 0, migrate.stderr
    lua = await run(
        str(bin_dir / "python"), "-c",
        "from importlib import resources; import jobstream.streams as s; print(s.__file__);"
        "print(len(list(resources.files('jobstream.streams.lua').glob('*.lua'))))",
        env=outside, cwd=tmp_path,
    )  # fmt: skip
    where, count = lua.stdout.split()
    assert where.startswith(str(tmp_path / "venv")), where
    assert int(count) == len(list((ROOT / "streams" / "lua").glob("*.lua")))
