"""Sohn, Lee, Yan (2015) Table 1 from a quadrant-task sweep: `cvae-report <sweep dir> --paper sohn2015`.

Rows: NN baseline (exact), CVAE (MC), CVAE (IS), GSNN (MC), hybrid (IS); columns: 1 / 2 / 3 quadrants
given, for val and test, with the paper's test figures beside ours. Our numbers come from each job's
`eval_val.json` / `eval_test.json` (`cvae-eval run_dir=<job> eval.split=val|test`): the baseline's
`ncll_exact`, the CVAE's `ncll_mc` and `ncll_is`, the GSNN's `ncll_mc`, the hybrid's `ncll_is` (and
`ncll_mc`, in the CSV). Several jobs in one cell (seeds) are averaged. Writes `sohn2015_table1.md`
(the table, the gap to the paper, the protocol) and `sohn2015_table1.csv` into the sweep dir.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from cvae_exp.errors import UserError
from cvae_exp.report import Job, markdown_table

# DESIGN.md section 5 (test set). The paper's GSNN and hybrid figures are not recorded there: blank.
PAPER_TEST = {
    ("baseline", "exact"): (99.75, 62.18, 25.99),
    ("cvae", "mc"): (68.39, 45.34, 20.96),
    ("cvae", "is"): (63.91, 44.73, 20.95),
}
ROWS = [
    ("NN baseline", "baseline", "exact"),
    ("CVAE (MC)", "cvae", "mc"),
    ("CVAE (IS)", "cvae", "is"),
    ("GSNN (MC)", "gsnn", "mc"),
    ("hybrid (IS)", "hybrid", "is"),
]
CSV_ROWS = ROWS + [("hybrid (MC)", "hybrid", "mc")]
CSV_COLUMNS = ["model", "n_given", "split", "estimator", "ncll", "paper", "epochs", "samples", "hardware"]
SPLITS = ("val", "test")
GIVEN = (1, 2, 3)
LAYOUTS = {  # data.quadrant_layout (runs saved before it existed used top_first)
    "left_first": "left_first (1: bottom-left; 2: left half; 3: all but bottom-right)",
    "top_first": "top_first (1: top-left; 2: top half; 3: all but bottom-right)",
    None: "top_first (1: top-left; 2: top half; 3: all but bottom-right; no data.quadrant_layout recorded)",
}
STANDARD_TRAIN = {"mnist": 60000, "fashion_mnist": 60000}  # before data.val_size is carved off
BINARIZATION = {
    "dynamic": "dynamic (train digits redrawn as Bernoulli samples every step; val and test binarized once "
    "with a fixed seed, the same for every run)",
    "static": "static (every split binarized once with a fixed seed)",
    "threshold": "threshold (every pixel above one half is 1, the others 0, in every split; no randomness)",
    "none": "none (grayscale targets)",
}


@dataclass
class PaperJob:
    job: Job
    cfg: dict
    kind: str
    n_given: int
    evals: dict  # split -> the eval json
    epochs: float | None
    hardware: str


def _evals(path: Path) -> dict:
    out = {}
    for split in SPLITS:
        for name in (f"eval_{split}.json", "eval.json"):
            try:
                data = json.loads((path / name).read_text())
            except (OSError, ValueError):
                continue
            if data.get("split", split) == split:
                out[split] = data
                break
    return out


def _log(job: Job) -> str:
    """The job's Hydra log (`<job>/<job name>.log`), where cvae-train records its data sizes and devices."""
    return "\n".join(f.read_text(errors="replace") for f in sorted(job.path.glob("*.log")))


def train_size(cfg: dict, job: Job) -> int | None:
    """Training digits: metrics.json's `train_examples` if recorded, else the log's, else the source's standard size."""
    if isinstance(job.metrics.get("train_examples"), int):
        return job.metrics["train_examples"]
    logged = re.findall(r"Data: .*; train (\d+), val", _log(job))
    if logged:
        return int(logged[-1])
    data = cfg.get("data", {})
    bundled = re.search(r"\((\d+) train", str(job.metrics.get("data_source", "")))
    total = int(bundled.group(1)) if bundled else STANDARD_TRAIN.get(data.get("name", "mnist"))
    return total - int(data.get("val_size", 0)) if total else None


def hardware(job: Job) -> str:
    """metrics.json's `hardware` if recorded, else the platform from the job's log and this machine's CPU."""
    if isinstance(job.metrics.get("hardware"), str):
        return job.metrics["hardware"]
    found = re.findall(r"Devices: (\d+) \((\w+)\)", _log(job))
    if found and found[-1][1] != "cpu":
        return f"{found[-1][0]} x {found[-1][1]} device"
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({found[-1][1] if found else 'platform not logged'})"


