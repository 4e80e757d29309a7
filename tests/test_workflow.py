"""Pipelines (docs/jobs.md, "Futures as inputs", "Workflow files"): a future among a job's
inputs makes the dependency and delivers the parent's output, resolved by the grid when
the child is scheduled; a TOML workflow file is submitted in dependency order and a rerun
with its rescue file reruns only what did not complete.

A real coordinator, real in-process workers (tests/test_jobs_e2e.py's ``agent``), the
Python client and the CLI commands' functions; the file checks need no grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from client.api import Grid
from client.errors import ClientError
from client.workflow import WorkflowError, load
from client.workflow_cli import cmd_workflow_run, cmd_workflow_status
from tests.fixtures.grid import GridHarness
from tests.fixtures.services import wait_for
from tests.job_actors import start_jobs_coordinator
from tests.test_jobs_e2e import ONE_BROKER, agent, alice

DIAMOND = """
[defaults]
wall = "2m"

[jobs.a]
command = "seq 1 5 > numbers.txt"
outputs = ["numbers.txt"]

[jobs.b]
command = "sed 's/^/b/' numbers.txt > b.txt"
inputs = { "numbers.txt" = { job = "a", output = "numbers.txt" } }
outputs = ["b.txt"]

[jobs.c]
command = "test \\"$(cat flag.txt)\\" = ok && tail -n 1 in.txt"
inputs = { "in.txt" = { job = "a", output = "numbers.txt" }, "flag.txt" = "flag.txt" }

