"""Crash-test pause points: named moments where a test can SIGKILL the coordinator.

`pause_point(name)` is a no-op unless the environment variable INTELLECT_COORD_PAUSE_AT names this
point (comma-separated list). Then the thread that reaches it writes the name to the file
$INTELLECT_COORD_PAUSE_FILE and stops there for good, so that a test can SIGKILL the process at
exactly this moment (tests/coordinator/test_crash.py).

Points: intake.validating (file in the inbox, no verdict), intake.stored (file moved to accepted/,
its verdict not yet in the ledger), intake.recorded (verdict committed, the node not yet answered),
train.trained (optimizer stepped, nothing saved), train.saved (checkpoint whole, not published).

What this module does not know: what happens at each point; callers name them.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

PAUSE_AT_ENV = "INTELLECT_COORD_PAUSE_AT"
PAUSE_FILE_ENV = "INTELLECT_COORD_PAUSE_FILE"


def pause_point(name: str) -> None:
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted or name not in wanted.split(","):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        tmp = f"{marker}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(name)
        os.replace(tmp, marker)
    logger.warning("paused at %s (%s): waiting to be killed", name, PAUSE_AT_ENV)
    threading.Event().wait()
