"""`cvae-report <sweep dir>`: one table and one plot for a multirun, from whatever launcher ran it.

    cvae-report outputs/multirun/2026-11-26/10-00-00 [--metric val/elbo] [--maximize] [--paper sohn2015]

A job is a subfolder holding `.hydra/` (Hydra's numbered job dirs; any depth, any launcher). Each row
reads the job's `.hydra/overrides.yaml`, `metrics.json` and, when present, `eval.json`, `eval_val.json`
and `eval_test.json` (their numbers prefixed `eval/`, `eval_val/`, `eval_test/`, e.g. `eval_test/ncll`).
The columns are the swept keys: those whose values differ between jobs, and those `multirun.yaml`
says were swept. Rows are sorted by the metric (lower is better unless `--maximize`); a job without
metrics.json is listed as running or failed/unfinished, never a crash. Writes report.md, report.csv and
report.png (the metric against each swept key: mean and standard deviation over the other keys, e.g.
seeds) into the sweep dir. `--paper sohn2015` adds Sohn et al. (2015) Table 1 (cvae_exp.results.sohn2015).

Argparse, not Hydra: the input is a folder, not a config. No JAX here, so the report takes a second.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from cvae_exp.cli import exit_on_user_error
from cvae_exp.errors import UserError
from cvae_exp.results.sohn2015 import sohn2015_table
from cvae_exp.results.sweeps import RecordedJob, finite, fmt, load_sweep, markdown_table, natural_key, typed

SUMMARY_METRICS = (  # shown beside the metric (bits per dimension: runs on 8-bit data)
    "val/elbo",
    "test/elbo",
    "eval_val/ncll",
    "eval_test/ncll",
    "eval/ncll",
    "eval_test/ncll_bits_per_dim",
    "eval/ncll_bits_per_dim",
)


# ----------------------------------------------------------------------------- the table


def sort_jobs(jobs: list[RecordedJob], metric: str, maximize: bool) -> list[RecordedJob]:
    def key(job):
        v = job.metrics.get(metric)
        good = job.ok and finite(v)
        return (not good, (-v if maximize else v) if good else 0.0, natural_key(job.name))

    return sorted(jobs, key=key)


def table_columns(jobs: list[RecordedJob], keys: list[str], metric: str) -> list[str]:
    present = {k for job in jobs for k in job.metrics}
    extra = [m for m in SUMMARY_METRICS if m in present and m != metric]
    return ["job", *keys, metric, *extra, "step", "wall_s", "status"]


def cell(job: RecordedJob, column: str):
    if column == "job":
        return job.name
    if column == "status":
        return job.status
    if column in job.overrides:
        return typed(job.overrides[column])  # printed as a number: 0.006074996073425695 -> 0.006075
    return job.metrics.get(column, "")


def write_csv(file: Path, jobs: list[RecordedJob], keys: list[str], metric: str) -> None:
    metrics = sorted({k for job in jobs for k in job.metrics} - {metric})
    header = ["job", *keys, "status", metric, *metrics, "overrides"]
    with open(file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for job in jobs:
            w.writerow(
                [
                    job.name,
                    *(job.overrides.get(k, "") for k in keys),
                    job.status,
                    *(job.metrics.get(m, "") for m in [metric, *metrics]),
                    job.override_string(),
                ]
            )


# ----------------------------------------------------------------------------- the plot


def plot(file: Path, jobs: list[RecordedJob], keys: list[str], metric: str, maximize: bool) -> None:
    """The metric against each swept key: every job as a dot, the mean over the other keys with a std bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [j for j in jobs if j.ok and finite(j.metrics.get(metric))]
    panels = [k for k in keys if k != "seed"] or keys or ["job"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False, dpi=90)
    for ax, key in zip(axes[0], panels, strict=False):
        by_value: dict = {}
        for j in done:
            by_value.setdefault(typed(cell(j, key)), []).append(float(j.metrics[metric]))
        if not by_value:
            ax.text(0.5, 0.5, "no finished jobs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        values = list(by_value)
        numeric = all(isinstance(v, (int, float)) for v in values)
        values = sorted(values) if numeric else sorted(values, key=str)
        xs = values if numeric else list(range(len(values)))
        means = [np.mean(by_value[v]) for v in values]
        stds = [np.std(by_value[v], ddof=1) if len(by_value[v]) > 1 else 0.0 for v in values]
        for x, v in zip(xs, values, strict=False):
            ax.scatter([x] * len(by_value[v]), by_value[v], s=12, color="0.6", zorder=2)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4, color="C0", zorder=3)
        if numeric and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
            ax.minorticks_off()
        if len(values) <= 12:
            ax.set_xticks(xs, [fmt(v) for v in values])
        per_value = len(done) / len(values)
        ax.set_xlabel(key)
        ax.set_ylabel(metric + (" (higher is better)" if maximize else " (lower is better)"))
        ax.set_title(
            f"{metric} vs {key}" + (f"\nmean ± std over ~{per_value:.0f} jobs each" if per_value > 1 else ""),
            fontsize=9,
        )
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)


