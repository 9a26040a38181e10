"""Index throughput next to a plain sequential read of the same files, in the same run.

Uses the real 2018 video-level validate shards when ../shared/yt8m is present,
else generated shards in the same format (--generated forces that; --level frame
generates frame-level shards instead). The files are read once first so that
both measurements see a warm page cache; each measurement is repeated and the
best and median rates are reported.

    .venv/bin/python benchmarks/bench_index.py [--repeat 7] [--workers N] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_2018 = REPO.parent / "shared" / "yt8m" / "2018" / "video"
BLOCK = 8 << 20


def raw_read(paths: list[Path]) -> int:
    """Plain sequential read in 8 MB blocks; returns the bytes read."""
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while block := f.read(BLOCK):
                total += len(block)
    return total


def generate_shards(folder: Path, level: str, shards: int, videos: int, seed: int = 0) -> list[Path]:
    from tensorflow.core.example import example_pb2

    from yt8m_qrnn.records.tfrecord import write_records

    rng = np.random.default_rng(seed)
    paths = []
    for s in range(shards):
        records = []
        for v in range(videos):
            labels = sorted(rng.choice(3862, rng.integers(1, 6), replace=False).tolist())
            if level == "video":
                example = example_pb2.Example()
                feats = example.features.feature
                feats["id"].bytes_list.value.append(f"{v:04d}{s:02d}".encode())
                feats["labels"].int64_list.value.extend(labels)
                feats["mean_rgb"].float_list.value.extend(rng.standard_normal(1024, np.float32).tolist())
                feats["mean_audio"].float_list.value.extend(rng.standard_normal(128, np.float32).tolist())
            else:
                example = example_pb2.SequenceExample()
                example.context.feature["id"].bytes_list.value.append(f"{v:04d}{s:02d}".encode())
                example.context.feature["labels"].int64_list.value.extend(labels)
                lists = example.feature_lists.feature_list
                for _ in range(int(rng.integers(60, 300))):
                    lists["rgb"].feature.add().bytes_list.value.append(rng.bytes(1024))
                    lists["audio"].feature.add().bytes_list.value.append(rng.bytes(128))
            records.append(example.SerializeToString())
        path = folder / f"train{s:04d}.tfrecord"
        write_records(path, records)
        paths.append(path)
    return paths


def rates(seconds: list[float], size: int) -> dict:
    return {"best_mb_s": size / min(seconds) / 1e6, "median_mb_s": size / statistics.median(seconds) / 1e6,
            "seconds": seconds}


def timed(fn) -> float:
    """Seconds that fn() takes; its result is freed after the clock stops (freeing an index is not indexing)."""
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    del result
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", action="store_true", help="use generated shards even if real ones exist")
    parser.add_argument("--level", choices=["video", "frame"], default="video", help="level of generated shards")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workers", type=int, default=None, help="index threads (default: the index's own choice)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    from yt8m_qrnn.stages import index as ix  # imports TensorFlow's protobuf classes: a one-off cost, reported apart
    import_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        if REAL_2018.is_dir() and not args.generated:
            source, level, paths = f"real 2018 video-level validate shards ({REAL_2018})", "video", \
                sorted(REAL_2018.glob("validate*.tfrecord"))
        else:
            level = args.level
            shards, videos = (100, 288) if level == "video" else (4, 100)
            source = f"generated {level}-level shards ({shards} x {videos} videos)"
            paths = generate_shards(Path(tmp), level, shards, videos)
        shards = [(p, p.name, level, "validate") for p in paths]
        size = raw_read(paths)  # warm the page cache
        # warm lazy imports and allocators; compiles the fast path unless numba's cache holds it
        first_call_seconds = timed(lambda: ix.index_shards(shards, 2, "fail", workers=args.workers))

        read_s, index_s, serial_s = [], [], []
        for _ in range(args.repeat):  # interleaved, so that background load hits all three alike
            read_s.append(timed(lambda: raw_read(paths)))
            index_s.append(timed(lambda: ix.index_shards(shards, 2, "fail", workers=args.workers)))
            serial_s.append(timed(lambda: ix.index_shards(shards, 2, "fail", workers=1)))
        rows = len(ix.index_shards(shards, 2, "fail", workers=1)[0])

    result = {
        "source": source, "files": len(paths), "bytes": size, "records": rows, "repeat": args.repeat,
        "cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
        "import_seconds": import_seconds, "first_call_seconds": first_call_seconds,
        "raw_read": rates(read_s, size),
        "index": rates(index_s, size) | {"workers": args.workers or "default"},
        "index_serial": rates(serial_s, size) | {"workers": 1},
    }
    result["index_over_raw_best"] = result["index"]["best_mb_s"] / result["raw_read"]["best_mb_s"]
    result["index_over_raw_median"] = result["index"]["median_mb_s"] / result["raw_read"]["median_mb_s"]

    print(f"{source}: {len(paths)} files, {size / 1e6:.1f} MB, {rows} records "
          f"({result['cpus']} cpus, load average {result['load_average'][0]:.2f})")
    print(f"  import yt8m_qrnn.stages.index (TensorFlow protobuf classes): {import_seconds:.2f} s, once per process")
    print(f"  first index call (compiles the fast path unless numba's cache has it): {first_call_seconds:.2f} s")
    for name, key in (("raw sequential read, 8 MB blocks", "raw_read"), ("index, default workers", "index"),
                      ("index, 1 thread", "index_serial")):
        print(f"  {name:34s} best {result[key]['best_mb_s']:8.1f} MB/s   median {result[key]['median_mb_s']:8.1f} MB/s")
    print(f"  index / raw read: best {result['index_over_raw_best']:.2f}, median {result['index_over_raw_median']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
