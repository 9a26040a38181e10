"""Fetching shards: names, selections, file://, http and gs:// mirrors, retries, resume, safety."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from conftest_servers import MirrorServer, gcs_emulator
from yt8m_qrnn.stages.fetch import sources as fetch
from yt8m_qrnn.stages.fetch.sources import (FetchError, RetryPolicy, fetch_dataset, fetch_one_shard, fetch_planned, md5_file,
                             partition_keep, plan_dataset, plan_url, remote_to_local_name, select_shards,
                             shard_folder_url)

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01, timeout=5)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "yt8m"


def shard_bytes(name: str, size: int = 40_000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def data_params(source: str, **overrides) -> dict:
    params = {"source": source, "version": 2, "region": "us", "levels": ["video"], "splits": ["train"],
              "shards": {"train": "all"}}
    params.update(overrides)
    return params


def write_mirror(root: Path, names: dict[str, list[str]], plan: bool = True, level: str = "video") -> dict[str, bytes]:
    """A file:// mirror in the http layout; names is split -> remote names. Returns name -> bytes."""
    contents = {}
    for split, remote_names in names.items():
        folder = root / "2" / level / split
        folder.mkdir(parents=True, exist_ok=True)
        for name in remote_names:
            contents[name] = shard_bytes(f"{level}/{name}")
            (folder / name).write_bytes(contents[name])
        if plan:
            plans = root / "2" / "download_plans"
            plans.mkdir(parents=True, exist_ok=True)
            files = {name: hashlib.md5(contents[name]).hexdigest() for name in remote_names}
            (plans / f"{level}_{split}.json").write_text(json.dumps({"files": files}))
    return contents


def fetch_quiet(params: dict, tmp_path: Path, **kwargs) -> dict:
    kwargs.setdefault("retry", FAST)
    return fetch_dataset(params, tmp_path / "dest", tmp_path / "manifest.json", progress=False, **kwargs)


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- names and selections

def test_remote_names_map_to_base62_local_names():
    assert remote_to_local_name("trainaa.tfrecord", "train") == "train0000.tfrecord"
    assert remote_to_local_name("trainab.tfrecord", "train") == "train0001.tfrecord"
    assert remote_to_local_name("trainba.tfrecord", "train") == "train0062.tfrecord"
    assert remote_to_local_name("trainA0.tfrecord", "train") == "train1664.tfrecord"
    assert remote_to_local_name("validate99.tfrecord", "validate") == "validate3843.tfrecord"
    assert remote_to_local_name("test0007.tfrecord", "test") == "test0007.tfrecord"
    for bad in ("trainaa.tfrecord.gz", "validateaa.tfrecord", "train_a.tfrecord", "traina.tfrecord"):
        with pytest.raises(FetchError):
            remote_to_local_name(bad, "train")


def test_partition_keep_is_download_py_rule_and_partitions_cover_everything():
    names = [f"train{a}{b}.tfrecord" for a in "abcXYZ" for b in "0123456789"]
    digest = int(hashlib.md5(b"trainab.tfrecord").hexdigest(), 16)
    assert partition_keep("trainab.tfrecord", digest % 7 + 1, 7)
    parts = [select_shards(names, f"{x},5", "train") for x in range(1, 6)]
    assert sorted(n for part in parts for n in part) == sorted(names)
    assert all(len(part) < len(names) for part in parts)


def test_select_shards_count_list_all_and_errors():
    names = ["trainba.tfrecord", "trainab.tfrecord", "trainaa.tfrecord", "trainac.tfrecord"]
    assert select_shards(names, "all", "train") == ["trainaa.tfrecord", "trainab.tfrecord",
                                                    "trainac.tfrecord", "trainba.tfrecord"]
    assert select_shards(names, 2, "train") == ["trainaa.tfrecord", "trainab.tfrecord"]
    assert select_shards(names, [62, 2]) == ["trainac.tfrecord", "trainba.tfrecord"]  # split inferred
    with pytest.raises(FetchError, match="only 4 shards"):
        select_shards(names, 5, "train")
    with pytest.raises(FetchError, match=r"indices \[3\]"):
        select_shards(names, [0, 3], "train")
    with pytest.raises(FetchError, match="X <= Y"):
        select_shards(names, "3,2", "train")
    with pytest.raises(FetchError, match="both map"):
        select_shards(["trainba.tfrecord", "train0062.tfrecord"], "all", "train")


