"""params.yaml is checked before any job runs; a bad value is named in one line."""
import copy
import subprocess

import pytest
import yaml

from conftest import REPO, tool_env
from yt8m_qrnn.pipeline.params import ParamsError, load_params, stage_params, validate_params

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def mutated(path: str, value=None, delete=False) -> dict:
    params = copy.deepcopy(DEFAULT)
    *parents, last = path.split(".")
    target = params
    for key in parents:
        target = target[key]
    if delete:
        del target[last]
    else:
        target[last] = value
    return params


def test_default_params_are_valid():
    validate_params(DEFAULT)


@pytest.mark.parametrize("path, value, expected", [
    ("models.qrnn.hiden", 8, "unknown key 'models.qrnn.hiden' (allowed: "),
    ("models.qrnn.hidden", "big", "models.qrnn.hidden: 'big' is not of type 'integer'"),
    ("models.qrnn.hidden", 0, "models.qrnn.hidden: 0 is less than the minimum of 1"),
    ("models.lstm.batch_size", -4, "models.lstm.batch_size: -4 is less than the minimum of 1"),
    ("models.qrnn.pooling", "max", "models.qrnn.pooling: 'max' is not one of 'f', 'fo', 'ifo'"),
    ("models.qrnn.kind", "transformer", "models.qrnn.kind: 'transformer' is not one of"),
    ("run_models", ["qrnn", "gru"], "run_models: unknown model 'gru'"),
    ("data.source", "ftp://example.org", "data.source: 'ftp://example.org' is not a data source (allowed: generated, file://<mirror>, "),
    ("data.shards", {"train": 9, "validate": "all", "test": "all"}, "data.shards.train: selects more shards than the 4 generated"),
    ("data.shards", {"train": 0}, "data.shards.train: 0 is not a shard selection"),
    ("index.eval_fraction", 0, "index.eval_fraction: 0 is less than or equal to the minimum of 0"),
    ("trian", {}, "unknown key 'trian' (allowed: bench, data, evaluate, generate, index, models, report, run_models, train)"),
    ("models.logistic.level", "frame", "models.logistic.level: kind logistic needs level 'video'"),
])
def test_bad_params_are_named(path, value, expected):
    with pytest.raises(ParamsError) as err:
        validate_params(mutated(path, value))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_key_is_named():
    with pytest.raises(ParamsError, match=r"models.qrnn: 'epochs' is a required property"):
        validate_params(mutated("models.qrnn.epochs", delete=True))


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_stage_reads_only_its_sections():
    train = stage_params(DEFAULT, "train", "qrnn")
    assert set(train) == {"data", "models", "train"}
    assert set(train["data"]) == {"version"}
    assert set(train["models"]) == {"qrnn"}


def test_snakemake_refuses_bad_params_before_any_job(tmp_path):
    bad = mutated("models.qrnn.hidden", -1)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    result = subprocess.run(["snakemake", "-n", "--configfile", str(config)], cwd=REPO, env=tool_env(),
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "models.qrnn.hidden: -1 is less than the minimum of 1" in result.stdout + result.stderr


def test_stage_cli_refuses_bad_params(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(mutated("run_models", ["nope"])))
    result = subprocess.run(["python", str(REPO / "workflow/scripts/report.py"), "--params", str(bad)], cwd=tmp_path,
                            env=tool_env(), capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "run_models: unknown model 'nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_not_run_needs_no_fetched_level():
    """A video-level run of the paper's params: lstm, qrnn_frame and dbof (frame level) stay defined, unrun."""
    params = load_params(REPO / "config" / "params.paper.yaml")
    params["data"]["levels"] = ["video"]
    params["run_models"] = [name for name in params["run_models"] if params["models"][name]["level"] == "video"]
    assert {"lstm", "qrnn_frame", "dbof"} <= set(params["models"]) - set(params["run_models"])
    validate_params(params)
    params["run_models"].append("qrnn_frame")
    with pytest.raises(ParamsError) as err:
        validate_params(params)
    assert str(err.value) == "params.yaml: models.qrnn_frame.level: 'frame' is not fetched (data.levels: ['video'])"
