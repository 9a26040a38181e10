rule generate:
    input:
        params="results/params/generate.json",
        script=f"{SCRIPTS}/generate.py",
        code=code_deps("generate"),
    output:
        mirror=directory("resources/generated"),
    log:
        "logs/generate.log",
    benchmark:
        benchmark_path("generate")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} > {log} 2>&1"


# The fetch fans out, one job per shard, so that a cluster downloads the shards in parallel:
#   fetch_plan (a checkpoint)  which shards the params select -> resources/store/plan.json
#   fetch_shard (one a shard)  verifies or downloads one into the shard store -> its record
#   fetch                      gathers: checks every shard against the source again (a verified
#                              one by its sidecar, no download), publishes resources/yt8m and
#                              the manifest
# DVC runs all of it as its one fetch stage (workflow/scripts/fetch.py), which writes the plan
# and the records too. The shards live in the store (resources/store/yt8m), outside every
# declared output, so no rerun deletes them; a shard job whose shard is verified downloads nothing.
#
# The plan and the records are bookkeeping: what decides whether the data is up to date is
# the fetch rule's own inputs, as in dvc.yaml. So the helpers take the params stamp, the
# mirror and their code as ancient (their times, e.g. after restore_mtimes.py or an edit to
# the code, which reruns the fetch itself, rerun nothing); a plan made
# from other data params is removed when Snakemake starts (yt8m_qrnn.stages.fetch.store.forget_stale_plan), and
# the checkpoint makes it again. Missing records (a workspace filled by `dvc pull`) are made
# only when the fetch job has to run.
# The generated mirror feeds the fetch only when it is the data source: with real data, an edit
# to the generator reruns nothing downstream. (dvc.yaml keeps the dependency; DVC compares
# content, so a regenerated mirror reruns its fetch stage, which then changes nothing.)
GENERATED_MIRROR = ["resources/generated"] if config["data"]["source"] == "generated" else []


checkpoint fetch_plan:
    input:
        params=ancient("results/params/fetch.json"),
        mirror=[ancient(path) for path in GENERATED_MIRROR],
        script=ancient(f"{SCRIPTS}/fetch_shard.py"),
        code=[ancient(path) for path in code_deps("fetch")],
    output:
        plan=str(SHARD_PLAN),
    params:
        digest=data_params_digest(config),  # also recorded in the plan
    log:
        "logs/fetch_plan.log",
    benchmark:
        benchmark_path("fetch_plan")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} --plan > {log} 2>&1"


rule fetch_shard:
    input:
        plan=ancient(str(SHARD_PLAN)),  # a new plan (one more shard) reruns no fetched shard
        mirror=[ancient(path) for path in GENERATED_MIRROR],
        script=ancient(f"{SCRIPTS}/fetch_shard.py"),
        code=[ancient(path) for path in code_deps("fetch")],
    output:
        record=f"{SHARD_RECORDS}/{{shard}}.json",  # dag.shard_record
    wildcard_constraints:
        shard=r"\d+/[a-z_]+/[a-z_]+/[a-z_]+\d{4}\.tfrecord",
    log:
        "logs/fetch_shard/{shard}.log",
    benchmark:
        "logs/benchmark/fetch_shard/{shard}.tsv"
    conda:
        CONDA_ENV
    shell:
        "python {input.script} --shard {wildcards.shard} > {log} 2>&1"


rule fetch:
    input:
        params="results/params/fetch.json",
        mirror=GENERATED_MIRROR,
        records=shard_records,
        script=f"{SCRIPTS}/fetch.py",
        code=code_deps("fetch"),
    output:
        shards=directory("resources/yt8m"),
        manifest="results/data/manifest.json",
    log:
        "logs/fetch.log",
    benchmark:
        benchmark_path("fetch")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} > {log} 2>&1"


rule index:
    input:
        params="results/params/index.json",
        shards="resources/yt8m",
        manifest="results/data/manifest.json",
        script=f"{SCRIPTS}/index.py",
        code=code_deps("index"),
    output:
        index="results/index/index.parquet",
        stats="results/index/label_stats.json",
    log:
        "logs/index.log",
    benchmark:
        benchmark_path("index")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} > {log} 2>&1"
