"""Fault injection: every failure gives one clear line and leaves no wrong artifact.

The faults of issue 7, each driven through the stage command line (workflow/scripts/*.py
or cli.run_stage in-process) where a user would meet it, and through Snakemake and DVC
for the faults that concern them. Library-level cases already in test_fetch.py,
test_index.py and test_params.py are not repeated; the closing note of the issue maps
every fault to its tests. Run alone with ``pytest -m faults``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tool_env
from conftest_servers import MirrorServer, _parse_range, free_port
from test_fetch import FAST, data_params, write_mirror
from test_index import KINDS, _corrupt, make_dataset
from test_pipeline import copy_repo, dvc_ran, snakemake_ran, tiny_params
from yt8m_qrnn.pipeline import cli
from yt8m_qrnn.stages.fetch import sources as fetch
from yt8m_qrnn.pipeline import dag as stages
from yt8m_qrnn.pipeline.cli import stage_function
from yt8m_qrnn.stages.fetch.sources import FetchError, RetryPolicy, fetch_dataset
from yt8m_qrnn.pipeline.io import resource_locks
from yt8m_qrnn.records.tfrecord import iter_records, read_record_at

pytestmark = pytest.mark.faults

SCRIPTS = REPO / "workflow" / "scripts"
TINY_GENERATE = {"seed": 5, "num_events": 4, "min_frames": 3, "max_frames": 5, "noise": 0.3,
                 "splits": {"train": [2, 24], "validate": [1, 24], "test": [1, 4]}}
QUICK = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02, timeout=5)


# ---------------------------------------------------------------- helpers

def small_params(**data) -> dict:
    """The repository's params with a tiny generated dataset and quick models."""
    params = tiny_params()
    params["generate"] = json.loads(json.dumps(TINY_GENERATE))
    params["run_models"] = ["logistic"]
    params["models"]["logistic"]["epochs"] = 1
    params["data"].update(data)
    if data.get("levels") == ["video"]:  # frame-level models would not validate
        params["models"] = {name: m for name, m in params["models"].items() if m["level"] == "video"}
    return params


