"""No run can destroy another: a run directory inside another run's checkpoints/ (or damaged_checkpoints/),
equal to it, or one whose own checkpoints/ holds another run is refused before anything is written (the
outer run's keep policy would delete the inner one whole, or move it to damaged_checkpoints/)."""

from __future__ import annotations

import shutil

import pytest
from cli_runs import tree_digest
from conftest import in_process


@pytest.fixture
def outer(tmp_path):
    """A run directory as cvae-train leaves it (its record, metrics.json, two step folders)."""
    run = tmp_path / "outer"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run / "metrics.json").write_text("{}\n")
    for step in (10, 20):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
        (run / "checkpoints" / str(step) / "commit_success.txt").write_text("ok")
    return run


def refused(args, env, cwd) -> str:
    done = in_process("cvae_exp.train", args, env=env, cwd=cwd)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The run directory "), done.stderr
    return lines[0]


@pytest.mark.parametrize("inner", ["checkpoints/20/run", "checkpoints/new", "checkpoints", "damaged_checkpoints/7"])
def test_a_run_inside_another_runs_checkpoints_is_refused(inner, outer, small_overrides, cli_env, tmp_path):
    before = tree_digest(outer)
    folders = sorted(p for p in outer.rglob("*") if p.is_dir())
    line = refused(small_overrides(outer / inner), cli_env, tmp_path)
    assert f"{outer / inner.split('/')[0]}, the {inner.split('/')[0]} folder of the run {outer}" in line
    assert tree_digest(outer) == before and sorted(p for p in outer.rglob("*") if p.is_dir()) == folders


def test_a_run_whose_checkpoints_hold_another_run_is_refused(outer, small_overrides, cli_env, tmp_path):
    inner = outer / "checkpoints" / "30" / "sub"
    shutil.copytree(outer / ".hydra", inner / ".hydra")  # a run made there (before this check existed)
    before = tree_digest(outer)
    line = refused(small_overrides(outer, "resume=true"), cli_env, tmp_path)
    assert f"holds another run, {inner}, inside its checkpoints folder" in line
    assert tree_digest(outer) == before


def test_the_vmap_launcher_refuses_a_sweep_inside_a_runs_checkpoints(outer, small_overrides, cli_env, tmp_path):
    sweep = outer / "checkpoints"  # its jobs would be the step folders 0 and 1
    args = ["-m", "hydra/launcher=vmap", *small_overrides(None), "seed=0,1", f"hydra.sweep.dir={sweep}"]
    before = tree_digest(outer)
    line = refused(args, cli_env, tmp_path)
    assert f"The run directory {sweep / '0'} lies inside {sweep}" in line
    after = tree_digest(outer)
    assert after.pop("checkpoints/multirun.yaml")  # Hydra's record of the sweep, written before any launcher runs
    assert after == before and not (sweep / "0").exists()


# Orbax's abandoned reads of a checkpoint deleted under them printed "Exception ignored in: <coroutine ...>"
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_reading_a_run_while_it_trains_never_loses_the_checkpoint(tiny_mnist, cli_env, tmp_path, caplog, monkeypatch):
    """cvae-eval / cvae-sample (trained_run.load_run) against a live run that saves every step and keeps one
    checkpoint: its keep policy deletes the checkpoint being read (the read waits, before it restores, until
    the live run has deleted it: the race made certain). The read goes on with the checkpoint there now and
    nothing is set aside as damaged. The live run is paused (SIGSTOP) for the second try only, so that the
    test does not depend on how fast this machine reads against how fast it saves."""
    import logging
    import signal
    import time

    from cli_runs import finish, launch, steps, tiny, wait_for

    from cvae_exp.runs import checkpoint
    from cvae_exp.runs.trained_run import load_run

    run = tmp_path / "live"
    changes = {"trainer.max_steps": 100000, "checkpoint.every": 1, "checkpoint.keep": 1, "trainer.eval_every": 100000}
    proc = launch(tiny(tiny_mnist, run, changes), cli_env, tmp_path / "live.log")
    real_restore, real_manager = checkpoint.restore_first, checkpoint.make_manager
    tried = []

    def restore_after_the_live_run_deleted_it(manager, target, ranked):
        if not tried:
            tried.append(ranked[0])
            wait_for(lambda: not (run / "checkpoints" / str(ranked[0])).exists(), proc, tmp_path / "live.log")
        return real_restore(manager, target, ranked)

    def manager_of_a_paused_run(*args, **kwargs):
        if tried:  # the second try: the live run holds still while it reads
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.2)
        return real_manager(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "restore_first", restore_after_the_live_run_deleted_it)
    monkeypatch.setattr(checkpoint, "make_manager", manager_of_a_paused_run)
    try:
        wait_for(lambda: len(steps(run)) >= 1 and steps(run)[-1] >= 3, proc, tmp_path / "live.log")
        with caplog.at_level(logging.INFO, logger="cvae_exp"):
            loaded = load_run(run)
        assert "The checkpoint being read was deleted by the live run" in caplog.text
        assert loaded.step > tried[0] and loaded.step in steps(run)
        assert not (run / "damaged_checkpoints").exists()
        proc.send_signal(signal.SIGCONT)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        finish(proc, tmp_path / "live.log")
