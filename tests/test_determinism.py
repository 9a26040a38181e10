"""Two clean runs agree to the last bit: the index, the trained weights and the predictions, each
run in a fresh process (the fast tier's determinism check; the chaos test runs the whole DAG)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, tool_env
from yt8m_qrnn.stages.generate import generate_mirror

GENERATE = {"seed": 5, "num_events": 6, "min_frames": 5, "max_frames": 9, "noise": 0.6,
            "splits": {"train": [2, 30], "validate": [1, 30]}}
TRAIN = {"seed": 7, "learning_rate_decay": 0.95, "learning_rate_decay_examples": 4_000_000,
         "clip_gradient_norm": 1.0, "log_every_steps": 50, "patience": 2}
# zoneout and random frame sampling: the runs draw random numbers while training
MODELS = {
    "qrnn": {"kind": "qrnn", "level": "frame", "hidden": 8, "layers": 2, "window": 2, "zoneout": 0.2,
             "learning_rate": 0.01, "batch_size": 16, "epochs": 2},
    "dbof": {"kind": "dbof", "level": "frame", "cluster_size": 16, "hidden_size": 8, "iterations": 4,
             "learning_rate": 0.01, "batch_size": 16, "epochs": 2},
}

ONE_RUN = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import keras, numpy as np
    from yt8m_qrnn.data import stream as data_lib
    from yt8m_qrnn.stages.index import assign_subsets, index_shards
    from yt8m_qrnn.stages.train import train_model

    args = json.loads(sys.argv[1])
    base, out = Path(args["mirror"]) / "2", Path(args["out"])
    shards = [(p, str(p.relative_to(base)), p.parent.parent.name, p.parent.name)
              for p in sorted(base.glob("*/*/*.tfrecord"))]
    table, _ = index_shards(shards, 2)
    table = assign_subsets(table, ["validate"], 0.5, "salt", validation_fraction=0.2)
    table.to_parquet(out / "index.parquet")
    digests = {"index": hashlib.sha256((out / "index.parquet").read_bytes()).hexdigest()}
    for name, cfg in args["models"].items():
        stats = train_model(name, cfg, args["train"], version=2, num_classes=3862, data_root=base,
                            index_path=out / "index.parquet", out_dir=out / name, work_dir=out / "work")
        model = keras.saving.load_model(out / name / "model.keras", compile=False)
        weights = b"".join(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes() for w in model.weights)
        rows = data_lib.subset_rows(table, "eval", cfg["level"])
        predictions = model.predict(data_lib.make_dataset(base, rows, cfg["level"], 2, 3862, 32), verbose=0)
        digests[name] = {"weights": hashlib.sha256(weights).hexdigest(),
                         "predictions": hashlib.sha256(predictions.tobytes()).hexdigest(),
                         "history": (out / name / "history.csv").read_text(),
                         "determinism": stats["determinism"]}
    print("DIGESTS " + json.dumps(digests))
""")


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory) -> list[dict]:
    """Two runs with the same params, and a third with another training seed."""
    mirror = tmp_path_factory.mktemp("determinism") / "mirror"
    generate_mirror(GENERATE, version=2, num_classes=3862, root=mirror)
    runs = []
    # a third run with another seed shows that the digests can tell two runs apart
    for name, models, train in (("first", MODELS, TRAIN), ("second", MODELS, TRAIN),
                                ("other-seed", {"qrnn": MODELS["qrnn"]}, TRAIN | {"seed": 8})):
        out = mirror.parent / name
        out.mkdir()
        args = {"mirror": str(mirror), "out": str(out), "models": models, "train": train}
        done = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(args)], cwd=REPO, env=tool_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.split("DIGESTS ", 1)[1]))
    return runs


def test_the_index_is_byte_identical(three_runs):
    first, second, _ = three_runs
    assert first["index"] == second["index"]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_weights_predictions_and_history_are_identical(three_runs, model):
    first, second, _ = three_runs
    assert first[model]["weights"] == second[model]["weights"]
    assert first[model]["predictions"] == second[model]["predictions"]
    assert first[model]["history"].splitlines()[0].startswith("epoch,loss")
    assert _without_timings(first[model]["history"]) == _without_timings(second[model]["history"])


def _without_timings(history: str) -> list[list[str]]:
    """epoch, loss, learning_rate, step, val_gap of each row (seconds and examples/s are the machine's)."""
    return [[field for i, field in enumerate(line.split(",")) if i not in (3, 4)] for line in history.splitlines()]


def test_another_seed_gives_other_weights_and_predictions(three_runs):
    first, _, other = three_runs
    assert other["index"] == first["index"]
    assert other["qrnn"]["weights"] != first["qrnn"]["weights"]
    assert other["qrnn"]["predictions"] != first["qrnn"]["predictions"]


def test_the_settings_are_recorded(three_runs):
    settings = three_runs[0]["qrnn"]["determinism"]
    assert settings["tf_op_determinism"] is True and settings["seeding"] == "keras.utils.set_random_seed"