def write_params(folder: Path, params: dict) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_cli(capsys, stage: str, *extra: str) -> tuple[int, str]:
    """A stage's command line, in-process in the current folder: (exit status, stderr)."""
    capsys.readouterr()
    try:
        cli.run_stage(stage, argv=["--params", "params.yaml", *extra])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    if os.environ.get("YT8M_ERROR_LINES"):  # collect what the user sees, per test, for the docs
        with open(os.environ["YT8M_ERROR_LINES"], "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{lines[0]}\n")
    return lines[0]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".part") or ".tmp" in p.name]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A workspace holding a generated mirror (the generate stage run once)."""
    root = tmp_path_factory.mktemp("generated")
    write_params(root, small_params())
    here = os.getcwd()
    os.chdir(root)
    try:
        stage_function("generate")(small_params())
    finally:
        os.chdir(here)
    return root


@pytest.fixture
def ws(tmp_path, generated, monkeypatch) -> Path:
    """A fresh workspace (the current folder) with the generated mirror and params.yaml."""
    root = tmp_path / "ws"
    shutil.copytree(generated, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def indexed_data(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """A workspace whose shards (test_index.make_dataset) and manifest are in place for the index stage."""
    root = tmp_path / "ws"
    root.mkdir()
    write_params(root, small_params())
    dataset = make_dataset(root / "resources" / "yt8m")
    manifest = root / "results" / "data" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"files": dataset["files"]}))
    monkeypatch.chdir(root)
    return root, dataset


class HangingMirror(MirrorServer):
    """A MirrorServer whose `hang_gets[path]` GETs send their headers, then nothing until released."""

    def __init__(self, files):
        super().__init__(files)
        self.hang_gets: dict[str, set[int]] = {}
        self.release = threading.Event()
        mirror, base = self, self._httpd.RequestHandlerClass

        class Handler(base):
            def do_GET(self):
                if mirror.count("GET", self.path) + 1 not in mirror.hang_gets.get(self.path, set()):
                    return super().do_GET()
                mirror.record("GET", self.path, self.headers.get("Range"))
                data = mirror.body(self.path)
                start, end = _parse_range(self.headers.get("Range"), len(data))
                self._send_headers(206, end - start, f"bytes {start}-{end - 1}/{len(data)}")
                mirror.release.wait(60)
                self.close_connection = True

        self._httpd.RequestHandlerClass = Handler

    def __exit__(self, *exc):
        self.release.set()
        super().__exit__(*exc)


def plan_files(sizes: dict[str, int]) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """MirrorServer files for video/train shards of the given sizes, and name -> bytes."""
    shards = {}
    for name, size in sizes.items():
        seed = hashlib.sha256(name.encode()).digest()
        shards[name] = (seed * (size // len(seed) + 1))[:size]
    plan = {"files": {name: hashlib.md5(data).hexdigest() for name, data in shards.items()}}
    files = {"/2/download_plans/video_train.json": json.dumps(plan).encode()}
    files |= {f"/2/video/train/{name}": data for name, data in shards.items()}
    return files, shards


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


# ---------------------------------------------------------------- 1. fetch killed mid-shard

def test_fetch_killed_mid_shard_refetches_only_that_shard(tmp_path):
    """SIGKILL while a shard is half downloaded: no final name for it; the rerun fetches it, not the others."""
    big = fetch.HTTP_BLOCK_SIZE + 3 * fetch.CHUNK_SIZE  # two ranged GETs: the second one hangs
    files, shards = plan_files({"trainaa.tfrecord": 90_000, "trainab.tfrecord": 70_000,
                                "trainac.tfrecord": big, "trainad.tfrecord": 50_000})
    hanging = "/2/video/train/trainac.tfrecord"
    root = tmp_path / "ws"
    root.mkdir()
    store = root / "resources" / "store" / "yt8m" / "2" / "video" / "train"
    with HangingMirror(files) as server:
        server.hang_gets[hanging] = {2}
        write_params(root, small_params(source=server.url, levels=["video"], splits=["train"], shards={"train": "all"}))
        command = [sys.executable, str(SCRIPTS / "fetch.py")]
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen(command, cwd=root, env=tool_env(), stdout=log, stderr=log, start_new_session=True)
        try:
            part = store / "train0002.tfrecord.part"
            wait_for(lambda: server.count("GET", hanging) >= 2 and part.exists()
                     and len(list(store.glob("*.verified.json"))) == 3, 60, "the hanging GET")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        assert 0 < part.stat().st_size < big  # killed mid-shard, with part of it on disk
        assert not (store / "train0002.tfrecord").exists()
        assert not (root / "resources" / "yt8m").exists() and not (root / "results" / "data" / "manifest.json").exists()

        server.hang_gets.clear()
        server.release.set()
        before = len(server.requests)
        second = subprocess.run(command, cwd=root, env=tool_env(), capture_output=True, text=True)
        assert second.returncode == 0, second.stderr[-3000:]
        gets = sorted({path for method, path, _ in server.requests[before:] if method == "GET"})
    assert gets == ["/2/download_plans/video_train.json", hanging]  # verified shards: no request at all
    manifest = json.loads((root / "results" / "data" / "manifest.json").read_text())
    assert [e["md5"] for e in manifest["files"]] == [hashlib.md5(shards[n]).hexdigest() for n in sorted(shards)]
    for entry, name in zip(manifest["files"], sorted(shards)):
        assert (root / "resources" / "yt8m" / entry["name"]).read_bytes() == shards[name]
    assert no_temporaries(root / "resources")


def test_fetch_rerun_after_orchestrator_removed_its_outputs_downloads_nothing(ws, capsys, monkeypatch):
    """Snakemake and DVC delete a stage's outputs before running it again: verified shards survive in the store."""
    assert run_cli(capsys, "fetch")[0] == 0
    first = json.loads(Path("results/data/manifest.json").read_text())
    shutil.rmtree("resources/yt8m")  # what both orchestrators do before rerunning fetch
    os.remove("results/data/manifest.json")
    copied = []
    real_copy = fetch._copy_to_part
    monkeypatch.setattr(fetch, "_copy_to_part", lambda ctx, shard, *a: copied.append(shard) or real_copy(ctx, shard, *a))
    assert run_cli(capsys, "fetch")[0] == 0
    assert copied == []
    assert json.loads(Path("results/data/manifest.json").read_text()) == first
    for entry in first["files"]:
        published, stored = Path("resources/yt8m") / entry["name"], stages.SHARD_STORE / entry["name"]
        assert published.stat().st_ino == stored.stat().st_ino  # a hard link: no second copy on disk
    assert files_under(Path("resources/yt8m")) == sorted(e["name"] for e in first["files"])


