"""The NN baseline's search on validation (results/sohn2015_baseline_search.md): ranks the search's runs by their
validation NCLL (`eval_val.json`, exact for the baseline) and writes the winner's overrides, one a line, without
those that name the run (seed, data.n_given, resume), for its other seeds and columns:

    python3 scripts/baseline_search_pick.py <search folder>   ->  <search folder>/best.txt, best_overrides.txt

Reads nothing but eval_val.json and .hydra/overrides.yaml: the test figures are left unread until the choice."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

PER_RUN = ("seed=", "data.n_given=", "resume=", "hydra.")


def ranked(folder: Path) -> list[tuple[float, str]]:
    runs = [
        (json.loads((d / "eval_val.json").read_text())["ncll"], d.name)
        for d in folder.iterdir()
        if (d / "eval_val.json").is_file()
    ]
    return sorted(runs)


def main(folder: Path) -> None:
    runs = ranked(folder)
    if not runs:
        sys.exit(f"baseline_search_pick.py: no run with eval_val.json in {folder}")
    for ncll, name in runs:
        print(f"{ncll:9.3f}  {name}")
    best = runs[0][1]
    overrides = yaml.safe_load((folder / best / ".hydra" / "overrides.yaml").read_text())
    kept = [o for o in overrides if not o.startswith(PER_RUN)]
    (folder / "best.txt").write_text(best + "\n")
    (folder / "best_overrides.txt").write_text("\n".join(kept) + "\n")
    print(f"best: {best}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
