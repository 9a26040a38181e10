"""Writing outputs safely (a temporary name in the same folder, renamed on success) and
the locks that keep two runs of the pipeline from writing the same outputs at once."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator


class OutputWriteError(OSError):
    """An output could not be written (disk full, read-only folder, ...); the message names it."""

    def __init__(self, path: Path, cause: OSError):
        super().__init__(cause.errno, cause.strerror)
        self.path = str(path)
        self.cause = cause

    def __str__(self) -> str:
        cause = self.cause
        reason = f"[Errno {cause.errno}] {cause.strerror}" if cause.errno and cause.strerror else str(cause)
        return f"cannot write {self.path}: {' '.join(reason.split())}"


class StageError(RuntimeError):
    """A failure whose cause and fix lie outside the code (a corrupt input, too little memory): the
    command line prints it after the stage and model it concerns ("evaluate qrnn: ...")."""


class CorruptArtifact(StageError):
    """A file's bytes are not those its producer recorded; the message names it, what is wrong and the fix."""

    def __init__(self, path: Path, problem: str, fix: str):
        super().__init__(f"{path} is corrupt: {problem}; {fix}")
        self.path = Path(path)


def sha256_file(path: Path, algorithm: str = "sha256") -> str:
    """The file's hex digest (sha256 unless another hashlib `algorithm` is named)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def check_sha256(path: Path, recorded: str, record: Path, fix: str) -> None:
    """CorruptArtifact unless `path` hashes to `recorded`, the digest its producer wrote into `record`."""
    found = sha256_file(path)
    if found != recorded:
        raise CorruptArtifact(path, f"sha256 {found}, but {record} records {recorded}", fix)


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str | None = None, *, durable: bool = False):
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    The one way the package writes a file (atomic_folder: a folder). The final name only
    ever holds a complete file: on any error the temporary is removed and `final` is left
    as it was. An OSError while writing (disk full, quota, read-only or unwritable folder)
    is raised as OutputWriteError naming `final`. The temporary name ends as `final` does:
    in `suffix` when given (a writer may insist on ".weights.h5"), else in its last suffix;
    it carries the pid (and the thread, off the main one), so writers never share one.
    `durable`: the file's bytes reach the disk before the rename (a record a restart trusts).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = final.suffix if suffix is None else suffix
    tmp = final.with_name(f".{final.name.removesuffix(suffix)}.tmp{_writer_tag()}{suffix}")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as err:
        about_output = err.filename is None or Path(err.filename) in (tmp, final)
        if about_output and not isinstance(err, OutputWriteError):
            raise OutputWriteError(final, err) from err
        raise
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def _writer_tag() -> str:
    main = threading.current_thread() is threading.main_thread()
    return str(os.getpid()) if main else f"{os.getpid()}-{threading.get_ident()}"


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a new empty folder beside `final`; it replaces `final` only if the block succeeds.

    A kill between removing the old folder and renaming the new one leaves no `final`
    (never a half-written one); the temporary is removed on any error.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{_writer_tag()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove what writers killed mid-write left beside `final`: the temporaries of atomic_path,
    atomic_folder (".<name>.tmp<pid>...", ".<stem>.tmp<pid><suffix>"). Their names carry the dead writer's pid, so no later writer reuses
    them. Call it holding the lock on `final`: no other live writer then has one (this
    process's own are kept)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    patterns = {f".{final.name}.tmp*", f".{final.name}.old*", f".{final.stem}.tmp*{final.suffix}"}
    mine = re.compile(rf"\.(?:tmp|old){os.getpid()}(?:\D|$)")
    stale = sorted({path for pattern in patterns for path in final.parent.glob(pattern) if not mine.search(path.name)})
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return stale


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def config_digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- locks

class LockTimeout(RuntimeError):
    """A lock was not released within the allowed wait; the message names it and its holders."""


LOCK_TIMEOUT_ENV = "YT8M_LOCK_TIMEOUT"  # seconds to wait for a lock; unset: wait as long as it takes


@contextlib.contextmanager
def resource_locks(lock_dir: Path, shared: Iterable[str] = (), exclusive: Iterable[str] = (), *,
                   owner: str = "", timeout: float | None = None, poll: float = 0.2) -> Iterator[None]:
    """Hold `shared` (read) and `exclusive` (write) locks on named resources for the block.

    One lock file per resource (``lock_dir/<name>.lock``, flock(2)): any number of
    readers, or one writer. Locks are taken in one global order (by name), so runs
    that each hold all their locks until they end cannot deadlock. A run that must
    wait says so once on stderr, naming what it waits for and who holds it; with a
    timeout (argument, or the YT8M_LOCK_TIMEOUT environment variable) it gives up
    with LockTimeout. Locks die with their process: a killed run leaves none behind.
    """
    exclusive = set(exclusive)
    wanted = {name: fcntl.LOCK_EX for name in exclusive}
    wanted |= {name: fcntl.LOCK_SH for name in set(shared) - exclusive}
    if timeout is None and os.environ.get(LOCK_TIMEOUT_ENV):
        timeout = float(os.environ[LOCK_TIMEOUT_ENV])
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    handles = []
    try:
        for name in sorted(wanted):
            handle = open(lock_dir / f"{name}.lock", "a+")
            handles.append(handle)
            _acquire(handle, wanted[name], name, owner, timeout, poll)
            if wanted[name] == fcntl.LOCK_EX:  # who writes: shown to those who wait
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} {owner}\n")
                handle.flush()
        yield
    finally:
        for handle in reversed(handles):
            handle.close()  # closing releases the flock


def _acquire(handle, mode: int, name: str, owner: str, timeout: float | None, poll: float) -> None:
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    kind = "write" if mode == fcntl.LOCK_EX else "read"
    print(f"{owner or 'this run'}: waiting for the {kind} lock on {name!r} ({handle.name}); "
          f"{_holders_text(handle)}", file=sys.stderr, flush=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"gave up after {timeout:g} s waiting for the {kind} lock on {name!r} "
                                  f"({handle.name}); {_holders_text(handle)}") from None
            time.sleep(poll)


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on `path` (Linux /proc/locks; [] where that is not available)."""
    try:
        stat = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK":
            try:
                inode = int(fields[5].rsplit(":", 1)[1])
            except (IndexError, ValueError):
                continue
            if inode == stat.st_ino and fields[4].isdigit():
                pids.append(int(fields[4]))
    return sorted(set(pids))


def _holders_text(handle) -> str:
    pids = [pid for pid in lock_holders(Path(handle.name)) if pid != os.getpid()]
    if not pids:
        return "held by another run"
    described = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmdline = ""
        described.append(f"pid {pid}" + (f" ({cmdline[:120]})" if cmdline else ""))
    return "held by " + ", ".join(described)