# ---------------------------------------------------------------- 2. a shard that fails its hash

def test_corrupt_shard_fails_the_fetch_stage_naming_shard_and_both_hashes(ws, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "RetryPolicy", lambda: QUICK)
    shard = Path("resources/generated/2/frame/train/train0001.tfrecord")
    data = bytearray(shard.read_bytes())
    expected = hashlib.md5(data).hexdigest()
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    attempts = []
    real_copy = fetch._copy_to_part
    monkeypatch.setattr(fetch, "_copy_to_part",
                        lambda ctx, s, *a: attempts.append(f"{s.level}/{s.local_name}") or real_copy(ctx, s, *a))
    code, err = run_cli(capsys, "fetch")
    line = error_line(err)
    assert code == 1
    assert line == (f"error: 2/frame/train/train0001.tfrecord (remote train0001.tfrecord): md5 mismatch: "
                    f"expected {expected}, got {hashlib.md5(data).hexdigest()} after {QUICK.attempts} attempts "
                    f"(file://{ws / shard})")
    assert attempts.count("frame/train0001.tfrecord") == QUICK.attempts  # retried, then given up
    assert not Path("results/data/manifest.json").exists() and not Path("resources/yt8m").exists()
    assert not (stages.SHARD_STORE / "2/frame/train/train0001.tfrecord").exists() and no_temporaries(Path("resources"))


# ---------------------------------------------------------------- 3. source unreachable, timeouts

def test_unreachable_source_backs_off_then_fails_in_one_line(tmp_path):
    port = free_port()  # nothing listens there
    sleeps = []
    policy = RetryPolicy(attempts=4, base_delay=0.5, max_delay=1.0, timeout=2)
    params = data_params(f"http://user:s3cret@127.0.0.1:{port}")
    with pytest.raises(FetchError) as err:
        fetch_dataset(params, tmp_path / "dest", tmp_path / "manifest.json", progress=False, retry=policy,
                      sleep=sleeps.append)
    message = str(err.value)
    assert sleeps == [0.5, 1.0, 1.0]  # exponential, capped at max_delay
    assert message.startswith(f"http://127.0.0.1:{port}/2/download_plans/video_train.json: ClientConnectorError: ")
    assert message.endswith("(after 4 attempts)") and "\n" not in message and "s3cret" not in message
    assert not (tmp_path / "dest").exists() and not (tmp_path / "manifest.json").exists()


def test_unreachable_source_through_the_stage(ws, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "RetryPolicy", lambda: QUICK)
    port = free_port()
    write_params(ws, small_params(source=f"http://127.0.0.1:{port}", levels=["video"], splits=["train"],
                                  shards={"train": "all"}))
    code, err = run_cli(capsys, "fetch")
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"error: http://127.0.0.1:{port}/2/download_plans/video_train.json: "
                           f"ClientConnectorError: Cannot connect to host 127.0.0.1:{port}")
    assert line.endswith(f"(after {QUICK.attempts} attempts)")
    assert not Path("resources/store").exists() and not Path("resources/yt8m").exists()
    assert not Path("results/data/manifest.json").exists()


def test_shard_that_always_times_out_gives_up_and_leaves_no_shard(tmp_path):
    files, _ = plan_files({"trainaa.tfrecord": 5_000, "trainab.tfrecord": 5_000})
    path = "/2/video/train/trainab.tfrecord"
    sleeps = []
    with MirrorServer(files) as server:
        server.stall_gets[path] = {1, 2, 3}
        server.stall_seconds = 0.6
        with pytest.raises(FetchError) as err:
            fetch_dataset(data_params(server.url), tmp_path / "dest", tmp_path / "m.json", progress=False,
                          retry=RetryPolicy(attempts=3, base_delay=0.25, max_delay=1, timeout=0.2),
                          sleep=sleeps.append, workers=1)
        assert server.count("GET", path) == 3
    message = str(err.value)
    assert message.startswith(f"{server.url}{path}: ") and message.endswith("(after 3 attempts)")
    assert message.endswith("TimeoutError: timed out (after 3 attempts)") and "\n" not in message
    assert sleeps == [0.25, 0.5]
    assert files_under(tmp_path / "dest") == ["2/video/train/train0000.tfrecord",
                                              "2/video/train/train0000.tfrecord.verified.json"]
    assert not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------- 4. bad records: the index stage and the reader

