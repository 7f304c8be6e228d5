"""`cvae-report <sweep dir>`: one table and one plot for a multirun, from whatever launcher ran it.

    cvae-report outputs/multirun/2026-11-26/10-00-00 [--metric val/elbo] [--maximize] [--paper sohn2015]

A job is a subfolder holding `.hydra/` (Hydra's numbered job dirs; any depth, any launcher). Each row
reads the job's `.hydra/overrides.yaml`, `metrics.json` and, when present, `eval.json`, `eval_val.json`
and `eval_test.json` (their numbers prefixed `eval/`, `eval_val/`, `eval_test/`, e.g. `eval_test/ncll`).
The columns are the swept keys: those whose values differ between jobs, and those `multirun.yaml`
says were swept. Rows are sorted by the metric (lower is better unless `--maximize`); a job without
metrics.json is listed as running or failed/unfinished, never a crash. Writes report.md, report.csv and
report.png (the metric against each swept key: mean and standard deviation over the other keys, e.g.
seeds) into the sweep dir. `--paper sohn2015` adds Sohn et al. (2015) Table 1 (cvae_exp.report_paper).

Argparse, not Hydra: the input is a folder, not a config. No JAX here, so the report takes a second.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cvae_exp.cli import exit_on_user_error
from cvae_exp.errors import UserError
from cvae_exp.rundir import is_locked

EVAL_FILES = ("eval", "eval_val", "eval_test")  # <name>.json -> keys "<name>/<field>"
SKIP_DIRS = {"checkpoints", "tb", "samples", ".submitit", ".hydra", "__pycache__"}
SUMMARY_METRICS = ("val/elbo", "test/elbo", "eval_val/ncll", "eval_test/ncll", "eval/ncll")
MAX_DEPTH = 4


@dataclass
class Job:
    name: str  # path relative to the sweep dir, e.g. "3"
    path: Path
    overrides: dict[str, str]  # key -> value, as given on the command line / by the sweeper
    metrics: dict[str, float | int | str] = field(default_factory=dict)
    saved: dict = field(default_factory=dict)  # metrics.json as written, every field (booleans, lists too)
    status: str = "ok"  # ok | running | failed/unfinished (...)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def override_string(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.overrides.items())


# ----------------------------------------------------------------------------- reading a sweep


def find_jobs(root: Path) -> list[Path]:
    """Job dirs under `root` (folders holding `.hydra/`), in job-number order; `root` itself if it is a run."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        depth = len(here.relative_to(root).parts)
        if depth and ".hydra" in dirnames:
            found.append(here)
            dirnames[:] = []  # a job's own folders (checkpoints, tb) hold no further jobs
            continue
        dirnames[:] = [] if depth >= MAX_DEPTH else [d for d in dirnames if d not in SKIP_DIRS]
    if not found and (root / ".hydra").is_dir():
        found = [root]
    return sorted(found, key=lambda p: _natural(p.relative_to(root).as_posix()))


def _natural(name: str) -> tuple:
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("/"))


def _split_override(text: str) -> tuple[str, str]:
    key, _, value = str(text).partition("=")
    return key.lstrip("+~"), value


def _numbers(data: dict, prefix: str = "") -> dict:
    """The numeric (and short string) fields of a JSON object, keys prefixed."""
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)) or (isinstance(v, str) and k in ("data_source", "hardware")):
            out[f"{prefix}{k}"] = v
    return out


