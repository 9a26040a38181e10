"""Part 6 of the report, "QRNN speed": the bench stage's results/bench/ as prose and tables,
each target marked met or not, and its figure."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from yt8m_qrnn.stages.report import prose
from yt8m_qrnn.stages.report.formatting import NA, fmt_duration, fmt_rate, fmt_seconds, markdown_table
from yt8m_qrnn.stages.report.inputs import ReportError, read_json

BENCH_JSON = ("summary", "layer_grid", "pooling", "input_pipeline")


def bench_section(results: Path) -> list[str]:
    """speed_section's lines, the last one empty (the section ends the report, with a newline)."""
    return (speed_section(results) + "\n").split("\n")


def speed_section(results: Path) -> str:
    """The section, from results/bench/ (yt8m_qrnn.stages.bench); says how to run the bench when it has not run."""
    folder = Path(results) / "bench"
    if not (folder / "summary.json").exists():
        return prose.fill("speed_not_run", summary=folder / "summary.json")
    bench = {name: read_json(folder / f"{name}.json", "the bench stage writes it") for name in BENCH_JSON}
    try:
        return prose.fill(
            "speed", **measured(bench["summary"]), targets=targets_table(bench["summary"]),
            **grid_part(bench["layer_grid"]), **shape_part(bench["layer_grid"], bench["pooling"]),
            input_pipeline=pipeline_text(bench["input_pipeline"]),
            speedup_figure=prose.fill("speedup_figure") if (folder / "speedup.png").exists() else "")
    except (KeyError, TypeError, ValueError) as err:
        raise ReportError(f"{folder}: malformed bench results ({type(err).__name__}: {err})") from None


def measured(summary: dict) -> dict:
    """Where and how the bench ran (summary.json's environment and params)."""
    env, params = summary["environment"], summary["params"]
    versions, load = env["versions"], env["load_average_start"]
    return {
        "device": env["device"], "cpus_usable": env["cpus_usable"], "cpu_count": env["cpu_count"],
        "no_gpu": "" if env.get("gpus") else "; no GPU visible to TensorFlow",
        "keras": versions["keras"], "backend": env["backend"], "tensorflow": versions["tensorflow"],
        "numpy": versions["numpy"], "python": versions["python"], "started": env["started"],
        "seconds": fmt_seconds(summary["seconds"]),
        "load_start": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "load_end": f", at the end {env['load_average_end'][0]:.2f}" if env.get("load_average_end") else "",
        "grid": json.dumps(params["grid"]), "shape": json.dumps(params["shape"]),
        "warmup": params["warmup"], "repeats": params["repeats"],
    }


def targets_table(summary: dict) -> str:
    return markdown_table(pd.DataFrame(
        [{"Target": t["target"], "Measured": t["measured_text"],
          "Status": t["status"] + (f" ({t['why_not_evaluated']})" if t.get("why_not_evaluated") else "")}
         for t in summary["targets"]]))


def grid_part(grid: dict) -> dict:
    """LSTM / QRNN over the grid: a table of batch x length, and the load around its cells."""
    spec, cells = grid["grid"], grid["cells"]
    ratios = {(c["batch"], c["length"]): c["ratio"] for c in cells}
    rows = [{"batch \\ length": str(b)} | {str(t): f"{ratios[(b, t)]:.2f}x" if (b, t) in ratios else NA
                                           for t in spec["lengths"]} for b in spec["batch_sizes"]]
    load = ""
    if cells and all("load_average" in c for c in cells):
        load = " " + prose.fill("grid_load", low=f"{min(c['load_average']['before'][0] for c in cells):.2f}",
                                high=f"{max(c['load_average']['after'][0] for c in cells):.2f}")
    return {"grid_name": spec["name"], "grid_hidden": spec["hidden"], "grid_inputs": spec["inputs"],
            "grid_table": markdown_table(pd.DataFrame(rows)) if rows else prose.fill("no_grid_cells"),
            "grid_load": load}


