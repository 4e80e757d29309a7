"""The README's "Data" and "Batch jobs" sections, followed literally (issues 9 and 10).

As the tour test (tests/e2e/test_readme_tour.py) does, every ``$ …`` line of the
sections' ``sh`` blocks is read from README.md and run, in order, against a real grid
(`xcloud up`, tests/fixtures/e2e.py), from a working directory of the reader's own. A
line of several commands (``a; b``) runs them one after the other. Only what differs from
one run to the next is substituted: the job ids the README writes ``j-…`` (each command
gets the jobs its comment speaks of, see ``JOBS``). Every command must exit 0 without a
traceback or an error line, and what the README's comments promise is checked. The one
command that runs until Ctrl-C, ``xcloud jobs --watch``, runs beside the commands after
it (as in another terminal) and gets its Ctrl-C once it has printed their job's events.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.test_readme_tour import Tourist, commands, section
from tests.fixtures.e2e import E2EGrid
from tests.fixtures.services import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ELLIPSIS_ID = "j-…"

#: Which jobs a command's ``j-…`` stand for, by its verb: sweep jobs by index, the
#: ``--count`` jobs ("count") and the GPU job the comments speak of ("gpu").
JOBS: dict[str, list[tuple[str, int]]] = {
    "job": [("sweep", 7)],  # `job show`
    "logs": [("count", 3)],  # one that printed something
    "results": [("sweep", 7)],  # res/outputs/out-7.txt
    "why": [("gpu", 0)],  # "why it is not running"
    "hold": [("gpu", 0)],
    "release": [("gpu", 0)],
    "cancel": [("gpu", 0)],
    "submit": [("sweep", 0), ("sweep", 1)],  # `--after j-…,j-…`
}


def split_commands(line: str) -> list[str]:
    """``xcloud a; xcloud b  # comment`` -> ``["xcloud a", "xcloud b"]``, each re-quoted
    for :meth:`Tourist.run`; a line of the reader's shell (``seq … > FILE``) stays whole."""
    if not line.startswith("xcloud "):
        return [line]
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
    lexer.whitespace_split = True
    found: list[list[str]] = [[]]
    for token in lexer:
        if token == ";":
            found.append([])
        else:
            found[-1].append(token)
    return [shlex.join(words) for words in found if words]


