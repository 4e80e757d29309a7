"""Tie a child process's life to its parent's (``xcloud up`` starts workers and the
broker this way): the kernel sends SIGTERM when the parent dies (PR_SET_PDEATHSIG).

Done by the child itself after exec: nothing may run between fork and exec in a parent
with threads (``preexec_fn`` is unsafe there), and the parent-death signal follows the
parent's *thread* that forked, which is why ``xcloud up`` forks from its main thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask for ``sig`` when the parent dies; False if it has died already.

    The check comes after the prctl: a parent that died before it would not signal us,
    and then we are someone else's child (``getppid`` changed).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_PDEATHSIG) failed: %s",
                            os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as err:
            log.warning("cannot ask to die with the parent: %s", err)
    return os.getppid() == parent_pid
