# The same DAG as dvc.yaml (tests/test_dag_agreement.py keeps them in step):
# generate -> fetch -> index -> train {model} -> evaluate {model} -> report, and bench -> report.
from snakemake.utils import min_version

min_version("9.0")


configfile: "params.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/bench.smk"


rule all:
    input:
        "results/report.md",
    default_target: True


onsuccess:
    commit_dvc_lock()
