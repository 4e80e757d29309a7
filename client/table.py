"""Plain-text tables for the CLI and the shell."""

from __future__ import annotations

import time
from collections.abc import Sequence

from client.api import WorkerInfo


def human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(n)


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return "\n".join(lines)


def workers_table(workers: Sequence[WorkerInfo]) -> str:
    if not workers:
        return "no workers"
    headers = ["#", "ID", "NAME", "STATE", "CPUS", "MEMORY", "CPU%", "SLOTS", "TAGS",
               "LAST SEEN"]
    rows = [
        [
            str(w.index if w.index >= 0 else i),
            w.id,
            w.name,
            w.state,
            str(w.cpus),
            human_bytes(w.memory_bytes),
            "-" if w.cpu_percent is None else f"{w.cpu_percent:.0f}",
            f"{w.free_slots}/{w.slots}",
            ",".join(w.tags) or "-",
            ago(w.last_seen),
        ]
        for i, w in enumerate(workers)
    ]
    return render(headers, rows)


def worker_detail(w: WorkerInfo) -> str:
    host = w.caps.get("host", {})
    cpu = w.caps.get("cpu", {})
    docker = w.caps.get("docker") or {}
    shared = w.caps.get("shared") or {}
    lines = [
        f"worker      {w.id} ({w.name})",
        f"state       {w.state}, last seen {ago(w.last_seen)}",
        f"host        {host.get('hostname', '-')}  {host.get('os_release', host.get('os', ''))}"
        f"  {host.get('arch', '')}  python {host.get('python', '-')}",
        f"cpu         {cpu.get('count', '-')} x {cpu.get('model', '-')}",
        f"memory      {human_bytes(w.memory_bytes)}",
        f"slots       {w.free_slots}/{w.slots} free; executors {', '.join(w.executors) or '-'}",
        f"docker      {docker.get('version') or 'no engine'}",
        f"tags        {', '.join(w.tags) or '-'}",
        f"description {w.description or '-'}",
    ]
    for key in ("apps", "packages", "data"):
        if shared.get(key):
            lines.append(f"shared {key:<5}{', '.join(shared[key])}")
    if w.trust:  # replicated jobs' quorums (docs/jobs.md, "Replicas and quorum")
        lines.append(f"trust       {'trusted' if w.trust.get('trusted') else 'UNTRUSTED'}: "
                     f"{w.trust.get('valid', 0)} valid, {w.trust.get('invalid', 0)} invalid "
                     "replica results")
    m = w.last_metrics
    if m:
        lines.append(
            f"metrics     cpu {m.get('cpu_percent', 0):.0f}%  load {m.get('load1', 0):.2f}  "
            f"mem used {human_bytes(m.get('mem_used_bytes'))}  "
            f"disk free {human_bytes(m.get('disk_free_bytes'))}"
        )
    if w.events:
        lines.append("events")
        for e in w.events[:10]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("ts", 0)))
            lines.append(f"  {when}  {e.get('old_state') or '-'} -> {e.get('new_state')}  "
                         f"{e.get('reason', '')}")
    return "\n".join(lines)
