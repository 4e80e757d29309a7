"""Workflow files: a TOML file of jobs and their edges, submitted as one pipeline, with a
rescue file so a rerun reruns only what did not complete (HTCondor DAGMan's rescue DAG;
docs/jobs.md, "Workflow files").

    [jobs.split]
    command = "split -n l/2 data.txt part."
    inputs = { "data.txt" = "data.txt" }          # a local file (next to this file)
    outputs = ["part.*"]

    [jobs.count]
    command = "wc -l < part.aa"
    inputs = { "part.aa" = { job = "split", output = "part.aa" } }   # a future input

Edges come from ``after = ["node", ...]`` and from future inputs; cycles and unknown names
are refused before anything is submitted. Nodes are submitted level by level (each level
in one ``jobs.submit``: parents must exist before their children name them), with the
grid's ``after`` and future inputs, so nothing waits here. ``FILE.rescue.json`` records
each node's job ids and the hash of its definition (its table, the defaults, and its
local files' contents). On a rerun a recorded node is kept when it completed, or is still
queued or running, and its hash and every ancestor are kept too; otherwise (failed,
cancelled, held, forgotten, edited, or downstream of a rerun node) it is submitted again,
and what is left of its earlier jobs (held, or queued/running when edited or downstream
of a rerun) is cancelled first.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.errors import InvalidRequest
from client.job_results import STREAMS, JobOutputRef
from client.jobs import JobStore
from client.reservation import Refused
from schemas.job_messages import MAX_JOBS_PER_REQUEST, TERMINAL_JOB_STATES

if TYPE_CHECKING:
    from client.api import Grid

RESCUE_SUFFIX = ".rescue.json"
RESCUE_VERSION = 1
MAX_NODES = 10_000
MAX_COUNT = 1000
NODE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Keys a node may have beyond JobStore.spec's keyword arguments.
OWN_KEYS = frozenset({"command", "count", "after", "inputs"})
NOT_KEYS = frozenset({"name", "index", "after"})  # set by the workflow itself
KEEP_STATES = frozenset({"completed", "queued", "running"})
WAIT_POLL_S = 1.0


class WorkflowError(InvalidRequest):
    """The workflow file is wrong (the message names the file, the node, the key)."""


def _spec_keys() -> frozenset[str]:
    params = inspect.signature(JobStore.spec).parameters
    return frozenset(n for n, p in params.items()
                     if p.kind is inspect.Parameter.KEYWORD_ONLY) - NOT_KEYS


@dataclass
class Node:
    """One ``[jobs.NAME]`` table: its options (defaults applied) and its edges."""

    name: str
    options: dict[str, Any]
    after: list[str]
    refs: dict[str, tuple[str, str]]  # input name -> (node, output)
    files: dict[str, str]  # input name -> a local path, a SHA-256 or a data ref name
    count: int = 1

    @property
    def parents(self) -> list[str]:
        return list(dict.fromkeys([*self.after, *(n for n, _ in self.refs.values())]))


@dataclass
class Workflow:
    path: Path
    nodes: dict[str, Node]
    levels: list[list[str]] = field(default_factory=list)

    @property
    def rescue_path(self) -> Path:
        return self.path.with_name(self.path.name + RESCUE_SUFFIX)

    def node_hash(self, name: str) -> str:
        """What a node is: its options, its edges, and its local input files' contents
        (an edited node, or an edited file, reruns)."""
        node = self.nodes[name]
        files: dict[str, str] = {}
        for key, value in sorted(node.files.items()):
            path = self.local(value)
            files[key] = _file_sha256(path) if path is not None else value
        doc = {"options": node.options, "after": node.after, "count": node.count,
               "refs": {k: list(v) for k, v in sorted(node.refs.items())}, "files": files}
        text = json.dumps(doc, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def local(self, value: str) -> Path | None:
        """``value`` as a local file (relative to the workflow file), or None."""
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.path.parent / path
        return path if path.is_file() else None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load(path: str | os.PathLike[str]) -> Workflow:
    """Read and check a workflow file: every name known, no cycle (``WorkflowError``)."""
    file = Path(path)
    try:
        doc = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise WorkflowError(f"cannot read {file}: {err.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise WorkflowError(f"{file}: not valid TOML: {err}") from None
    unknown = set(doc) - {"jobs", "defaults"}
    if unknown:
        raise WorkflowError(f"{file}: unknown table(s) {', '.join(sorted(unknown))} "
                            "(a workflow has [defaults] and [jobs.NAME] tables)")
    jobs, defaults = doc.get("jobs"), doc.get("defaults", {})
    if not isinstance(jobs, dict) or not jobs:
        raise WorkflowError(f"{file}: no jobs (add [jobs.NAME] tables)")
    if not isinstance(defaults, dict):
        raise WorkflowError(f"{file}: [defaults] must be a table")
    if len(jobs) > MAX_NODES:
        raise WorkflowError(f"{file}: at most {MAX_NODES} jobs")
    keys = _spec_keys() | OWN_KEYS
    nodes = {name: _node(file, name, table, defaults, keys) for name, table in jobs.items()}
    wf = Workflow(file, nodes)
    for node in nodes.values():
        for parent in node.parents:
            if parent not in nodes:
                raise WorkflowError(f"{file}: job {node.name!r} depends on {parent!r}, "
                                    "which is not a job of this file")
        for key, (parent, _) in node.refs.items():
            if nodes[parent].count != 1:
                raise WorkflowError(f"{file}: job {node.name!r} input {key!r} names an "
                                    f"output of {parent!r}, which runs {nodes[parent].count} "
                                    "times (count): which one is ambiguous")
    wf.levels = levels(nodes)
    return wf


def _node(file: Path, name: Any, table: Any, defaults: dict[str, Any],
          keys: frozenset[str]) -> Node:
    where = f"{file}: job {name!r}"
    if not isinstance(name, str) or not NODE_NAME.match(name):
        raise WorkflowError(f"{where}: names are 1-64 letters, digits, '_', '.', '-'")
    if not isinstance(table, dict):
        raise WorkflowError(f"{where}: must be a table ([jobs.{name}])")
    options = {**defaults, **table}
    bad = sorted(set(options) - keys)
    if bad:
        raise WorkflowError(f"{where}: unknown key(s) {', '.join(bad)} "
                            f"(known: {', '.join(sorted(keys))})")
    if "app" in options:  # a registered application (docs/jobs.md, Applications as jobs)
        if "command" in options or not isinstance(options["app"], str):
            raise WorkflowError(f"{where}: app is an application's name, and a job has "
                                "a command or an app, not both")
    elif not isinstance(options.get("command"), (str, list)) or not options["command"]:
        raise WorkflowError(f"{where}: needs a command (a string or a list of words) "
                            "or an app")
    after = options.pop("after", [])
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise WorkflowError(f"{where}: after is a list of job names")
    count = options.pop("count", 1)
    if not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise WorkflowError(f"{where}: count is 1 to {MAX_COUNT}")
    inputs = options.pop("inputs", {})
    if not isinstance(inputs, dict):
        raise WorkflowError(f"{where}: inputs is a table of name = path | {{job, output}}")
    refs: dict[str, tuple[str, str]] = {}
    files: dict[str, str] = {}
    for key, value in inputs.items():
        if isinstance(value, str):
            files[key] = value
        elif (isinstance(value, dict) and set(value) <= {"job", "output"}
              and isinstance(value.get("job"), str)
              and isinstance(value.get("output", "stdout"), str)):
            refs[key] = (value["job"], value.get("output", "stdout"))
        else:
            raise WorkflowError(f"{where}: input {key!r} is a path or "
                                "{ job = \"name\", output = \"file\" | \"stdout\" }")
    return Node(name, options, after, refs, files, count)


def levels(nodes: dict[str, Node]) -> list[list[str]]:
    """The nodes by depth (parents before children); ``WorkflowError`` naming a cycle."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    depth: dict[str, int] = {}
    for start in nodes:
        if state.get(start) == 2:
            continue
        path: list[str] = []
        stack: list[tuple[str, Iterable[str]]] = [(start, iter(nodes[start].parents))]
        state[start] = 1
        path.append(start)
        while stack:
            name, todo = stack[-1]
            nxt = next(iter(todo), None)
            if nxt is None:
                stack.pop()
                path.pop()
                state[name] = 2
                depth[name] = 1 + max((depth[p] for p in nodes[name].parents), default=-1)
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                raise WorkflowError("the workflow has a cycle: " + " -> ".join(reversed(cycle)))
            if state.get(nxt) != 2:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(nodes[nxt].parents)))
    out: list[list[str]] = [[] for _ in range(1 + max(depth.values(), default=-1))]
    for name in nodes:
        out[depth[name]].append(name)
    return out


