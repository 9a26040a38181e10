"""Fetch YouTube-8M shards from an http mirror, a public GCS bucket or a file:// mirror.

Sources (``data.source``), all read through one fsspec interface (``ls``/``info``/``open``):

* ``http(s)://HOST`` -- the protocol of the dataset's own ``download.py``: the plan
  ``{HOST}/{version}/download_plans/{level}_{split}.json`` maps remote names to md5s.
  For the official ``data.yt8m.org`` the shards come from ``{region}.data.yt8m.org``;
  any other host serves the plan and the shards itself.
* ``gs://BUCKET[/PREFIX]`` -- anonymous access; the folder is listed and every shard
  is checked against the object's ``md5Hash`` (or ``crc32c`` when there is no md5).
* ``file://ROOT`` -- the http layout on disk; without a plan the folder is listed and
  the md5 computed while copying is recorded.

Version 1 (2017) uses ``video_level``/``frame_level`` as remote folder names; shards
always land locally at ``dest/{version}/{level}/{split}/{split}%04d.tfrecord``.

Shard selection per split: ``all``; ``N`` = the first N by local name; ``[i, ...]`` =
local shard numbers (``train0007`` is 7); ``"X,Y"`` = download.py's partition, on the
remote name. Asking for more shards or indices than the source has is an error.

Reruns: next to each verified shard a sidecar ``<shard>.verified.json`` records its
md5, size and mtime. A shard whose final file has the expected size and whose sidecar
still describes it (same size and mtime) with the expected hash is skipped without
reading it; without a valid sidecar the file is hashed locally (never downloaded) and
the sidecar is rewritten. With no hash from the source (file:// without a plan) only a
valid sidecar and the listed size count. The manifest is output only, never consulted.
``.part`` files from earlier runs are deleted; within a run a network failure resumes
the ``.part`` (ranged reads), a hash mismatch restarts it. Shards no longer selected
are left in place: readers should follow the manifest, not a glob.

Fanning out (one job per shard, e.g. Snakemake on a cluster): ``plan_dataset`` resolves
the selection without downloading anything; ``fetch_one_shard`` makes one planned shard
present and verified (the same code path as ``fetch_dataset``, shard by shard);
``fetch_planned`` is ``fetch_dataset`` over a given plan.
"""
from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import os
import re
import string
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import fsspec

from yt8m_qrnn.pipeline.io import atomic_path

BASE62 = string.ascii_lowercase + string.ascii_uppercase + string.digits
OFFICIAL_HOST = "data.yt8m.org"
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".verified.json"
CHUNK_SIZE = 1 << 20
HTTP_BLOCK_SIZE = 16 << 20  # bytes per ranged GET; a dropped connection costs at most one block
GCS_BLOCK_SIZE = 16 << 20
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_FOLDER_PART = re.compile(r"^[a-z_]+$")


class FetchError(RuntimeError):
    """A shard or plan could not be fetched or verified; the message is one line."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 1.0  # seconds before the 2nd attempt; doubled each time after
    max_delay: float = 60.0
    timeout: float = 60.0  # http: seconds to connect, and without data while reading

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** (failures - 1))


@dataclass(frozen=True)
class Expected:
    """What the source says a shard is; None where the source does not say."""

    md5: str | None = None
    crc32c: str | None = None
    size: int | None = None
    generation: str | None = None


@dataclass(frozen=True)
class Shard:
    level: str
    split: str
    remote_name: str
    local_name: str
    url: str  # full remote URL
    expected: Expected


# ---------------------------------------------------------------- names and selection

def remote_to_local_name(remote: str, split: str) -> str:
    """``trainaa.tfrecord`` -> ``train0000.tfrecord``; ``train0007.tfrecord`` is kept."""
    check_remote_name(remote)
    numbered = re.fullmatch(rf"{re.escape(split)}(\d{{4}})\.tfrecord", remote)
    if numbered:
        return remote
    lettered = re.fullmatch(rf"{re.escape(split)}([a-zA-Z0-9]{{2}})\.tfrecord", remote)
    if not lettered:
        raise FetchError(f"unrecognised shard name {remote!r} for split {split!r} "
                         f"(expected {split}XY.tfrecord or {split}NNNN.tfrecord)")
    high, low = lettered.group(1)
    return f"{split}{BASE62.index(high) * len(BASE62) + BASE62.index(low):04d}.tfrecord"


def shard_index(local_name: str) -> int:
    return int(local_name[-len("0000.tfrecord"):-len(".tfrecord")])


def check_remote_name(name: str) -> None:
    """Reject names that could escape the destination folder."""
    hostile = (not name or ".." in name or "/" in name or "\\" in name or "\x00" in name
               or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name) is not None)
    if hostile:
        raise FetchError(f"refusing unsafe remote shard name {name!r}")


def partition_keep(name: str, x: int, y: int) -> bool:
    """download.py's ``shard=X,Y``: keep when md5(name) mod Y == X - 1."""
    return int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16) % y == x - 1


