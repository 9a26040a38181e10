rule report:
    input:
        params="results/params/report.json",
        stats="results/index/label_stats.json",
        manifest="results/data/manifest.json",
        train=expand("results/models/{model}/{file}", model=MODELS, file=["seeds", "train_stats.json", "history.csv"]),
        evaluation=expand(
            "results/eval/{model}/{file}",
            model=MODELS,
            file=["predictions", "metrics.json", "per_class_ap.csv", "pr_curve.csv", "eval_predictions.csv",
                  "submission.csv"],
        ),
        bench=expand("results/bench/{file}", file=["layer_grid.json", "pooling.json", "input_pipeline.json",
                                                   "speedup.png", "summary.json"]),
        script=f"{SCRIPTS}/report.py",
        code=code_deps("report"),
    output:
        # `snakemake --report report.html` shows these: the report, every figure, every table (HTML).
        report=report("results/report.md", category="Report"),
        figures=report(directory("results/figures"), patterns=["{name}.png"], category="Figures",
                       labels={"figure": "{name}"}),
        tables=report(directory("results/tables"), patterns=["{name}.html"], category="Tables",
                      labels={"table": "{name}"}),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmark/report.tsv"
    conda:
        CONDA_ENV
    shell:
        "python {input.script} > {log} 2>&1"