[jobs.d]
command = "cat b.txt c.txt"
after = ["a"]
inputs = { "b.txt" = { job = "b", output = "b.txt" }, "c.txt" = { job = "c" } }
"""


def test_a_future_input_makes_the_edge_and_delivers_the_file(grid: GridHarness) -> None:
    """Diamond a -> (b, c) -> d from Python futures: d reads b's file and c's stdout."""
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=4)
    client = alice(grid)
    a = client.submit("seq 1 3 > n.txt; echo a-log", outputs=["n.txt"])
    b = client.submit("sed 's/^/b/' n.txt > b.txt", inputs={"n.txt": a.output("n.txt")},
                      outputs=["b.txt"])
    c = client.submit("tail -n 1 n.txt", inputs={"n.txt": a.output("n.txt")})
    d = client.submit("cat b.txt c.txt log.txt",
                      inputs={"b.txt": b.output("b.txt"), "c.txt": c, "log.txt": a})
    assert set(client.jobs.show(d.job).job["spec"]["after"]) == {b.job, c.job, a.job}
    result = d.result(timeout=90)
    assert result.ok, result
    assert result.stdout == b"b1\nb2\nb3\n3\na-log\n"
    ends = {f.job: f.result().state for f in (a, b, c)}
    assert set(ends.values()) == {"completed"}
    # The worker got plain data refs: the stored spec was rewritten when d was assigned.
    inputs = client.jobs.show(d.job).job["spec"]["inputs"]
    assert all(set(i) == {"name", "sha256"} for i in inputs)
    assert {i["sha256"] for i in inputs} == {
        b.result().outputs[0].sha256, c.result().stdout_ref.sha256,  # type: ignore[union-attr]
        a.result().stdout_ref.sha256}  # type: ignore[union-attr]
    # ... and each delivered object is kept for d too (a data ref of kind job)
    assert all(("job", d.job) in {(k, r) for k, r, _ in grid.store.data_refs(i["sha256"])}
               for i in inputs)


@ONE_BROKER
def test_three_stages_submitted_before_any_worker_runs(grid: GridHarness) -> None:
    """The client submits the whole pipeline at once, with no worker online: nothing
    waits in the client, the grid runs the stages in order once a worker comes."""
    start_jobs_coordinator(grid)
    client = alice(grid)
    one = client.submit("echo hello > x.txt", outputs=["x.txt"])
    two = client.submit("tr a-z A-Z < x.txt > y.txt", inputs={"x.txt": one.output("x.txt")},
                        outputs=["y.txt"])
    three = client.submit("rev y.txt", inputs={"y.txt": two.output("y.txt")})
    assert [client.jobs.show(f.job).job["state"] for f in (one, two, three)] == [
        "queued", "queued", "queued"]
    assert client.jobs.show(three.job).job["spec"]["inputs"] == [
        {"name": "y.txt", "job": two.job, "output": "y.txt"}]
    agent(grid, "w1", slots=2)
    result = three.result(timeout=90)
    assert result.ok, result
    assert result.stdout == b"OLLEH\n"


@ONE_BROKER
def test_a_parent_without_the_output_holds_the_child(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    client = alice(grid)
    parent = client.submit("echo no file", outputs=["*.txt"])
    child = client.submit("cat in.txt", inputs={"in.txt": parent.output("missing.txt")})
    assert parent.result(timeout=60).ok
    wait_for(lambda: client.jobs.show(child.job).job["state"] == "held", 30,
             message="the child held for its missing input")
    job = client.jobs.show(child.job).job
    assert job["hold_code"] == "input"
    assert "input_missing" in job["hold_reason"]
    assert "missing.txt" in job["hold_reason"]
    assert client.jobs.show(child.job).attempts == []  # never reached a worker


@ONE_BROKER
def test_future_inputs_are_bounded_and_the_submitters_own(grid: GridHarness) -> None:
    start_jobs_coordinator(grid)
    client = alice(grid)
    mine = client.submit("true", worker="nobody")
    bob = grid.client("bob", "client")
    with pytest.raises(ClientError, match="no job"):
        bob.submit("cat x", inputs={"x": mine.output("x")})
    with pytest.raises(ValueError, match="not an output name"):
        mine.output("../etc/passwd")
    spec = client.jobs.spec("cat x", inputs={"x": mine.output("x")})
    spec["inputs"][0]["output"] = "../x"  # a hand-made spec: the schema refuses it
    with pytest.raises(ClientError, match=r"inputs\[0\] cannot be validated"):
        client.jobs.submit_specs([spec])
    spec["inputs"][0].update(output="x", sha256="0" * 64)  # both forms: one or the other
    with pytest.raises(ClientError, match=r"inputs\[0\] cannot be validated"):
        client.jobs.submit_specs([spec])
    # many futures of one job: one parent
    many = {f"in{i}": mine.output(f"o{i}") for i in range(65)}
    spec = client.jobs.spec("true", inputs=many)
    assert spec["after"] == [mine.job]  # the same parent, once
    assert client.jobs.submit_specs([spec])[0].job.startswith("j-")


def _args(file: Path, **extra: object) -> argparse.Namespace:
    return argparse.Namespace(file=str(file), json=False, wait=True, check=False, **extra)


def test_workflow_diamond_then_rescue_reruns_only_what_failed(
        grid: GridHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=4)
    client = alice(grid)
    config = grid.config_for("alice")
    wf_file = tmp_path / "diamond.toml"
    wf_file.write_text(DIAMOND)
    (tmp_path / "flag.txt").write_text("broken\n")
    assert cmd_workflow_run(_args(wf_file), config) == 1  # c fails, d is held
    out = capsys.readouterr()
    assert "did not complete" in out.err
    first = _states(client, wf_file)
    assert {n: s for n, (_, s) in first.items()} == {
        "a": "completed", "b": "completed", "c": "failed", "d": "held"}
    d_job = client.jobs.show(first["d"][0]).job
    assert d_job["hold_code"] == "dependency"
    assert first["c"][0] in d_job["hold_reason"]
    # Fix c (its local input file) and rerun: a and b are kept, c and d run again.
    (tmp_path / "flag.txt").write_text("ok\n")
    before = {j["id"] for j in client.jobs.ls()}
    assert cmd_workflow_run(_args(wf_file), config) == 0
    second = _states(client, wf_file)
    assert {n: s for n, (_, s) in second.items()} == dict.fromkeys("abcd", "completed")
    assert second["a"][0] == first["a"][0]
    assert second["b"][0] == first["b"][0]
    assert second["c"][0] != first["c"][0]
    after = {j["id"] for j in client.jobs.ls()}
    assert after - before == {second["c"][0], second["d"][0]}  # nothing new for a, b
    assert client.jobs.show(first["d"][0]).job["state"] == "cancelled"  # the held one
    assert client.jobs.result(second["d"][0]).stdout == b"b1\nb2\nb3\nb4\nb5\n5\n"
    # A third run finds everything completed: nothing is submitted.
    assert cmd_workflow_run(_args(wf_file), config) == 0
    assert {j["id"] for j in client.jobs.ls()} == after
    assert "a: kept" in capsys.readouterr().err
    assert cmd_workflow_status(_args(wf_file), config) == 0
    table = capsys.readouterr().out
    assert second["d"][0] in table
    assert table.count("completed") == 4
    # Editing a node reruns it and what depends on it, never its parents.
    wf_file.write_text(DIAMOND.replace("tail -n 1", "head -n 1"))
    assert cmd_workflow_run(_args(wf_file), config) == 0
    third = _states(client, wf_file)
    assert [third[n][0] == second[n][0] for n in "abcd"] == [True, True, False, False]
    assert client.jobs.result(third["d"][0]).stdout.endswith(b"b5\n1\n")


def _states(client: Grid, wf_file: Path) -> dict[str, tuple[str, str]]:
    from client.workflow import status

    rows = status(client, load(wf_file))
    assert len({n for n, _, _ in rows}) == len(rows)  # one job per node here
    return {n: (j, s) for n, j, s in rows}


def test_cycles_and_unknown_names_are_refused_by_name(tmp_path: Path) -> None:
    wf = tmp_path / "bad.toml"
    wf.write_text('[jobs.a]\ncommand = "true"\nafter = ["c"]\n'
                  '[jobs.b]\ncommand = "true"\ninputs = { x = { job = "a" } }\n'
                  '[jobs.c]\ncommand = "true"\nafter = ["b"]\n'
                  '[jobs.ok]\ncommand = "true"\n')
    with pytest.raises(WorkflowError, match=r"cycle: (a -> b -> c -> a|b -> c -> a -> b|"
                                            r"c -> a -> b -> c)"):
        load(wf)
    wf.write_text('[jobs.a]\ncommand = "true"\nafter = ["nope"]\n')
    with pytest.raises(WorkflowError, match="'a' depends on 'nope'"):
        load(wf)
    wf.write_text('[jobs.a]\ncommand = "true"\nmemroy = "1G"\n')
    with pytest.raises(WorkflowError, match=r"unknown key.*memroy"):
        load(wf)
    wf.write_text('[jobs.a]\ncommand = "true"\ncount = 2\n'
                  '[jobs.b]\ncommand = "true"\ninputs = { x = { job = "a", output = "o" } }\n')
    with pytest.raises(WorkflowError, match="ambiguous"):
        load(wf)
    wf.write_text("[jobs.a\n")
    with pytest.raises(WorkflowError, match="not valid TOML"):
        load(wf)
    wf.write_text(DIAMOND)
    assert load(wf).levels == [["a"], ["b", "c"], ["d"]]
    assert not (tmp_path / "bad.toml.rescue.json").exists()  # nothing submitted, no grid


@ONE_BROKER
def test_the_documented_example_runs(grid: GridHarness, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """docs/examples/pipeline.toml: three stages from a workflow file, as documented."""
    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    for name in ("pipeline.toml", "data.txt"):
        (tmp_path / name).write_bytes((examples / name).read_bytes())
    start_jobs_coordinator(grid)
    agent(grid, "w1", slots=2)
    config = grid.config_for("alice")
    assert cmd_workflow_run(_args(tmp_path / "pipeline.toml"), config) == 0
    rows = {n: j for n, j, _ in _rows(capsys.readouterr().out)}
    assert list(rows) == ["split", "left", "right", "total"]
    client = alice(grid)
    assert client.jobs.result(rows["total"]).stdout == b"12\n"
    assert client.jobs.result(rows["left"]).stdout == b"5\n"


def _rows(table: str) -> list[tuple[str, str, str]]:
    lines = table.strip().splitlines()
    assert lines[0].split() == ["NODE", "JOB", "STATE"]
    return [(p[0], p[1], p[2]) for p in (line.split() for line in lines[1:])]
