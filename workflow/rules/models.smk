rule train:
    input:
        params="results/params/train-{model}.json",
        shards="resources/yt8m",
        index="results/index/index.parquet",
        script=f"{SCRIPTS}/train.py",
        code=code_deps("train"),
    output:
        seeds=directory("results/models/{model}/seeds"),
        stats="results/models/{model}/train_stats.json",
        history="results/models/{model}/history.csv",
    log:
        "logs/train/{model}.log",
    benchmark:
        benchmark_path("train", "{model}")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} --model {wildcards.model} > {log} 2>&1"


rule evaluate:
    input:
        params="results/params/evaluate-{model}.json",
        shards="resources/yt8m",
        index="results/index/index.parquet",
        seeds="results/models/{model}/seeds",
        script=f"{SCRIPTS}/evaluate.py",
        code=code_deps("evaluate"),
    output:
        topk=directory("results/eval/{model}/predictions"),
        predictions="results/eval/{model}/eval_predictions.csv",
        submission="results/eval/{model}/submission.csv",
        metrics="results/eval/{model}/metrics.json",
        pr_curve="results/eval/{model}/pr_curve.csv",
        per_class="results/eval/{model}/per_class_ap.csv",
    log:
        "logs/evaluate/{model}.log",
    benchmark:
        benchmark_path("evaluate", "{model}")
    conda:
        CONDA_ENV
    shell:
        "python {input.script} --model {wildcards.model} > {log} 2>&1"
