# The speed of one QRNN layer against one LSTM layer, and of the input pipeline
# (yt8m_qrnn.stages.bench). The report shows it; bench.grid / bench.shape in params.yaml pick
# the paper's Figure 4 grid and the YouTube-8M shape (defaults: a small grid, ~1 min).
sync_params_stamp(config, "bench")


rule bench:
    input:
        params="results/params/bench.json",
        shards="resources/yt8m",
        script=f"{SCRIPTS}/bench.py",
        code=code_deps("bench"),
    output:
        grid="results/bench/layer_grid.json",
        pooling="results/bench/pooling.json",
        pipeline="results/bench/input_pipeline.json",
        figure=report("results/bench/speedup.png", category="Speed"),
        summary="results/bench/summary.json",
    log:
        "logs/bench.log",
    benchmark:
        benchmark_path("bench")
    # every core of a local run: no other job runs beside the timings (a cluster run,
    # without --cores, gives 1; `set-threads: bench=N` in its profile sizes the job)
    threads: lambda wildcards: workflow.resource_settings.cores or 1
    conda:
        CONDA_ENV
    shell:
        "python {input.script} > {log} 2>&1"
