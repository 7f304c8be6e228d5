"""`cvae-report`: a real 2 x 2 multirun through the CLI, its table, files and hparams summaries; failed and
running jobs; bad input; and `--paper sohn2015` on a synthetic sweep dir with known numbers."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import tbevents
import yaml
from conftest import run_module
from PIL import Image
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

from cvae_exp import report
from cvae_exp.results import sohn2015

SWEPT = ["model.latent_dim", "seed"]


def run_report(args, env) -> subprocess.CompletedProcess:
    return run_module("cvae_exp.report", args, env=env, cwd=None, timeout=120)


def table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table in `text`: (header, rows)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], [r for r in split[2:] if not r[0].startswith("---")]


def first_table(text: str) -> tuple[list[str], list[list[str]]]:
    block, started = [], False
    for ln in text.splitlines():
        if ln.startswith("|"):
            block.append(ln)
            started = True
        elif started:
            break
    return table_rows("\n".join(block))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, session_cli, small_overrides) -> Path:
    """A real multirun: the latent_dim sweep config narrowed to 2 x 2 jobs on the tiny dataset, 30 steps each."""
    out = tmp_path_factory.mktemp("sweep") / "multirun"
    base = [o for o in small_overrides() if not o.startswith("model.latent_dim=")]
    proc = session_cli(
        [
            "sweep=latent_dim",
            "model.latent_dim=2,4",
            "seed=0,1",
            *base,
            "trainer.max_steps=30",
            "logger.images=false",
            f"hydra.sweep.dir={out}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    return out


def val_elbo(job: Path) -> float:
    return json.loads((job / "metrics.json").read_text())["val/elbo"]


def test_report_of_a_2x2_sweep(sweep, cli_env):
    proc = run_report([sweep], cli_env)
    assert proc.returncode == 0, proc.stderr
    header, rows = first_table(proc.stdout)
    assert header[:4] == ["job", *SWEPT, "val/elbo"]
    assert len(rows) == 4
    # Sorted by val/elbo, lower first; each row's swept values and metric are its own job's.
    jobs = [r[0] for r in rows]
    assert jobs == sorted(jobs, key=lambda j: val_elbo(sweep / j))
    for row in rows:
        job = sweep / row[0]
        given = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        assert row[1:3] == [given["model.latent_dim"], given["seed"]]
        assert float(row[3]) == pytest.approx(val_elbo(job), abs=0.01)
        assert row[-1] == "ok"
    assert {(r[1], r[2]) for r in rows} == {("2", "0"), ("2", "1"), ("4", "0"), ("4", "1")}
    best = rows[0][0]
    assert f"Best: job {best} " in proc.stdout and "model.latent_dim=" in proc.stdout.split("Best:")[1]

    md = (sweep / "report.md").read_text()
    assert first_table(md) == (header, rows)
    assert "cvae-train -m " in md and "model.latent_dim=2,4" in md  # the command, from multirun.yaml
    with open(sweep / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == jobs
    for r in table:
        assert float(r["val/elbo"]) == pytest.approx(val_elbo(sweep / r["job"]))
        assert r["model.latent_dim"] in ("2", "4") and r["seed"] in ("0", "1") and r["status"] == "ok"
    with Image.open(sweep / "report.png") as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 150


def test_failed_and_running_jobs_are_listed_not_fatal(sweep, cli_env, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("tb", "report.*"))
    (copy / "1" / "metrics.json").unlink()
    (copy / "2" / "metrics.json").unlink()
    (copy / "1" / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # left by a killed run: no lock
    with open(copy / "2" / ".lock", "w") as held:  # a live process holds job 2's lock
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run_report([copy], cli_env)
    assert proc.returncode == 0, proc.stderr
    _, rows = first_table(proc.stdout)
    assert len(rows) == 4
    status = {r[0]: r[-1] for r in rows}
    assert status["0"] == status["3"] == "ok"
    assert status["1"].startswith("failed/unfinished") and "step 30" in status["1"]  # its last checkpoint
    assert status["2"] == "running"
    assert [r[0] for r in rows][2:] == ["1", "2"]  # unfinished jobs sort last
    assert "2 running, failed or unfinished" in (copy / "report.md").read_text()
    best = min(("0", "3"), key=lambda j: val_elbo(copy / j))
    assert f"Best: job {best} " in proc.stdout


def test_unreadable_jobs_are_skipped_with_one_line_each(sweep, tmp_path, capsys):
    """A metrics.json that is a list, a non-UTF-8 overrides.yaml, a non-UTF-8 folder name: one line each (or
    a failed row), and the report of the rest; no traceback."""
    copy = tmp_path / "copy"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("tb", "checkpoints", "report.*"))
    (copy / "0" / "metrics.json").write_text("[1, 2]")
    (copy / "0" / "eval.json").write_text('"a string"')
    (copy / "1" / ".hydra" / "overrides.yaml").write_bytes(b"- seed=\xff\xfe\n")
    odd = Path(os.fsdecode(bytes(copy / "job") + b"\xff"))
    shutil.copytree(copy / "3", odd)
    report.main([str(copy)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0] == f"skipped {copy / '1'}: .hydra/overrides.yaml is not UTF-8 text."
    assert lines[1].startswith("skipped '") and lines[1].endswith("job\\udcff': its name is not UTF-8.")
    _, rows = first_table(out)
    status = {r[0]: r[-1] for r in rows}
    assert set(status) == {"0", "2", "3"}
    assert status["0"] == "failed (unreadable metrics.json: a JSON list, not an object)"
    assert status["2"] == status["3"] == "ok"


def test_hparams_summary_in_every_job_with_the_same_keys(sweep):
    key_sets, metric_sets = [], []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        start, metrics = None, None
        for file in (job / "tb").rglob(tbevents.EVENT_GLOB):
            for event in tbevents.read_events(file):
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name != "hparams":
                        continue
                    data = HParamsPluginData()
                    data.ParseFromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        start = data.session_start_info.hparams
                    if data.HasField("experiment"):
                        metrics = {m.name.tag for m in data.experiment.metric_infos}
                        order = [h.name for h in data.experiment.hparam_infos]
        assert start is not None and metrics, f"no hparams summary under {job / 'tb'}"
        assert not [p for p in (job / "tb").iterdir() if p.is_dir()]  # in the run's own events: one run per job
        given = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        assert start["model.latent_dim"].number_value == int(given["model.latent_dim"])
        assert start["seed"].number_value == int(given["seed"])
        key_sets.append(set(start))
        metric_sets.append(metrics)
        scalar_tags = {t for t in tbevents.load(job / "tb").scalars if t not in metrics}  # the training curves
        assert "z_hparams/val/elbo" in metrics and not metrics & scalar_tags  # metric names never collide with tags
        assert min(metrics) > max(scalar_tags)  # and sort below the training curves in the Scalars tab
        assert order[:2] == SWEPT  # the swept keys declared first (TensorBoards that keep the declared order)
        assert tbevents.hparams_shown_first(job / "tb", 2) == sorted(SWEPT)  # and first in TensorBoard's own sort
    assert all(k == key_sets[0] for k in key_sets) and all(m == metric_sets[0] for m in metric_sets)


def test_bad_input_is_one_sentence_and_exit_2(tmp_path, cli_env, sweep):
    for args, named in [
        ([tmp_path / "nowhere"], "nowhere"),
        ([tmp_path], str(tmp_path)),  # exists, holds no job
        ([sweep, "--metric", "val/nope"], "val/nope"),
    ]:
        proc = run_report(args, cli_env)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- --paper sohn2015

KINDS = ["baseline", "cvae", "gsnn", "hybrid"]
STEPS, BATCH, VAL_SIZE, S = 1100, 100, 5000, 50


def known(kind: str, n: int, split: str, est: str) -> float:
    """The synthetic ncll of a cell: distinct in every digit position, so a misplaced cell shows."""
    return (
        100 * KINDS.index(kind) + 10 * n + (5 if split == "test" else 0) + {"exact": 0.11, "mc": 0.22, "is": 0.33}[est]
    )


def write_job(root: Path, num: int, kind: str, n: int, seed: int = 0, shift: float = 0.0, evals: bool = True):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"model={kind}", f"data.n_given={n}", f"seed={seed}"])
    )
    cfg = {
        "model": {"kind": kind},
        "seed": seed,
        "trainer": {"batch_size": BATCH, "max_steps": STEPS},
        "data": {
            "name": "mnist",
            "condition": "quadrants",
            "n_given": n,
            "binarize": "dynamic",
            "val_size": VAL_SIZE,
            "split_seed": 0,
        },
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = {
        "step": STEPS,
        "val/elbo": known(kind, n, "val", "mc"),
        "wall_s": 12.5,
        "data_source": "hub:ylecun/mnist",
    }
    (job / "metrics.json").write_text(json.dumps(metrics))
    log = "[x][cvae_exp][INFO] - Devices: 1 (cpu), processes: 1; run dir: x\n"
    if n == 3:  # the training log's data sizes win over the standard 60,000 - val_size
        log += "[x][cvae_exp][INFO] - Data: hub:ylecun/mnist; train 27500, val 5000, test 10000\n"
    (job / "train.log").write_text(log)
    if not evals:
        return
    ests = {"baseline": ["exact"], "gsnn": ["mc"]}.get(kind, ["mc", "is"])
    for split in ("val", "test"):
        data = {f"ncll_{e}": known(kind, n, split, e) + shift for e in ests}
        data |= {f"ncll_{e}_sem": 0.25 + shift for e in ests}
        data |= {
            "split": split,
            "samples": 0 if kind == "baseline" else S,
            "seconds": 3.0,
            "checkpoint_step": 1000,
            "examples": 5000 if split == "val" else 10000,
            "model": kind,
        }
        (job / f"eval_{split}.json").write_text(json.dumps(data))


@pytest.fixture
def paper_sweep(tmp_path) -> Path:
    root = tmp_path / "sohn"
    num = 0
    for n in (1, 2, 3):
        for kind in KINDS:
            write_job(root, num, kind, n)
            num += 1
    write_job(root, num, "cvae", 1, seed=1, shift=2.0)  # a second seed: the cell averages
    write_job(root, num + 1, "cvae", 2, seed=2, evals=False)  # not evaluated: left out of the paper table
    return root


def test_paper_table_puts_known_numbers_in_their_cells(paper_sweep, capsys):
    report.run([str(paper_sweep), "--paper", "sohn2015"])
    md = (paper_sweep / "sohn2015_table1.md").read_text()
    header, rows = first_table(md)
    assert header == [
        "model",
        "val 1q",
        "val 2q",
        "val 3q",
        "test 1q",
        "recalled 1q",
        "test 2q",
        "recalled 2q",
        "test 3q",
        "recalled 3q",
    ]
    assert [r[0] for r in rows] == [label for label, _, _ in sohn2015.ROWS]
    assert [r[0] for r in rows] == [
        "NN baseline",
        "GSNN (MC)",
        "CVAE (MC)",
        "CVAE (IS)",
        "hybrid (MC)",
        "hybrid (IS)",
    ]
    cell = {r[0]: dict(zip(header, r, strict=False)) for r in rows}
    for label, kind, est in sohn2015.ROWS:
        for n in (1, 2, 3):
            for split in ("val", "test"):
                value = known(kind, n, split, est)
                if kind == "cvae" and n == 1:  # seeds 0 and 1, the second 2 nats higher
                    assert cell[label][f"{split} {n}q"] == f"{value + 1:.2f} ± 1.41 (2)"
                else:
                    assert cell[label][f"{split} {n}q"] == f"{value:.2f} (1 seed)", (label, n, split)
    assert [cell["NN baseline"][f"recalled {n}q"] for n in (1, 2, 3)] == ["99.75", "62.18", "25.99"]
    assert [cell["CVAE (MC)"][f"recalled {n}q"] for n in (1, 2, 3)] == ["68.39", "45.34", "20.96"]
    assert [cell["CVAE (IS)"][f"recalled {n}q"] for n in (1, 2, 3)] == ["63.91", "44.73", "20.95"]
    assert all(cell[m][f"recalled {n}q"] == "" for m in ("GSNN (MC)", "hybrid (IS)") for n in (1, 2, 3))
    for words in ("Binarization: dynamic", "S: 50", "val = 5000 digits", "Epochs", "train wall s", "NOT read"):
        assert words in md
    assert "## Training binarization: dynamic" in md
    assert "1 job(s) without a quadrant-task evaluation left out" in md
    assert "CVAE (IS)" in capsys.readouterr().out
    gap = known("cvae", 1, "test", "is") + 1 - 63.91
    assert f"| CVAE (IS) | {gap:+.2f} ± 1.41 |" in md  # the signed gap carries the spread over seeds

    with open(paper_sweep / "sohn2015_table1.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [
            "model",
            "n_given",
            "split",
            "estimator",
            "ncll",
            "ncll_std",
            "ncll_sem",
            "seeds",
            "binarize",
            "samples",
        ]
        table = {(r["model"], r["n_given"], r["split"], r["estimator"]): r for r in reader}
    row = table[("cvae", "2", "test", "is")]
    assert float(row["ncll"]) == pytest.approx(known("cvae", 2, "test", "is"))
    assert (row["ncll_std"], row["seeds"], row["binarize"], row["samples"]) == ("", "1", "dynamic", str(S))
    assert float(row["ncll_sem"]) == 0.25
    two = table[("cvae", "1", "test", "is")]
    assert float(two["ncll"]) == pytest.approx(known("cvae", 1, "test", "is") + 1)
    assert float(two["ncll_std"]) == pytest.approx(2**0.5, abs=1e-4) and two["seeds"] == "2"
    assert float(two["ncll_sem"]) == pytest.approx(1.25)  # the seeds' standard errors (0.25, 2.25), averaged
    assert table[("baseline", "3", "test", "exact")]["samples"] == "0"
    assert float(table[("hybrid", "1", "test", "mc")]["ncll"]) == pytest.approx(known("hybrid", 1, "test", "mc"))
    assert len(table) == 6 * 3 * 2  # every estimator row x 3 quadrant settings x 2 splits


def test_paper_report_gives_each_training_binarization_its_own_table(paper_sweep):
    for job in ("0", "1"):  # the 1-quadrant baseline and CVAE once more, trained on the static draw
        shutil.copytree(paper_sweep / job, paper_sweep / f"static_{job}")
        file = paper_sweep / f"static_{job}" / ".hydra" / "config.yaml"
        cfg = yaml.safe_load(file.read_text())
        cfg["data"]["binarize"] = "static"
        file.write_text(yaml.safe_dump(cfg))
    report.run([str(paper_sweep), "--paper", "sohn2015"])
    md = (paper_sweep / "sohn2015_table1.md").read_text()
    assert "## Training binarization: dynamic" in md and "## Training binarization: static" in md
    with open(paper_sweep / "sohn2015_table1.csv") as f:
        rows = list(csv.DictReader(f))
    static = [r for r in rows if r["binarize"] == "static"]
    assert {(r["model"], r["n_given"]) for r in static} == {("baseline", "1"), ("cvae", "1")}
    dynamic_cvae = [r for r in rows if r["binarize"] == "dynamic" and r["model"] == "cvae" and r["n_given"] == "1"]
    assert all(r["seeds"] == "2" for r in dynamic_cvae)  # the static copies are not averaged in


def test_paper_table_without_evaluations_is_a_clear_error(tmp_path, cli_env):
    write_job(tmp_path / "s", 0, "cvae", 1, evals=False)
    proc = run_report([tmp_path / "s", "--paper", "sohn2015"], cli_env)
    assert proc.returncode == 2 and "cvae-eval" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "s" / "report.md").is_file()  # the plain report is still written


def test_paper_table_says_which_jobs_stopped_early(paper_sweep):
    job = paper_sweep / "1"  # cvae, 1 quadrant given
    cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    cfg["trainer"] |= {"patience": 5, "eval_every": 100}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    metrics = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps(metrics | {"stopped_early": True}))
    report.run([str(paper_sweep), "--paper", "sohn2015"])
    md = (paper_sweep / "sohn2015_table1.md").read_text()
    assert (
        f"- Training: {STEPS} steps (no early stopping), up to {STEPS} steps, stopped early after 5 validation "
        "passes (100 steps apart) without a better val/elbo." in md
    )
    assert md.count("| 1000 | yes | 12.500 |") == 1 and md.count("| 1000 |  | 12.500 |") == 12
