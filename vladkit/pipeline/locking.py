"""Locks between processes: one job per output folder, one numba compilation at a time.

Both are ``flock`` locks on a file (POSIX): the kernel releases them when their holder
exits, however it exits (``SIGKILL`` included), so a killed job never leaves a stale lock
that a user would have to remove by hand.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import tempfile
import threading

try:
    import fcntl
except ImportError:  # Windows: no flock; the locks are no-ops there (documented)
    fcntl = None

__all__ = ["FolderLockedError", "folder_lock", "machine_lock"]

#: The lock file of an output folder. It stays in the folder (empty between jobs):
#: removing it while another process has it open would let two processes each lock a
#: different file of the same name.
LOCK_FILE = ".vladkit.lock"


class FolderLockedError(OSError):
    """Another process is writing to this output folder.

    Attributes
    ----------
    folder : str
    holder : dict
        What the holder wrote in the lock file: ``pid``, ``host``, ``started`` (ISO 8601)
        and ``command``; empty if it had not written it yet.
    """

    def __init__(self, folder, holder):
        self.folder, self.holder = os.fspath(folder), dict(holder)
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
               + (f": {holder['command']}" if holder.get("command") else "")) if holder else "another process"
        super().__init__(f"{self.folder!r} is in use by another vladkit job ({who}); wait for it to finish "
                         "or choose another output")

    def __reduce__(self):
        return (type(self), (self.folder, self.holder))


_held = {}  # real path of a lock file -> [times entered, open file]: re-entrant within a process
_held_lock = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder):
    """Hold ``folder``'s job lock (creating the folder and its lock file) for the block.

    Exclusive across processes and re-entrant within one (a command that wraps
    :func:`vladkit.pipeline.jobs.encode_images` holds it across both). The holder's description is
    written into the lock file and removed on release, so that a completed folder holds
    the same bytes whoever wrote it.

    Raises
    ------
    FolderLockedError
        Another process holds it; nothing was changed.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.realpath(os.path.join(folder, LOCK_FILE))
    with _held_lock:
        if path in _held:
            _held[path][0] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_lock:
                _held[path][0] -= 1
        return
    handle = open(path, "a+", encoding="utf-8")  # "a+": opening changes nothing
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderLockedError(folder, _read_holder(handle)) from None
        _write_holder(handle)
        with _held_lock:
            _held[path] = [1, handle]
        try:
            yield
        finally:
            with _held_lock:
                del _held[path]
            with contextlib.suppress(OSError):
                handle.truncate(0)
                handle.flush()
    finally:
        handle.close()  # releases the flock


def _write_holder(handle):
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else ""}
    handle.truncate(0)
    handle.write(json.dumps(holder) + "\n")
    handle.flush()


def _read_holder(handle):
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def machine_lock(name):
    """An exclusive lock shared by the processes of this machine (waits for it; a no-op
    without fcntl)."""
    if fcntl is None:
        yield
        return
    path = os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}.lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
