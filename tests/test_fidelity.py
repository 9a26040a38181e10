"""The models and protocol are the starter's, or say where they are not: the MoE's L2 default,
a video-level QRNN whose every parameter trains and whose zoneout cannot differ between training
and inference, the split protocols, and the validation subset carved out of the training videos."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import yaml

import keras
from conftest import REPO
from yt8m_qrnn.pipeline.params import ParamsError, load_params, validate_params
from yt8m_qrnn.stages.index import assign_subsets
from yt8m_qrnn.models.starter import build_model, trainable_parameter_count

C = 50
D = 1152
CONFIGS = ("params.yaml", "config/params.paper.yaml", "config/params.sample.yaml")
VIDEO_QRNN = {"kind": "qrnn", "level": "video", "hidden": 16, "layers": 2, "window": 1, "pooling": "fo",
              "zoneout": 0.0, "num_mixtures": 2, "learning_rate": 0.01, "batch_size": 8, "epochs": 1}


@pytest.mark.parametrize("config", CONFIGS)
def test_every_moe_uses_the_starter_l2_default(config):
    params = load_params(REPO / config)
    moes = [m for m in params["models"].values() if m["kind"] == "moe"]
    assert moes and all(m["l2_penalty"] == 1e-8 for m in moes)


def test_the_moe_builder_defaults_to_the_starter_l2():
    model = build_model("m", {"kind": "moe", "level": "video"}, C)
    moe = model.get_layer("moe")
    assert moe.l2_penalty == 1e-8
    assert moe.gates.kernel_regularizer.l2 == pytest.approx(1e-8 / 2)  # slim: penalty * sum(w**2) / 2


def test_video_level_qrnn_parameters_all_train():
    model = build_model("q", VIDEO_QRNN, C)
    hidden, mixtures = 16, 2
    # fo-pooling: z, f, o gates; window 1: one kernel row block per input; then the MoE head
    expected = (D * 3 * hidden + 3 * hidden) + (hidden * 3 * hidden + 3 * hidden) \
        + hidden * C * (mixtures + 1) + hidden * C * mixtures + C * mixtures
    assert trainable_parameter_count(model) == expected == model.count_params()
    x = {"features": tf.random.normal((4, D), seed=1)}
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    dead = [w.path for w, g in zip(model.trainable_weights, grads) if g is None or not np.any(g.numpy())]
    assert not dead, f"parameters that never get a gradient: {dead}"


def test_video_level_qrnn_is_the_same_function_in_training_and_inference():
    model = build_model("q", VIDEO_QRNN, C)
    x = {"features": np.random.default_rng(2).normal(size=(6, D)).astype("float32")}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x, training=True)),
                                  keras.ops.convert_to_numpy(model(x, training=False)))


@pytest.mark.parametrize("key, value", [("window", 2), ("zoneout", 0.1)])
def test_video_level_qrnn_refuses_a_window_or_zoneout(key, value):
    with pytest.raises(ValueError, match="one step"):
        build_model("q", VIDEO_QRNN | {key: value}, C)
    params = load_params(REPO / "params.yaml")
    params["models"]["qrnn"] = VIDEO_QRNN | {key: value}
    with pytest.raises(ParamsError, match=rf"models\.qrnn\.{key}: a video-level QRNN runs over one step"):
        validate_params(params)


def test_a_model_that_does_not_run_is_not_checked_against_the_fetched_levels():
    params = load_params(REPO / "params.yaml")
    params["data"]["levels"] = ["video"]
    params["run_models"] = ["logistic", "moe"]
    validate_params(params)  # lstm, qrnn (frame level) are defined but not run
    params["run_models"].append("lstm")
    with pytest.raises(ParamsError, match="models.lstm.level: 'frame' is not fetched"):
        validate_params(params)


def test_the_paper_and_sample_configs_say_where_each_non_starter_value_comes_from():
    for config in ("config/params.paper.yaml", "config/params.sample.yaml"):
        text = (REPO / config).read_text()
        data = yaml.safe_load(text)
        assert data["index"]["protocol"] in ("starter", "hash")
        for line in text.split("\nbench:")[0].splitlines():  # the bench's epochs are passes over files
            if line.strip().startswith(("epochs:", "patience:", "seeds:", "validation_fraction:")):
                assert "#" in line, f"{config}: {line.strip()} has no source comment"


# ---------------------------------------------------------------- split protocols


def index_rows(count=2000) -> pd.DataFrame:
    splits = ["train"] * (count // 2) + ["validate"] * (count // 2)
    return pd.DataFrame({"id": [f"v{i:05d}" for i in range(count)], "split": splits,
                         "labels": [[i % 7] for i in range(count)], "level": "video"})


def test_the_starter_protocol_trains_on_train_and_evaluates_on_validate():
    out = assign_subsets(index_rows(), ["validate"], 0.3, "s", "starter", 0.0)
    assert set(out.loc[out["split"] == "validate", "subset"]) == {"eval"}
    assert set(out.loc[out["split"] == "train", "subset"]) == {"train"}


def test_the_hash_protocol_holds_out_a_fraction_of_validate_by_id():
    out = assign_subsets(index_rows(), ["validate"], 0.3, "s", "hash", 0.0)
    validate = out[out["split"] == "validate"]
    assert 0.25 < (validate["subset"] == "eval").mean() < 0.35
    assert set(out.loc[out["split"] == "train", "subset"]) == {"train"}
    again = assign_subsets(index_rows().iloc[::-1], ["validate"], 0.3, "s", "hash", 0.0)
    assert again.sort_values("id")["subset"].tolist() == out.sort_values("id")["subset"].tolist()


@pytest.mark.parametrize("protocol", ["starter", "hash"])
def test_validation_videos_come_only_from_the_training_videos(protocol):
    plain = assign_subsets(index_rows(), ["validate"], 0.3, "s", protocol, 0.0)
    carved = assign_subsets(index_rows(), ["validate"], 0.3, "s", protocol, 0.1)
    assert (carved["subset"] == "eval").equals(plain["subset"] == "eval")  # evaluation videos unchanged
    moved = carved["subset"] == "valid"
    assert (plain.loc[moved, "subset"] == "train").all()
    share = moved.sum() / (plain["subset"] == "train").sum()
    assert 0.07 < share < 0.13


def test_an_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="index.protocol: 'x'"):
        assign_subsets(index_rows(), ["validate"], 0.3, "s", "x", 0.0)
