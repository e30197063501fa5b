"""Atomic file writing: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; when the block succeeds it becomes ``path`` (an existing ``path`` is
    replaced only with ``overwrite``, and refused up front otherwise). On failure nothing is left behind."""
    import shutil

    from .errors import ReassemblyError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ReassemblyError(f"{path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ReassemblyError(f"{path} already exists and is not empty; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old / path.name, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on ``path`` + '.lock' (for read-modify-write of shared files like a manifest)."""
    import fcntl

    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, activity: str):
    """Refuse to work in ``directory`` while another process works in it (both would write its state); the message
    says it is being ``activity`` (e.g. "trained") by another process."""
    import fcntl

    from .errors import ReassemblyError

    directory = Path(directory)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReassemblyError(f"{directory} is being {activity} by another process; wait for it or use another "
                                  "--out") from None
        remove_stale_temporaries(directory)
        yield


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``directory`` (and below) when a process writing them
    was killed; call it only while holding the directory's :func:`exclusive` lock, when no writer can be alive."""
    stale = [p for p in Path(directory).rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it: an in-memory state the block updates in several
    steps is never saved half updated. Outside the main thread, where signals cannot be handled, and in a process
    told to ignore SIGINT (started in the background by a script), a plain block."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
