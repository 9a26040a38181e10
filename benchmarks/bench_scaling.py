"""How time and disk grow with the number of frame-level train shards: generate -> fetch ->
index -> one training epoch, for 1, 2, 4, 8 generated shards, each in a fresh temporary copy
of the workspace.

Per shard count N, in a copy of the repository at --commit (git archive; default HEAD) whose
params.yaml is that revision's with these overrides:

* generate.splits: train [N, --videos], validate [1, --videos] (the held-out videos come
  from validate: index.eval_splits); data.levels [frame], data.splits [train, validate];
* run_models [qrnn], models: the frame-level ones only, models.qrnn.epochs 1 (the
  repository's small QRNN otherwise).

Each stage runs through its command line (workflow/scripts/*.py, what `dvc repro` runs),
timed from outside (wall clock, including the interpreter and TensorFlow start-up; the
fastest of --repeat runs in fresh copies counts, the machine being shared). The
fetch is also timed as Snakemake runs it, fanned out (checkpoint fetch_plan, one
fetch_shard job per shard, the gathering fetch; `--cores` jobs at a time) into an empty
shard store. Disk: `du` of resources/ (hard links counted once) and of results/, and of
the folders inside resources/, after the training epoch.

The extrapolation to the full dataset is a least-squares line through the four points,
time (or disk) = a + b * train bytes, evaluated at 1.5 TB (every frame-level shard: 3844
in each of train, validate and test) and at 0.5 TB (the train split): it assumes each stage
costs the same per byte on the real shards as on the generated ones, on this machine.
--refit recomputes it from the runs in --out. What it does not model: the fetch reads
a local file:// mirror here, not the network; the generated mirror (resources/generated)
is a second copy that a real source does not have; real videos are longer (up to 300
frames) and the paper's models bigger.

    .venv/bin/python benchmarks/bench_scaling.py [--shards 1 2 4 8] [--videos 1900] [--repeat 2]
        [--cores 2] [--out benchmarks/results/scaling.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# YouTube-8M 2018 frame level: 3844 shards in each of train, validate and test, 100-150 MB
# each (../shared/yt8m/README.md), ~1.5 TB in all; the train split is about a third.
FULL_BYTES = 1.5e12
TARGETS = {"full frame-level dataset (3 x 3844 shards)": FULL_BYTES,
           "train split (3844 shards)": FULL_BYTES / 3}
STAGES = ("generate", "fetch", "index", "train")


def copy_repo(dest: Path, commit: str) -> None:
    """The repository's files at `commit` (`git archive`: what is committed, not work in progress)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def scaled_params(shards: int, videos: int, commit: str) -> dict:
    text = subprocess.run(["git", "show", f"{commit}:params.yaml"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    params = yaml.safe_load(text)
    params["generate"]["splits"] = {"train": [shards, videos], "validate": [1, videos]}
    params["data"].update(source="generated", levels=["frame"], splits=["train", "validate"],
                          shards={"train": "all", "validate": "all"})
    params["models"] = {name: model for name, model in params["models"].items() if model["level"] == "frame"}
    params["models"]["qrnn"]["epochs"] = 1
    params["run_models"] = ["qrnn"]
    return params


def tool_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, as `make run` on this machine
    return env


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {result.returncode}); see {log}")
    return seconds


def du(path: Path) -> int:
    """Disk usage in bytes (allocated blocks; a file with several hard links counted once)."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def train_bytes(root: Path) -> tuple[int, int]:
    files = sorted((root / "resources/yt8m/2/frame/train").glob("*.tfrecord"))
    return len(files), sum(f.stat().st_size for f in files)


def measure(shards: int, videos: int, cores: int, work: Path, logs: Path, commit: str) -> dict:
    root = work / f"shards-{shards}"
    copy_repo(root, commit)
    (root / "params.yaml").write_text(yaml.safe_dump(scaled_params(shards, videos, commit), sort_keys=False))
    log = logs / f"shards-{shards}.log"
    log.write_text("")
    py = sys.executable
    seconds = {
        "generate": timed([py, "workflow/scripts/generate.py"], root, log),
        "fetch": timed([py, "workflow/scripts/fetch.py"], root, log),
        "index": timed([py, "workflow/scripts/index.py"], root, log),
        "train": timed([py, "workflow/scripts/train.py", "--model", "qrnn"], root, log),
    }
    count, nbytes = train_bytes(root)
    assert count == shards, (count, shards)
    disk = {"resources": du(root / "resources"), "results": du(root / "results")}
    for sub in ("generated", "store", "yt8m", "work"):
        disk[f"resources/{sub}"] = du(root / "resources" / sub)  # each alone: yt8m's hard links count here
    manifest = json.loads((root / "results/data/manifest.json").read_text())
    stats = json.loads((root / "results/models/qrnn/train_stats.json").read_text())

    # The same fetch as Snakemake fans it out, into an empty store (the generated mirror stays).
    for path in ("resources/store", "resources/yt8m", "results/data"):
        shutil.rmtree(root / path, ignore_errors=True)
    seconds["fetch_fanout"] = timed(["snakemake", "--cores", str(cores), "--workflow-profile", "workflow/profiles/default",
                                     "results/data/manifest.json"], root, log)
    jobs = len(list((root / "resources/store/records/2/frame").rglob("*.json")))
    again = json.loads((root / "results/data/manifest.json").read_text())["files"]
    assert [(e["name"], e["md5"]) for e in again] == [(e["name"], e["md5"]) for e in manifest["files"]]
    shutil.rmtree(root, ignore_errors=True)
    return {"shards": shards, "videos": shards * videos, "train_bytes": nbytes, "seconds": seconds,
            "disk_bytes": disk, "fetch_shard_jobs": jobs, "train_examples_per_second": stats.get("examples_per_second"),
            "fetched_files": len(manifest["files"])}


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def extrapolate(runs: list[dict]) -> dict:
    xs = [run["train_bytes"] for run in runs]
    out = {"assumption": "linear in the bytes of frame-level shards: a least-squares line through the measured "
                         "points, cost = a + b * train bytes, evaluated at each target's bytes; same machine, same "
                         "small model, the fetch from a local file:// mirror (no network)",
           "fits": {}, "targets": {}}
    for kind in ("seconds", "disk_bytes"):
        for key in runs[0][kind]:
            a, b = fit(xs, [run[kind][key] for run in runs])
            out["fits"][f"{kind}.{key}"] = {"intercept": a, "per_byte": b}
    for target, nbytes in TARGETS.items():
        values = {"bytes": nbytes, "seconds": {}, "disk_bytes": {}}
        for name, line in out["fits"].items():
            kind, key = name.split(".", 1)
            values[kind][key] = line["intercept"] + line["per_byte"] * nbytes if line["per_byte"] > 0 else None
        out["targets"][target] = values  # None: no growth measured
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--videos", type=int, default=1900,
                        help="videos per generated shard (~65 MB frame level; at most 1922: 3844 ids per shard index)")
    parser.add_argument("--cores", type=int, default=2, help="Snakemake --cores for the fanned-out fetch")
    parser.add_argument("--repeat", type=int, default=2, help="runs per shard count; the fastest time of each stage counts")
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: recompute the extrapolation of the runs already in --out")
    parser.add_argument("--commit", default="HEAD", help="the revision measured (copied with git archive)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scaling.json")
    parser.add_argument("--keep-logs", type=Path, default=None, help="a folder for the stages' logs")
    args = parser.parse_args(argv)

    if args.refit:
        result = json.loads(args.out.read_text())
        result["extrapolation"] = extrapolate(result["runs"])
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"rewrote the extrapolation in {args.out}")
        return
    commit = subprocess.run(["git", "rev-parse", args.commit], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    runs = []
    with tempfile.TemporaryDirectory(prefix="yt8m-scaling-") as tmp:
        work = Path(tmp)
        logs = args.keep_logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for shards in args.shards:
            samples = [measure(shards, args.videos, args.cores, work, logs, commit) for _ in range(args.repeat)]
            run = samples[-1] | {"seconds": {stage: min(s["seconds"][stage] for s in samples) for stage in samples[0]["seconds"]},
                                 "seconds_samples": [s["seconds"] for s in samples]}
            runs.append(run)
            print(json.dumps(run), flush=True)
    result = {
        "what": "generate -> fetch -> index -> one training epoch (qrnn), per number of generated frame-level train shards",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "note": "wall-clock seconds on a machine whose cores other work shared"},
        "git": {"commit": commit},
        "videos_per_shard": args.videos,
        "params_overrides": {"generate.splits": {"train": ["N", args.videos], "validate": [1, args.videos]},
                             "data.levels": ["frame"], "data.splits": ["train", "validate"],
                             "run_models": ["qrnn"], "models": "the frame-level ones", "models.qrnn.epochs": 1},
        "runs": runs,
        "extrapolation": extrapolate(runs) if len(runs) >= 2 else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
