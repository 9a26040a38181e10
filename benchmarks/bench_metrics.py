"""Time EvaluationMetrics on a validation-sized stream of random predictions.

Usage: .venv/bin/python benchmarks/bench_metrics.py [--videos N] [--out figures.json]

Scores are uniform random (float32, as a model emits them) with about 3 labels
per video. Each batch is generated outside the timed region with a fixed seed;
only accumulate() and get() are timed.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from yt8m_qrnn.metrics.official import EvaluationMetrics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=3862)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--labels-per-video", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    return parser.parse_args()


def random_batch(rng: np.random.Generator, size: int, num_classes: int, labels_per_video: int):
    predictions = rng.random((size, num_classes), dtype=np.float32)
    labels = np.zeros((size, num_classes), dtype=np.uint8)
    # Draws may repeat a class, so a video gets labels_per_video labels or slightly fewer.
    label_classes = rng.integers(0, num_classes, size=(size, labels_per_video))
    labels[np.arange(size)[:, None], label_classes] = 1
    return predictions, labels


def run_benchmark(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    metrics = EvaluationMetrics(args.classes, top_k=args.top_k)
    accumulate_seconds = 0.0
    for start in range(0, args.videos, args.batch_size):
        predictions, labels = random_batch(
            rng, min(args.batch_size, args.videos - start), args.classes, args.labels_per_video
        )
        started = time.perf_counter()
        metrics.accumulate(predictions, labels)
        accumulate_seconds += time.perf_counter() - started
    started = time.perf_counter()
    results = metrics.get()
    get_seconds = time.perf_counter() - started
    return {
        "videos": args.videos,
        "classes": args.classes,
        "batch_size": args.batch_size,
        "top_k": args.top_k,
        "accumulate_s": accumulate_seconds,
        "get_s": get_seconds,
        "total_s": accumulate_seconds + get_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "metrics": {key: results[key] for key in ("gap", "map", "map_present", "hit_at_one", "perr")},
    }


def main() -> None:
    args = parse_args()
    figures = run_benchmark(args)
    print(f"videos={figures['videos']} classes={figures['classes']} batch_size={figures['batch_size']}")
    print(f"accumulate: {figures['accumulate_s']:.3f} s")
    print(f"get:        {figures['get_s']:.3f} s")
    print(f"total:      {figures['total_s']:.3f} s")
    print(f"peak RSS:   {figures['peak_rss_mib']:.0f} MiB")
    print("metrics:    " + ", ".join(f"{k}={v:.6f}" for k, v in figures["metrics"].items()))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