def select_shards(names: Iterable[str], selection, split: str | None = None) -> list[str]:
    """The remote names `selection` keeps, sorted by local name.

    selection: "all" | N (the first N by local name) | [indices] (local shard numbers)
    | "X,Y" (download.py partition X of Y, on the remote name).
    """
    names = list(names)
    local = {name: remote_to_local_name(name, split or _infer_split(name)) for name in names}
    _reject_duplicates(local)
    ordered = sorted(names, key=local.__getitem__)
    if selection == "all":
        return ordered
    if isinstance(selection, bool):
        raise FetchError(f"invalid shard selection {selection!r}")
    if isinstance(selection, int):
        return _first(ordered, selection)
    if isinstance(selection, (list, tuple)):
        return _by_index(ordered, local, selection)
    if isinstance(selection, str) and re.fullmatch(r"\d+,\d+", selection):
        x, y = (int(part) for part in selection.split(","))
        if not 1 <= x <= y:
            raise FetchError(f"shard selection {selection!r}: need 1 <= X <= Y")
        return [name for name in ordered if partition_keep(name, x, y)]
    raise FetchError(f"invalid shard selection {selection!r} (all, a count, a list of indices, or \"X,Y\")")


def _infer_split(name: str) -> str:
    for split in ("validate", "train", "test"):
        if name.startswith(split):
            return split
    raise FetchError(f"cannot tell the split of shard name {name!r}")