def shape_part(grid: dict, pooling: dict) -> dict:
    """At the shape the targets are set at: the ratio, the load, the step and its parts."""
    at, shape = grid["at_shape"], grid["shape"]
    load = at.get("load_average")
    return {
        "shape_name": shape["name"], "batch": shape["batch"], "frames": shape["frames"], "inputs": shape["inputs"],
        "hidden": shape["hidden"], "ratio": f"{at['ratio']:.2f}x",
        "ratio_cpu": f" (CPU time {at['ratio_cpu_time']:.2f}x)" if at.get("ratio_cpu_time") else "",
        "shape_load": prose.fill("shape_load", before=f"{load['before'][0]:.2f}", after=f"{load['after'][0]:.2f}")
        if load else prose.fill("shape_load_not_recorded"),
        "steps_table": markdown_table(pd.DataFrame(step_rows(at, pooling))),
    }


def step_rows(at: dict, pooling: dict) -> list[dict]:
    """The QRNN layer's step, its convolution and pooling alone, and the LSTM's step, at the shape."""
    rows = [
        _step("QRNN layer (fo, window 2)", at["qrnn_s"], "100%"),
        _step("QRNN layer, again in the parts' round", pooling["layer_s"], "100% (the shares below)"),
        _step("convolution alone (the matmuls of x_{t-1}, x_t with the kernel, and their gradient)",
              pooling["convolution_s"], _share(pooling["convolution_share"], pooling.get("convolution_share_cpu"))),
    ]
    used = pooling["layer_pool_impl"]
    for name, impl in pooling["implementations"].items():
        share = _share(impl["share_of_layer"], pooling.get("pooling_share_cpu") if name == used else None)
        rows.append(_step(f"pooling alone: {name}" + (" (the layer's)" if name == used else ""), impl["median_s"],
                          f"{share} (max error vs float64 {impl['max_abs_error']:.1e})"))
    xla = at["lstm_xla_s"]
    rows += [
        _step("LSTM, tf.function", at["lstm_plain_s"], f"{at['lstm_plain_s'] / at['qrnn_s']:.2f}x"),
        {"Step": "LSTM, XLA (how Keras compiles a model of LSTMs)",
         "Median": "not timed here (bench.lstm_xla)" if xla is None else fmt_duration(xla),
         "Of the QRNN layer step": NA if xla is None else f"{xla / at['qrnn_s']:.2f}x"},
    ]
    return rows


def _step(name: str, seconds: float, share: str) -> dict:
    return {"Step": name, "Median": fmt_duration(seconds), "Of the QRNN layer step": share}


def _share(of_wall_time: float, of_cpu_time: float | None) -> str:
    """The share as "12.3%", with " (CPU time 11.0%)" where the process's CPU time was recorded."""
    cpu = "" if of_cpu_time is None else f" (CPU time {100 * of_cpu_time:.1f}%)"
    return f"{100 * of_wall_time:.1f}%{cpu}"


def pipeline_text(pipeline: dict) -> str:
    """The input pipeline measurements (input_pipeline.json): a paragraph and a table per set of shards,
    the set where the target is checked first."""
    target = pipeline["target_run"]
    runs = sorted(pipeline["runs"].items(), key=lambda item: item[0] != target)
    return "\n\n".join(_pipeline_run(run, is_target=name == target) for name, run in runs)


def _pipeline_run(run: dict, is_target: bool) -> str:
    stream = run["pipeline"]
    table = markdown_table(pd.DataFrame([
        {"Read": "raw `tf.data.TFRecordDataset` of the files", **_rates(run["raw"])},
        {"Read": "the stream's batches built one after another in one thread, without tf.data "
                 "(`yt8m_qrnn.data.reader.FrameBatches`)", **_rates(run["batches_only"])},
        {"Read": "training stream (`yt8m_qrnn.data.stream`: shuffle, read at the index's offsets, check CRCs, "
                 "copy the frames, pad, batch ahead of the consumer)", **_rates(stream)},
    ]))
    return prose.fill(
        "input_run", target="Where the target is checked: " if is_target else "", videos=f"{run['videos']:,}",
        frames=f"{run['frames']:,}", mean_frames=f"{run['mean_frames']:.0f}", megabytes=f"{run['bytes'] / 1e6:.1f}",
        shards=len(run["files"]), passes=run["epochs"], source=run["source"], batch=run["batch_size"], table=table,
        share=f"{100 * run['share_of_raw']:.0f}", first_batch_ms=f"{1e3 * stream['first_batch_s']:.0f}")


def _rates(read: dict) -> dict:
    return {"Videos/s": fmt_rate(read["videos_per_s"]), "MB/s": fmt_rate(read["mb_per_s"]),
            "Frames/s": fmt_rate(read["frames_per_s"])}