def test_url_builders_follow_download_py():
    assert plan_url("http://data.yt8m.org", 2, "frame", "validate") == \
        "http://data.yt8m.org/2/download_plans/frame_validate.json"
    assert shard_folder_url("http://data.yt8m.org/", 2, "frame", "train", "eu") == \
        "http://eu.data.yt8m.org/2/frame/train"
    assert shard_folder_url("http://127.0.0.1:8000", 2, "video", "test", "eu") == "http://127.0.0.1:8000/2/video/test"
    assert shard_folder_url("gs://us.data.yt8m.org", 1, "video", "train", "us") == \
        "gs://us.data.yt8m.org/1/video_level/train"
    assert plan_url("gs://youtube8m-ml", 2, "video", "train") is None


# ---------------------------------------------------------------- file:// mirrors

def test_file_mirror_with_plan_selects_and_renames(tmp_path):
    remote = {"train": ["trainaa.tfrecord", "trainab.tfrecord", "trainba.tfrecord"],
              "validate": ["validate0000.tfrecord", "validate0001.tfrecord", "validate0002.tfrecord"],  # as generated
              "test": [f"test{c}a.tfrecord" for c in "abcdefgh"]}
    contents = write_mirror(tmp_path / "mirror", remote)
    params = data_params(f"file://{tmp_path / 'mirror'}", splits=["train", "validate", "test"],
                         shards={"train": 2, "validate": [0, 2], "test": "1,2"})
    manifest = fetch_quiet(params, tmp_path)

    kept_tests = [n for n in remote["test"] if partition_keep(n, 1, 2)]
    expected_names = (["2/video/train/train0000.tfrecord", "2/video/train/train0001.tfrecord",
                       "2/video/validate/validate0000.tfrecord", "2/video/validate/validate0002.tfrecord"]
                      + [f"2/video/test/{remote_to_local_name(n, 'test')}" for n in kept_tests])
    assert [e["name"] for e in manifest["files"]] == sorted(expected_names)
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["source"] == f"file://{tmp_path / 'mirror'}"
    for entry in manifest["files"]:
        local = tmp_path / "dest" / entry["name"]
        remote_name = entry["remote"].rsplit("/", 1)[1]
        assert local.read_bytes() == contents[remote_name]
        assert entry["md5"] == md5_file(local) and entry["bytes"] == local.stat().st_size
        assert entry["level"] == "video" and entry["split"] == entry["name"].split("/")[2]
        assert entry["fetched_at"].endswith("+00:00")
    assert not list((tmp_path / "dest").rglob("*.part"))


def test_file_mirror_without_plan_lists_the_folder(tmp_path):
    names = [f"train{i:04d}.tfrecord" for i in range(4)]
    contents = write_mirror(tmp_path / "mirror", {"train": names}, plan=False, level="frame")
    (tmp_path / "mirror" / "2" / "frame" / "train" / "README.txt").write_text("not a shard")
    params = data_params(f"file://{tmp_path / 'mirror'}", levels=["frame"], shards={"train": [1, 3]})
    manifest = fetch_quiet(params, tmp_path)
    shards = ["2/frame/train/train0001.tfrecord", "2/frame/train/train0003.tfrecord"]
    assert [e["name"] for e in manifest["files"]] == shards
    for entry in manifest["files"]:
        name = entry["name"].rsplit("/", 1)[1]
        assert entry["md5"] == hashlib.md5(contents[name]).hexdigest()
    assert files_under(tmp_path / "dest") == [shards[0], shards[0] + ".verified.json", shards[1], shards[1] + ".verified.json"]


def test_missing_file_mirror_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(FetchError, match="not found") as err:
        fetch_quiet(data_params(f"file://{tmp_path / 'nowhere'}"), tmp_path)
    assert "\n" not in str(err.value)


