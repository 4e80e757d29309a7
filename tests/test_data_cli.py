"""``xcloud data`` without a grid: the progress bar (drawn on a terminal only, with rate
and ETA, throttled) and argument checks that need no connection."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from client.cli import build_parser, main
from client.data_cli import ProgressBar

MIB = 1 << 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_percent_rate_and_eta_and_ends_its_line() -> None:
    now = [100.0]
    out = Terminal()
    bar = ProgressBar("input.dat", out, clock=lambda: now[0])
    now[0] += 5.0  # hashing the file: not part of the rate
    bar(0, 128 * MIB)  # the first callback starts the clock
    assert out.getvalue() == ""
    now[0] += 2.0
    bar(64 * MIB, 128 * MIB)
    line = out.getvalue()
    assert line.startswith("\rinput.dat")
    assert " 50% [##########          ]" in line
    assert "64.0/128.0 MiB" in line
    assert "32.0 MiB/s" in line
    assert "ETA 0:02" in line
    now[0] += 0.05
    bar(65 * MIB, 128 * MIB)  # too soon: not redrawn
    assert out.getvalue() == line
    bar(128 * MIB, 128 * MIB)  # the end is always drawn
    assert "100% [####################]" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\n")


def test_the_bar_is_only_for_terminals() -> None:
    assert ProgressBar.wanted(Terminal())
    assert not ProgressBar.wanted(io.StringIO())
    quiet = io.StringIO()
    ProgressBar("x", quiet).close()  # never drawn: nothing to end
    assert quiet.getvalue() == ""


def test_identity_options_may_come_before_or_after_the_action() -> None:
    args = build_parser().parse_args(["data", "--principal", "alice", "get", "k", "-o", "f"])
    assert (args.principal, args.key, args.output) == ("alice", "k", "f")
    args = build_parser().parse_args(["data", "ls", "--principal", "bob", "--json"])
    assert (args.principal, args.json) == ("bob", True)


def test_bad_usage_is_one_line_before_any_connection(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XCLOUD_HOME", str(tmp_path))
    assert main(["data", "put", "a", "b", "--name", "x"]) == 1
    err = capsys.readouterr().err
    assert err == "xcloud: error: --name names one file: give one FILE with it\n"
    with pytest.raises(SystemExit):
        main(["data", "share", "k"])  # one of --public / --with / --private is required