@pytest.mark.parametrize("kind", list(KINDS))
def test_index_stage_names_file_and_offset_and_leaves_no_index(indexed_data, capsys, kind):
    root, _ = indexed_data
    name = "2/frame/train/train0000.tfrecord"
    shard = Path("resources/yt8m") / name
    offset = _corrupt(kind, shard, [o for o, _ in iter_records(shard)])
    Path("results/index").mkdir(parents=True)
    Path("results/index/index.parquet").write_text("an index from an earlier run")  # must not survive
    code, err = run_cli(capsys, "index")
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"error: resources/yt8m/{name}: record at byte offset {offset}: ")
    assert KINDS[kind] in line
    assert files_under(root / "results" / "index") == []


def test_index_stage_skips_and_counts_bad_records_when_asked(indexed_data, capsys):
    root, dataset = indexed_data
    params = small_params()
    params["index"]["on_bad_record"] = "skip"
    write_params(root, params)
    shard = Path("resources/yt8m/2/video/train/train0001.tfrecord")
    offset = _corrupt("data_crc", shard, [o for o, _ in iter_records(shard)])
    assert run_cli(capsys, "index")[0] == 0
    stats = json.loads(Path("results/index/label_stats.json").read_text())
    assert stats["bad_records"] == {"count": 1, "records": [
        {"shard": "2/video/train/train0001.tfrecord", "offset": offset, "reason": "bad data crc"}]}
    assert stats["rows"] == len(dataset["expected"]) - 1


@pytest.mark.slow
def test_shard_corrupted_after_indexing_stops_training_naming_file_and_offset(ws, capsys):
    for stage in ("fetch", "index"):
        assert run_cli(capsys, stage)[0] == 0
    import pandas as pd

    index = pd.read_parquet("results/index/index.parquet")
    row = index[(index["level"] == "video") & (index["subset"] == "train")].iloc[3]
    shard = Path("resources/yt8m") / row["shard"]
    raw = bytearray(shard.read_bytes())
    raw[int(row["offset"]) + 12 + 40] ^= 0x10  # a bit flip in the record's data: its CRC no longer matches
    shard.write_bytes(bytes(raw))
    code, err = run_cli(capsys, "train", "--model", "logistic")
    line = error_line(err)
    assert code == 1
    assert line.startswith(f"error: {shard}: record at byte offset {row['offset']}: bad data crc; "
                           "the shards changed after they were indexed")
    assert "Traceback" not in err
    assert files_under(ws / "results" / "models") == []


# ---------------------------------------------------------------- 6. disk full, unwritable folder

@pytest.mark.parametrize("output, reason", [
    ("results/index/index.parquet", "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"),
    ("results/index/label_stats.json", "[Errno 28] No space left on device"),
])
def test_disk_full_while_writing_an_output(indexed_data, capsys, output, reason):
    """The output's temporary name is pointed at /dev/full: the kernel's own ENOSPC on write."""
    root, _ = indexed_data
    final = Path(output)
    final.parent.mkdir(parents=True)
    Path("results/index/label_stats.json").write_text("{}")  # stale outputs of an earlier run
    os.symlink("/dev/full", final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}"))
    code, err = run_cli(capsys, "index")
    assert code == 1
    assert error_line(err) == f"error: cannot write {output}: {reason}"
    assert files_under(root / "results" / "index") == [] and not list((root / "results" / "index").iterdir())


