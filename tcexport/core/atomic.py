"""Write outputs under a temporary name and rename them into place, so a failure leaves nothing half-written."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tcexport.core.errors import UsageError


def check_writable(path: str | os.PathLike, what: str | None = None, directory: bool = False) -> Path:
    """Refuse, as a UsageError, an output path that cannot be created: one of its parents is an existing file
    (or anything else that is not a directory), or the nearest existing parent is not writable; a file output
    (`directory` False) that is an existing directory is refused too. `what` names the option to change (-o,
    --json...).

    Cheap (a few stat calls), so every stage calls it before any heavy work; the atomic writers below call it
    too, so nothing can slip through. Returns `path` as a Path."""
    final = Path(path)
    other = f"choose another {what}" if what else "choose another output path"
    if not directory and final.is_dir():
        raise UsageError(f"cannot write {final}: it is a directory; give a file name, or {other}")
    for parent in final.parents:
        if parent.is_dir():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"cannot write {final}: {parent} is not writable; {other}")
            break
        if os.path.lexists(parent):  # exists but is no directory: a file, a broken link, a socket...
            kind = ("a broken link" if parent.is_symlink() else "a file, not a directory" if parent.is_file()
                    else "not a directory")
            raise UsageError(f"cannot write {final}: {parent} is {kind}; {other}")
    return final


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on failure delete it."""
    final = check_writable(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs should look like any other file
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` whole."""
    final = check_writable(path, directory=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
