"""The index file (results/index/index.parquet): its columns, and reading it back checked.

The index file carries the sha256 of its content (column types and values, and the pandas
metadata), computed before writing and checked by read_index: a flipped byte anywhere in
what a reader uses is found, however it got there (the disk, a copy, DVC's cache).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from yt8m_qrnn.pipeline.io import CorruptArtifact

SUBSETS = ("train", "valid", "eval", "test")
COLUMNS = ["shard", "level", "split", "offset", "length", "id", "labels", "num_frames", "rgb_at", "audio_at",
           "data_crc"]
PARQUET_SCHEMA = pa.schema([
    ("shard", pa.string()), ("level", pa.string()), ("split", pa.string()),
    ("offset", pa.int64()), ("length", pa.int64()), ("id", pa.string()),
    ("labels", pa.list_(pa.int32())), ("num_frames", pa.int32()), ("rgb_at", pa.int32()), ("audio_at", pa.int32()),
    ("data_crc", pa.int64()), ("subset", pa.string()),
])

# The index file carries the sha256 of its content (column types and values, and the pandas
# metadata), computed before writing and checked by read_index: a flipped byte anywhere in
# what a reader uses is found, however it got there (the disk, a copy, DVC's cache).
CONTENT_DIGEST_KEY = b"yt8m_qrnn.content_sha256"
REINDEX = "rerun the index stage (dvc repro --force --single-item index, or snakemake --forcerun index)"


def with_content_digest(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata((table.schema.metadata or {}) | {CONTENT_DIGEST_KEY: content_digest(table)})


def content_digest(table: pa.Table) -> bytes:
    """sha256 (hex) of the columns' names, types and values and the pandas metadata, whatever the
    table's chunking: the same for a table and for what reading its parquet file gives back."""
    digest = hashlib.sha256(repr([(field.name, _type_name(field.type)) for field in table.schema]).encode())
    digest.update((table.schema.metadata or {}).get(b"pandas", b""))
    for column in table.columns:
        _hash_values(digest, column.combine_chunks())
    return digest.hexdigest().encode()


def _type_name(kind: pa.DataType) -> str:
    """The type without the name of a list's item field (which parquet readers may rename)."""
    return f"list<{_type_name(kind.value_type)}>" if pa.types.is_list(kind) else str(kind)


def _hash_values(digest, array: pa.Array) -> None:
    digest.update(np.packbits(array.is_null().to_numpy(zero_copy_only=False)).tobytes())
    if not len(array):
        return
    if pa.types.is_string(array.type) or pa.types.is_list(array.type):
        bounds = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
        start, end = (int(bounds[0]), int(bounds[-1])) if len(bounds) else (0, 0)
        digest.update((bounds - start).tobytes())
        if pa.types.is_string(array.type):
            digest.update(memoryview(array.buffers()[2])[start:end] if end > start else b"")
        else:
            _hash_values(digest, array.values.slice(start, end - start))
    else:
        digest.update(array.fill_null(0).to_numpy(zero_copy_only=False).tobytes())


def read_index(path: Path) -> pd.DataFrame:
    """The index written by run_index, after checking it is what the index stage wrote (CorruptArtifact if
    not). An index without a recorded digest (written by other code, e.g. a test's) is read unchecked."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:  # a flipped byte in a page or in the footer
        raise CorruptArtifact(path, f"parquet cannot read it ({' '.join(str(err).split())})", REINDEX) from None
    recorded = (table.schema.metadata or {}).get(CONTENT_DIGEST_KEY)
    if recorded is not None:
        _check_content(path, table, recorded)
    return table.to_pandas()


def _check_content(path: Path, table: pa.Table, recorded: bytes) -> None:
    try:
        found = content_digest(table)
    except (ValueError, TypeError, pa.ArrowException) as err:  # columns of unexpected types
        raise CorruptArtifact(path, f"its content cannot be hashed ({err})", REINDEX) from None
    if found != recorded:
        raise CorruptArtifact(path, f"content sha256 {found.decode()}, but the file records "
                                    f"{recorded.decode(errors='replace')}", REINDEX)
