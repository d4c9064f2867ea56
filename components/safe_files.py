"""Opening a user's file: its type and size are checked on the opened descriptor before anything is read.

Every place that reads a file a user named (a dataset's images and labels, classes.txt, predict's
inputs, a saved model's config.json) opens it here. A FIFO named `x.png` would block a plain open
for ever, `/dev/zero` or a 6 GB sparse file would be read whole before any later check, and a
folder, a loop of links or a name too long for the file system would end in a traceback; here each
is one ValueError (FileNotFoundError when missing) that names the file and what it is.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

# Why an open failed, in words a user acts on.
OPEN_ERRORS = {
    errno.ELOOP: "a loop of symbolic links",
    errno.ENAMETOOLONG: "a name too long for the file system",
    errno.EACCES: "not readable (permission denied)",
    errno.ENOTDIR: "a path through something that is not a folder",
}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | Path, what: str, max_bytes: int) -> BinaryIO:
    """`path` opened for binary reading, after checking that it is a regular file (links followed)
    of at most `max_bytes`. `what` names the file's role in errors ("image", "classes.txt")."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} file is missing") from None
    except OSError as err:
        reason = OPEN_ERRORS.get(err.errno or 0, err.strerror)
        raise ValueError(f"{path}: cannot open the {what}: {reason}") from None
    try:
        info = os.fstat(fd)  # the opened file itself: a swap after a path check cannot fool this
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: the {what} is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{path}: the {what} is {info.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (open_regular's checks)."""
    with open_regular(path, what, max_bytes) as handle:
        return handle.read(max_bytes + 1)[:max_bytes]