def collect(jobs: list[Job]) -> list[PaperJob]:
    out = []
    for job in jobs:
        try:
            cfg = yaml.safe_load((job.path / ".hydra" / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        data, model = cfg.get("data", {}), cfg.get("model", {})
        evals = _evals(job.path)
        if data.get("condition") != "quadrants" or not evals:
            continue
        size, steps = train_size(cfg, job), job.metrics.get("step")
        batch = cfg.get("trainer", {}).get("batch_size")
        epochs = steps * batch / size if size and isinstance(steps, int) and batch else None
        out.append(PaperJob(job, cfg, model.get("kind"), int(data.get("n_given", 1)), evals, epochs, hardware(job)))
    return out


def cells(paper_jobs: list[PaperJob]) -> dict:
    """(kind, estimator, n_given, split) -> [(value, job)]."""
    out: dict = {}
    for pj in paper_jobs:
        for split, data in pj.evals.items():
            for _, kind, est in CSV_ROWS:
                value = data.get(f"ncll_{est}")
                if pj.kind == kind and isinstance(value, (int, float)):
                    out.setdefault((kind, est, pj.n_given, split), []).append((float(value), pj))
    return out


def _mean_text(entries) -> str:
    if not entries:
        return ""
    values = [v for v, _ in entries]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _paper(kind: str, est: str, n: int) -> float | None:
    return PAPER_TEST[(kind, est)][n - 1] if (kind, est) in PAPER_TEST else None


def main_table(found: dict) -> str:
    header = ["model", *(f"val {n}q" for n in GIVEN)]
    for n in GIVEN:
        header += [f"test {n}q", f"paper {n}q"]
    rows = []
    for label, kind, est in ROWS:
        row = [label, *(_mean_text(found.get((kind, est, n, "val"))) for n in GIVEN)]
        for n in GIVEN:
            paper = _paper(kind, est, n)
            row += [_mean_text(found.get((kind, est, n, "test"))), "" if paper is None else f"{paper:.2f}"]
        rows.append(row)
    return markdown_table(header, rows)


def _mean(entries) -> float | None:
    return statistics.mean(v for v, _ in entries) if entries else None


def gap_lines(found: dict) -> list[str]:
    """Ours minus the paper on test (positive: we are worse), and whether the CVAE beats the baseline."""
    rows = []
    for label, kind, est in ROWS:
        if (kind, est) in PAPER_TEST:
            gaps = [_mean(found.get((kind, est, n, "test"))) for n in GIVEN]
            rows.append(
                [
                    label,
                    *(
                        f"{g - _paper(kind, est, n):+.2f}" if g is not None else ""
                        for g, n in zip(gaps, GIVEN, strict=False)
                    ),
                ]
            )
    lines = [
        "Gap to the paper on test, ours minus paper in nats (positive: ours is worse):",
        "",
        markdown_table(["model", *(f"{n}q" for n in GIVEN)], rows),
        "",
    ]
    verdicts = []
    for n in GIVEN:
        cvae, base = _mean(found.get(("cvae", "is", n, "test"))), _mean(found.get(("baseline", "exact", n, "test")))
        if cvae is not None and base is not None:
            verdicts.append(f"{n}q {'yes' if cvae < base else 'NO'} ({cvae:.2f} vs {base:.2f})")
    if verdicts:
        lines += ["CVAE (IS) below the NN baseline on test: " + "; ".join(verdicts) + ".", ""]
    return lines


def protocol_lines(paper_jobs: list[PaperJob]) -> list[str]:
    def distinct(values) -> str:
        return ", ".join(str(v) for v in dict.fromkeys(values)) or "unknown"

    data = [pj.cfg.get("data", {}) for pj in paper_jobs]
    layouts = [LAYOUTS.get(lay, str(lay)) for lay in dict.fromkeys(d.get("quadrant_layout") for d in data)]
    samples = [e.get("samples") for pj in paper_jobs for e in pj.evals.values() if pj.kind != "baseline"]
    examples = {s: distinct(pj.evals[s].get("examples") for pj in paper_jobs if s in pj.evals) for s in SPLITS}
    lines = [
        "## Protocol",
        "",
        f"- Binarization: {'; '.join(BINARIZATION.get(b, b) for b in dict.fromkeys(d.get('binarize') for d in data))}.",
        f"- Importance / Monte Carlo samples per digit S: {distinct(samples)} (the baseline's likelihood is exact).",
        (
            f"- Splits: val = {distinct(d.get('val_size') for d in data)} digits carved from the training split "
            f"(data.split_seed={distinct(d.get('split_seed') for d in data)}; {examples['val']} evaluated); "
            f"test = the test split ({examples['test']} digits)."
        ),
        f"- Scored pixels: the unobserved quadrants only; quadrants given: {'; '.join(layouts)}.",
        (
            "- Evaluated checkpoint: the best by val/elbo. Epochs = steps x batch / training digits "
            "(from metrics.json's train_examples or the training log; else the standard 60,000 minus data.val_size)."
        ),
        f"- Data: {distinct(_relative_source(pj.job.metrics.get('data_source')) for pj in paper_jobs)}.",
        f"- Training: {distinct(_stopping(pj.cfg.get('trainer', {})) for pj in paper_jobs)}.",
        "",
    ]
    header = [
        "job",
        "model",
        "n_given",
        "steps",
        "batch",
        "epochs",
        "best step",
        "stopped early",
        "train wall s",
        "eval val s",
        "eval test s",
        "S",
        "hardware",
    ]
    rows = []
    for pj in sorted(
        paper_jobs,
        key=lambda p: (
            p.n_given,
            [k for _, k, _ in ROWS].index(p.kind) if p.kind in [k for _, k, _ in ROWS] else 9,
            p.job.name,
        ),
    ):
        ev = pj.evals
        rows.append(
            [
                pj.job.name,
                pj.kind,
                pj.n_given,
                pj.job.metrics.get("step", ""),
                pj.cfg.get("trainer", {}).get("batch_size", ""),
                round(pj.epochs, 2) if pj.epochs is not None else "",
                distinct(e.get("checkpoint_step") for e in ev.values()),
                {True: "yes", False: "no"}.get(pj.job.saved.get("stopped_early"), ""),
                pj.job.metrics.get("wall_s", ""),
                ev.get("val", {}).get("seconds", ""),
                ev.get("test", {}).get("seconds", ""),
                distinct(e.get("samples") for e in ev.values()),
                pj.hardware,
            ]
        )
    return lines + [
        "Per job (wall times in seconds: training incl. its final evaluation; each cvae-eval):",
        "",
        markdown_table(header, rows),
        "",
    ]


def _stopping(trainer: dict) -> str:
    """How a job's training was meant to end: max_steps alone, or early stopping on val/elbo."""
    steps, every, patience = trainer.get("max_steps"), trainer.get("eval_every"), trainer.get("patience") or 0
    if not patience:
        return f"{steps} steps (no early stopping)"
    return (
        f"up to {steps} steps, stopped early after {patience} validation passes ({every} steps apart) "
        "without a better val/elbo"
    )


def csv_rows(found: dict) -> list[list]:
    rows = []
    for _, kind, est in CSV_ROWS:
        for n in GIVEN:
            for split in SPLITS:
                entries = found.get((kind, est, n, split), [])
                paper = _paper(kind, est, n) if split == "test" else None
                if not entries and paper is None:
                    continue
                pjs = [pj for _, pj in entries]
                epochs = [pj.epochs for pj in pjs if pj.epochs is not None]
                samples = dict.fromkeys(str(pj.evals[split].get("samples", "")) for pj in pjs)
                rows.append(
                    [
                        kind,
                        n,
                        split,
                        est,
                        round(_mean(entries), 4) if entries else "",
                        paper if paper is not None else "",
                        round(statistics.mean(epochs), 2) if epochs else "",
                        "/".join(samples),
                        "; ".join(dict.fromkeys(pj.hardware for pj in pjs)),
                    ]
                )
    return rows


def _relative_source(source: str | None) -> str | None:
    """`parquet:/abs/folder` as `parquet:<folder relative to here>`: reports name no machine's paths."""
    kind, _, path = (source or "").partition(":")
    return f"{kind}:{os.path.relpath(path)}" if path.startswith("/") else source


def sohn2015_table(root: Path, jobs: list[Job], command: str | None) -> tuple[str, list[Path]]:
    paper_jobs = collect(jobs)
    shown = os.path.relpath(root)  # as the user would type it from here
    if not paper_jobs:
        raise UserError(
            f"--paper sohn2015: no job in {root} is a quadrant-task run with eval_val.json or eval_test.json; "
            "run cvae-eval run_dir=<job dir> eval.split=val (and test) on each job first."
        )
    found = cells(paper_jobs)
    table = main_table(found)
    skipped = len(jobs) - len(paper_jobs)
    # scripts/sohn2015_table.sh records its own command line: its two training sweeps share the sweep dir,
    # so multirun.yaml holds only the second one.
    script = root / "command.txt"
    if script.is_file():
        command_line = f"Command: `{script.read_text().strip()}` (trains, evaluates and reports)"
    elif command:
        command_line = (
            f"Command: `{command}`, then `cvae-eval run_dir=<job> eval.split=val|test` per job, then "
            f"`cvae-report {shown} --paper sohn2015`"
        )
    else:
        command_line = f"Report: `cvae-report {shown} --paper sohn2015`"
    md = [
        "# Sohn et al. (2015) Table 1: negative conditional log-likelihood on MNIST",
        "",
        f"Sweep: `{shown}`" + (f", {skipped} job(s) without a quadrant-task evaluation left out" if skipped else ""),
        "",
        command_line,
        "",
        (
            "Nats per digit, summed over the unobserved pixels; lower is better. Columns: quadrants given, on our "
            'validation and test splits; "paper": the test figures of Sohn et al. (2015) Table 1 as recorded in '
            "DESIGN.md section 5 (the paper's GSNN and hybrid figures are not recorded there and are left blank). "
            "Estimators: exact (baseline), MC (z from the prior p(z|x)), IS (importance sampling from q(z|x,y))."
        ),
        "",
        table,
        "",
        *gap_lines(found),
        *protocol_lines(paper_jobs),
    ]
    md_file, csv_file = root / "sohn2015_table1.md", root / "sohn2015_table1.csv"
    md_file.write_text("\n".join(md))
    with open(csv_file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(csv_rows(found))
    return table, [md_file, csv_file]
