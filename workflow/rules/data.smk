rule generate:
    input:
        params="results/params/generate.json",
        script=f"{SCRIPTS}/generate.py",
        code=f"{PY}/synth.py",
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


rule fetch:
    input:
        params="results/params/fetch.json",
        mirror="resources/generated",
        script=f"{SCRIPTS}/fetch.py",
        code=f"{PY}/fetch.py",
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
        code=f"{PY}/index.py",
        tfrecord=f"{PY}/tfrecord.py",
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