def test_disk_full_while_downloading_a_shard(ws, capsys, monkeypatch):
    """Every .part is written to /dev/full: the first shard fails at once (no retries), naming the file."""
    real_open = open
    opened = []

    def full_disk_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".part") and ("w" in mode or "a" in mode):
            opened.append(str(file))
            return real_open("/dev/full", "wb")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fetch, "open", full_disk_open, raising=False)
    code, err = run_cli(capsys, "fetch")
    line = error_line(err)
    assert code == 1
    assert re.fullmatch(r"error: cannot write resources/store/yt8m/2/\w+/\w+/\w+\.tfrecord\.part: "
                        r"OSError: \[Errno 28\] No space left on device", line), line
    assert len(opened) == len(set(opened))  # no shard was retried
    assert not Path("results/data/manifest.json").exists() and not Path("resources/yt8m").exists()
    assert no_temporaries(Path("resources")) and not list(Path("resources/store").rglob("*.tfrecord"))


def immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i: a folder even root cannot write to (ext4, xfs, btrfs)."""
    if not shutil.which("chattr"):
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_unwritable_output_folder(ws, capsys, monkeypatch):
    folder = Path("results/data")
    folder.mkdir(parents=True)
    if not immutable(folder, True):
        pytest.skip("chattr +i is not supported here")
    try:
        code, err = run_cli(capsys, "fetch")
    finally:
        immutable(folder, False)
    assert code == 1
    assert error_line(err) == "error: cannot write results/data/manifest.json: [Errno 1] Operation not permitted"
    assert not Path("resources/yt8m").exists() and list(folder.iterdir()) == []
    # the verified shards were kept aside: once the folder is writable the rerun copies nothing
    copied = []
    real_copy = fetch._copy_to_part
    monkeypatch.setattr(fetch, "_copy_to_part", lambda ctx, s, *a: copied.append(s) or real_copy(ctx, s, *a))
    assert run_cli(capsys, "fetch")[0] == 0 and copied == []


def test_failed_stage_removes_all_its_outputs(ws, capsys, monkeypatch):
    """A stage that fails after writing some outputs leaves none, so no set of outputs is half new, half stale."""
    for stage in ("fetch", "index"):
        assert run_cli(capsys, stage)[0] == 0
    from yt8m_qrnn.stages.fetch import store

    real_write_json = store.write_json

    def fail_on_manifest(path, obj):
        if Path(path) == stages.MANIFEST:
            raise OSError(28, "No space left on device")
        return real_write_json(path, obj)

    monkeypatch.setattr(store, "write_json", fail_on_manifest)
    code, err = run_cli(capsys, "fetch")
    assert code == 1 and error_line(err) == "error: [Errno 28] No space left on device"
    assert not Path("resources/yt8m").exists() and not Path("results/data/manifest.json").exists()
    assert Path("results/index/index.parquet").exists()  # other stages' outputs are not touched


def test_a_stage_removes_what_a_killed_run_left_mid_write(indexed_data, capsys):
    """Temporaries named after a dead writer's pid: the next run of the stage removes them, and only them."""
    folder = Path("results/index")
    folder.mkdir(parents=True, exist_ok=True)
    left = [folder / ".index.tmp4242.parquet", folder / ".label_stats.tmp4242.json"]
    for path in left:
        path.write_bytes(b"half")
    other = folder / ".notes.tmp4242.txt"
    other.write_text("not an output's")
    assert run_cli(capsys, "index")[0] == 0
    assert [path for path in left if path.exists()] == [] and other.exists()
    assert sorted(p.name for p in folder.iterdir()) == [".notes.tmp4242.txt", "index.parquet", "label_stats.json"]


def test_stage_outputs_match_the_dag():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        if "foreach" in stage:
            declared = {next(iter(o)) if isinstance(o, dict) else o
                        for key in ("outs", "metrics", "plots") for o in stage["do"].get(key, [])}
            assert {str(p) for p in stages.outputs(name, "qrnn")} == {d.replace("${item}", "qrnn") for d in declared}
        else:
            declared = {next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]}
            assert {str(p) for p in stages.outputs(name)} == declared


# ---------------------------------------------------------------- 7. params (the rest: test_params.py)

