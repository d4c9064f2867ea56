"""Write outputs so that a failure or interruption never leaves a partial result behind.

Everything is written under a temporary sibling path first and renamed into place at the end;
rename is atomic on one filesystem, so readers see either the old output or the complete new one.
A writer holds an exclusive lock on its output for as long as it writes (output_lock), so two runs
never write one output at once and a temporary is removed as stale only when no live run holds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from components.owned_files import Recogniser, check_replaceable

# Written into every directory output: a directory at an output path without it holds something
# the pipeline did not write (a user's folder), which a stage must not delete.
MARKER = ".hmsa-output"


# Out of room: the user frees space or picks another path. The error names the output it hit.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask sets it to read it: a thread creating
    a file in between would get the wrong mode). Linux reports it in /proc/self/status."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_dir(target: Path, infix: str = "tmp") -> Path:
    """A new directory `.<name>.<infix>-XXXX` beside `target`, with the mode a plain mkdir gives
    (mkdtemp makes it 0700 whatever the umask: renamed into place, a serving account, CI or a
    colleague could not read the output)."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{infix}-", dir=target.parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


@contextlib.contextmanager
def naming_the_output(target: str | Path, key: str | None) -> Iterator[None]:
    """Re-raise a full disk or quota while writing `target` as one line that names it and its key
    (the OSError of a write names no file, or only a temporary one)."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        where = f"{key} = {target}" if key else str(target)
        raise OSError(err.errno, f"{os.strerror(err.errno)} while writing {where} "
                                 "(free space there or choose another path; the earlier output is kept)") from None


class OutputBusyError(FileExistsError):
    """Another live run is writing this output."""


# Lock files this process holds, by path, with their depth: a stage that locks its output and then
# writes it through atomic_dir takes the same lock twice (flock would refuse the second descriptor).
_held_locks: dict[str, int] = {}


def _describe_this_run() -> str:
    command = " ".join(sys.argv)[:200] or sys.executable
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {since}"


@contextlib.contextmanager
def output_lock(target: str | Path, key: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the local output `target` while the block runs; a second run is
    refused at once with one line naming the holder. The lock is `.<name>.lock` beside the output,
    an flock the kernel releases when the holder dies (no stale lock after SIGKILL); the file is
    removed on release. Outputs on S3 are not locked (S3 has no locks)."""
    target = Path(target)
    lock_path = target.parent / f".{target.name}.lock"
    held_key = os.path.realpath(lock_path)
    if held_key in _held_locks:
        _held_locks[held_key] += 1
        try:
            yield
        finally:
            _held_locks[held_key] -= 1
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "a run that has not said who it is"
            os.close(fd)
            name = f"{key} = {target}" if key else str(target)
            raise OutputBusyError(f"{name}: another run is writing it ({holder}); wait for it to end or choose "
                                  "another path") from None
        try:  # the previous holder may have removed the file between our open and our lock: lock the new one
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_describe_this_run() + "\n").encode(), 0)
    _held_locks[held_key] = 1
    try:
        yield
    finally:
        del _held_locks[held_key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # before the unlock: a waiter that opened it sees the inode change
        os.close(fd)


def remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries that a killed run (SIGKILL, power loss) left next to `target`.

    Called under output_lock(target): no live run writes `target`, so any such leftover is stale.
    """
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def check_owned(target: Path, key: str | None = None, recognise=None) -> None:
    """Refuse to replace `target` unless it is absent, an empty directory, or a directory this
    pipeline wrote: it holds the marker file, or `recognise(target)` says it is one of ours (a saved
    model is recognised by its files and carries no marker)."""
    if not target.exists() and not target.is_symlink():
        return
    name = f"{key} = {target}" if key else str(target)
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(f"{name}: is a file, not an output directory of this pipeline; move it or choose "
                              "another path")
    ours = recognise(target) if recognise is not None else (target / MARKER).is_file()
    if any(target.iterdir()) and not ours:
        raise FileExistsError(f"{name}: holds files this pipeline did not write (no {MARKER} inside); move them "
                              "or choose another path")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(source: Path, target: Path) -> None:
    """Put the finished directory `source` at `target` without the path ever standing empty: the
    two are exchanged atomically and the old one (now at `source`, a temporary name the next run
    removes if we are killed here) deleted. Where the exchange is unsupported, the old output is
    first renamed to such a temporary."""
    source, target = Path(source), Path(target)
    if not target.exists():
        source.rename(target)
        return
    if _exchange(source, target):
        shutil.rmtree(source, ignore_errors=True)
        return
    old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
    target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(target: str | Path, purpose: str, key: str | None = None) -> Iterator[Path]:
    """A working directory next to `target`, named after it, removed at the end; the ones a killed
    run left behind (same name pattern) are removed first."""
    target = Path(target)
    with output_lock(target, key):
        for stale in target.parent.glob(f".{target.name}.{purpose}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        path = temporary_dir(target, purpose)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, key: str | None = None, recognise=None) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `target` only if the block succeeds.

    `target` must be absent, empty, or an earlier output of this pipeline (check_owned; `key`
    names the setting in the error); the new directory carries the marker unless `recognise`
    identifies such outputs by their own files."""
    target = Path(target)
    with output_lock(target, key):
        check_owned(target, key, recognise)
        remove_stale_temporaries(target)
        tmp = temporary_dir(target)
        try:
            with naming_the_output(target, key):
                yield tmp
                if recognise is None:
                    (tmp / MARKER).write_text(
                        "written by the HMSA pipeline; the stage that owns this path may replace it\n")
                replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_batch() -> Iterator[Callable[[Path], BinaryIO]]:
    """Files written one after another that appear together: the block gets `open_for(target)`,
    which opens a temporary beside `target`; all are renamed into place when the block succeeds and
    none otherwise. What is written waits on disk, not in memory. The caller owns the targets (locks
    their folder, checks what it replaces) and removes stale temporaries of them first."""
    pending: list[tuple[str, Path]] = []

    def open_for(target: Path) -> BinaryIO:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        pending.append((tmp, target))
        os.fchmod(fd, 0o666 & ~current_umask())
        return os.fdopen(fd, "wb")

    try:
        yield open_for
        for tmp, target in pending:
            os.replace(tmp, target)
    finally:
        for tmp, _ in pending:
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(target: str | Path, recognise: Recogniser, mode: str = "w", key: str | None = None) -> Iterator:
    """Open a temporary file next to `target`; it replaces `target` only if the block succeeds, and
    only an absent file or one `recognise` knows as this output (check_replaceable). Temporaries a
    killed writer of `target` left (SIGKILL between open and rename) are removed first."""
    target = Path(target)
    with output_lock(target, key):
        check_replaceable(target, recognise, key)
        remove_stale_temporaries(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600; the output gets a plain file's mode
        try:
            with naming_the_output(target, key):
                with os.fdopen(fd, mode) as handle:
                    yield handle
                os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
