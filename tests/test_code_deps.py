"""Each stage's code, declared once in yt8m_qrnn.pipeline.dag (package folders and modules) and
spelled in dvc.yaml and in its Snakemake rule, covers every repository file its process reads:
its script, the params schema, the package modules it imports (inside functions too) and the
package data they open; and each declared folder or module is read. So an edit to any of them
makes exactly the stages that read it stale, under either orchestrator."""
import inspect
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from conftest import REPO, tool_env
from test_dag_agreement import dvc_stages
from test_pipeline import copy_repo, run
from yt8m_qrnn.pipeline import dag
from yt8m_qrnn.pipeline.dag import SHARD_PLAN
from yt8m_qrnn.stages.fetch.store import data_params_digest

DATA = ("resources/", "results/")


def trace(script: str) -> None:
    """Print the repository files the stage script's process reads (run in a fresh interpreter).

    The script runs with pipeline.cli.run_stage stubbed out, so its own imports are loaded; then the
    module of the stage's entry (pipeline.dag), which cli imports when the stage runs; then every
    import inside a function of every loaded module of the package, until none is new.
    Package data: the files of src/yt8m_qrnn and workflow/schemas that a loaded module names
    (the declaration, pipeline.dag, names every stage's: only its own constants count).
    """
    import ast
    import importlib
    import importlib.util
    import json
    import runpy
    import sys
    from pathlib import Path

    sys.path.insert(0, "src")
    from yt8m_qrnn.pipeline import cli, dag

    def load_imports(tree, package):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in (n for n in names if n.split(".")[0] == "yt8m_qrnn"):
                try:
                    importlib.import_module(name)
                except ModuleNotFoundError:  # a name defined in a module, not a module
                    pass

    def package():
        return {name for name in sys.modules if name.split(".")[0] == "yt8m_qrnn"}

    called = []
    cli.run_stage = lambda name, *args, **kwargs: called.append(name)
    runpy.run_path(script)  # not as __main__: fetch_shard.py's main() does not run either
    for name in called:
        importlib.import_module(dag.stage(name).entry.partition(":")[0])
    scanned = set()
    while new := package() - scanned:
        for name in new:
            scanned.add(name)
            module = sys.modules[name]
            load_imports(ast.parse(Path(module.__file__).read_text()), module.__package__ or name)

    files = {script} | {Path(sys.modules[name].__file__).relative_to(Path.cwd()).as_posix() for name in package()}
    declaration = "src/yt8m_qrnn/pipeline/dag.py"  # names every stage's data: not a reader of it
    named = {n.value for f in files - {declaration} for n in ast.walk(ast.parse(Path(f).read_text()))
             if isinstance(n, ast.Constant)}
    named_files = {Path(n).name for n in named if isinstance(n, str) and "." in n}
    files |= {p.relative_to(Path.cwd()).as_posix() for folder in ("src/yt8m_qrnn", "workflow/schemas")
              for p in Path(folder).resolve().rglob("*")
              if p.is_file() and p.suffix not in (".py", ".pyc") and p.name in named_files}
    # and the files a module names in a constant of its own (the schema's path, in pipeline.dag)
    for name in package():
        for value in vars(sys.modules[name]).values():
            if isinstance(value, (str, Path)) and str(value).startswith(("src/yt8m_qrnn/", "workflow/schemas/")):
                if Path(value).is_file():
                    files.add(Path(value).as_posix())
    print(json.dumps(sorted(files)))


RULE_INPUTS = """
import json
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings()) as api:
    rules = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("workflow/Snakefile"))._workflow.rules
    print(json.dumps({rule.name: [f for f in rule.input if isinstance(f, str)] for rule in rules}))
"""