def test_rerun_skips_verified_shards_and_replaces_stale_parts(tmp_path, monkeypatch):
    write_mirror(tmp_path / "mirror", {"train": ["trainaa.tfrecord", "trainab.tfrecord", "trainac.tfrecord"]})
    params = data_params(f"file://{tmp_path / 'mirror'}")
    first = fetch_quiet(params, tmp_path)
    shard_dir = tmp_path / "dest" / "2" / "video" / "train"
    (shard_dir / "train0000.tfrecord.part").write_bytes(b"stale partial download")
    (shard_dir / "train0001.tfrecord.part").write_bytes(b"stale partial download")
    (shard_dir / "train0001.tfrecord").unlink()
    good = (shard_dir / "train0002.tfrecord").read_bytes()
    (shard_dir / "train0002.tfrecord").write_bytes(bytes([good[0] ^ 1]) + good[1:])  # same size, wrong bytes
    (shard_dir / "train0000.tfrecord.verified.json").unlink()  # verified again by hashing, not downloading

    copied = []
    real_copy = fetch._copy_to_part
    def counting_copy(ctx, shard, *args):
        copied.append(shard.local_name)
        return real_copy(ctx, shard, *args)

    monkeypatch.setattr(fetch, "_copy_to_part", counting_copy)
    second = fetch_quiet(params, tmp_path)
    assert sorted(copied) == ["train0001.tfrecord", "train0002.tfrecord"]
    assert [e["md5"] for e in second["files"]] == [e["md5"] for e in first["files"]]
    assert not list(shard_dir.glob("*.part"))
    source_bytes = (tmp_path / "mirror/2/video/train/trainab.tfrecord").read_bytes()
    assert (shard_dir / "train0001.tfrecord").read_bytes() == source_bytes
    assert (shard_dir / "train0002.tfrecord").read_bytes() == good
    assert (shard_dir / "train0000.tfrecord.verified.json").exists()


def test_hostile_plan_names_are_rejected_and_nothing_is_written(tmp_path):
    for i, bad in enumerate(["../evil.tfrecord", "/tmp/evil.tfrecord", "sub/train0000.tfrecord",
                             "..\\evil.tfrecord", "train..tfrecord"]):
        root = tmp_path / f"mirror{i}"
        write_mirror(root, {"train": ["trainaa.tfrecord"]})
        plan = root / "2" / "download_plans" / "video_train.json"
        files = json.loads(plan.read_text())["files"]
        plan.write_text(json.dumps({"files": {**files, bad: "0" * 32}}))
        with pytest.raises(FetchError, match="unsafe remote shard name"):
            fetch_dataset(data_params(f"file://{root}"), tmp_path / f"dest{i}" / "data", tmp_path / f"m{i}.json",
                          progress=False, retry=FAST)
        assert not (tmp_path / f"dest{i}").exists() and not (tmp_path / f"m{i}.json").exists()
    assert not list(tmp_path.rglob("evil*"))


# ---------------------------------------------------------------- the plan, then one shard at a time (the fan-out)

def without_times(manifest_files: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "fetched_at"} for entry in manifest_files]


def test_plan_then_one_shard_at_a_time_is_fetch_dataset(tmp_path, monkeypatch):
    remote = {"train": ["trainaa.tfrecord", "trainab.tfrecord", "trainba.tfrecord"],
              "validate": ["validateaa.tfrecord", "validateab.tfrecord"]}
    contents = write_mirror(tmp_path / "mirror", remote)
    params = data_params(f"file://{tmp_path / 'mirror'}", splits=["train", "validate"],
                         shards={"train": [0, 62], "validate": 1})
    plan = plan_dataset(params, retry=FAST)
    assert not (tmp_path / "dest").exists()  # nothing downloaded, nothing written
    assert plan == plan_dataset(params, retry=FAST)  # deterministic: a rerun finds it unchanged
    assert plan["version"] == 2 and plan["source"] == f"file://{tmp_path / 'mirror'}"
    assert [(e["name"], e["remote"]) for e in plan["shards"]] == [
        ("2/video/train/train0000.tfrecord", "trainaa.tfrecord"), ("2/video/train/train0062.tfrecord", "trainba.tfrecord"),
        ("2/video/validate/validate0000.tfrecord", "validateaa.tfrecord")]
    for entry in plan["shards"]:
        assert entry["expected"] == {"md5": hashlib.md5(contents[entry["remote"]]).hexdigest(), "crc32c": None,
                                     "size": None, "generation": None}
    assert json.loads(json.dumps(plan)) == plan  # what the checkpoint writes to disk

    whole = fetch_dataset(params, tmp_path / "whole", tmp_path / "whole.json", progress=False, retry=FAST)
    one_by_one = [fetch_one_shard(params, entry, tmp_path / "dest", retry=FAST) for entry in plan["shards"]]
    assert without_times(one_by_one) == without_times(whole["files"])  # entries named as fetch_dataset names them
    for entry in one_by_one:
        assert (tmp_path / "dest" / entry["name"]).read_bytes() == contents[entry["remote"].rsplit("/", 1)[1]]
    assert files_under(tmp_path / "dest") == sorted(
        f"{e['name']}{suffix}" for e in one_by_one for suffix in ("", ".verified.json"))

    copied = []
    real_copy = fetch._copy_to_part
    monkeypatch.setattr(fetch, "_copy_to_part", lambda ctx, shard, *a: copied.append(shard) or real_copy(ctx, shard, *a))
    assert [fetch_one_shard(params, e, tmp_path / "dest", retry=FAST) for e in plan["shards"]] == one_by_one
    manifest = fetch_planned(params, plan, tmp_path / "dest", tmp_path / "manifest.json", progress=False, retry=FAST)
    assert copied == []  # verified shards: neither the shard jobs nor the gather download them again
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == sorted(one_by_one, key=lambda e: e["name"])