def _reject_duplicates(local: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for remote, name in local.items():
        if name in seen:
            raise FetchError(f"remote shards {seen[name]!r} and {remote!r} both map to {name!r}")
        seen[name] = remote


def _first(ordered: list[str], count: int) -> list[str]:
    if count < 1 or count > len(ordered):
        raise FetchError(f"shard selection {count}: only {len(ordered)} shards available")
    return ordered[:count]


def _by_index(ordered: list[str], local: dict[str, str], indices) -> list[str]:
    by_index = {shard_index(local[name]): name for name in ordered}
    missing = sorted(set(indices) - set(by_index))
    if missing:
        raise FetchError(f"shard selection: indices {missing} not available "
                         f"({len(by_index)} shards, indices {min(by_index, default=0)}..{max(by_index, default=0)})")
    wanted = set(indices)
    return [name for name in ordered if shard_index(local[name]) in wanted]


# ---------------------------------------------------------------- URLs

def remote_level(version: int, level: str) -> str:
    """2017 (version 1) folders are ``video_level``/``frame_level``."""
    return f"{level}_level" if int(version) == 1 else level


def plan_url(source: str, version: int, level: str, split: str) -> str | None:
    """Where the download plan lives, or None for sources without plans (gs://)."""
    source = source.rstrip("/")
    if source.startswith("gs://"):
        return None
    return f"{source}/{version}/download_plans/{remote_level(version, level)}_{split}.json"


def shard_folder_url(source: str, version: int, level: str, split: str, region: str) -> str:
    """The folder holding the shards; the official host serves files from ``{region}.``."""
    source = source.rstrip("/")
    parts = urlsplit(source)
    if parts.scheme in ("http", "https") and parts.hostname == OFFICIAL_HOST:
        source = urlunsplit(parts._replace(netloc=parts.netloc.replace(OFFICIAL_HOST, f"{region}.{OFFICIAL_HOST}", 1)))
    return f"{source}/{version}/{remote_level(version, level)}/{split}"


def redact_url(url: str) -> str:
    """The URL without user info, query or fragment: nothing secret reaches a manifest."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------- hashing and sidecars

def md5_file(path: str | Path) -> str:
    return _hash_file(path, with_crc32c=False)[0]


def _hash_file(path: str | Path, with_crc32c: bool) -> tuple[str, str | None]:
    digests = _Digests(with_crc32c)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digests.update(chunk)
    return digests.md5(), digests.crc32c()


class _Digests:
    def __init__(self, with_crc32c: bool):
        self._md5 = hashlib.md5()
        self._crc = None
        if with_crc32c:
            import google_crc32c
            self._crc = google_crc32c.Checksum()

    def update(self, chunk: bytes) -> None:
        self._md5.update(chunk)
        if self._crc is not None:
            self._crc.update(chunk)

    def md5(self) -> str:
        return self._md5.hexdigest()

    def crc32c(self) -> str | None:
        return None if self._crc is None else self._crc.digest().hex()


def _sidecar_path(final: Path) -> Path:
    return final.with_name(final.name + SIDECAR_SUFFIX)


def _read_sidecar(final: Path, stat: os.stat_result) -> dict | None:
    """The sidecar record, when it still describes the file as it is now."""
    try:
        record = json.loads(_sidecar_path(final).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("md5"), str):
        return None
    if record.get("bytes") != stat.st_size or record.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return record


def _write_sidecar(final: Path, record: dict) -> None:
    stat = final.stat()
    _write_json_atomic(_sidecar_path(final), {**record, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})


def _write_json_atomic(path: Path, payload: dict) -> None:
    try:
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    except OSError as err:
        raise FetchError(f"cannot write {path}: {_reason(err)}") from None


def _hash_problem(expected: Expected, size: int, md5: str, crc32c: str | None) -> str | None:
    """Why a file does not match `expected`, or None when it does."""
    if expected.size is not None and size != expected.size:
        return f"size mismatch: expected {expected.size} bytes, got {size}"
    if expected.md5 is not None and md5 != expected.md5:
        return f"md5 mismatch: expected {expected.md5}, got {md5}"
    if expected.md5 is None and expected.crc32c is not None and crc32c != expected.crc32c:
        return f"crc32c mismatch: expected {expected.crc32c}, got {crc32c}"
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- sources

def _gcs_hex(value: str | None) -> str | None:
    return base64.b64decode(value).hex() if value else None


class _Source:
    """One mirror: an fsspec filesystem plus how URLs map to its paths."""

    def __init__(self, source: str, policy: RetryPolicy):
        self.source = source.rstrip("/")
        self.scheme = urlsplit(self.source).scheme
        if self.scheme == "file":
            root = Path(self.source[len("file://"):]).expanduser().resolve()
            self.source = f"file://{root.as_posix()}"
            self.fs = fsspec.filesystem("file")
        elif self.scheme in ("http", "https"):
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout, sock_read=policy.timeout)
            self.fs = fsspec.filesystem("http", skip_instance_cache=True, client_kwargs={"timeout": timeout})
        elif self.scheme == "gs":
            # The core class: gcsfs's default one probes the gRPC control plane per bucket.
            from gcsfs.core import GCSFileSystem
            self.fs = GCSFileSystem(token="anon", skip_instance_cache=True)
        else:
            raise FetchError(f"unsupported data source {redact_url(source)!r} (file://, http(s)://, gs://)")

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def path(self, url: str) -> str:
        if self.scheme in ("http", "https"):
            return url
        return url.split("://", 1)[1]

    def open_kwargs(self, size: int | None, streaming: bool) -> dict:
        if self.scheme in ("http", "https"):
            return {"block_size": 0 if streaming else HTTP_BLOCK_SIZE, "size": size}
        if self.scheme == "gs":
            return {"block_size": GCS_BLOCK_SIZE}
        return {}

    def read_plan(self, url: str) -> bytes | None:
        """The plan's bytes; None when a file:// mirror has none."""
        try:
            return self.fs.cat_file(self.path(url))
        except FileNotFoundError:
            if self.is_local:
                return None
            raise

    def list_folder(self, url: str) -> dict[str, Expected]:
        entries = self.fs.ls(self.path(url), detail=True)
        listed = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "directory" or not name.endswith(".tfrecord"):
                continue
            listed[name] = Expected(md5=_gcs_hex(entry.get("md5Hash")), crc32c=_gcs_hex(entry.get("crc32c")),
                                    size=entry.get("size"), generation=_generation(entry))
        return listed

    def remote_info(self, url: str) -> Expected:
        info = self.fs.info(self.path(url))
        return Expected(size=info.get("size"), generation=_generation(info))


def _generation(info: dict) -> str | None:
    value = info.get("generation") or info.get("ETag")
    return str(value).strip('"') if value else None


# ---------------------------------------------------------------- retries

_TRANSIENT: tuple[type[BaseException], ...] = (OSError, aiohttp.ClientError, asyncio.TimeoutError)
try:
    from gcsfs.retry import HttpError as _GcsHttpError
    _TRANSIENT += (_GcsHttpError,)
except ImportError:  # gcsfs is only needed for gs:// sources
    pass


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        # fsspec's http info() reports any failure (a 500 too) as FileNotFoundError from the cause
        return _reason(err.__cause__) if err.__cause__ is not None else "not found"
    text = re.sub(r"//[^/@\s]+@", "//", " ".join(str(err).split()))  # no user:password@
    if not text:
        text = "timed out" if isinstance(err, (asyncio.TimeoutError, TimeoutError)) else "no details"
    return f"{type(err).__name__}: {text}"


def _with_retries(action: Callable, what: str, policy: RetryPolicy, sleep: Callable, local: bool):
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except _TRANSIENT as err:
            if local or attempt == policy.attempts:
                tries = "" if local else f" (after {attempt} attempt{'s' if attempt > 1 else ''})"
                raise FetchError(f"{what}: {_reason(err)}{tries}") from None
            sleep(policy.delay(attempt))


# ---------------------------------------------------------------- progress

class _Progress:
    """One byte bar for the whole fetch; totals are estimated while sizes are unknown."""

    def __init__(self, enabled: bool, sizes: list[int | None]):
        self._lock = threading.Lock()
        self._known = [s for s in sizes if s is not None]
        self._unknown = len(sizes) - len(self._known)
        self._count, self._done = len(sizes), 0
        self._bar = None
        if enabled and sizes:
            from tqdm import tqdm
            self._bar = tqdm(total=self._estimate(), unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, desc="fetch", dynamic_ncols=True)
            self._bar.set_postfix_str(f"0/{self._count} shards")

    def _estimate(self) -> int | None:
        if not self._known:
            return None
        return sum(self._known) + round(sum(self._known) / len(self._known) * self._unknown)

    def learn_size(self, size: int | None) -> None:
        if size is None:
            return
        with self._lock:
            if self._unknown:
                self._unknown -= 1
                self._known.append(size)
                if self._bar is not None:
                    self._bar.total = self._estimate()
                    self._bar.refresh()

    def add(self, nbytes: int) -> None:
        if self._bar is not None and nbytes:
            with self._lock:
                self._bar.update(nbytes)

    def shard_done(self) -> None:
        with self._lock:
            self._done += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self._done}/{self._count} shards")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------- one shard

