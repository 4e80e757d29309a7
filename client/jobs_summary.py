"""``xcloud jobs --summary``: each principal's jobs and share of the busy slots
(docs/jobs.md, "Fair share and locality").

``summary(grid)`` asks the coordinator (``jobs.summary``); ``summary_text`` is what the
CLI prints. An admin gets every principal's line; a client its own line and the totals
of all principals (no other principal's name or counts).
"""

from __future__ import annotations

from typing import Any

from schemas.job_messages import JobsSummary, JobsSummaryReply

COLUMNS = ("queued", "waiting", "running", "held", "completed", "failed")


def summary(grid: Any) -> dict[str, Any]:
    """The ``jobs.summary.reply`` fields (a ``client.api.Grid``)."""
    reply: JobsSummaryReply = grid.ask(JobsSummary(), what="summarise jobs")
    return reply.to_dict()


def _pct(value: Any) -> str:
    return f"{float(value or 0) * 100:.0f}%"


def summary_text(reply: dict[str, Any]) -> str:
    """One line per principal, then the totals; SHARE is of the busy slots now, TARGET
    what the weights give it while it has work."""
    from client.table import render

    headers = ["PRINCIPAL", *(c.upper() for c in COLUMNS), "SLOTS", "WEIGHT", "SHARE",
               "TARGET"]
    rows = [[str(r.get("principal")), *(str(r.get(c, 0)) for c in COLUMNS),
             str(r.get("slots", 0)), f"{float(r.get('weight') or 0):g}",
             _pct(r.get("busy_share")), _pct(r.get("target_share"))]
            for r in reply.get("lines") or () if isinstance(r, dict)]
    totals = reply.get("totals") or {}
    rows.append(["(all)", *(str(totals.get(c, 0)) for c in COLUMNS),
                 str(totals.get("slots", 0)), "", "100%" if totals.get("slots") else "0%",
                 ""])
    lines = [render(headers, rows)]
    window = float(reply.get("window_s") or 0)
    lines.append(f"\n{totals.get('owners', 0)} principal(s) with jobs, "
                 f"{totals.get('active', 0)} with queued or running work; completed and "
                 f"failed: the last {window / 3600:g} h")
    if reply.get("more"):
        lines.append("(the busiest principals only: more are left out)")
    if reply.get("fair_share") is False:
        lines.append("fair share is off ([jobs] fair_share = false): one queue by priority")
    return "\n".join(lines)
