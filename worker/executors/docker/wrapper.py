"""The shell side of the docker driver: the scripts that run inside a session container.

All POSIX ``sh`` (dash and busybox ash), each passed as ``/bin/sh -c SCRIPT xcloud ARGS``
so a client's command or id is always an argument, never pasted into shell text. They
keep per-command state in the container: ``/tmp/.xcloud/KEY.pid`` (the command's process
group and the memory cgroup's OOM counter at start) and, on the bind-mounted work dir,
``/work/.xcloud/cwd`` (the directory the last command ended in) and ``KEY.oom`` markers.
``KEY`` is ``task_key(task_id)``: a client-chosen id never steers a path.
"""

from __future__ import annotations

import hashlib

# Every command runs as: /bin/sh -c WRAPPER xcloud KEY COMMAND. POSIX sh (dash and
# busybox ash). It records "PID OOMCOUNT" in /tmp/.xcloud/KEY.pid (the exec is its own
# session and process-group leader, so PID is the group signal() targets; OOMCOUNT is
# the memory cgroup's oom_kill counter at start), starts in the directory the previous
# command ended in, evals the command in this shell (so a `cd` is seen by the EXIT
# trap) and on the way out saves the final directory and, if the OOM counter went up
# meanwhile, leaves /work/.xcloud/KEY.oom for the executor to find on the host. When
# the wrapper itself is SIGKILLed (exit status 137, no trap), wait() compares the
# counter from inside instead (POSTMORTEM_SCRIPT), so the pid file is kept for that.
WRAPPER = r"""__xc_k=$1 __xc_c=$2
shift 2
__xc_oom() {
  __xc_n=0
  for __xc_f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
    if [ -r "$__xc_f" ]; then
      while read -r __xc_a __xc_b; do
        if [ "$__xc_a" = oom_kill ]; then __xc_n=$__xc_b; fi
      done < "$__xc_f"
    fi
  done
}
__xc_oom
__xc_o=$__xc_n
[ -d /tmp/.xcloud ] || mkdir -p /tmp/.xcloud
echo "$$ $__xc_o" > "/tmp/.xcloud/$__xc_k.pid"
__xc_w=/work
[ -r /work/.xcloud/cwd ] && IFS= read -r __xc_w < /work/.xcloud/cwd
cd "$__xc_w" 2>/dev/null || cd /work
trap '__xc_r=$?
{ [ -d /work/.xcloud ] || mkdir -p /work/.xcloud; pwd > /work/.xcloud/cwd
  __xc_oom; [ "$__xc_n" -gt "$__xc_o" ] && : > "/work/.xcloud/$__xc_k.oom"; } 2>/dev/null
if [ "$__xc_r" != 137 ] || [ -e "/work/.xcloud/$__xc_k.oom" ]; then
  rm -f "/tmp/.xcloud/$__xc_k.pid"
fi' EXIT
unset __xc_f __xc_a __xc_b __xc_w __xc_n
eval "$__xc_c"
"""

# /bin/sh -c SIGNAL_SCRIPT xcloud KEY SIGNAME: signal the command's process group. The
# pid file is written by the wrapper's first lines; the bounded wait covers a signal
# sent within milliseconds of start(). busybox's kill wants "-PGID", dash's "-- -PGID"
# (and rejects the former without sending anything).
SIGNAL_SCRIPT = r"""f=/tmp/.xcloud/$1.pid i=0
while [ ! -s "$f" ]; do
  i=$((i + 1)); [ "$i" -gt 300 ] && exit 3
  sleep 0.01
done
read -r p o < "$f"
kill -s "$2" "-$p" 2>/dev/null || kill -s "$2" -- "-$p"
"""

# /bin/sh -c POSTMORTEM_SCRIPT xcloud KEY: after an exit status of 137, print
# "OOM_AT_START OOM_NOW" ("-" when unknown) and drop the pid file.
POSTMORTEM_SCRIPT = r"""f=/tmp/.xcloud/$1.pid p=- o=- n=-
[ -r "$f" ] && read -r p o < "$f"
rm -f "$f"
for g in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
  if [ -r "$g" ]; then
    while read -r a b; do [ "$a" = oom_kill ] && n=$b; done < "$g"
  fi
done
echo "$o $n"
"""

# /bin/sh -c SIGNAL_ALL_SCRIPT xcloud SIGNAME: signal every command's process group in
# the container; prints how many. Used by close_session (TERM before the container
# goes) and recover (KILL: after a worker restart, the previous agent's commands can no
# longer report to anyone).
SIGNAL_ALL_SCRIPT = r"""n=0
for f in /tmp/.xcloud/*.pid; do
  [ -r "$f" ] || continue
  read -r p o < "$f" || continue
  { kill -s "$1" "-$p" || kill -s "$1" -- "-$p"; } 2>/dev/null && n=$((n + 1))
  if [ "$1" = KILL ]; then rm -f "$f"; fi
done
echo "$n"
"""


def task_key(task_id: str) -> str:
    """A file-name-safe, fixed-length key for a task id chosen by a client."""
    return hashlib.sha256(task_id.encode()).hexdigest()[:24]


def oom_count(text: str) -> int | None:
    """An OOM counter as POSTMORTEM_SCRIPT prints it ("-" when unknown)."""
    return int(text) if text.isdigit() else None