def load_job(root: Path, path: Path) -> Job:
    name = path.relative_to(root).as_posix() if path != root else path.name
    try:
        listed = yaml.safe_load((path / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        listed = []
    overrides = dict(_split_override(o) for o in listed if not str(o).startswith("hydra."))
    job = Job(name, path, overrides)
    try:
        job.saved = json.loads((path / "metrics.json").read_text())
        job.metrics = _numbers(job.saved)
    except FileNotFoundError:
        job.status = _unfinished(path)
    except (OSError, ValueError) as err:
        job.status = f"failed (unreadable metrics.json: {type(err).__name__})"
    for stem in EVAL_FILES:
        try:
            job.metrics |= _numbers(json.loads((path / f"{stem}.json").read_text()), f"{stem}/")
        except (OSError, ValueError):
            pass
    return job


def _unfinished(path: Path) -> str:
    """`running` while a live process holds the run's lock, else failed/unfinished (with its last checkpoint)."""
    if is_locked(path):  # asks the kernel's lock (cvae_exp.rundir.RunLock), not a PID in the file
        return "running"
    steps = [int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit()]
    return "failed/unfinished" + (f" (last checkpoint: step {max(steps)})" if steps else " (no metrics.json)")


def multirun_info(root: Path) -> tuple[list[str], str | None]:
    """(keys swept according to multirun.yaml, the command that launched the sweep) or ([], None)."""
    try:
        hydra_cfg = (yaml.safe_load((root / "multirun.yaml").read_text()) or {}).get("hydra", {})
    except (OSError, yaml.YAMLError):
        return [], None
    task = list((hydra_cfg.get("overrides") or {}).get("task") or [])
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    keys = [str(k).lstrip("+~") for k in params]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(task)
    except HydraException:  # an override this Hydra cannot parse: the jobs' differing values still tell
        parsed = []
    keys += [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    command = "cvae-train -m " + " ".join(task) if task else None
    return list(dict.fromkeys(keys)), command


def swept_keys(jobs: list[Job], declared: list[str]) -> list[str]:
    """Keys whose values differ across jobs, plus the declared ones, in first-seen order."""
    seen = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    differ = {k for k in seen if len({job.overrides.get(k) for job in jobs}) > 1}
    return [k for k in dict.fromkeys(seen + declared) if k in differ or k in declared]


# ----------------------------------------------------------------------------- the table


def typed(value):
    """'8' -> 8, '1e-3' -> 0.001, other strings unchanged (for sorting and plotting)."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def fmt(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.2f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) >= 1 else f"{v:.4g}"
    return str(v)


def sort_jobs(jobs: list[Job], metric: str, maximize: bool) -> list[Job]:
    def key(job):
        v = job.metrics.get(metric)
        good = job.ok and _finite(v)
        return (not good, (-v if maximize else v) if good else 0.0, _natural(job.name))

    return sorted(jobs, key=key)


def table_columns(jobs: list[Job], keys: list[str], metric: str) -> list[str]:
    present = {k for job in jobs for k in job.metrics}
    extra = [m for m in SUMMARY_METRICS if m in present and m != metric]
    return ["job", *keys, metric, *extra, "step", "wall_s", "status"]


def cell(job: Job, column: str):
    if column == "job":
        return job.name
    if column == "status":
        return job.status
    if column in job.overrides:
        return typed(job.overrides[column])  # printed as a number: 0.006074996073425695 -> 0.006075
    return job.metrics.get(column, "")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(file: Path, jobs: list[Job], keys: list[str], metric: str) -> None:
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


def plot(file: Path, jobs: list[Job], keys: list[str], metric: str, maximize: bool) -> None:
    """The metric against each swept key: every job as a dot, the mean over the other keys with a std bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [j for j in jobs if j.ok and _finite(j.metrics.get(metric))]
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


def load_sweep(sweep_dir: str | Path) -> tuple[Path, list[Job], list[str], str | None]:
    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"The sweep directory {root} does not exist (pass the folder a multirun wrote).")
    root = root.resolve()
    paths = find_jobs(root)
    if not paths:
        raise UserError(f"{root} holds no job directories (subfolders with a .hydra/ folder); is it a multirun dir?")
    jobs = [load_job(root, p) for p in paths]
    declared, command = multirun_info(root)
    return root, jobs, swept_keys(jobs, declared), command


def report(sweep_dir: str | Path, metric: str = "val/elbo", maximize: bool = False) -> dict:
    """Writes report.md/.csv/.png into the sweep dir; returns the table, the best job and the paths."""
    root, jobs, keys, command = load_sweep(sweep_dir)
    if not any(metric in j.metrics for j in jobs) and any(j.ok for j in jobs):
        known = sorted({k for j in jobs for k, v in j.metrics.items() if isinstance(v, (int, float))})
        raise UserError(f"--metric {metric} is in no job's metrics; known: {', '.join(known)}.")
    jobs = sort_jobs(jobs, metric, maximize)
    columns = table_columns(jobs, keys, metric)
    table = markdown_table(columns, [[cell(j, c) for c in columns] for j in jobs])
    best = next((j for j in jobs if j.ok and _finite(j.metrics.get(metric))), None)
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
        from cvae_exp.report_paper import sohn2015_table

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
