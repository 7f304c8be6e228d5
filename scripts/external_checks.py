"""The external checks (docs/external_checks.md): our trainer and evaluator against published likelihoods whose
protocol is known from public code, rebuilt from the committed records.

    python3 scripts/external_checks.py record <run dir> <record name>   # copy a finished run's record
    python3 scripts/external_checks.py table [<out folder, default results>]

`record` copies what the table needs from a run directory (metrics.json, eval_val.json, eval_test.json,
.hydra/config.yaml and overrides.yaml, and train.log where there is one; never checkpoints; the run directory's
and the data's absolute paths written as <run dir> and the data.path override) into
results/external_checks_cells/<record name>/ and writes record.json beside them: when the test evaluation
finished (UTC, from its file), the commands that trained and evaluated it, and how often the training resumed
from a checkpoint (from train.log, which every launch appends to; null without one). A resumed run's
metrics.json times its last launch only, and the table says so. `table` writes <out>/external_checks.csv and
.md from those records alone (no data, no JAX): a protocol's row holds the finished seeds, and a protocol with
none is marked pending, never filled in.
"""

from __future__ import annotations

import csv
import datetime
import json
import statistics
import sys
from pathlib import Path

import yaml

CELLS = Path("results/external_checks_cells")
FILES = ("metrics.json", "eval_val.json", "eval_test.json", ".hydra/config.yaml", ".hydra/overrides.yaml")
SAMPLES = 5000  # both references: 5,000 importance samples per test digit
TEST_DIGITS = 10000  # all of them
# Each protocol: the record prefix (records <key>_s<seed>), what it is, the figure it is checked against (a
# negative log-likelihood in nats: the papers print it as -86.76) and where that figure is printed.
PROTOCOLS = [
    {
        "key": "burda2016_vae",
        "protocol": "VAE, one stochastic layer, k = 1 (experiment=burda2016_vae)",
        "theirs": 86.76,
        "source": "Burda, Grosse, Salakhutdinov (2016) Table 1, MNIST, VAE 1 layer k=1; code yburda/iwae",
    },
    {
        "key": "burda2016_cvae_label",
        "protocol": "label-conditional VAE, learned prior given the label, k = 1 (experiment=burda2016_cvae_label)",
        "theirs": 82.32,
        "source": "nbip/IWAE README, CVAE 1 stochastic layer, CIWAE k=1; code tasks/task04.py",
    },
    {
        "key": "burda2016_iwae5",
        "protocol": "IWAE, one stochastic layer, k = 5 (experiment=burda2016_vae model.iw_samples=5)",
        "theirs": 85.54,
        "source": "Burda, Grosse, Salakhutdinov (2016) Table 1, MNIST, IWAE 1 layer k=5; code yburda/iwae",
    },
    {
        "key": "burda2016_ciwae5_label",
        "protocol": "label-conditional IWAE, k = 5 (experiment=burda2016_cvae_label model.iw_samples=5)",
        "theirs": 81.41,
        "source": "nbip/IWAE README, CVAE 1 stochastic layer, CIWAE k=5; code tasks/task04.py",
    },
]
COLUMNS = [
    "protocol",
    "status",
    "ours_nll",
    "ours_spread",
    "spread_kind",
    "seeds",
    "theirs_nll",
    "gap",
    "train_command",
    "eval_command",
    "finished_utc",
    "hardware",
    "source",
]
PER_RUN = ("hydra.", "resume=")


def placeless(run_dir: Path, source: str, overrides: list[str]):
    """A function that writes the paths of the machine a run trained on the way the command named them: the run
    directory as <run dir> and the resolved data path (`source`, metrics.json's `kind:path`) as its `data.path=`
    override (the records are committed; cvae_exp/results/sohn2015.py's _relative_source does this for reports)."""
    data = source.partition(":")[2]
    given = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.path=")), "<data path>")
    pairs = [(str(run_dir.resolve()), "<run dir>")] + ([(data, given)] if Path(data).is_absolute() else [])

    def unplace(text: str) -> str:
        for path, name in pairs:
            text = text.replace(path, name)
        return text

    return unplace


