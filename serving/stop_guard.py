"""The bound on `capaserve serve`'s stop when Ray's own processes got the signal too.

systemd's default `KillMode=control-group` and a terminal's Ctrl-C signal every process of
the server, Ray's raylet, GCS and workers included. They exit at once, and then the drain
call to the (gone) ingress and `ray.shutdown()` wait on a GCS that is not coming back:
Ray's reconnect timeout is 60 s (an exit 61 s after SIGTERM was seen). So, on a local
cluster, the command:

* records the processes it started (its descendants, by pid and start time, read from
  /proc), when serving starts and again when the signal comes;
* if the raylet or GCS it started is gone shortly after the signal, skips the drain (the
  replicas holding requests received the signal as well) and the Ray shutdown, ends what
  is left of its processes and exits;
* in every case arms a watchdog that, at the drain timeout + the stop budget, ends any of
  its processes still alive and exits, so the promise (drain timeout + 5 s, nothing left
  behind) holds whatever Ray does.

Linux only (/proc); elsewhere it records nothing and only the watchdog's exit applies.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("capaserve.serve")

#: A process, as (pid, start time in clock ticks): a pid reused later is not mistaken for it.
Proc = tuple[int, int]


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time, state) of `pid` from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> set[Proc]:
    """Every live process below `root`."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
            children.setdefault(st[0], []).append(int(entry))
    out: set[Proc] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add((child, stats[child][1]))
            todo.append(child)
    return out


def alive(proc: Proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1] and st[2] not in ("Z", "X")


def end(procs: set[Proc]) -> int:
    """SIGKILL every process of `procs` still alive; how many were."""
    n = 0
    for proc in procs:
        if alive(proc):
            try:
                os.kill(proc[0], signal.SIGKILL)
                n += 1
            except OSError:
                pass
    return n


class StopGuard:
    """What `capaserve serve` started, and the watchdog on its stop."""

    def __init__(self, node_pids: list[int]) -> None:
        self.node = {p for p in descendants(os.getpid()) if p[0] in node_pids}
        self.started: set[Proc] = descendants(os.getpid())

    def record(self) -> None:
        self.started |= descendants(os.getpid())

    def ray_was_signalled(self, wait_s: float = 0.5) -> bool:
        """Whether the raylet or GCS this command started is gone within `wait_s` of the signal."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.node and not all(alive(p) for p in self.node):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def arm(self, budget_s: float, exit_now: Callable[[int], None]) -> None:
        """In `budget_s` seconds, end every process this command started and exit, if still here."""

        def fire() -> None:
            time.sleep(budget_s)
            n = end(self.started | descendants(os.getpid()))
            log.warning("stop took longer than %.1f s: ended %d leftover process(es) and exiting", budget_s, n)
            exit_now(0)

        threading.Thread(target=fire, name="capaserve-stop-watchdog", daemon=True).start()

    def end_all(self) -> int:
        return end(self.started | descendants(os.getpid()))


def node_pids() -> list[int]:
    """The pids of the local Ray node's own processes (raylet, GCS, ...), started by this process."""
    try:
        from ray._private import worker  # deferred: Ray is imported by the caller already

        node = worker._global_node
        return [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]
    except Exception:  # noqa: BLE001 - no node info: the watchdog alone bounds the stop
        return []
