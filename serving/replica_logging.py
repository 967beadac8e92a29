"""capaserve's log lines inside Ray Serve replicas: to the replica's stderr, one handler per process.

In Serve's throughput-optimized mode a replica's Python logging goes to Serve's per-replica
log file only, so a warning such as "adapter registry unreachable" never reached the
operator. A replica's stderr is kept in Ray's worker log and streamed to the driver, where
`capaserve serve` prints it, as the access log already was.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stderr() -> None:
    """Give the `capaserve` logger (INFO and up) a stderr handler, once per process."""
    logger = logging.getLogger("capaserve")
    if any(getattr(h, "capaserve_stderr", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.__stderr__)  # Serve may have replaced sys.stderr by then
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.capaserve_stderr = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one line per record; Serve's own handlers would add a second