# -- the rescue file ---------------------------------------------------------------------


def read_rescue(wf: Workflow) -> dict[str, dict[str, Any]]:
    """node -> {jobs: [ids], hash} from the rescue file; {} when there is none."""
    try:
        doc = json.loads(wf.rescue_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise WorkflowError(f"cannot read the rescue file {wf.rescue_path}: {err} "
                            "(remove it to start over)") from None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if doc.get("version") != RESCUE_VERSION or not isinstance(nodes, dict):
        raise WorkflowError(f"{wf.rescue_path} is not a rescue file of this version "
                            "(remove it to start over)")
    return {str(k): v for k, v in nodes.items()
            if isinstance(v, dict) and isinstance(v.get("jobs"), list)}


def write_rescue(wf: Workflow, record: dict[str, dict[str, Any]]) -> None:
    """Atomically: a crash leaves the old file or the new one."""
    doc = {"version": RESCUE_VERSION, "workflow": wf.path.name, "updated_at": time.time(),
           "nodes": record}
    tmp = wf.rescue_path.with_name(wf.rescue_path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, wf.rescue_path)


def job_states(grid: Grid, ids: Iterable[str]) -> dict[str, str]:
    """id -> state ("unknown" for a job the grid no longer has)."""
    wanted = list(dict.fromkeys(ids))
    if len(wanted) > 20:  # one listing of our jobs is cheaper than many shows
        listed = {str(j["id"]): str(j["state"]) for j in grid.jobs.ls()}
        return {j: listed.get(j, "unknown") for j in wanted}
    states: dict[str, str] = {}
    for job in wanted:
        try:
            states[job] = str(grid.jobs.show(job).job["state"])
        except Refused as err:
            if err.code not in ("not_found", "forbidden"):
                raise
            states[job] = "unknown"
    return states


# -- running -----------------------------------------------------------------------------


@dataclass
class NodeRun:
    name: str
    jobs: list[str]
    action: str  # "kept" (recorded job stands) or "submitted"
    state: str = ""


def run(grid: Grid, wf: Workflow, *, say: Callable[[str], None] = lambda _: None
        ) -> dict[str, NodeRun]:
    """Submit what the rescue file does not show completed or under way (module
    docstring); returns each node's jobs and what was done."""
    record = read_rescue(wf)
    hashes = {name: wf.node_hash(name) for name in wf.nodes}
    known = [j for name in wf.nodes for j in record.get(name, {}).get("jobs", [])]
    states = job_states(grid, known) if known else {}
    runs: dict[str, NodeRun] = {}
    cancel: list[str] = []
    for level in wf.levels:
        for name in level:
            old = record.get(name)
            jobs = [str(j) for j in old["jobs"]] if old else []
            node_states = [states.get(j, "unknown") for j in jobs]
            reran = [p for p in wf.nodes[name].parents if runs[p].action == "submitted"]
            edited = old is not None and old.get("hash") != hashes[name]
            if (jobs and not reran and not edited
                    and all(s in KEEP_STATES for s in node_states)):
                state = "completed" if set(node_states) == {"completed"} else node_states[0]
                runs[name] = NodeRun(name, jobs, "kept", state)
                continue
            # resubmitted: what is left of its earlier jobs is cancelled (no duplicates)
            cancel += [j for j, s in zip(jobs, node_states, strict=True)
                       if s in ("queued", "running", "held")]
            runs[name] = NodeRun(name, [], "submitted")
    if cancel:
        say(f"cancelling {len(cancel)} held or outdated job(s) of an earlier run")
        grid.jobs.cancel(cancel)
    for level in wf.levels:
        todo = [name for name in level if runs[name].action == "submitted"]
        specs: list[dict[str, Any]] = []
        owners: list[str] = []
        for name in todo:
            for spec in _specs(grid, wf, wf.nodes[name], runs):
                specs.append(spec)
                owners.append(name)
        for start in range(0, len(specs), MAX_JOBS_PER_REQUEST):
            futures = grid.jobs.submit_specs(specs[start:start + MAX_JOBS_PER_REQUEST])
            for name, fut in zip(owners[start:], futures, strict=False):
                runs[name].jobs.append(fut.job)
        for name in todo:
            record[name] = {"jobs": runs[name].jobs, "hash": hashes[name]}
            runs[name].state = "queued"
        for name in level:
            if runs[name].action == "kept":
                record[name] = {"jobs": runs[name].jobs, "hash": hashes[name]}
        write_rescue(wf, {n: record[n] for n in wf.nodes if n in record})
    for name, node_run in runs.items():
        verb = "kept" if node_run.action == "kept" else "submitted"
        say(f"{name}: {verb} {' '.join(node_run.jobs)} ({node_run.state})")
    return runs


def _specs(grid: Grid, wf: Workflow, node: Node, runs: dict[str, NodeRun]
           ) -> list[dict[str, Any]]:
    """The JobSpecs of one node (``count`` of them), its parents' jobs already known."""
    options = dict(node.options)
    command = options.pop("command", None)  # None: the node runs an app
    labels = {**(options.pop("labels", None) or {}), "workflow": wf.path.stem}
    if isinstance(options.get("stdin"), str):
        options["stdin"] = wf.local(options["stdin"]) or options["stdin"]
    inputs: dict[str, Any] = {}
    for key, value in node.files.items():
        path = wf.local(value)
        inputs[key] = path if path is not None else value  # else a SHA-256
    for key, (parent, output) in node.refs.items():
        if output not in STREAMS and (output.startswith("/") or ".." in Path(output).parts):
            raise WorkflowError(f"{wf.path}: job {node.name!r}: not an output name {output!r}")
        inputs[key] = JobOutputRef(runs[parent].jobs[0], output)
    after = [j for p in node.after for j in runs[p].jobs]
    try:
        base = grid.jobs.spec(command, inputs=inputs, after=after, name=node.name,
                              labels=labels, **options)
    except TypeError as err:
        raise WorkflowError(f"{wf.path}: job {node.name!r}: {err}") from None
    if node.count == 1:
        return [base]
    return [dict(base, index=i) for i in range(node.count)]


def status(grid: Grid, wf: Workflow) -> list[tuple[str, str, str]]:
    """(node, job, state) for every node of the file; job "-" when never submitted."""
    record = read_rescue(wf)
    ids = [j for name in wf.nodes for j in record.get(name, {}).get("jobs", [])]
    states = job_states(grid, ids) if ids else {}
    rows: list[tuple[str, str, str]] = []
    for level in wf.levels:
        for name in level:
            jobs = record.get(name, {}).get("jobs", [])
            if not jobs:
                rows.append((name, "-", "not submitted"))
            rows += [(name, str(j), states.get(str(j), "unknown")) for j in jobs]
    return rows


def wait(grid: Grid, ids: Iterable[str], *, poll_s: float = WAIT_POLL_S,
         timeout: float | None = None) -> dict[str, str]:
    """Poll until every job ended or is held (a held job waits for someone: the
    workflow stops there); their last states."""
    wanted = list(ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    closed = grid._closed
    while True:
        states = job_states(grid, wanted)
        if all(s in TERMINAL_JOB_STATES or s in ("held", "unknown") for s in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            return states
        closed.wait(poll_s)