def test_one_shard_is_verified_like_the_rest(tmp_path):
    """A shard whose bytes do not match the plan: retried, then a one-line error; no file left."""
    write_mirror(tmp_path / "mirror", {"train": ["trainaa.tfrecord", "trainab.tfrecord"]})
    params = data_params(f"file://{tmp_path / 'mirror'}")
    plan = plan_dataset(params, retry=FAST)
    bad = plan["shards"][1] | {"expected": plan["shards"][1]["expected"] | {"md5": "0" * 32}}
    with pytest.raises(FetchError, match=r"^2/video/train/train0001.tfrecord \(remote trainab.tfrecord\): md5 mismatch: "
                                         rf"expected 0{{32}}, got [0-9a-f]{{32}} after {FAST.attempts} attempts"):
        fetch_one_shard(params, bad, tmp_path / "dest", retry=FAST)
    assert files_under(tmp_path / "dest") == []
    assert fetch_one_shard(params, plan["shards"][0], tmp_path / "dest", retry=FAST)["name"] == plan["shards"][0]["name"]


def test_plan_entries_that_do_not_fit_the_params_are_refused(tmp_path):
    write_mirror(tmp_path / "mirror", {"train": ["trainaa.tfrecord"]})
    params = data_params(f"file://{tmp_path / 'mirror'}")
    entry = plan_dataset(params, retry=FAST)["shards"][0]
    with pytest.raises(FetchError, match="does not fit the params"):
        fetch_one_shard(params | {"version": 1}, entry, tmp_path / "dest", retry=FAST)
    with pytest.raises(FetchError, match="unsafe remote shard name"):
        fetch_one_shard(params, entry | {"remote": "../trainaa.tfrecord"}, tmp_path / "dest", retry=FAST)
    with pytest.raises(FetchError, match="invalid level/split"):
        fetch_one_shard(params, entry | {"split": "../train"}, tmp_path / "dest", retry=FAST)
    with pytest.raises(FetchError, match="malformed shard plan entry"):
        fetch_one_shard(params, {"name": entry["name"]}, tmp_path / "dest", retry=FAST)
    assert not (tmp_path / "dest").exists()
    with pytest.raises(FetchError, match=r"data.shards.train: shard selection 2: only 1 shards available"):
        plan_dataset(params | {"shards": {"train": 2}}, retry=FAST)  # the same errors as fetch_dataset


