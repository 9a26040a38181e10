"""Put file times back in pipeline order after `dvc pull` / `dvc checkout`, so that
`snakemake -n` agrees with `dvc status` that nothing needs to run.

DVC restores contents, not times: pulled outputs get the time of the pull, in no
particular order, and Snakemake (rerun trigger: mtime) then sees a stage's outputs
older than its inputs and wants to rerun. This script, run from the repository root:

1. refuses (exit 1) unless `dvc status` is clean: times are only rewritten when DVC's
   hashes say every output matches its inputs, code and params (dvc.lock);
2. rewrites the params stamps (results/params/*.json) that the Snakemake rules take
   as inputs, as the Snakefile does when it starts;
3. gives every output of a stage (every file and folder inside, and Snakemake's
   .snakemake_timestamp and benchmark file when present) one time, later than every
   source file and params stamp and one second later than the outputs of the stages
   it depends on, in the topological order of dvc.yaml.

Usage: python workflow/scripts/restore_mtimes.py [--params params.yaml] [--no-check]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from yt8m_qrnn.pipeline.params import benchmark_path, load_params, sync_params_stamp  # noqa: E402

STEP = 1.0  # seconds between a stage's outputs and those of the stages it depends on


def stage_name(addressing: str) -> tuple[str, str | None]:
    name, _, item = addressing.partition("@")
    return name, item or None


def pipeline(repo) -> list[tuple[str, list[str], list[str], int]]:
    """(stage, output paths, dependency paths, depth) for every stage, deps first."""
    import networkx as nx

    graph = repo.index.graph  # edge a -> b: stage a depends on stage b
    depth: dict = {}
    for stage in reversed(list(nx.topological_sort(graph))):
        depth[stage] = 1 + max((depth[dep] for dep in graph.successors(stage)), default=-1)
    stages = sorted(depth, key=lambda s: (depth[s], s.addressing))
    return [(s.addressing, [o.def_path for o in s.outs], [d.def_path for d in s.deps if not hasattr(d, "params")],
             depth[s]) for s in stages]


def tree(path: Path):
    """`path` and, for a folder, everything inside it (files before their folders)."""
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path, topdown=False):
            yield from (Path(root) / name for name in files)
            yield from (Path(root) / name for name in dirs)
    if path.exists() or path.is_symlink():
        yield path


def newest(paths) -> float:
    return max((p.stat().st_mtime for path in paths for p in tree(Path(path)) if p.exists()), default=0.0)


def restore(params_path: str = "params.yaml", check: bool = True) -> dict[str, float]:
    from dvc.repo import Repo

    with Repo(".") as repo:
        if check:
            changed = repo.status()
            if changed:
                raise SystemExit(f"error: dvc status is not clean ({', '.join(sorted(changed))}); "
                                 "run `dvc pull` (or `dvc repro`) first: times are only restored over up-to-date outputs")
        stages = pipeline(repo)

    params = load_params(params_path)
    stamps = []
    for name, _, _, _ in stages:
        stage, model = stage_name(name)
        stamps.append(sync_params_stamp(params, stage, model))

    outputs = {Path(out) for _, outs, _, _ in stages for out in outs}
    produced = lambda dep: any(dep == o or o in dep.parents or dep in o.parents for o in outputs)  # noqa: E731
    sources = {Path(dep) for _, _, deps, _ in stages for dep in deps if not produced(Path(dep))}
    base = max(time.time(), newest(sources)) + STEP
    for stamp in stamps:
        os.utime(stamp, (base - STEP, base - STEP))

    times = {}
    for name, outs, _, depth in stages:
        when = base + depth * STEP
        stage, model = stage_name(name)
        carriers = [Path(out) for out in outs] + [Path(benchmark_path(stage, model))]
        for carrier in carriers:
            for path in tree(carrier):
                os.utime(path, (when, when))
        times[name] = when
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-check", action="store_true", help="skip the `dvc status` check")
    args = parser.parse_args(argv)
    times = restore(args.params, check=not args.no_check)
    print(f"restored the times of {len(times)} stages' outputs in pipeline order")


if __name__ == "__main__":
    main()