def python(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=tool_env(), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def dvc_code() -> dict[str, tuple[str, set[str]]]:
    """DVC stage -> (its script, its deps in the repository)."""
    return {name: (stage["cmd"].split()[1], {d for d in stage["deps"] if not d.startswith(DATA)})
            for name, stage in dvc_stages().items()}


def snakemake_code() -> dict[str, tuple[str, set[str]]]:
    """Snakemake rule -> (its script, its inputs in the repository), read from the loaded workflow."""
    rules = json.loads(python(RULE_INPUTS).splitlines()[-1])
    code = {name: {f for f in inputs if not f.startswith(DATA)} for name, inputs in rules.items()}
    return {name: (next(f for f in files if f.startswith("workflow/scripts/")), files)
            for name, files in code.items() if name != "all"}


@pytest.fixture(scope="module")
def declared() -> dict[str, dict[str, tuple[str, set[str]]]]:
    return {"dvc": dvc_code(), "snakemake": snakemake_code()}


@pytest.fixture(scope="module")
def traced(declared) -> dict[str, set[str]]:
    """Script -> the repository files its process reads: every stage script's, two at a time."""
    scripts = sorted({script for stages in declared.values() for script, _ in stages.values()})
    code = "import sys\n" + inspect.getsource(trace) + "\ntrace(sys.argv[1])\n"
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(scripts, (set(json.loads(out)) for out in pool.map(lambda s: python(code, s), scripts))))


def test_the_trace_follows_imports_inside_functions_and_package_data(traced):
    py = "src/yt8m_qrnn/"
    train, evaluate = traced["workflow/scripts/train.py"], traced["workflow/scripts/evaluate.py"]
    assert {py + "stages/train.py", py + "data/reader.py", py + "records/tfrecord.py",
            py + "records/fastparse.py"} <= train
    assert {py + "models/starter.py", py + "models/qrnn.py"} <= evaluate
    assert py + "stages/report/paper_numbers.yaml" in traced["workflow/scripts/report.py"]
    assert py + "stages/yt8m_label_shape.json" in traced["workflow/scripts/generate.py"]
    assert "workflow/schemas/params.schema.yaml" in train
    # only the stage's own modules are loaded
    assert not {py + "stages/report/build.py", py + "stages/generate.py", py + "stages/fetch/sources.py",
                py + "stages/bench.py"} & train


def covers(declared: str, path: str) -> bool:
    return path == declared or path.startswith(declared + "/")


def differences(declared: dict[str, tuple[str, set[str]]], traced: dict[str, set[str]]) -> list[str]:
    """Per stage: the files its process reads that no declared dep covers, and the declared deps
    (files or folders) that cover none of them."""
    out = []
    for name, (script, deps) in sorted(declared.items()):
        read = traced[script]
        undeclared = sorted(path for path in read if not any(covers(dep, path) for dep in deps))
        unused = sorted(dep for dep in deps if not any(covers(dep, path) for path in read))
        if undeclared or unused:
            out.append(f"{name}: undeclared {undeclared}, not read {unused}")
    return out


def test_the_declared_code_is_what_each_stage_reads(traced):
    """The declaration itself (pipeline.dag: folders and modules), against every DVC stage's trace."""
    declared = {name: (f"workflow/scripts/{name}.py", set(dag.code_paths(name)) | {dag.SCHEMA,
                f"workflow/scripts/{name}.py"}) for name, spec in dag.STAGES.items() if "dvc" in spec.orchestrators}
    assert differences(declared, traced) == []


def test_dvc_stages_declare_every_file_their_process_reads(declared, traced):
    assert differences(declared["dvc"], traced) == []


def test_snakemake_rules_declare_every_file_their_process_reads(declared, traced):
    """The rules list files (a folder's time does not change when a file in it is edited): each
    file the process reads is among them, and each is a file of the declared code."""
    rules = declared["snakemake"]
    assert {"fetch_plan", "fetch_shard"} <= set(rules)  # the fan-out's helpers too, whose script DVC never runs
    for name, (script, files) in rules.items():
        assert traced[script] <= files, f"{name}: undeclared {sorted(traced[script] - files)}"
        assert files == set(dag.code_files(name)) | {dag.SCHEMA, script}, name


# ---------------------------------------------------------------- an edit makes exactly its readers stale