@dataclass
class _Context:
    source: _Source
    dest: Path
    version: int
    policy: RetryPolicy
    sleep: Callable[[float], None]
    progress: _Progress = field(default_factory=lambda: _Progress(False, []))

    def final_path(self, shard: Shard) -> Path:
        final = self.dest / str(self.version) / shard.level / shard.split / shard.local_name
        if not final.resolve().is_relative_to(self.dest.resolve()):
            raise FetchError(f"refusing to write {shard.remote_name!r} outside {self.dest}")
        return final

    def label(self, shard: Shard) -> str:
        return f"{self.version}/{shard.level}/{shard.split}/{shard.local_name} (remote {shard.remote_name})"


def _verified_local(ctx: _Context, shard: Shard) -> dict | None:
    """The shard's record when its final file is already there and correct; no network.

    A ``.part`` left by an earlier run is removed: downloads never resume across runs.
    """
    final = ctx.final_path(shard)
    _remove(final.with_name(final.name + PART_SUFFIX))
    if not final.is_file():
        return None
    stat = final.stat()
    expected = shard.expected
    if expected.size is not None and stat.st_size != expected.size:
        return None
    record = _read_sidecar(final, stat)
    if expected.md5 is None and expected.crc32c is None:
        return record  # nothing to compare with: only our own verified sidecar counts
    needs_crc32c = expected.md5 is None and record is not None and not record.get("crc32c")
    if record is not None and not needs_crc32c:
        problem = _hash_problem(expected, stat.st_size, record["md5"], record.get("crc32c"))
        return record if problem is None else None
    md5, crc = _hash_file(final, with_crc32c=expected.crc32c is not None)
    if _hash_problem(expected, stat.st_size, md5, crc) is not None:
        return None
    record = {"md5": md5, "crc32c": crc, "remote": redact_url(shard.url), "generation": expected.generation,
              "fetched_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds")}
    _write_sidecar(final, record)
    return record


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class _RangeUnsupported(Exception):
    pass


