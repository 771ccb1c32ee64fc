"""One trainer per workdir: ``DIR/LOCK`` names the process (pid, host, start time) that trains there.

The lock file is created atomically (``O_CREAT | O_EXCL``). A second trainer
refuses with a message naming the holder. A lock left by a trainer that died
(SIGKILL, a crash, a reboot) is stale and taken over, with a message: on the
same host when its process no longer exists (or the pid now belongs to a
process that started later); on another host it cannot be checked, so the
message says to remove the file once that trainer is known to be gone. In a
multi-host run process 0 holds the lock and every process learns whether it
got it. Samplers and evaluators only read and take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from trainers.errors import RunError

LOCK = "LOCK"


class WorkdirLockedError(RunError):
    """Another trainer holds the workdir."""


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid')} on host {holder.get('host')!r}, started {when}"


def is_stale(holder: dict) -> bool:
    """Whether the trainer that wrote ``holder`` is certainly gone (only checkable on this host)."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        return True
    recorded, now = holder.get("proc_start"), _process_start_time(pid)
    return recorded is not None and now is not None and recorded != now  # the pid was reused


class WorkdirLock:
    """``with WorkdirLock(workdir):`` or ``acquire()`` / ``release()``; only process 0 touches the file."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir).absolute() / LOCK
        self.held = False

    def _try_create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "proc_start": _process_start_time(os.getpid())}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"pid": None, "host": "?"}  # a half-written lock: its writer died while writing

    def _acquire_here(self) -> str:
        """'' when acquired, 'reentrant' when this process holds it already, else why it could not be."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a concurrent remove/create between our steps: try again
            if self._try_create():
                return ""
            holder = self._holder()
            if not holder:
                continue
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                return "reentrant"  # this process holds it already (an enclosing call releases it)
            if is_stale(holder):
                print(f"taking over the stale lock {self.path} ({_describe(holder)}: that process is gone)",
                      flush=True)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            other_host = holder.get("host") != socket.gethostname()
            return (f"{self.path.parent} is in use by another trainer ({_describe(holder)}); wait for it to "
                    "finish or stop it, or use another --workdir" +
                    (f". If that trainer is gone (it ran on another host, so this cannot be checked), "
                     f"remove {self.path}" if other_host else ""))
        return f"could not create {self.path} (it keeps reappearing); is another trainer starting?"

    def acquire(self) -> "WorkdirLock":
        import jax

        reason = ""
        if jax.process_index() == 0:
            reason = self._acquire_here()
            self.held = not reason
            if reason == "reentrant":
                reason = ""
        if jax.process_count() > 1:  # every process stops if process 0 did not get the lock
            import numpy as np
            from jax.experimental import multihost_utils

            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(not reason)))
            if not ok and not reason:
                reason = f"process 0 could not lock {self.path} (see its log)"
        if reason:
            raise WorkdirLockedError(reason)
        return self

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