@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A copy of the repository whose every output is a stand-in, up to date for both orchestrators:
    recorded by `dvc commit`, and given times after every input by workflow/scripts/restore_mtimes.py."""
    root = tmp_path_factory.mktemp("stand_ins")
    copy_repo(root)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "stand-ins"]):
        run(cmd, root)
    for out in {out for stage in dvc_stages().values() for out in stage["outs"]}:
        path = root / out
        path = path if path.suffix else path / "stand-in"  # the outputs without a suffix are folders
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("stand-in\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / SHARD_PLAN).parent.mkdir(parents=True, exist_ok=True)  # the checkpoint's plan: no shards to fetch
    (root / SHARD_PLAN).write_text(json.dumps({"shards": [], "params_digest": data_params_digest(params)}))
    run(["dvc", "commit", "--force", "--quiet"], root)
    run([sys.executable, "workflow/scripts/restore_mtimes.py"], root)
    assert "up to date" in run(["dvc", "status"], root)
    assert "Nothing to be done" in run(["snakemake", "-n"], root)
    return root


def dvc_stale(root, paths: list[str]) -> dict[str, set[str]]:
    """path -> the stages `dvc status` finds changed because the path (or the folder declared for it) is."""
    status = json.loads(run(["dvc", "status", "--json"], root))
    changed = {name: change["changed deps"] for name, changes in status.items()
               for change in changes if isinstance(change, dict) and "changed deps" in change}
    return {path: {name for name, deps in changed.items() if any(covers(dep, path) for dep in deps)}
            for path in paths}


def dry_run(root, *args: str) -> list[tuple[str, str]]:
    """(job, reason) of every job `snakemake -n` would run, e.g. ("train@qrnn", "Updated input files: ...")."""
    jobs = []
    out = run(["snakemake", "-n", *args], root)
    for block in re.split(r"^(?=(?:local)?(?:rule|checkpoint) \w+:)", out, flags=re.M)[1:]:
        rule = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):", block).group(1)
        model = re.search(r"^\s+wildcards: model=(\w+)", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M).group(1)
        jobs.append((f"{rule}@{model.group(1)}" if model else rule, reason))
    return jobs


def snakemake_stale(root, paths: list[str]) -> dict[str, set[str]]:
    """path -> the jobs a dry run reruns because the path is newer than their outputs. A dry run gives
    a job rerun after another only that reason, so each rule with jobs to rerun is dry-run again alone."""
    rules = {job.split("@")[0] for job, _ in dry_run(root)} - {"all"}
    with ThreadPoolExecutor(2) as pool:
        jobs = [job for jobs in pool.map(lambda rule: dry_run(root, "--allowed-rules", rule), rules) for job in jobs]
    updated = [(job, reason.removeprefix("Updated input files: ").split(", ")) for job, reason in jobs
               if reason.startswith("Updated input files: ")]
    return {path: {job for job, files in updated if path in files} for path in paths}


def test_an_edit_makes_exactly_the_stages_that_read_it_stale(stand_ins, declared, traced):
    """Two files edited at once: tfrecord.py decodes the training frames, deep under reader.py;
    evaluate.py loads models.py inside a function."""
    edited = ["src/yt8m_qrnn/records/tfrecord.py", "src/yt8m_qrnn/models/starter.py"]
    readers = {path: {stage for stage, (script, _) in declared["dvc"].items() if path in traced[script]}
               for path in edited}
    assert readers[edited[0]] >= {"index", "bench", "train@qrnn", "evaluate@qrnn"}
    assert readers[edited[1]] >= {"train@qrnn", "evaluate@qrnn"}
    later = max(p.stat().st_mtime for p in stand_ins.rglob("*")) + 1  # restore_mtimes.py dates outputs ahead of now
    for path in edited:
        with open(stand_ins / path, "a") as handle:
            handle.write("# edited\n")
        os.utime(stand_ins / path, (later, later))
    assert dvc_stale(stand_ins, edited) == readers
    assert snakemake_stale(stand_ins, edited) == readers