def test_fan_out_stages_write_what_the_single_fetch_stage_writes(tmp_path, monkeypatch):
    """the fetch_plan stage + one fetch_shard per shard (Snakemake) leave the plan and the
    records that the fetch stage (DVC's one stage) finds unchanged; a plan of other params is refused."""
    from yt8m_qrnn.pipeline import dag as stages
    from yt8m_qrnn.stages.fetch import store
    from yt8m_qrnn.pipeline.cli import stage_function

    write_mirror(tmp_path / "mirror", {"train": ["trainaa.tfrecord", "trainab.tfrecord"]})
    params = {"data": data_params(f"file://{tmp_path / 'mirror'}")}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fetch, "RetryPolicy", lambda: FAST)
    stage_function("fetch_plan")(params)
    plan = json.loads(stages.SHARD_PLAN.read_text())
    assert [e["name"] for e in plan["shards"]] == ["2/video/train/train0000.tfrecord", "2/video/train/train0001.tfrecord"]
    for entry in plan["shards"]:
        stage_function("fetch_shard")(params, entry["name"])
    records = [json.loads(stages.shard_record(e["name"]).read_text()) for e in plan["shards"]]
    copied = []
    real_copy = fetch._copy_to_part
    monkeypatch.setattr(fetch, "_copy_to_part", lambda ctx, shard, *a: copied.append(shard) or real_copy(ctx, shard, *a))
    stage_function("fetch")(params)
    assert copied == [] and json.loads(stages.SHARD_PLAN.read_text()) == plan
    assert [json.loads(stages.shard_record(e["name"]).read_text()) for e in plan["shards"]] == records
    assert json.loads(stages.MANIFEST.read_text())["files"] == records
    assert store.forget_stale_plan(params) is False and stages.SHARD_PLAN.exists()
    other = {"data": params["data"] | {"shards": {"train": 1}}}
    with pytest.raises(FetchError, match="made from other data params"):
        stage_function("fetch_shard")(other, plan["shards"][0]["name"])
    assert store.forget_stale_plan(other) is True and not stages.SHARD_PLAN.exists()
    with pytest.raises(ValueError, match="invalid shard name"):
        stages.shard_record("../../params.yaml")


# ---------------------------------------------------------------- http mirror