# ----------------------------------------------------------------------------- the command


def report(sweep_dir: str | Path, metric: str = "val/elbo", maximize: bool = False) -> dict:
    """Writes report.md/.csv/.png into the sweep dir; returns the table, the best job and the paths."""
    root, jobs, keys, command = load_sweep(sweep_dir)
    if not any(metric in j.metrics for j in jobs) and any(j.ok for j in jobs):
        known = sorted({k for j in jobs for k, v in j.metrics.items() if isinstance(v, (int, float))})
        raise UserError(f"--metric {metric} is in no job's metrics; known: {', '.join(known)}.")
    jobs = sort_jobs(jobs, metric, maximize)
    columns = table_columns(jobs, keys, metric)
    table = markdown_table(columns, [[cell(j, c) for c in columns] for j in jobs])
    best = next((j for j in jobs if j.ok and finite(j.metrics.get(metric))), None)
    finished = sum(j.ok for j in jobs)
    lines = [
        f"# Sweep report: {root}",
        "",
        (
            f"Metric: `{metric}` ({'higher' if maximize else 'lower'} is better). "
            f"Jobs: {len(jobs)} ({finished} finished, {len(jobs) - finished} running, failed or unfinished). "
            f"Swept: {', '.join(f'`{k}`' for k in keys) or 'nothing'}."
        ),
    ]
    if command:
        lines += ["", f"Command: `{command}`"]
    lines += ["", table, ""]
    if best:
        best_line = (
            f"Best: job {best.name} ({metric} = {fmt(best.metrics[metric])}); overrides: {best.override_string()}"
        )
    else:
        best_line = "Best: none (no job has finished with a finite metric)."
    lines += [best_line, "", f"![{metric} against each swept key](report.png)", ""]
    paths = {"md": root / "report.md", "csv": root / "report.csv", "png": root / "report.png"}
    paths["md"].write_text("\n".join(lines))
    write_csv(paths["csv"], jobs, keys, metric)
    plot(paths["png"], jobs, keys, metric, maximize)
    return {
        "root": root,
        "jobs": jobs,
        "keys": keys,
        "table": table,
        "best": best,
        "best_line": best_line,
        "paths": paths,
        "command": command,
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cvae-report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="the multirun directory (hydra.sweep.dir), holding one folder per job")
    p.add_argument(
        "--metric",
        default="val/elbo",
        help="the column to sort by and plot (default: val/elbo; also e.g. test/elbo, eval_test/ncll)",
    )
    p.add_argument("--maximize", action="store_true", help="higher is better for --metric")
    p.add_argument("--paper", choices=["sohn2015"], help="also write the paper's table (sohn2015: Table 1)")
    return p.parse_args(argv)


def run(argv=None) -> None:
    args = parse_args(argv)
    out = report(args.sweep_dir, args.metric, args.maximize)
    print(out["table"])
    print()
    print(out["best_line"])
    written = list(out["paths"].values())
    if args.paper == "sohn2015":
        table, paper_paths = sohn2015_table(out["root"], out["jobs"], out["command"])
        print()
        print(table)
        written += paper_paths
    print()
    print("Wrote " + ", ".join(str(p) for p in written))


@exit_on_user_error
def main(argv=None) -> None:
    run(argv)


if __name__ == "__main__":
    main()