def test_remote_shard_selection_beyond_the_source_names_the_key(ws, capsys):
    """A remote source's size is only known from its listing: the fetch stage, first to read it, names the key."""
    mirror = ws / "mirror"
    write_mirror(mirror, {"train": ["trainaa.tfrecord", "trainab.tfrecord"]})
    for selection, reason in ((5, "shard selection 5: only 2 shards available"),
                              ([1, 7], "shard selection: indices [7] not available (2 shards, indices 0..1)")):
        write_params(ws, small_params(source=f"file://{mirror}", levels=["video"], splits=["train"],
                                      shards={"train": selection}))
        code, err = run_cli(capsys, "fetch")
        assert code == 1
        assert error_line(err) == f"error: data.shards.train: {reason} in file://{mirror}/2/video/train"
        assert not Path("resources/store").exists() and not Path("results/data/manifest.json").exists()


# ---------------------------------------------------------------- 8. hostile names

def test_hostile_names_in_a_listing_write_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_mirror(mirror, {"train": ["trainaa.tfrecord"]}, plan=False)
    real_list = fetch._Source.list_folder
    for bad in ("../../evil.tfrecord", "/tmp/evil.tfrecord", "a/../../evil.tfrecord", "..", "train\x00.tfrecord"):
        monkeypatch.setattr(fetch._Source, "list_folder",
                            lambda self, url, bad=bad: real_list(self, url) | {bad: fetch.Expected(size=1)})
        dest = tmp_path / "data" / "dest"
        with pytest.raises(FetchError, match="refusing unsafe remote shard name"):
            fetch_dataset(data_params(f"file://{mirror}"), dest, tmp_path / "m.json", progress=False, retry=FAST)
        assert not dest.exists() and not (tmp_path / "m.json").exists()
    assert not [p for p in tmp_path.rglob("*evil*")]


def test_destination_folder_linked_outside_is_refused(tmp_path):
    mirror, outside, dest = tmp_path / "mirror", tmp_path / "outside", tmp_path / "data"
    write_mirror(mirror, {"train": ["trainaa.tfrecord"]})
    outside.mkdir()
    (dest / "2" / "video").mkdir(parents=True)
    (dest / "2" / "video" / "train").symlink_to(outside)
    with pytest.raises(FetchError, match=r"refusing to write 'trainaa.tfrecord' outside"):
        fetch_dataset(data_params(f"file://{mirror}"), dest, tmp_path / "m.json", progress=False, retry=FAST)
    assert list(outside.iterdir()) == [] and not (tmp_path / "m.json").exists()


def test_hostile_plan_through_the_stage(ws, capsys):
    mirror = ws / "mirror"
    write_mirror(mirror, {"train": ["trainaa.tfrecord"]})
    plan = mirror / "2" / "download_plans" / "video_train.json"
    plan.write_text(json.dumps({"files": {"../../../../evil.tfrecord": "0" * 32}}))
    write_params(ws, small_params(source=f"file://{mirror}", levels=["video"], splits=["train"], shards={"train": "all"}))
    code, err = run_cli(capsys, "fetch")
    assert code == 1
    assert error_line(err) == "error: refusing unsafe remote shard name '../../../../evil.tfrecord'"
    assert not [p for p in ws.parent.rglob("*evil*") if p != plan] and not Path("resources/store").exists()


# ---------------------------------------------------------------- 9. locks

HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
from yt8m_qrnn.pipeline.io import resource_locks
shared, exclusive, seconds = {shared!r}, {exclusive!r}, {seconds!r}
with resource_locks(Path("resources/locks"), shared, exclusive, owner="holder"):
    Path("held").touch()
    time.sleep(seconds)
    Path("released").write_text(repr(time.time()))
