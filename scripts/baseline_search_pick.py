"""The NN baseline's search on validation (results/sohn2015_baseline_search.md): ranks the search's runs by their
validation NCLL (`eval_val.json`, exact for the baseline) and writes the winner's overrides, one a line, without
those that name the run (seed, data.n_given, resume), for its other seeds and columns:

    python3 scripts/baseline_search_pick.py <search folder> [--md <file>] [--prefix <name prefix>]

writes <search folder>/best.txt and best_overrides.txt, and with --md the ranking as a markdown table (runs whose
folder name starts with --prefix only, e.g. the committed records results/sohn2015_cells/search__*). Reads
nothing but eval_val.json, metrics.json and .hydra/: the test figures are left unread until the choice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

PER_RUN = ("seed=", "data.n_given=", "resume=", "hydra.")


def ranked(folder: Path, prefix: str = "") -> list[tuple[float, Path]]:
    runs = [
        (json.loads((d / "eval_val.json").read_text())["ncll"], d)
        for d in sorted(folder.iterdir())
        if d.name.startswith(prefix) and (d / "eval_val.json").is_file()
    ]
    return sorted(runs)


def row(ncll: float, run: Path) -> list[str]:
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    transform = cfg["optimizer"]["transform"]
    decay = transform.get("weight_decay", 0.0) if transform["_target_"] == "optax.adamw" else 0.0
    return [
        run.name,
        "x".join(str(w) for w in cfg["model"]["hidden"]),
        f"{cfg['optimizer']['lr']:g}",
        f"{decay:g}",
        f"{ncll:.3f}",
        str(metrics.get("best_step", "")),
        str(metrics.get("step", "")),
        f"{metrics.get('wall_s', 0):.0f}",
    ]


def markdown(runs: list[tuple[float, Path]]) -> str:
    head = ["run", "hidden", "lr", "weight decay (AdamW)", "val NCLL", "best step", "stopped at", "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row(ncll, run)) + " |" for ncll, run in runs]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    folder = Path(argv[0])
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    runs = ranked(folder, opts.get("--prefix", ""))
    if not runs:
        sys.exit(f"baseline_search_pick.py: no run with eval_val.json in {folder}")
    for ncll, run in runs:
        print(f"{ncll:9.3f}  {run.name}")
    if "--md" in opts:
        Path(opts["--md"]).write_text(markdown(runs))
        return
    best = runs[0][1]
    overrides = yaml.safe_load((best / ".hydra" / "overrides.yaml").read_text())
    (folder / "best.txt").write_text(best.name + "\n")
    (folder / "best_overrides.txt").write_text("\n".join(o for o in overrides if not o.startswith(PER_RUN)) + "\n")
    print(f"best: {best.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
