"""The fetch stage: plan the shards the params select, verify or download each into the store,
and publish them into resources/yt8m (the download machinery is in sources.py)."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from yt8m_qrnn.pipeline.dag import (
    DATA_ROOT,
    GENERATED_MIRROR,
    MANIFEST,
    SHARD_PLAN,
    SHARD_STORE,
    STORE_MANIFEST,
    shard_record,
)
from yt8m_qrnn.pipeline.io import atomic_folder, config_digest, write_json
from yt8m_qrnn.pipeline.params import stage_params
from yt8m_qrnn.stages.fetch.sources import (
    FetchError,
    fetch_one_shard,
    fetch_planned,
    plan_dataset,
)

log = logging.getLogger(__name__)


def run(params: dict) -> None:
    """Plan, verify or download every selected shard, record each, publish: everything, in one process.

    The plan and the records are rewritten (or, unchanged, touched) before the outputs, so
    Snakemake's fetch_plan and fetch_shard jobs are up to date after a run of this stage.
    """
    data, generated = _fetch_data(params)
    plan = _plan(params, data, generated)
    _refresh_json(SHARD_PLAN, plan)
    manifest = fetch_planned(data, plan, SHARD_STORE, STORE_MANIFEST)
    for entry in manifest["files"]:
        _refresh_json(shard_record(entry["name"]), entry)
    if generated:  # the report shows a banner: not comparable with the paper
        manifest = manifest | {"dataset": "generated", "source": f"generated ({GENERATED_MIRROR})"}
    publish_shards(manifest, SHARD_STORE, DATA_ROOT)
    write_json(MANIFEST, manifest)  # last: a manifest means its shards are in place
    log.info("fetched %d shards into %s", len(manifest["files"]), DATA_ROOT)


def plan(params: dict) -> None:
    """Snakemake's checkpoint: which shards the params select (SHARD_PLAN); nothing is downloaded."""
    data, generated = _fetch_data(params)
    plan = _plan(params, data, generated)
    _refresh_json(SHARD_PLAN, plan)
    log.info("planned %d shards in %s", len(plan["shards"]), SHARD_PLAN)


def shard(params: dict, name: str) -> None:
    """Snakemake's fan-out: verify or download the planned shard `name` into the store; write its record."""
    record_path = shard_record(name)
    data, _ = _fetch_data(params)
    try:
        plan = json.loads(SHARD_PLAN.read_text())
    except FileNotFoundError:
        raise FetchError(f"{SHARD_PLAN}: not found: plan the shards first (snakemake fetch_plan)") from None
    except ValueError as err:
        raise FetchError(f"{SHARD_PLAN}: not valid JSON ({err}): plan the shards again") from None
    if plan.get("params_digest") != data_params_digest(params):
        raise FetchError(f"{SHARD_PLAN} was made from other data params: plan the shards again")
    entry = next((e for e in plan.get("shards", []) if e.get("name") == name), None)
    if entry is None:
        raise FetchError(f"{name} is not among the {len(plan.get('shards', []))} shards of {SHARD_PLAN}")
    write_json(record_path, fetch_one_shard(data, entry, SHARD_STORE))
    log.info("%s verified in %s", name, SHARD_STORE)


def _fetch_data(params: dict) -> tuple[dict, bool]:
    """The data params with ``generated`` as the file:// URL of the generated mirror; whether it was."""
    data = stage_params(params, "fetch")["data"]
    generated = data["source"] == "generated"
    if generated:
        data = data | {"source": "file://" + str(GENERATED_MIRROR.resolve())}
    return data, generated


def _plan(params: dict, data: dict, generated: bool) -> dict:
    """plan_dataset's plan, stamped with the digest of the data params it was made from."""
    plan = plan_dataset(data) | {"params_digest": data_params_digest(params)}
    return plan | {"source": f"generated ({GENERATED_MIRROR})"} if generated else plan


def data_params_digest(params: dict) -> str:
    """A digest of the fetch stage's params (no URL in the clear: a source may carry a password)."""
    return config_digest(stage_params(params, "fetch"))


def forget_stale_plan(params: dict) -> bool:
    """Remove SHARD_PLAN when it was made from other data params, or is unreadable; whether it was.

    For Snakemake, when it starts: the checkpoint fetch_plan takes its inputs as ancient
    (times alone, e.g. after restore_mtimes.py, must not rerun the fetch), so a plan
    that no longer fits the params is removed, and the checkpoint makes it again.
    """
    try:
        plan = json.loads(SHARD_PLAN.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        plan = {}
    if isinstance(plan, dict) and plan.get("params_digest") == data_params_digest(params):
        return False
    SHARD_PLAN.unlink(missing_ok=True)
    return True


def _refresh_json(path: Path, payload: dict) -> None:
    """Write `payload` to `path`, or only touch it when it already holds exactly that: its
    time then says it is newer than the stage's inputs, for Snakemake."""
    try:
        same = json.loads(path.read_text()) == payload
    except (OSError, ValueError):
        same = False
    if same:
        os.utime(path)
    else:
        write_json(path, payload)


def publish_shards(manifest: dict, store: Path, dest: Path) -> None:
    """Make `dest` hold exactly the manifest's shards, as hard links into `store`.

    Built beside `dest` under a temporary name and swapped in, so `dest` is never
    half-published. Where a hard link is impossible (another file system) the shard
    is copied.
    """
    store, dest = Path(store), Path(dest)
    with atomic_folder(dest) as tmp:
        copied = 0
        for entry in manifest["files"]:
            source, target = store / entry["name"], tmp / entry["name"]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copy2(source, target)
                copied += 1
    if copied:
        log.warning("%d shards copied into %s (hard links to %s not possible)", copied, dest, store)