def http_mirror(version: int = 2, level: str = "video", split: str = "train", count: int = 3,
                size: int = 200_000) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(url path -> bytes for a MirrorServer, remote name -> shard bytes)."""
    shards = {f"{split}a{c}.tfrecord": shard_bytes(f"http/{c}", size) for c in "abcdefgh"[:count]}
    plan = {"files": {name: hashlib.md5(data).hexdigest() for name, data in shards.items()}}
    files = {f"/{version}/download_plans/{level}_{split}.json": json.dumps(plan).encode()}
    files.update({f"/{version}/{level}/{split}/{name}": data for name, data in shards.items()})
    return files, shards


@pytest.fixture
def small_blocks(monkeypatch):
    """Several ranged requests per shard, so a resumed download is visible."""
    monkeypatch.setattr(fetch, "HTTP_BLOCK_SIZE", 32 * 1024)
    monkeypatch.setattr(fetch, "CHUNK_SIZE", 16 * 1024)


def test_http_mirror_fetch_and_rerun_makes_no_shard_requests(tmp_path, small_blocks):
    files, shards = http_mirror()
    with MirrorServer(files) as server:
        host = server.url.replace("127.0.0.1", "user:s3cret@127.0.0.1")
        manifest = fetch_quiet(data_params(host + "/"), tmp_path)
        assert [e["name"] for e in manifest["files"]] == [f"2/video/train/train000{i}.tfrecord" for i in range(3)]
        for entry, (name, data) in zip(manifest["files"], sorted(shards.items())):
            assert entry["remote"] == f"{server.url}/2/video/train/{name}"
            assert entry["generation"] == f"etag-{len(data)}" and entry["bytes"] == len(data)
            assert (tmp_path / "dest" / entry["name"]).read_bytes() == data
        assert "s3cret" not in (tmp_path / "manifest.json").read_text()

        before = len(server.requests)
        again = fetch_quiet(data_params(server.url), tmp_path)
        new = server.requests[before:]
        assert [(m, p) for m, p, _ in new] == [("GET", "/2/download_plans/video_train.json")]
        assert [e["md5"] for e in again["files"]] == [e["md5"] for e in manifest["files"]]


def test_url_builders_are_the_seam_for_the_official_host(tmp_path, monkeypatch):
    files, _ = http_mirror(count=1, size=1000)
    calls = []
    with MirrorServer(files) as server:
        def local_plan(source, version, level, split):
            calls.append(("plan", source))
            return f"{server.url}/{version}/download_plans/{level}_{split}.json"

        def local_folder(source, version, level, split, region):
            calls.append(("files", source, region))
            return f"{server.url}/{version}/{level}/{split}"

        monkeypatch.setattr(fetch, "plan_url", local_plan)
        monkeypatch.setattr(fetch, "shard_folder_url", local_folder)
        manifest = fetch_quiet(data_params("http://data.yt8m.org", region="asia"), tmp_path)
    assert sorted(calls) == [("files", "http://data.yt8m.org", "asia"), ("plan", "http://data.yt8m.org")]
    assert manifest["source"] == "http://data.yt8m.org" and len(manifest["files"]) == 1


def test_http_dropped_connection_is_resumed(tmp_path, small_blocks):
    files, shards = http_mirror(count=2)
    path = "/2/video/train/trainab.tfrecord"
    with MirrorServer(files) as server:
        server.cut_gets[path] = {2}
        manifest = fetch_quiet(data_params(server.url), tmp_path, workers=1)
        ranges = server.ranges(path)
    assert len(ranges) > 2
    resumed_from = int(ranges[2].split("=")[1].split("-")[0])
    assert resumed_from > 0  # the third request continued where the cut one left the .part
    assert (tmp_path / "dest" / "2/video/train/train0001.tfrecord").read_bytes() == shards["trainab.tfrecord"]
    assert manifest["files"][1]["md5"] == hashlib.md5(shards["trainab.tfrecord"]).hexdigest()


def test_http_corrupted_shard_fails_naming_shard_and_hashes(tmp_path):
    files, shards = http_mirror(count=2)
    path = "/2/video/train/trainab.tfrecord"
    expected = hashlib.md5(shards["trainab.tfrecord"]).hexdigest()
    with MirrorServer(files) as server:
        server.corrupt.add(path)
        actual = hashlib.md5(server.body(path)).hexdigest()
        with pytest.raises(FetchError) as err:
            fetch_quiet(data_params(server.url), tmp_path, workers=1)
        assert server.count("GET", path) == FAST.attempts
    message = str(err.value)
    assert "train0001.tfrecord" in message and "trainab.tfrecord" in message
    assert expected in message and actual in message and "\n" not in message
    shard_dir = tmp_path / "dest" / "2" / "video" / "train"
    assert not (shard_dir / "train0001.tfrecord").exists()
    assert not list(shard_dir.glob("*.part"))
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("status, reason", [(500, "500"), (404, "404")])
def test_http_errors_retry_then_fail_in_one_line(tmp_path, status, reason):
    files, _ = http_mirror(count=1, size=1000)
    path = "/2/video/train/trainaa.tfrecord"
    with MirrorServer(files) as server:
        server.status[path] = status
        with pytest.raises(FetchError) as err:
            fetch_quiet(data_params(server.url), tmp_path)
        assert server.count("HEAD", path) == FAST.attempts
    message = str(err.value)
    assert message.startswith(f"{server.url}{path}: ") and reason in message and "\n" not in message
    assert not list((tmp_path / "dest").rglob("*.tfrecord*"))


def test_http_stalled_response_times_out_and_is_retried(tmp_path):
    files, shards = http_mirror(count=1, size=1000)
    path = "/2/video/train/trainaa.tfrecord"
    with MirrorServer(files) as server:
        server.stall_gets[path] = {1}
        manifest = fetch_quiet(data_params(server.url), tmp_path, retry=replace(FAST, timeout=0.3))
        assert server.count("GET", path) == 2
    assert manifest["files"][0]["md5"] == hashlib.md5(shards["trainaa.tfrecord"]).hexdigest()


def test_http_missing_plan_is_an_error(tmp_path):
    with MirrorServer({}) as server:
        with pytest.raises(FetchError, match="download_plans/video_train.json: not found"):
            fetch_quiet(data_params(server.url), tmp_path)


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    files, _ = http_mirror(count=2, size=5000)
    with MirrorServer(files) as server:
        fetch_dataset(data_params(server.url), tmp_path / "dest", tmp_path / "m.json", retry=FAST)
    captured = capsys.readouterr()
    assert "2/2 shards" in captured.err and "B/s" in captured.err and captured.out == ""


# ---------------------------------------------------------------- gs:// through the emulator

@pytest.fixture
def emulator(monkeypatch):
    server = gcs_emulator()
    try:
        host = server.__enter__()
    except Exception as err:  # noqa: BLE001 -- whatever stops it starting means: cannot test here
        pytest.skip(f"gcp-storage-emulator could not start: {err}")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    yield host
    server.__exit__(None, None, None)


def test_gcs_bucket_is_listed_and_verified_against_md5hash(tmp_path, emulator):
    from gcsfs.core import GCSFileSystem

    uploader = GCSFileSystem(token="anon", skip_instance_cache=True)
    uploader.mkdir("us.data.yt8m.org")
    shards = {f"validate{c}.tfrecord": shard_bytes(f"gcs/{c}", 30_000) for c in ("aa", "ab", "ac")}
    for name, data in shards.items():
        uploader.pipe_file(f"us.data.yt8m.org/2/frame/validate/{name}", data)
    params = data_params("gs://us.data.yt8m.org", levels=["frame"], splits=["validate"], shards={"validate": 2})
    manifest = fetch_quiet(params, tmp_path)
    assert [e["name"] for e in manifest["files"]] == ["2/frame/validate/validate0000.tfrecord",
                                                      "2/frame/validate/validate0001.tfrecord"]
    for entry, name in zip(manifest["files"], ["validateaa.tfrecord", "validateab.tfrecord"]):
        assert entry["remote"] == f"gs://us.data.yt8m.org/2/frame/validate/{name}"
        assert entry["md5"] == hashlib.md5(shards[name]).hexdigest()
        assert entry["generation"] and len(entry["crc32c"]) == 8
        assert (tmp_path / "dest" / entry["name"]).read_bytes() == shards[name]


@pytest.mark.parametrize("lie", ["md5", "crc32c"])
def test_gcs_metadata_mismatch_fails(tmp_path, emulator, monkeypatch, lie):
    from gcsfs.core import GCSFileSystem

    uploader = GCSFileSystem(token="anon", skip_instance_cache=True)
    uploader.mkdir("bucket")
    uploader.pipe_file("bucket/2/video/train/trainaa.tfrecord", b"x" * 5000)
    real_list = fetch._Source.list_folder

    def lying_listing(self, url):
        return {name: fetch.Expected(**{lie: "0" * (32 if lie == "md5" else 8)}, size=e.size)
                for name, e in real_list(self, url).items()}

    monkeypatch.setattr(fetch._Source, "list_folder", lying_listing)
    if lie == "md5":
        actual = hashlib.md5(b"x" * 5000).hexdigest()
    else:
        import google_crc32c
        actual = google_crc32c.Checksum(b"x" * 5000).digest().hex()
    with pytest.raises(FetchError, match=f"{lie} mismatch: expected 0+, got {actual} after 3 attempts"):
        fetch_quiet(data_params("gs://bucket"), tmp_path)
    assert not list((tmp_path / "dest").rglob("*.tfrecord*"))


def test_gcs_plan_carries_the_listing_and_one_shard_is_checked_against_it(tmp_path, emulator):
    from gcsfs.core import GCSFileSystem

    uploader = GCSFileSystem(token="anon", skip_instance_cache=True)
    uploader.mkdir("bucket")
    data = shard_bytes("gcs/plan", 20_000)
    uploader.pipe_file("bucket/2/frame/train/trainab.tfrecord", data)
    params = data_params("gs://bucket", levels=["frame"])
    (entry,) = plan_dataset(params, retry=FAST)["shards"]
    assert entry["name"] == "2/frame/train/train0001.tfrecord" and entry["remote"] == "trainab.tfrecord"
    assert entry["expected"]["md5"] == hashlib.md5(data).hexdigest() and entry["expected"]["size"] == len(data)
    assert len(entry["expected"]["crc32c"]) == 8 and entry["expected"]["generation"]
    record = fetch_one_shard(params, entry, tmp_path / "dest", retry=FAST)
    assert record["remote"] == "gs://bucket/2/frame/train/trainab.tfrecord" and record["bytes"] == len(data)
    assert (tmp_path / "dest" / entry["name"]).read_bytes() == data


# ---------------------------------------------------------------- real shards (read-only, never copied into the repo)

@pytest.mark.realdata
def test_real_validate_shards_through_a_symlink_mirror(tmp_path):
    real = SHARED / "2018" / "video"
    if not (real / "SHA256SUMS").exists():
        pytest.skip(f"real YouTube-8M shards not found at {real}")
    sums = dict(reversed(line.split()) for line in (real / "SHA256SUMS").read_text().splitlines() if line.strip())
    folder = tmp_path / "mirror" / "2" / "video" / "validate"
    folder.mkdir(parents=True)
    for name in sorted(sums)[:5]:
        os.symlink(real / name, folder / name)
    params = data_params(f"file://{tmp_path / 'mirror'}", splits=["validate"], shards={"validate": 3})
    manifest = fetch_quiet(params, tmp_path)
    assert len(manifest["files"]) == 3
    for entry in manifest["files"]:
        local = tmp_path / "dest" / entry["name"]
        assert not local.is_symlink()
        assert hashlib.sha256(local.read_bytes()).hexdigest() == sums[local.name]
        assert entry["md5"] == md5_file(local)