def _copy_to_part(ctx: _Context, shard: Shard, part: Path, expected: Expected,
                  streaming: bool) -> tuple[int, str, str | None]:
    """Append the rest of the remote file to `part` (from where it stops); its size and hashes."""
    offset = part.stat().st_size if part.exists() and not streaming else 0
    digests = _Digests(with_crc32c=expected.crc32c is not None)
    if offset:
        with open(part, "rb") as done:
            for chunk in iter(lambda: done.read(CHUNK_SIZE), b""):
                digests.update(chunk)
    kwargs = ctx.source.open_kwargs(expected.size, streaming)
    remote = ctx.source.fs.open(ctx.source.path(shard.url), "rb", **kwargs)
    with remote as src, open(part, "ab" if offset else "wb") as dst:
        try:
            src.seek(offset)
            for chunk in iter(lambda: src.read(CHUNK_SIZE), b""):
                dst.write(chunk)
                digests.update(chunk)
                ctx.progress.add(len(chunk))
        except ValueError as err:  # fsspec: seek on a stream, or a server without range requests
            raise _RangeUnsupported(str(err)) from None
        dst.flush()
        os.fsync(dst.fileno())
    return part.stat().st_size, digests.md5(), digests.crc32c()


def _discard(ctx: _Context, part: Path) -> None:
    if part.exists():
        ctx.progress.add(-part.stat().st_size)
        _remove(part)


def _download(ctx: _Context, shard: Shard) -> dict:
    """Download to ``<shard>.part``, verify, then rename: the final name only ever holds a verified file."""
    final = ctx.final_path(shard)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PART_SUFFIX)
    for stale in (part, final, _sidecar_path(final)):
        _remove(stale)
    expected = _with_retries(lambda: _merge(shard.expected, ctx.source.remote_info(shard.url)),
                             redact_url(shard.url), ctx.policy, ctx.sleep, ctx.source.is_local)
    ctx.progress.learn_size(expected.size)
    try:
        md5, crc = _retrieve(ctx, shard, part, expected)
    finally:
        _discard(ctx, part)  # nothing left when it failed; already renamed when it worked
    record = {"md5": md5, "crc32c": crc, "remote": redact_url(shard.url),
              "generation": expected.generation, "fetched_at": _now()}
    _write_sidecar(final, record)
    return record


def _retrieve(ctx: _Context, shard: Shard, part: Path, expected: Expected) -> tuple[str, str | None]:
    """Attempts with backoff; a network failure resumes the ``.part``, a bad hash restarts it."""
    streaming, problem, mismatch = False, "", False
    for attempt in range(1, ctx.policy.attempts + 1):
        if attempt > 1:
            ctx.sleep(ctx.policy.delay(attempt - 1))
        try:
            size, md5, crc = _copy_to_part(ctx, shard, part, expected, streaming)
        except _RangeUnsupported:
            streaming, problem, mismatch = True, "server does not support resuming (range requests)", False
            _discard(ctx, part)
            continue
        except _TRANSIENT as err:
            if _local_disk_error(err, part):  # not the network: retrying cannot help
                raise FetchError(f"cannot write {part}: {_reason(err)}") from None
            problem, mismatch = _reason(err), False
            if ctx.source.is_local:
                break
            continue
        problem = _hash_problem(expected, size, md5, crc)
        if problem is None:
            os.replace(part, ctx.final_path(shard))
            return md5, crc
        mismatch = True
        _discard(ctx, part)
    if mismatch:
        raise FetchError(f"{ctx.label(shard)}: {problem} after {attempt} attempts ({redact_url(shard.url)})")
    raise FetchError(f"{redact_url(shard.url)}: {problem} (after {attempt} attempt{'s' if attempt > 1 else ''})")


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _local_disk_error(err: BaseException, part: Path) -> bool:
    """Disk full, over quota, read-only, or any error on the .part file itself."""
    return isinstance(err, OSError) and (
        err.errno in _DISK_ERRNOS or (err.filename is not None and Path(err.filename) == part))


def _merge(listed: Expected, fresh: Expected) -> Expected:
    """The source's own expectations first; the live object's metadata fills the gaps."""
    return replace(listed, size=listed.size if listed.size is not None else fresh.size,
                   generation=listed.generation or fresh.generation)


