"""How the process driver launches a task's shell: its environment, the one-line prelude
(gate, working directory kept across commands, EXIT trap) and the limits applied while
the shell waits at its gate (worker/executors/process.py says why each looks this way).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import signal as _signal
import subprocess
from pathlib import Path
from typing import IO

from worker.executors.base import ExecutorError, Limits, PolledInput, TaskSpec
from worker.executors.cgroups import CgroupError, SessionCgroup

CWD_FILE = ".xcloud/cwd"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def task_env(spec: TaskSpec, workdir: Path) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": str(workdir),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "TERM": spec.tty.term if spec.tty else "dumb",
    }
    for name, value in spec.env.items():
        if not _ENV_NAME.match(name) or "\0" in value:
            raise ExecutorError(f"invalid environment variable {name!r}")
        env[name] = value
    env.update({"XCLOUD_RESERVATION": spec.session.session_id,
                "XCLOUD_EXEC_ID": spec.task_id, "XCLOUD_WORKDIR": str(workdir)})
    return env

def shell_prelude(workdir: Path, gated: bool, *, stdin: bool = False,
                  carry_cwd: bool = True) -> str:
    """One line, so the user's line numbers in shell error messages stay right. With
    ``stdin`` the gate line is all the prelude reads of it (``read`` takes one byte at
    a time from a pipe): what follows is the command's input. Without ``carry_cwd`` (a
    batch job's single command) no directory is read from, or left in, ``CWD_FILE``."""
    cwd_file = shlex.quote(str(workdir / CWD_FILE))
    keep = "" if stdin else "exec </dev/null; "
    gate = f"IFS= read -r __xc || exit 126; {keep}unset __xc; " if gated else ""
    if not carry_cwd:
        return gate
    on_exit = f"__xc=$?; pwd > {cwd_file} 2>/dev/null; exit $__xc"
    return (
        f"{gate}"
        f"__xc=; [ -r {cwd_file} ] && IFS= read -r __xc < {cwd_file}; "
        '[ -n "$__xc" ] && cd "$__xc" 2>/dev/null; unset __xc; '
        f"trap {shlex.quote(on_exit)} EXIT; "
    )

def apply_limits(proc: subprocess.Popen[bytes], limits: Limits,
             cgroup: SessionCgroup | None, *, keep_stdin: bool = False) -> None:
    """Put the gated shell in its cgroup, prlimit it (the limits no cgroup enforces),
    then open the gate; on failure it never runs."""
    assert proc.stdin is not None
    try:
        if cgroup is not None:
            cgroup.attach(proc.pid)
        if limits.memory_bytes is not None:
            value = int(limits.memory_bytes)
            resource.prlimit(proc.pid, resource.RLIMIT_AS, (value, value))
        if limits.pids is not None:
            value = int(limits.pids)
            resource.prlimit(proc.pid, resource.RLIMIT_NPROC, (value, value))
        # A shell that exited before its gate (a syntax error) ran nothing.
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(b"go\n")
    except (OSError, ValueError, CgroupError) as err:
        keep_stdin = False
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, _signal.SIGKILL)
        proc.wait()
        raise ExecutorError(f"cannot apply resource limits: {err}") from err
    finally:
        if not keep_stdin:
            with contextlib.suppress(OSError):
                proc.stdin.close()


class PipeInput(PolledInput):
    """A task's stdin pipe, written without blocking (poll for room, then write)."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(pipe.fileno())
        self._pipe = pipe
        os.set_blocking(self._fd, False)

    def _send(self, data: bytes | memoryview) -> int:
        return os.write(self._fd, data)

    def _end(self) -> None:
        self._pipe.close()