@dataclass
class Reader(Tourist):
    """Follows the sections from their own working directory, keeping the job ids the
    submits printed."""

    jobs: dict[str, list[str]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # what this command's j-… stand for
    watch: tuple[subprocess.Popen[str], list[str]] | None = None

    def substitute(self, word: str) -> str:
        while ELLIPSIS_ID in word:
            word = word.replace(ELLIPSIS_ID, self.ids.pop(0), 1)
        return super().substitute(word)

    def follow(self, line: str) -> subprocess.CompletedProcess[str] | None:
        """One command of the README: the reader's own shell, the watch, or `xcloud`."""
        if not line.startswith("xcloud "):  # e.g. `seq 1 1000 > params.txt`
            subprocess.run(["/bin/sh", "-c", line], cwd=self.cwd, check=True, timeout=30)
            return None
        args = shlex.split(line)
        if "--watch" in args:
            self.start_watch(args[1:])
            return None
        self.ids = [self.jobs[kind][index] for kind, index in
                    (JOBS[args[1]] if ELLIPSIS_ID in line else [])]
        result = self.run(line)
        assert not self.ids, f"{line}: unused job ids {self.ids}"
        return result

    def start_watch(self, args: list[str]) -> None:
        proc, seen = self.spawn(args, self.cwd)
        self.watch = (proc, seen)
        wait_for(lambda: any("watching your jobs' events" in s for s in seen)
                 or proc.poll() is not None, 30, message="`xcloud jobs --watch` watching")
        assert proc.poll() is None, "".join(seen)

    def stop_watch(self, job: str) -> str:
        """Ctrl-C the watch once it printed ``job``'s completion; what it printed."""
        assert self.watch is not None
        proc, seen = self.watch
        self.watch = None
        try:
            wait_for(lambda: any(job in s and "completed" in s for s in seen), 30,
                     message=f"`xcloud jobs --watch` shows {job} completed")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.wait(30)
        shown = "".join(seen)
        assert proc.returncode == 130, shown  # the exit status of a Ctrl-C
        assert "Traceback" not in shown, shown
        assert "error" not in shown.lower(), shown
        return shown


def readers_files(where: Path) -> None:
    """The reader's own files that the sections' commands name."""
    payload = where / "payload"
    payload.mkdir()
    for i in range(4):
        (payload / f"part-{i}.bin").write_bytes(bytes(range(256)) * 4096 * (i + 1))
    with tarfile.open(where / "inputs.tar", "w") as tar:
        tar.add(payload, arcname="payload")
    for name in ("sim", "sim-arm"):
        (where / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
        (where / name).chmod(0o755)
    (where / "data.csv").write_text("".join(f"{i},{i * i},x\n" for i in range(1, 1201)))
    (where / "merge.sh").write_text("echo merged\n")


@pytest.fixture
def reader(process_grid: E2EGrid, tmp_path: Path) -> Iterator[Reader]:
    workers = sorted(process_grid.workers_json(), key=lambda w: w["index"])
    home = tmp_path / "reader"
    home.mkdir()
    readers_files(home)
    guide = Reader(process_grid, workers[0]["id"], cwd=home)
    try:
        yield guide
    finally:
        if guide.watch is not None and guide.watch[0].poll() is None:
            guide.watch[0].kill()
            guide.watch[0].wait(10)


def test_the_readme_data_section_followed_literally(reader: Reader) -> None:
    lines = [c for b in section("Data") if b.lang == "sh" for line in commands(b)
             for c in split_commands(line)]
    assert len(lines) >= 10
    home = reader.cwd
    for line in lines:
        result = reader.follow(line)
        assert result is not None, line
        verb = shlex.split(line)[1:3]
        out = result.stdout
        if verb == ["data", "put"]:
            assert "inputs.tar" in out, out
        elif verb == ["data", "ls"]:
            assert "inputs.tar" in out, out
            assert "shared" in out, out
        elif verb == ["data", "get"]:  # verified and bit-identical
            assert (home / "copy.tar").read_bytes() == (home / "inputs.tar").read_bytes()
        elif verb == ["data", "show"]:
            assert "access:       public" in out, out  # after `data share --public`
        elif verb == ["data", "rm"]:
            assert "removed 1" in out, out
        elif verb == ["app", "add"]:
            assert "linux/amd64, linux/arm64" in out, out
        elif verb == ["app", "ls"] or verb == ["app", "show"]:
            assert "sim" in out, out
            assert "linux/arm64" in out, out
        elif verb == ["app", "rm"]:
            assert "removed 1 version" in out, out
    assert "inputs.tar" not in reader.grid.cli("data", "ls", check=True).stdout


def test_the_readme_batch_jobs_section_followed_literally(reader: Reader) -> None:
    blocks = [b for b in section("Batch jobs") if b.lang == "sh"]
    assert len(blocks) == 1  # the one block of commands
    lines = [c for line in commands(blocks[0]) for c in split_commands(line)]
    home = reader.cwd
    merge = ""
    for line in lines:
        result = reader.follow(line)
        if result is None:
            continue
        args = shlex.split(line)
        out = result.stdout
        if args[1] == "submit":
            ids = out.split()
            assert ids, out
            assert all(i.startswith("j-") for i in ids), out
            if "--sweep" in args:
                assert len(ids) == 1000
                reader.jobs["sweep"] = ids
            elif "--count" in args:
                assert len(ids) == 20
                reader.jobs["count"] = ids
            elif "--gpus" in args:
                reader.jobs["gpu"] = ids
            else:
                merge, = ids
        elif args[1] == "jobs":
            assert len(out.splitlines()) > 1000, out[:2000]  # the header and the jobs
        elif args[1:3] == ["job", "show"]:
            assert reader.jobs["sweep"][7] in out, out
            assert "head -n 8 data.csv" in out, out
        elif args[1] == "wait":
            ended = out.splitlines()  # those not yet ended when it started
            assert ended, out
            assert all("completed  exit 0" in e for e in ended), out
            listed = json.loads(reader.grid.cli("jobs", "--json", "--limit", "5000",
                                                check=True).stdout)
            assert len(listed) == 1020, len(listed)
            assert {j["state"] for j in listed} == {"completed"}, listed
        elif args[1] == "logs":
            assert out == "job 3\n", out
        elif args[1] == "results":
            res = home / "res"
            assert (res / "stdout").is_file()
            assert (res / "stderr").is_file()
            expected = len("".join((home / "data.csv").read_text().splitlines(True)[:8]))
            assert (res / "outputs" / "out-7.txt").read_text().strip() == str(expected)
        elif args[1] == "why":
            assert reader.jobs["gpu"][0] in out, out
            if ": queued:" in out:  # no H100 here
                assert "no online worker has a GPU named like H100" in out, out
        elif args[1] in ("hold", "release", "cancel"):
            assert "unknown 0" in out, out
    assert merge, "the README submits a job --after others"
    done = reader.grid.cli("wait", merge, timeout=60, cwd=home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "completed  exit 0" in done.stdout, done.stdout
    assert reader.grid.cli("logs", merge, check=True).stdout == "merged\n"
    shown = reader.stop_watch(merge)  # it printed the merge job's events, live
    assert f"{merge}  running" in shown, shown
    gpu = reader.grid.cli("job", "show", reader.jobs["gpu"][0], check=True).stdout
    assert "cancelled" in gpu, gpu
