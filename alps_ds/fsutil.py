"""Crash-safe outputs: check where a command may write, build under a temporary name, then rename.

A reader never sees a half-written file or folder, and an error (disk full, a kill, Ctrl-C,
SIGTERM) leaves whatever was there before untouched. :func:`check_output_dir` and
:func:`check_output_file` decide, before any work, whether a command may write to a path: never
over one of its inputs, never into a folder or over a file that the command did not write itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from alps_ds.errors import AlpsError


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) while a command writes: unwinds like Ctrl-C so temporary files are removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """While writing, SIGTERM unwinds like Ctrl-C (its default would kill the process and leave the
    temporary files behind). Only the main thread can take signals; elsewhere this does nothing."""
    install = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    )
    if install:
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a swap of renames, so it is never left half done by an interrupt."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _new_folders(path: Path) -> Iterator[None]:
    """Folders on the way to ``path`` that do not exist yet are removed again (when still empty) if the
    write fails or is interrupted, so a failed run leaves no trace."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


# ---- where a command may write -----------------------------------------------------------------------------


def marker_name(command: str) -> str:
    """The file a command leaves in a folder it writes: proof, on the next run, that the folder is its own."""
    return f".alps-{command}"


def _owned(folder: Path, command: str) -> set[str] | None:
    """Names the command wrote into ``folder`` last time (from its marker), or None without a marker."""
    marker = folder / marker_name(command)
    if not marker.is_file():
        return None
    try:
        names = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        names = None
    if not isinstance(names, list):  # a marker that lists nothing (an older demo's): everything is the command's
        return {entry.name for entry in folder.iterdir()}
    return set(names)


def _output_path(value: str | os.PathLike, flag: str, what: str) -> Path:
    if not str(value).strip():
        raise AlpsError(f"{flag}: empty path; name the {what} to write, e.g. {flag} out")
    path = Path(os.path.abspath(Path(value).expanduser()))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AlpsError(f"{flag} {value}: {parent} is a file, not a folder; choose another {flag}")
            break
    return path


def _refuse_inputs(path: Path, flag: str, inputs: Iterable[str | os.PathLike | None]) -> None:
    """An output that is, holds or lies inside an input would destroy it: refuse."""
    out = Path(os.path.realpath(path))
    for item in inputs:
        if item is None or not str(item) or str(item).startswith("tiny:"):
            continue
        given = Path(item).expanduser()
        if not given.exists():
            continue  # a hub id, or an input some other check reports
        real = Path(os.path.realpath(given))
        if real == out:
            how = "is"
        elif out in real.parents:
            how = "contains"
        elif real in out.parents:
            how = "lies inside"
        else:
            continue
        raise AlpsError(f"{flag} {path}: {how} the input {item}; writing there would destroy it: choose a new {flag}")


def check_output_dir(
    value: str | os.PathLike,
    *,
    flag: str,
    command: str,
    inputs: Iterable[str | os.PathLike | None] = (),
    whole: bool = True,
) -> Path:
    """The folder ``command`` may write as ``flag`` = ``value``, or one AlpsError line saying why not.

    Refused: an empty path, an existing file, an input or a folder holding or inside one, and a
    non-empty folder without the command's marker (not written by it). ``whole``: the command
    replaces the folder as a whole, so a folder holding files it did not write is refused too.
    """
    path = _output_path(value, flag, "folder")
    _refuse_inputs(path, flag, inputs)
    if not path.exists():
        return path
    if not path.is_dir():
        raise AlpsError(f"{flag} {value}: exists and is a file, not a folder; choose another {flag}")
    entries = {entry.name for entry in path.iterdir()}
    if not entries:
        return path
    owned = _owned(path, command)
    if owned is None:
        raise AlpsError(
            f"{flag} {value}: folder is not empty and was not written by alps-ds {command}; "
            f"choose a new or empty {flag} (nothing in it is replaced)"
        )
    foreign = sorted(entries - owned - {marker_name(command)}) if whole else []
    if foreign:
        raise AlpsError(
            f"{flag} {value}: holds {foreign[0]}, which alps-ds {command} did not write and would delete; "
            f"move it away or choose another {flag}"
        )
    return path


def check_output_file(
    value: str | os.PathLike,
    *,
    flag: str,
    default_name: str,
    is_own: Callable[[Path], bool],
    what: str,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """The file a command may write as ``flag`` = ``value`` (a folder, or a path ending in '/', means
    ``default_name`` inside it), or one AlpsError line saying why not. An existing file is replaced only
    when ``is_own`` recognizes it as ``what`` (an earlier output of this kind), never when it is an input."""
    text = str(value)
    path = _output_path(value, flag, "file")
    if text.endswith(("/", os.sep)) or path.is_dir():
        path = path / default_name
        _output_path(path, flag, "file")
    _refuse_inputs(path, flag, inputs)
    if path.is_dir():
        raise AlpsError(f"{flag} {path}: is a folder; name a file to write")
    if path.exists() and not is_own(path):
        raise AlpsError(f"{flag} {path}: exists and is not {what}; nothing was replaced: choose another {flag}")
    return path


def claim_dir(path: str | os.PathLike, command: str) -> Path:
    """Create ``path`` (if needed) with ``command``'s marker, before the first file is written into it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if _owned(path, command) is None:
        atomic_write_text(path / marker_name(command), json.dumps({"written_by": f"alps-ds {command}"}) + "\n")
    return path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path``; on clean exit fsync it and rename it over ``path``."""
    path = Path(path)
    with _new_folders(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_file(path, mode) as f:
            yield f


@contextlib.contextmanager
def _atomic_file(path: Path, mode: str) -> Iterator:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with _interruptible():
            # mkstemp creates 0600; give the file the permissions a plain open() would have.
            os.chmod(tmp, 0o666 & ~_umask())
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, command: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on clean exit it replaces ``path``.

    An existing ``path`` is moved aside first and deleted only after the new folder is in
    place, so at every instant one complete version exists under ``path`` or its backup.
    ``command``: leave its marker (listing what was written) for :func:`check_output_dir`.
    """
    path = Path(path)
    with _new_folders(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_dir(path, command) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_dir(path: Path, command: str | None) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
    try:
        with _interruptible():
            yield tmp
            if command is not None:
                files = sorted(entry.name for entry in tmp.iterdir())
                (tmp / marker_name(command)).write_text(
                    json.dumps({"written_by": f"alps-ds {command}", "files": files}) + "\n"
                )
        old = None
        with _signals_deferred():
            if path.exists():
                # A unique name: a kill while a big old folder is being deleted leaves its backup behind,
                # and a later run with the same pid (common in containers) could not rename onto it.
                old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:  # put the previous version back rather than leave it under the backup name
                    os.replace(old, path)
                raise
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike, *, command: str) -> Iterator[Callable[[str, str | bytes], None]]:
    """Yield ``put(name, data)``; on clean exit every file put replaces ``folder/name`` in one swap
    (with the command's marker). Files in ``folder`` that were not put are left alone; on an error or
    an interrupt nothing in ``folder`` changes."""
    folder = Path(folder)
    with _new_folders(folder), _staged_files(folder, command) as put:
        yield put


@contextlib.contextmanager
def _staged_files(folder: Path, command: str) -> Iterator[Callable[[str, str | bytes], None]]:
    staged: dict[str, str] = {}

    def put(name: str, data: str | bytes) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        staged[name] = tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())

    try:
        with _interruptible():
            yield put
        with _signals_deferred():
            for name, tmp in staged.items():
                os.replace(tmp, folder / name)
            staged.clear()
            claim_dir(folder, command)
        _fsync_dir(folder)
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
