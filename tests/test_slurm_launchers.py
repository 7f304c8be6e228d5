"""The SLURM launchers' parts that need no cluster (the cluster itself: tests/test_slurm.py, make test-cluster):
a sweep refused in one sentence before anything is submitted, the job states read from squeue, the stop signals
that SLURM sends before a time limit, and one console for a run of several processes."""

from __future__ import annotations

import logging
import os
import signal

import pytest
from conftest import in_process, shrunk

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.parametrize(
    ("launcher", "extra", "said"),
    [
        ("slurm", [], "hydra/launcher=slurm submits SLURM jobs, and this machine has no sbatch on PATH"),
        ("vmap_slurm", [], "hydra/launcher=vmap_slurm submits SLURM jobs, and this machine has no sbatch on PATH"),
        (
            "slurm",
            ["hydra.launcher.max_members=2"],
            "hydra.launcher.max_members=2 is a key of hydra/launcher=vmap_slurm",
        ),
        (
            "vmap_slurm",
            ["hydra.launcher.tasks_per_node=2"],
            "hydra.launcher.tasks_per_node=2: a vmap group trains in one process",
        ),
    ],
)
def test_a_sweep_that_cannot_be_submitted_is_refused_in_one_sentence(
    launcher, extra, said, tiny_mnist, cli_env, tmp_path
):
    """No sbatch here (PATH holds nothing), or keys that do not fit the launcher: exit 2, one sentence, and no job
    directory in the sweep."""
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep}", *shrunk(tiny_mnist), "seed=0,1", *extra]
    out = in_process("cvae_exp.train", args, env={**cli_env, "PATH": str(tmp_path)}, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {said}"), out.stderr
    assert not sweep.exists() or [p.name for p in sweep.iterdir() if p.is_dir()] == []


def test_job_states_are_read_from_squeue_and_a_job_no_longer_listed_has_ended():
    from submitit.slurm.slurm import SlurmJob

    from cvae_exp.runs import slurm

    watcher = slurm._queue_watcher()
    for job in ("7_0", "7_1", "8", "9"):
        watcher.register_job(job)
    info = watcher.read_info(b"7_0|RUNNING|vm\n7_1|PENDING|\n8|CANCELLED|vm\n")
    assert {job: info[job]["State"] for job in info} == {"7_0": "RUNNING", "7_1": "PENDING", "8": "CANCELLED",
                                                         "9": "ENDED"}  # fmt: skip
    watcher._info_dict.update(info)
    assert [watcher.is_done(j, mode="cache") for j in ("7_0", "7_1", "8", "9")] == [False, False, True, True]
    command = watcher._make_command()
    assert command[0] == "squeue" and "--states=all" in command and "--array" in command
    assert SlurmJob.watcher is not watcher  # installed only inside job_states(), on a cluster without accounting


def test_a_failed_state_ends_a_job_only_when_two_reads_in_a_row_give_it():
    """While submitit requeues a preempted job, squeue may list it FAILED for a moment: one read of FAILED is
    not the job's end; a job still FAILED at the next read has failed."""
    from cvae_exp.runs import slurm

    watcher = slurm._queue_watcher()
    for job in ("5", "6"):
        watcher.register_job(job)
    states = []
    for listing in (b"5|FAILED|vm\n6|FAILED|vm\n", b"5|PENDING|\n6|FAILED|vm\n", b"5|FAILED|vm\n6|FAILED|vm\n"):
        info = watcher.read_info(listing)
        watcher._info_dict.update(info)
        states.append([watcher.is_done(j, mode="cache") for j in ("5", "6")])
    assert states == [[False, False], [False, True], [False, True]]


def test_usr1_and_usr2_stop_the_loop_and_pass_on_to_the_handler_from_before():
    """What `sbatch --signal` and submitit send before a time limit: the loop stops (after a checkpoint); then
    hand_over gives a Python handler from before the loop (submitit's requeue) its turn; SIGTERM is never handed."""
    from cvae_exp.training.loop import StopRequest, hand_over

    seen = []
    before = {sig: signal.signal(sig, lambda s, f: seen.append(s)) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    try:
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            with StopRequest() as stop:
                signal.raise_signal(sig)
                assert stop.requested and stop.signum == sig and seen == []
                hand_over(sig)  # inside the loop's `with` (the vmap group stops there)
            assert seen == [sig]
            hand_over(sig)  # after it (a single run)
            assert seen == [sig, sig]
            seen.clear()
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.signum == signal.SIGTERM
        hand_over(signal.SIGTERM)
        assert seen == []
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize(("env", "shown"), [({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False),
                                            ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, True),
                                            ({"SLURM_NTASKS": "1", "SLURM_PROCID": "3"}, True)])  # fmt: skip
def test_only_process_0_logs_below_warning(env, shown, monkeypatch, caplog):
    from omegaconf import OmegaConf

    from cvae_exp.runs.process_log import primary_only

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = OmegaConf.create({"cluster": {"process_id": None}})
    log = logging.getLogger("cvae_exp.test_process_log")
    with caplog.at_level(logging.INFO), primary_only(cfg):
        log.info("an info line")
        log.warning("a warning")
        bars_off = os.environ.get("TQDM_DISABLE") == "1"
    assert [r.getMessage() for r in caplog.records] == (["an info line"] if shown else []) + ["a warning"]
    assert bars_off is not shown
    assert logging.root.manager.disable == logging.NOTSET and "TQDM_DISABLE" not in os.environ
    with primary_only(OmegaConf.create({"cluster": {"process_id": 1}})):  # cluster.* decides over SLURM's
        assert logging.root.manager.disable == logging.INFO