def _manifest_entry(ctx: _Context, shard: Shard, record: dict) -> dict:
    final = ctx.final_path(shard)
    entry = {"name": f"{ctx.version}/{shard.level}/{shard.split}/{shard.local_name}",
             "remote": redact_url(shard.url), "bytes": final.stat().st_size, "md5": record["md5"],
             "fetched_at": record["fetched_at"], "level": shard.level, "split": shard.split}
    for optional in ("crc32c", "generation"):
        if record.get(optional):
            entry[optional] = record[optional]
    return entry


# ---------------------------------------------------------------- planning

def _plan_entries(raw: bytes, url: str) -> dict[str, Expected]:
    try:
        files = json.loads(raw)["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (ValueError, KeyError, TypeError) as err:
        raise FetchError(f"{redact_url(url)}: malformed download plan ({_reason(err)})") from None
    entries = {}
    for name, md5 in files.items():
        check_remote_name(name)
        if not isinstance(md5, str) or not _MD5_HEX.match(md5.lower()):
            raise FetchError(f"{redact_url(url)}: malformed md5 {md5!r} for {name!r}")
        entries[name] = Expected(md5=md5.lower())
    return entries


def _available(ctx: _Context, level: str, split: str, region: str) -> tuple[str, dict[str, Expected]]:
    """The shard folder URL and every shard the source offers there."""
    source = ctx.source
    folder = shard_folder_url(source.source, ctx.version, level, split, region)
    plan = plan_url(source.source, ctx.version, level, split)
    if plan is not None:
        raw = _with_retries(lambda: source.read_plan(plan), redact_url(plan), ctx.policy, ctx.sleep, source.is_local)
        if raw is not None:
            return folder, _plan_entries(raw, plan)
        if not source.is_local:
            raise FetchError(f"{redact_url(plan)}: download plan not found")
    listed = _with_retries(lambda: source.list_folder(folder), redact_url(folder), ctx.policy, ctx.sleep,
                           source.is_local)
    for name in listed:
        check_remote_name(name)
    if not listed:
        raise FetchError(f"{redact_url(folder)}: no .tfrecord shards found")
    return folder, listed


def _plan_shards(ctx: _Context, data_params: dict) -> list[Shard]:
    shards = []
    for level in data_params["levels"]:
        for split in data_params["splits"]:
            if not (_FOLDER_PART.match(level) and _FOLDER_PART.match(split)):
                raise FetchError(f"invalid level/split {level!r}/{split!r}")
            folder, available = _available(ctx, level, split, data_params.get("region", "us"))
            try:
                chosen = select_shards(available, data_params.get("shards", {}).get(split, "all"), split)
            except FetchError as err:  # name the params key, and where the shards were counted
                if not str(err).startswith("shard selection"):
                    raise
                raise FetchError(f"data.shards.{split}: {err} in {redact_url(folder)}") from None
            shards += [Shard(level, split, name, remote_to_local_name(name, split), f"{folder}/{name}", available[name])
                       for name in chosen]
    return shards


def _run_all(work: Callable, items: list, workers: int) -> list:
    """work(item) for every item, `workers` at a time; the first failure cancels the rest."""
    if workers <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, item) for item in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            for future in futures:
                future.cancel()
            raise failed[0].exception()
        return [future.result() for future in futures]


# ---------------------------------------------------------------- entry points

