"""The shell's split: its language parses without a terminal library, the old import
path still serves every name, and the client's result carries the shared ``Outcome``.

(The parsing functions' own behaviour is tested in tests/test_client_stream.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from client.exec_stream import ExecResult, ExecStream
from schemas.outcome import Outcome


def loaded_after(statement: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after ``statement``."""
    code = (f"import sys, json\n{statement}\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60)
    return set(json.loads(done.stdout))


def test_parsing_loads_no_prompt_toolkit() -> None:
    loaded = loaded_after("from client.shell_syntax import split_script, reserve_args\n"
                          "assert split_script('reserve any\\nps') == ['reserve any', 'ps']")
    assert "client" in loaded
    assert "prompt_toolkit" not in loaded


def test_the_shell_loads_prompt_toolkit_only_for_the_prompt() -> None:
    """Scripted runs and ``xcloud run`` need no terminal library."""
    assert "prompt_toolkit" not in loaded_after("import client.shell, client.cli")


def test_client_shell_still_serves_its_names() -> None:
    import client.console
    import client.shell
    import client.shell_commands
    import client.shell_syntax

    for name in ("ShellError", "ShellExit", "CommandSpec", "COMMANDS", "command_names",
                 "split_script", "script_commands", "parse_bytes", "reserve_args"):
        assert getattr(client.shell, name) is getattr(client.shell_syntax, name)
    for name in ("Console", "describe_exit", "follow_output", "SigintCounter", "use_color"):
        assert getattr(client.shell, name) is getattr(client.console, name)
    assert client.shell.Shell is client.shell_commands.Shell
    for name in ("run_shell", "run_once", "run_script", "run_interactive", "_completer",
                 "history_path"):
        assert callable(getattr(client.shell, name))


def test_find_command_knows_names_and_aliases() -> None:
    from client.shell_syntax import COMMANDS, command_names, find_command

    for spec in COMMANDS:
        for name in (spec.name, *spec.aliases):
            assert find_command(name) is spec
            assert find_command(name.upper()) is spec
    assert find_command("reserve") is find_command("reserveWorker")
    assert find_command("frobnicate") is None
    assert len(command_names()) == len(set(n.lower() for n in command_names()))


@pytest.mark.parametrize(("outcome", "line"), [
    (Outcome(exit_code=3, duration_s=1.5, output_bytes=7), "[exit 3 · 1.50s]"),
    (Outcome(signal=9, duration_s=0.25, timed_out=True, truncated=True, error="stopped"),
     "[killed by SIGKILL · 0.25s · timed out · stopped]"),
    (Outcome(duration_s=2.0, oom_killed=True, output_bytes=0),
     "[ended · 2.00s · out of memory]"),
])
def test_exec_result_carries_the_shared_outcome(outcome: Outcome, line: str) -> None:
    from client.shell import describe_exit

    stream = ExecStream("e1")
    stream.feed(0, "stdout", b"1234567")
    stream.feed_exit({**outcome.outcome_fields(), "exec_id": "e1", "last_seq": 0})
    result = stream.result
    assert isinstance(result, Outcome)
    # The client fills the flags in where the wire left them out: compare those as bools.
    assert result.outcome() == Outcome(
        exit_code=outcome.exit_code, signal=outcome.signal, duration_s=outcome.duration_s,
        timed_out=bool(outcome.timed_out), truncated=bool(outcome.truncated),
        oom_killed=bool(outcome.oom_killed), error=outcome.error,
        output_bytes=outcome.output_bytes or 7)
    assert result.returncode == outcome.returncode
    assert result.describe() == result.outcome().describe()
    assert describe_exit(result) == line


def test_exec_result_ok_counts_only_the_exit_code() -> None:
    """Unlike ``Outcome.ok``: a command that exited 0 is ok even with an error note."""
    assert ExecResult("e", exit_code=0, error="reservation closed: released").ok
    assert not Outcome(exit_code=0, error="reservation closed: released").ok
    assert not ExecResult("e", signal=15).ok
    assert ExecResult("e").duration_s == 0.0
    assert ExecResult("e").timed_out is False
