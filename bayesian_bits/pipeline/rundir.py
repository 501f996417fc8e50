"""The run folder (``--logdir``): created, probed for writing, locked by one run at a time, cleaned of temporary
files a killed run left, and never mixed: a folder that already holds a run is continued (``--resume``),
replaced (``--overwrite``) or refused."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from ..checkpoint_io import TEMP_SUFFIX, file_mode, temp_files
from .errors import UsageError
from .metrics import LOG_FILE, METRICS_FILE, SUMMARY_FILE
from .plots import BITS_PNG, BUDGET_PNG, CURVES_PNG

LOCK_FILE = ".lock"
RUN_FILES = (LOG_FILE, METRICS_FILE, SUMMARY_FILE, BITS_PNG, CURVES_PNG, BUDGET_PNG)


def is_run_output(path: Path) -> bool:
    """Whether ``path`` is a file a run writes (log, metrics, summary, plots, checkpoints, temporary files)."""
    return path.is_file() and (path.name in RUN_FILES or path.suffix == ".pth" or path.name.endswith(TEMP_SUFFIX))


class RunDir:
    """An open run folder: ``path``, held under an exclusive lock until ``release``."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    def release(self) -> None:
        """Drop the lock (also dropped by the operating system when the process ends)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None


def _lock(path: Path) -> int:
    """Take the folder's exclusive lock and record the holder in the lock file; refuse if another run holds it."""
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read_text(encoding="utf-8", errors="replace").strip() or "holder unknown"
        os.close(fd)
        raise UsageError(f"--logdir {path} is in use by another run ({holder}); wait for it to end or pick another "
                         "--logdir") from None
    os.ftruncate(fd, 0)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {when}\n".encode())
    return fd


def open_run_dir(path: Path, resume: bool, overwrite: bool) -> RunDir:
    """Create, probe, lock and clean ``path``; a folder holding a run needs ``resume`` or ``overwrite``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", suffix=TEMP_SUFFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"--logdir {path} is not writable ({exc.strerror or exc}); pass a writable folder") from None
    run_dir = RunDir(path, _lock(path))
    try:
        for stale in temp_files(path):  # the lock is ours: no other writer can own them
            stale.unlink(missing_ok=True)
        contents = sorted(p for p in path.iterdir() if p.name != LOCK_FILE)
        if contents and not resume:
            _replace(path, contents, overwrite)
    except BaseException:
        run_dir.release()
        raise
    return run_dir


def _replace(path: Path, contents: list[Path], overwrite: bool) -> None:
    names = ", ".join(p.name for p in contents[:5]) + (", ..." if len(contents) > 5 else "")
    if not overwrite:
        raise UsageError(f"--logdir {path} already holds a run ({names}); continue it with --resume "
                         f"{path / 'last.pth'}, replace it with --overwrite, or pick another --logdir")
    foreign = [p.name for p in contents if not is_run_output(p)]
    if foreign:
        raise UsageError(f"--overwrite: {path} also holds files that are not run outputs ({', '.join(foreign[:5])}); "
                         "move them away or pick another --logdir")
    for p in contents:
        p.unlink()
