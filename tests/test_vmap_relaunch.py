"""Relaunching a vmap sweep (`hydra/launcher=vmap`), as a user does, in a new process: after any fault that
leaves its jobs' newest checkpoints at different steps (a damaged final checkpoint, a kill between two jobs'
saves, a save lost to a full disk) it finishes with every job equal to the uninterrupted sweep; a job
directory is continued only by the job that wrote it (a changed sweep or changed data is refused in one
sentence, nothing written); a value added to the sweep trains only the new job."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import yaml
from cli_runs import metrics, steps, tree_digest
from conftest import in_process, run_module, shrunk
from test_reliability_record import flip_one_bit

STEPS = 6
COMMON = (f"trainer.max_steps={STEPS}", "checkpoint.every=1", "trainer.eval_every=3", "checkpoint.keep=10")
COMMON += ("logger.images=false", "model.hidden=[16]", "trainer.log_every=3")


def sweep(tiny_mnist, where: Path, seeds: str, *extra: str) -> list[str]:
    return [
        "-m",
        "hydra/launcher=vmap",
        *shrunk(tiny_mnist),
        *COMMON,
        f"seed={seeds}",
        *extra,
        f"hydra.sweep.dir={where}",
    ]


@pytest.fixture(scope="module")
def finished(tiny_mnist, cli_env, tmp_path_factory) -> Path:
    """The uninterrupted sweep of three jobs (seed=0,1,2), trained in this process."""
    root = tmp_path_factory.mktemp("vmap_relaunch") / "sweep"
    proc = in_process("cvae_exp.train", sweep(tiny_mnist, root, "0,1,2"), env=cli_env, cwd=root.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(steps(root / str(n)) == list(range(1, STEPS + 1)) for n in range(3))
    return root


def test_a_relaunch_after_faults_finishes_every_job_as_if_never_stopped(finished, tiny_mnist, cli_env, tmp_path):
    root = tmp_path / "sweep"
    shutil.copytree(finished, root)
    for n in range(3):
        (root / str(n) / "metrics.json").unlink()
    # job 0: killed after its last save; job 1: killed between two jobs' saves (its newest is one step behind);
    # job 2: its final checkpoint damaged (one flipped bit) and the one before lost to a full disk (a
    # half-written temporary folder, which Orbax ignores)
    shutil.rmtree(root / "1" / "checkpoints" / str(STEPS))
    flip_one_bit(root / "2" / "checkpoints" / str(STEPS), random.Random(0))
    (root / "2" / "checkpoints" / str(STEPS - 1)).rename(
        root / "2" / "checkpoints" / f"{STEPS - 1}.orbax-checkpoint-tmp-1"
    )
    proc = run_module("cvae_exp.train", sweep(tiny_mnist, root, "0,1,2"), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n, resumed_from in ((0, STEPS), (1, STEPS - 1), (2, STEPS - 2)):  # each from its newest good checkpoint
        log = (root / str(n) / "train.log").read_text()
        assert f"job {n}, Resumed from step {resumed_from} " in log, log[-2000:]
        after, before = metrics(root / str(n)), metrics(finished / str(n))
        assert after["step"] == STEPS and after["params_sha256"] == before["params_sha256"], n
        assert after["val/elbo"] == before["val/elbo"]
    assert (root / "2" / "damaged_checkpoints" / str(STEPS)).is_dir()  # set aside, not deleted


def test_a_changed_sweep_or_data_is_refused_and_changes_nothing(finished, tiny_mnist, cli_env, tmp_path):
    before = tree_digest(finished)
    cases = {
        # seed=1 removed: job 1 would now be seed=2 and continue seed=1's checkpoints
        "renumbered": (sweep(tiny_mnist, finished, "0,2"), "Job 1's directory"),
        "data": (sweep(tiny_mnist, finished, "0,1,2", "data.val_size=100"), "data.val_size=100"),
    }
    for name, (args, named) in cases.items():
        proc = run_module("cvae_exp.train", args, env=cli_env, cwd=tmp_path)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, proc.stderr)
        assert named in lines[0], (name, lines[0])
    assert tree_digest(finished) == before


def test_a_value_added_to_the_sweep_trains_only_the_new_job(finished, tiny_mnist, cli_env, tmp_path, monkeypatch):
    root = tmp_path / "sweep"
    shutil.copytree(finished, root)
    kept = {n: tree_digest(root / str(n) / "checkpoints") for n in range(3)}
    from cvae_exp.training.program import build_program

    built = []  # the members of each program the relaunch builds

    def counting(exp, plains, *args):
        built.append(len(plains))
        return build_program(exp, plains, *args)

    monkeypatch.setattr("cvae_exp.runs.group.build_program", counting)
    proc = in_process("cvae_exp.train", sweep(tiny_mnist, root, "0,1,2,3"), env=cli_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The jobs at step 6 and the new one at step 0 train one after another in the one program of all four
    # (a vmap of another size rounds differently: on an AVX2-only CPU a relaunched job then missed its bits).
    assert built == [4]
    assert steps(root / "3") == list(range(1, STEPS + 1)) and metrics(root / "3")["step"] == STEPS
    assert yaml.safe_load((root / "3" / ".hydra" / "overrides.yaml").read_text())[-1] == "seed=3"
    for n in range(3):  # the finished jobs: evaluated again as they stand, nothing trained or saved
        assert tree_digest(root / str(n) / "checkpoints") == kept[n]
        assert metrics(root / str(n))["params_sha256"] == metrics(finished / str(n))["params_sha256"]
