"""scripts/sohn2015_table.sh end to end on the tiny dataset: the baseline first, then the CVAE built on it,
both evaluated on val and test by one cvae-eval multirun, and the paper report written from them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLI_TIMEOUT_S, REPO, shrunk


def test_table_script_trains_the_baseline_then_the_aided_cvae_and_reports(tiny_mnist, cli_env, tmp_path):
    sweep = tmp_path / "table"
    env = cli_env | {"BIN": str(Path(sys.executable).parent), "MODELS": "cvae", "N_GIVEN": "1", "SAMPLES": "5"}
    args = shrunk(tiny_mnist, None, "trainer.max_steps=30", "trainer.patience=0")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "sohn2015_table.sh"), str(sweep), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=2 * CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert jobs == ["baseline_n1", "cvae_n1"]  # N_GIVEN and MODELS narrowed both stages
    saved = yaml.safe_load((sweep / "cvae_n1" / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["kind"] == "cvae" and saved["data"]["n_given"] == 1
    assert saved["model"]["baseline_run"] == f"{sweep.resolve()}/baseline_n${{data.n_given}}"
    for job in jobs:
        for split in ("val", "test"):
            result = json.loads((sweep / job / f"eval_{split}.json").read_text())
            assert result["split"] == split and result["samples"] == (0 if job == "baseline_n1" else 5)
    assert (sweep / "command.txt").read_text().startswith("MODELS=cvae N_GIVEN=1 SAMPLES=5 scripts/sohn2015_table.sh ")
    with open(sweep / "sohn2015_table1.csv") as f:
        rows = {(r["model"], r["n_given"], r["split"], r["estimator"]): r for r in csv.DictReader(f)}
    test_is = json.loads((sweep / "cvae_n1" / "eval_test.json").read_text())["ncll_is"]
    assert float(rows[("cvae", "1", "test", "is")]["ncll"]) == pytest.approx(test_is, abs=1e-3)
    assert rows[("baseline", "1", "val", "exact")]["ncll"] != ""
