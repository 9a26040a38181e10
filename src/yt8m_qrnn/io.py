"""Writing outputs safely (a temporary name in the same folder, renamed on success) and
the locks that keep two runs of the pipeline from writing the same outputs at once."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
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


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yield a temporary path beside `final`; rename it to `final` only if the block succeeds.

    The final name only ever holds a complete file: on any error the temporary is
    removed and `final` is left as it was. An OSError while writing (disk full, quota,
    read-only or unwritable folder) is raised as OutputWriteError naming `final`.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        about_output = err.filename is None or Path(err.filename) in (tmp, final)
        if about_output and not isinstance(err, OutputWriteError):
            raise OutputWriteError(final, err) from err
        raise
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


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



# ---------------------------------------------------------------- one orchestrator per workspace

class WorkspaceBusy(RuntimeError):
    """Another pipeline run (Snakemake, `dvc repro`, or a stage run by hand) is using the workspace."""


WORKSPACE_LOCK = "workspace"
WORKSPACE_ENV = "YT8M_WORKSPACE_HELD"  # set by an orchestrator holding the workspace; its jobs inherit it


def hold_workspace(lock_dir: Path, owner: str, dvc_dir: Path | None = None) -> list:
    """For an orchestrator, at its start: the workspace to itself until it ends, or WorkspaceBusy at once.

    Takes ``lock_dir/workspace.lock`` exclusively (every stage run outside this
    orchestrator holds it shared: cli.run_stage) and, given `dvc_dir`, DVC's own repo
    lock (``dvc_dir/tmp/lock``, held by ``dvc repro`` except while a stage command
    runs), so that neither a stage nor DVC can start, nor delete outputs before
    rerunning a stage, until this run ends. Sets WORKSPACE_ENV, so the orchestrator's
    own jobs (which inherit it) do not ask for the shared lock. Returns the open lock
    files; closing one releases its lock (the DVC one must be released before this
    process itself runs dvc).
    """
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = []
    try:
        held.append(_try_lock(lock_dir / f"{WORKSPACE_LOCK}.lock", fcntl.LOCK_EX, owner))
        if dvc_dir is not None:
            (Path(dvc_dir) / "tmp").mkdir(parents=True, exist_ok=True)
            held.append(_try_lock(Path(dvc_dir) / "tmp" / "lock", fcntl.LOCK_EX, owner, what="DVC's repo lock"))
    except WorkspaceBusy:
        for handle in held:
            handle.close()
        raise
    os.environ[WORKSPACE_ENV] = f"{owner} (pid {os.getpid()})"
    return held


@contextlib.contextmanager
def workspace_shared(lock_dir: Path, owner: str) -> Iterator[None]:
    """For a stage run: share the workspace with other stage runs, but not with an orchestrator holding it.

    Nothing to do inside an orchestrator that holds it (WORKSPACE_ENV set); otherwise
    WorkspaceBusy at once while one does.
    """
    if os.environ.get(WORKSPACE_ENV):
        yield
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = _try_lock(lock_dir / f"{WORKSPACE_LOCK}.lock", fcntl.LOCK_SH, owner)
    try:
        yield
    finally:
        handle.close()


def _try_lock(path: Path, mode: int, owner: str, what: str | None = None):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holders = _holders_text(handle)
        handle.close()
        raise WorkspaceBusy(f"another pipeline run is using this workspace ({what or path}: {holders}); "
                            "run again when it has finished") from None
    if mode == fcntl.LOCK_EX:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n" if what else f"pid {os.getpid()} {owner}\n")  # DVC's file: a pid
        handle.flush()
    return handle