def record(run_dir: Path, name: str) -> Path:
    """Copies a finished run's record into CELLS/<name> and writes its record.json."""
    test = json.loads((run_dir / "eval_test.json").read_text())
    if test.get("samples") != SAMPLES or test.get("checkpoint") != "last":
        sys.exit(
            f"external_checks.py: {run_dir}/eval_test.json is not the protocol's (S={SAMPLES}, the last checkpoint)"
        )
    out = CELLS / name
    logged = ("train.log",) if (run_dir / "train.log").is_file() else ()
    texts = {rel: (run_dir / rel).read_text() for rel in FILES + logged}
    overrides = yaml.safe_load(texts[".hydra/overrides.yaml"])
    unplace = placeless(run_dir, json.loads(texts["metrics.json"]).get("data_source", ""), overrides)
    for rel, text in texts.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(unplace(text))
    resumes = texts["train.log"].count("Resumed from step") if logged else None
    train = "cvae-train " + " ".join(o for o in overrides if not o.startswith(PER_RUN)) + " hydra.run.dir=<run dir>"
    finished = datetime.datetime.fromtimestamp((run_dir / "eval_test.json").stat().st_mtime, datetime.UTC)
    meta = {
        "finished_utc": finished.strftime("%Y-%m-%d %H:%M"),
        "train_command": train,
        "eval_command": f"cvae-eval run_dir=<run dir> eval.samples={SAMPLES} eval.checkpoint=last eval.split=test",
        "resumes": resumes,
    }
    (out / "record.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def finished(folder: Path) -> dict | None:
    """A record's numbers, if its run trained to the end of its schedule and was scored by the protocol."""
    if not (folder / "eval_test.json").is_file() or not (folder / "record.json").is_file():
        return None
    metrics = json.loads((folder / "metrics.json").read_text())
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    test = json.loads((folder / "eval_test.json").read_text())
    scored = (test.get("samples"), test.get("examples")) == (SAMPLES, TEST_DIGITS)
    if metrics.get("step") != config["trainer"]["max_steps"] or not scored:
        return None
    val = folder / "eval_val.json"
    return {
        "metrics": metrics,
        "test": test,
        "val": json.loads(val.read_text()) if val.is_file() else {},
        "seed": config["seed"],
        "val_trained_on": config.get("data", {}).get("val_holdout", True) is False,
        **json.loads((folder / "record.json").read_text()),
    }


def rows(cells: Path = CELLS) -> list[dict]:
    out = []
    for p in PROTOCOLS:
        runs = [r for f in sorted(cells.glob(f"{p['key']}_s*")) if (r := finished(f))]
        row = dict.fromkeys(COLUMNS, "") | {"protocol": p["protocol"], "theirs_nll": p["theirs"], "source": p["source"]}
        if not runs:
            out.append(row | {"status": "pending", "seeds": 0})
            continue
        values = [r["test"]["ncll"] for r in runs]
        mean = statistics.mean(values)
        if len(runs) > 1:
            spread, kind = statistics.stdev(values), "sd over seeds"
        else:
            spread, kind = runs[0]["test"]["ncll_sem"], "s.e. over test digits"
        row |= {
            "status": "finished",
            "ours_nll": round(mean, 2),
            "ours_spread": round(spread, 2),
            "spread_kind": kind,
            "seeds": len(runs),
            "gap": f"{mean - p['theirs']:+.2f}",
            "train_command": runs[0]["train_command"].replace(f"seed={runs[0]['seed']}", "seed=<seed>"),
            "eval_command": runs[0]["eval_command"],
            "finished_utc": max(r["finished_utc"] for r in runs),
            "hardware": "; ".join(dict.fromkeys(r["metrics"].get("hardware", "") for r in runs)),
            "runs": runs,
        }
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    head = ["protocol", "ours (test NLL, nats)", "theirs", "ours - theirs", "finished (UTC)"]
    lines = [
        "# External checks: published likelihoods under their own protocols",
        "",
        "Built by `python3 scripts/external_checks.py table` from the records in `results/external_checks_cells/`",
        "(protocols, what the reference code does and where it differs from the papers: docs/external_checks.md;",
        "the runs and how to restart them: results/external_checks_runs.md). Negative log-likelihood of the MNIST",
        f"test digits in nats (lower is better; the papers print it negated), {SAMPLES:,} importance samples per",
        "digit, the model at the end of its schedule. Ours: the mean over seeds ± their standard deviation, or for",
        "one seed ± the standard error over the test digits. A positive gap: ours is worse.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for r in table:
        if r["status"] == "pending":
            ours, gap = "pending: no finished run yet", ""
        else:
            ours = f"{r['ours_nll']:.2f} ± {r['ours_spread']:.2f} ({r['seeds']} seed{'s' * (r['seeds'] > 1)}, {r['spread_kind']})"
            gap = r["gap"]
        lines.append(f"| {r['protocol']} | {ours} | {r['theirs_nll']:.2f} | {gap} | {r['finished_utc']} |")
    lines += ["", "Sources of the reference figures:", ""]
    lines += [f"- {r['protocol']}: {r['source']}." for r in table]
    done = [r for r in table if r["status"] == "finished"]
    if done:
        lines += ["", "## Runs", ""]
        run_head = [
            "protocol",
            "seed",
            "steps",
            "test NLL ± s.e.",
            "val NLL (400 digits)",
            "resumes",
            "train wall s (last launch)",
            "eval s",
            "hardware",
        ]
        lines += ["| " + " | ".join(run_head) + " |", "| " + " | ".join("---" for _ in run_head) + " |"]
        for r in done:
            for run in r["runs"]:
                t, m = run["test"], run["metrics"]
                resumes = "not recorded" if run.get("resumes") is None else run["resumes"]
                val = f"{run['val'].get('ncll', float('nan')):.2f}" + " (trained on)" * run["val_trained_on"]
                lines.append(
                    f"| {r['protocol']} | {run['seed']} | {m['step']} | {t['ncll']:.2f} ± {t['ncll_sem']:.2f} | "
                    f"{val} | {resumes} | {m.get('wall_s', 0):.0f} | "
                    f"{t['seconds']:.0f} | {m.get('hardware', '')} |"
                )
        lines += [
            "",
            "Resumes: how often the training went on from a checkpoint (counted in the run's train.log, which the",
            "record keeps; not recorded for a record made without it). The train wall time is that of the last",
            "launch alone (metrics.json), so a resumed run trained longer than it says. The val digits are the last",
            '400 of the training file; "trained on" marks a protocol that trains on them too (nbip/IWAE has no',
            "validation set, `data.val_holdout=false`): there they measure fit, not generalisation.",
            "",
            "Commands (from the repository root; `<run dir>` the run's folder):",
            "",
        ]
        for r in done:
            lines += [f"- {r['protocol']}: `{r['train_command']}`, then `{r['eval_command']}`"]
    return "\n".join(lines) + "\n"


def table(out: Path) -> None:
    found = rows()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "external_checks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(found)
    (out / "external_checks.md").write_text(markdown(found))
    print(f"wrote {out}/external_checks.csv and .md ({sum(r['status'] == 'finished' for r in found)} finished)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 4:
        print(record(Path(sys.argv[2]), sys.argv[3]))
    elif sys.argv[1:2] == ["table"]:
        table(Path(sys.argv[2] if len(sys.argv) > 2 else "results"))
    else:
        sys.exit(__doc__)