def fetch_dataset(data_params: dict, dest: Path, manifest_path: Path, *, progress: bool = True,
                  retry: RetryPolicy | None = None, workers: int = 4,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
    """Fetch the selected shards into dest/{version}/{level}/{split}/ and write the manifest.

    `data_params` is the ``data`` section of params.yaml with ``source`` already a URL.
    """
    ctx = _make_context(data_params, dest, retry, sleep)
    return _fetch_shards(ctx, _plan_shards(ctx, data_params), manifest_path, progress, workers)


def plan_dataset(data_params: dict, *, retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> dict:
    """The shards `data_params` selects, resolved from the source's plans or listings; nothing is downloaded.

    The same resolution as fetch_dataset (and the same errors): ``{"version", "source",
    "shards": [entry, ...]}``, the shards in the order fetch_dataset fetches them, each
    entry ``{"name": "{version}/{level}/{split}/{local name}", "level", "split", "remote"
    (the remote file name), "expected": {"md5", "crc32c", "size", "generation"}}`` (None
    where the source does not say). No URL is stored, so nothing secret is either:
    fetch_one_shard rebuilds it from the params. Deterministic for an unchanged source.
    """
    ctx = _make_context(data_params, Path("."), retry, sleep)
    shards = _plan_shards(ctx, data_params)
    return {"version": ctx.version, "source": redact_url(ctx.source.source),
            "shards": [{"name": _shard_name(ctx, shard), "level": shard.level, "split": shard.split,
                        "remote": shard.remote_name, "expected": asdict(shard.expected)} for shard in shards]}


def fetch_planned(data_params: dict, plan: dict, dest: Path, manifest_path: Path, *, progress: bool = True,
                  retry: RetryPolicy | None = None, workers: int = 4,
                  sleep: Callable[[float], None] = time.sleep) -> dict:
    """fetch_dataset for the shards of `plan` (plan_dataset's answer) instead of a fresh resolution."""
    ctx = _make_context(data_params, dest, retry, sleep)
    return _fetch_shards(ctx, [_planned_shard(ctx, data_params, entry) for entry in plan["shards"]],
                         manifest_path, progress, workers)


def fetch_one_shard(data_params: dict, entry: dict, dest: Path, *, retry: RetryPolicy | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> dict:
    """Make one planned shard (an entry of plan_dataset) present and verified under dest; its manifest entry.

    fetch_dataset's path for a single shard: a shard already verified is skipped without
    a download, otherwise it is downloaded to ``.part`` with retries, checked against the
    plan's hashes and renamed. Writes no manifest.
    """
    ctx = _make_context(data_params, dest, retry, sleep)
    shard = _planned_shard(ctx, data_params, entry)
    record = _verified_local(ctx, shard)
    if record is None:
        record = _download(ctx, shard)
    return _manifest_entry(ctx, shard, record)


def _make_context(data_params: dict, dest: Path, retry: RetryPolicy | None, sleep: Callable[[float], None]) -> _Context:
    policy = retry or RetryPolicy()
    return _Context(_Source(data_params["source"], policy), Path(dest), int(data_params["version"]), policy, sleep)


def _shard_name(ctx: _Context, shard: Shard) -> str:
    return f"{ctx.version}/{shard.level}/{shard.split}/{shard.local_name}"


def _planned_shard(ctx: _Context, data_params: dict, entry: dict) -> Shard:
    """The Shard a plan entry describes, its URL rebuilt from the params; a plan that does not fit them is an error."""
    try:
        level, split, remote, name = entry["level"], entry["split"], entry["remote"], entry["name"]
        expected = Expected(**entry["expected"])
    except (KeyError, TypeError) as err:
        raise FetchError(f"malformed shard plan entry {entry!r} ({_reason(err)})") from None
    if not (isinstance(level, str) and isinstance(split, str) and _FOLDER_PART.match(level) and _FOLDER_PART.match(split)):
        raise FetchError(f"invalid level/split {level!r}/{split!r} in the shard plan")
    check_remote_name(remote)
    folder = shard_folder_url(ctx.source.source, ctx.version, level, split, data_params.get("region", "us"))
    shard = Shard(level, split, remote, remote_to_local_name(remote, split), f"{folder}/{remote}", expected)
    if _shard_name(ctx, shard) != name:
        raise FetchError(f"shard plan entry {name!r} does not fit the params (remote {remote!r}, "
                         f"data.version {ctx.version}): plan again")
    return shard


def _fetch_shards(ctx: _Context, shards: list[Shard], manifest_path: Path, progress: bool, workers: int) -> dict:
    """Verify or download every shard (`workers` at a time), then write the manifest."""
    records = _run_all(lambda shard: _verified_local(ctx, shard), shards, workers)
    todo = [i for i, record in enumerate(records) if record is None]
    ctx.progress = _Progress(progress, [shards[i].expected.size for i in todo])

    def fetch_one(shard: Shard) -> dict:
        record = _download(ctx, shard)
        ctx.progress.shard_done()
        return record

    try:
        for i, record in zip(todo, _run_all(fetch_one, [shards[i] for i in todo], workers)):
            records[i] = record
    finally:
        ctx.progress.close()
    entries = [_manifest_entry(ctx, shard, record) for shard, record in zip(shards, records)]
    manifest = {"source": redact_url(ctx.source.source), "version": ctx.version,
                "files": sorted(entries, key=lambda entry: entry["name"])}
    _write_json_atomic(Path(manifest_path), manifest)
    return manifest
