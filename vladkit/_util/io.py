"""Writing files so that a reader never sees half of one: temporary file + rename.

The temporary file is made by :func:`tempfile.mkstemp`, which creates it readable by its
owner only; before the rename it gets the permissions a plain ``open(path, "w")`` would
have given it, ``0o666`` less the process's umask (:func:`default_file_mode`), so that a
user with ``umask 077`` keeps their encodings and indexes (which list their photos'
paths) private, and one with ``umask 022`` shares them as every other file they write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import zipfile

import numpy as np


@contextlib.contextmanager
def atomic_output(path, mode="wb"):
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    Interrupted or failed (any exception, Ctrl-C included), nothing is left behind, least
    of all a partial file, and an existing ``path`` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def current_umask():
    """The process's umask, read without changing it where the system says (Linux's
    ``/proc/self/status``); elsewhere set and restored under a lock, as ``os.umask`` can
    only be read by setting it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def default_file_mode():
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def default_folder_mode():
    """The mode ``os.mkdir(path)`` gives a new folder: ``0o777 & ~umask``."""
    return 0o777 & ~current_umask()


# Lone surrogates: what os.fsdecode makes of file-name bytes that are not UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_dumps(value, **options):
    """JSON text that is always valid UTF-8, for logs and listings of file names.

    Non-ASCII characters are kept as they are (readable), but a file name whose bytes are
    not UTF-8 (``bad_\\xff.jpg`` becomes the lone surrogate ``'\\udcff'`` in Python) is
    written with ``\\udcff`` escapes: ``json.loads`` gives back the same string, and
    ``os.fsencode`` of it the original bytes.
    """
    text = json.dumps(value, ensure_ascii=False, **options)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def write_npz_atomically(path, arrays):
    """An .npz (uncompressed zip of .npy files) with fixed timestamps: the same arrays give
    the same bytes. Written through :func:`atomic_output`."""
    with atomic_output(path) as handle, zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.asarray(arrays[name]), allow_pickle=False)