"""


def hold_locks(cwd: Path, shared=(), exclusive=(), seconds=2.0) -> subprocess.Popen:
    """Another process holding locks for `seconds` (as a concurrent stage run would)."""
    for marker in ("held", "released"):
        (cwd / marker).unlink(missing_ok=True)
    code = HOLD.format(src=str(REPO / "src"), shared=list(shared), exclusive=list(exclusive), seconds=seconds)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=cwd)
    wait_for(lambda: (cwd / "held").exists(), 30, "the holder to take its locks")
    return holder


def test_a_stage_waits_while_another_run_writes_its_outputs(indexed_data, capsys):
    root, _ = indexed_data
    holder = hold_locks(root, exclusive=["index"], seconds=1.5)
    try:
        code, err = run_cli(capsys, "index")
    finally:
        holder.wait()
    assert code == 0, err
    released = float((root / "released").read_text())
    assert Path("results/index/index.parquet").stat().st_mtime >= released  # written after the other run ended
    assert f"stage index: waiting for the write lock on 'index' (resources/locks/index.lock); held by pid {holder.pid}" \
        in err


def test_a_stage_waits_while_its_inputs_are_rewritten(indexed_data, capsys):
    root, _ = indexed_data
    holder = hold_locks(root, exclusive=["data"], seconds=1.0)  # a fetch rewriting the shards
    try:
        code, err = run_cli(capsys, "index")
    finally:
        holder.wait()
    assert code == 0 and "waiting for the read lock on 'data'" in err
    assert Path("results/index/index.parquet").stat().st_mtime >= float((root / "released").read_text())


def test_lock_wait_can_be_bounded_and_then_fails_cleanly(indexed_data, capsys, monkeypatch):
    root, _ = indexed_data
    Path("results/index").mkdir(parents=True)
    Path("results/index/index.parquet").write_text("written by the other run")
    monkeypatch.setenv("YT8M_LOCK_TIMEOUT", "0.5")
    holder = hold_locks(root, exclusive=["index"], seconds=3)
    try:
        code, err = run_cli(capsys, "index")
    finally:
        holder.kill()
        holder.wait()
    assert code == 1
    assert error_line(err).startswith("error: gave up after 0.5 s waiting for the write lock on 'index' "
                                      f"(resources/locks/index.lock); held by pid {holder.pid}")
    assert Path("results/index/index.parquet").read_text() == "written by the other run"  # not ours to remove


def test_readers_share_writers_wait(tmp_path):
    first = hold_locks(tmp_path, shared=["data"], seconds=1.0)
    try:
        started = time.monotonic()
        with resource_locks(tmp_path / "resources" / "locks", shared=["data"]):
            assert time.monotonic() - started < 0.5  # two readers at once
        with resource_locks(tmp_path / "resources" / "locks", exclusive=["data"]):
            assert (tmp_path / "released").exists()  # the writer waited for the reader
    finally:
        first.wait()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    holder = hold_locks(tmp_path, exclusive=["index"], seconds=60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with resource_locks(tmp_path / "resources" / "locks", exclusive=["index"], timeout=5):
        assert time.monotonic() - started < 1


# ---------------------------------------------------------------- orchestrators: killed, failing, both at once

def orchestrator_workspace(root: Path, params: dict | None = None) -> Path:
    copy_repo(root)
    write_params(root, params or small_params())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=tool_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_when_running(process: subprocess.Popen, script: str, timeout: float = 240) -> None:
    """SIGKILL the process group (orchestrator and its jobs) once a job runs workflow/scripts/<script>."""
    import psutil

    def running() -> bool:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return False
        for child in children:
            try:
                if any(arg.endswith(f"workflow/scripts/{script}") for arg in child.cmdline()):
                    return True
            except psutil.Error:
                continue
        return False

    try:
        wait_for(running, timeout, f"a job running {script}", poll=0.1)
        time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def check_index_is_consistent(root: Path) -> None:
    """Manifest, shards and index agree: every indexed record reads back with its CRCs and id."""
    import pandas as pd

    from yt8m_qrnn.stages.index import parse_video_record

    manifest = json.loads((root / "results/data/manifest.json").read_text())
    for entry in manifest["files"]:
        assert hashlib.md5((root / "resources/yt8m" / entry["name"]).read_bytes()).hexdigest() == entry["md5"]
    index = pd.read_parquet(root / "results/index/index.parquet")
    assert set(index["shard"]) == {e["name"] for e in manifest["files"]}
    for row in index.itertuples():
        data = read_record_at(root / "resources/yt8m" / row.shard, row.offset)
        assert parse_video_record(data, 2, row.level)[0] == row.id


@pytest.mark.slow
def test_snakemake_killed_between_stages_reruns_only_the_incomplete_job(tmp_path):
    root = orchestrator_workspace(tmp_path / "ws")
    target = ["snakemake", "--cores", "1", "results/index/index.parquet"]
    kill_when_running(start(target, root, tmp_path / "killed.log"), "index.py")
    assert (root / "results/data/manifest.json").exists()  # fetch had completed
    assert not (root / "results/index/index.parquet").exists()  # index had not: nothing under its name

    locked = sh(target, root, check=False)  # what the user sees first: Snakemake's own stale lock
    assert locked.returncode != 0 and "Directory cannot be locked" in locked.stdout + locked.stderr
    sh(["snakemake", "--unlock"], root)
    out = sh(target, root)
    assert snakemake_ran(out.stdout + out.stderr) == ["index"]
    check_index_is_consistent(root)
    assert "Nothing to be done" in sh(["snakemake", "-n", "results/index/index.parquet"], root).stdout


@pytest.mark.slow
def test_dvc_killed_between_stages_reruns_only_the_incomplete_stage(tmp_path):
    root = orchestrator_workspace(tmp_path / "ws")
    kill_when_running(start(["dvc", "repro", "index"], root, tmp_path / "killed.log"), "index.py")
    assert not (root / "results/index/index.parquet").exists()
    out = sh(["dvc", "repro", "index"], root)
    assert dvc_ran(out.stdout + out.stderr) == ["index"]
    assert "Stage 'fetch' didn't change, skipping" in out.stdout + out.stderr
    check_index_is_consistent(root)
    assert dvc_ran(sh(["dvc", "repro", "index"], root).stdout) == []


@pytest.mark.slow
def test_corrupt_shard_stops_the_dag_under_snakemake(tmp_path):
    root = orchestrator_workspace(tmp_path / "ws")
    sh(["snakemake", "--cores", "1", "resources/generated"], root)
    shard = root / "resources/generated/2/video/train/train0000.tfrecord"
    data = bytearray(shard.read_bytes())
    data[50] ^= 0x01
    shard.write_bytes(bytes(data))
    result = sh(["snakemake", "--cores", "1", "results/index/index.parquet"], root, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "Error in rule fetch_shard" in out
    ran = snakemake_ran(out)  # the fetch fans out: one fetch_shard job per shard, then fetch gathers
    assert "fetch_shard" in ran and set(ran) <= {"fetch_plan", "fetch_shard"}  # nothing downstream ran
    line = error_line((root / "logs/fetch_shard/2/video/train/train0000.tfrecord.log").read_text())
    assert line.startswith("error: 2/video/train/train0000.tfrecord (remote train0000.tfrecord): md5 mismatch: ")
    assert not (root / "results/data/manifest.json").exists() and not (root / "resources/yt8m").exists()
    assert not (root / "results/index").exists() or files_under(root / "results/index") == []


@pytest.mark.slow
def test_dvc_refuses_bad_params_before_writing_anything(tmp_path):
    params = small_params()
    params["models"]["logistic"]["learning_rat"] = 0.1
    root = orchestrator_workspace(tmp_path / "ws", params)
    result = sh(["dvc", "repro"], root, check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "error: params.yaml: unknown key 'models.logistic.learning_rat' (allowed: " in out
    assert "Traceback" not in out
    assert not (root / "resources").exists() and not (root / "results").exists()


@pytest.mark.slow
def test_snakemake_and_dvc_at_once_never_interleave(tmp_path):
    root = orchestrator_workspace(tmp_path / "ws")
    snake = start(["snakemake", "--cores", "2", "results/index/index.parquet"], root, tmp_path / "snakemake.log")
    dvc = start(["dvc", "repro", "index"], root, tmp_path / "dvc.log")
    codes = {"snakemake": snake.wait(timeout=400), "dvc": dvc.wait(timeout=400)}
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in codes}
    stage_logs = "".join(p.read_text() for p in (root / "logs").glob("*.log"))
    for text in [*logs.values(), stage_logs]:
        assert "Traceback" not in text  # whatever failed, failed with its one line
    waited = [line for line in (stage_logs + logs["dvc"]).splitlines() if ": waiting for the " in line]
    assert waited, "the two runs never met at a lock"
    # whichever failed (its outputs deleted by the other orchestrator), a rerun of each completes and agrees
    sh(["snakemake", "--unlock"], root)
    sh(["snakemake", "--cores", "2", "results/index/index.parquet"], root)
    sh(["dvc", "repro", "index"], root)
    check_index_is_consistent(root)
