"""params.yaml: loading, validation against the schema, and per-stage sections (the keys each
stage reads are declared with the stage, in pipeline.dag)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import yaml

from yt8m_qrnn.models.registry import KIND_LEVELS
from yt8m_qrnn.pipeline.dag import SCHEMA, stage_keys
from yt8m_qrnn.pipeline.io import write_text
from yt8m_qrnn.records.features import NUM_CLASSES

REPO_ROOT = Path(__file__).resolve().parents[3]
SCHEMA_PATH = REPO_ROOT / SCHEMA

class ParamsError(ValueError):
    """params.yaml is invalid; the message names the key."""


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    validate_params(params, source=str(path))
    return params


def validate_params(params: dict, source: str = "params.yaml") -> None:
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [leaf for error in validator.iter_errors(params) for leaf in _leaves(error)]
    if errors:
        errors.sort(key=lambda e: (e.validator == "unevaluatedProperties", -len(e.absolute_path)))
        raise ParamsError(f"{source}: {_describe(errors[0], schema)}")
    _check_cross_references(params, source)


def _leaves(error: jsonschema.ValidationError):
    """The innermost errors: the ones that name the offending key itself."""
    if error.validator in ("allOf", "then") and error.context:
        for sub in error.context:
            yield from _leaves(sub)
    else:
        yield error


def _describe(error: jsonschema.ValidationError, schema: dict) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_allowed_keys(error))
        unknown = sorted(set(error.instance) - set(allowed)) if allowed else []
        name = f"{key}.{unknown[0]}" if unknown and key != "(top level)" else (unknown[0] if unknown else key)
        return f"unknown key '{name}'" + (f" (allowed: {', '.join(allowed)})" if allowed else f": {error.message}")
    if error.validator == "enum":
        return f"{key}: {error.instance!r} is not one of {', '.join(map(repr, error.validator_value))}"
    if error.validator == "required":
        return f"{key}: {error.message}"
    if error.validator == "oneOf" and "shards" in error.absolute_path:
        return f"{key}: {error.instance!r} is not a shard selection (all, a count >= 1, a list of indices, or \"X,Y\")"
    if error.validator in ("oneOf", "pattern") and error.schema.get("description"):
        return f"{key}: {error.instance!r} is not {error.schema['description']}"
    return f"{key}: {error.message}"


def _allowed_keys(error: jsonschema.ValidationError) -> set[str]:
    keys = set(error.schema.get("properties", {}))
    for sub in error.schema.get("allOf", []):
        kind = sub.get("if", {}).get("properties", {}).get("kind", {}).get("const")
        if kind is not None and error.instance.get("kind") == kind:
            keys |= set(sub["then"]["properties"])
    return keys


def _check_cross_references(params: dict, source: str) -> None:
    unknown = [m for m in params["run_models"] if m not in params["models"]]
    if unknown:
        raise ParamsError(f"{source}: run_models: unknown model {unknown[0]!r} (defined in models: {', '.join(params['models'])})")
    gen = params["generate"]
    if gen["min_frames"] > gen["max_frames"]:
        raise ParamsError(f"{source}: generate.min_frames ({gen['min_frames']}) exceeds generate.max_frames ({gen['max_frames']})")
    data = params["data"]
    for split in data["shards"]:
        if split not in data["splits"]:
            raise ParamsError(f"{source}: data.shards.{split}: split {split!r} is not in data.splits {data['splits']}")
    if data["source"] == "generated":
        for split in data["splits"]:
            if split not in gen["splits"]:
                raise ParamsError(f"{source}: data.splits: {split!r} is not generated (generate.splits has {', '.join(gen['splits'])})")
            selection = data["shards"].get(split, "all")
            available = gen["splits"][split][0]
            too_many = (isinstance(selection, int) and selection > available) or (
                isinstance(selection, list) and max(selection) >= available)
            if too_many:
                raise ParamsError(f"{source}: data.shards.{split}: selects more shards than the {available} generated")
    for name in params["run_models"]:  # a model defined but not run is not checked against the data
        _check_model(params["models"][name], f"{source}: models.{name}", data["levels"])
    if params["index"]["protocol"] == "starter" and "train" not in data["splits"]:
        raise ParamsError(f"{source}: index.protocol: 'starter' trains on the train split, which data.splits "
                          f"({data['splits']}) does not fetch")


def _check_model(model: dict, where: str, levels: list[str]) -> None:
    needed = KIND_LEVELS[model["kind"]]
    if needed is not None and model["level"] != needed:
        raise ParamsError(f"{where}.level: kind {model['kind']} needs level {needed!r}")
    if model["level"] not in levels:
        raise ParamsError(f"{where}.level: {model['level']!r} is not fetched (data.levels: {levels})")
    if model["kind"] == "qrnn" and model["level"] == "video":
        # the video vector is a sequence of one step: no previous step for a window to reach, no state to zone out to
        for key, only in (("window", 1), ("zoneout", 0)):
            if model.get(key, only) != only:
                raise ParamsError(f"{where}.{key}: a video-level QRNN runs over one step, so {key} must be {only} "
                                  f"(got {model[key]})")


def num_classes(params: dict) -> int:
    return NUM_CLASSES[params["data"]["version"]]


def stage_params(params: dict, stage: str, model: str | None = None) -> dict:
    """Only the keys `stage` may read, as a nested dict with the same shape."""
    out: dict = {}
    for key in stage_keys(stage, model):
        parts = key.split(".")
        value = params
        for part in parts:
            value = value[part]
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = copy.deepcopy(value)
    return out


PARAMS_STAMP_DIR = Path("results/params")


def params_stamp_path(stage: str, model: str | None = None) -> Path:
    return PARAMS_STAMP_DIR / (f"{stage}-{model}.json" if model else f"{stage}.json")


def sync_params_stamp(params: dict, stage: str, model: str | None = None) -> Path:
    """Write the stage's params to its stamp file, only when they changed.

    Snakemake (rerun trigger: mtime) takes the stamp as an input, so a params
    change reruns exactly the stages that read it; every stage refreshes its own
    stamp when it runs, so a stage run by `dvc repro` leaves Snakemake nothing to redo.
    """
    path = params_stamp_path(stage, model)
    text = json.dumps(stage_params(params, stage, model), indent=1, sort_keys=True) + "\n"
    if not path.exists() or path.read_text() != text:
        write_text(path, text)
    return path


def benchmark_path(stage: str, model: str | None = None) -> str:
    """Where Snakemake records a stage's `benchmark:` (also the pattern, with model="{model}")."""
    return f"logs/benchmark/{stage}/{model}.tsv" if model else f"logs/benchmark/{stage}.tsv"
