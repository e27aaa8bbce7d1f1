"""Run many `jobstream` command lines fast: import once, then fork one process per command.

`python -m tests.cli_fork` reads `[[args, env], ...]` as JSON on stdin and writes
`[[exit code, stdout, stderr], ...]`. Each child runs the console script's `main` with its
own environment, stdin from /dev/null, stdout and stderr to files, and exits the way the
interpreter would (an escaping exception prints its traceback, exit code 1).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import traceback

from jobstream.consumers.cli.main import main

LIMIT_S = 30


def run(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code: object = 1
            try:
                signal.alarm(LIMIT_S)
                os.environ.clear()
                os.environ.update(env)
                null = os.open(os.devnull, os.O_RDONLY)
                for fd, target in ((null, 0), (out.fileno(), 1), (err.fileno(), 2)):
                    os.dup2(fd, target)
                code = main(args)
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 1)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        return code, out.read().decode(errors="replace"), err.read().decode(errors="replace")


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    json.dump([run(args, env) for args, env in cases], sys.stdout)
