"""Issues 6 and 15, reliability: bit-exact resume (from the run's own saved config), preemption, damaged
checkpoints, changed configs on resume, numerical faults and run-directory locks, through the real
`cvae-train` CLI: its `main()` with the command line's arguments, in this process where the process boundary
is not what is tested (cli_runs.train), and as new processes where it is (signals, SIGKILL, a resume from
disk in a fresh interpreter, another process's lock).

Every training run is tiny (one hidden layer of 32, four latents, batches of 32 on the 1,200-digit
`tiny_mnist`) and shares one persistent XLA compilation cache. Input validation, safe targets and
the pickle ban are in test_reliability_inputs.py.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import shlex
import shutil
import signal
import socket
from pathlib import Path

import pytest
from cli_runs import (
    assert_curves_contain,
    curves,
    file_tree,
    finish,
    launch,
    metrics,
    ok,
    steps,
    tiny,
    tmp_folders,
    train,
    tree_digest,
    wait_for,
)
from conftest import LINEAR, LINEAR_STEPS

N = LINEAR_STEPS // 2  # bit-exact resume: N steps, stop, resume to 2N
M = 300  # preemption: the cosine schedule's horizon; long enough that the signal lands well before it
COSINE = {"optimizer.schedule": "cosine", "optimizer.warmup_steps": 20}  # decays to 0 at trainer.max_steps


@pytest.fixture(scope="module")
def env(cli_env) -> dict[str, str]:
    """The CLI environment with the session's persistent XLA compilation cache."""
    return cli_env


@pytest.fixture(scope="module")
def straight(tiny_mnist, env, linear_run, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs that tests compare with or copy: 'linear' (2N steps, linear warm-up; conftest's
    linear_run) and 'cosine' (M steps, warm-up then cosine decay)."""
    root = tmp_path_factory.mktemp("straight")
    ok(train(tiny(tiny_mnist, root / "cosine", {"trainer.max_steps": M, **COSINE}), env, root / "cosine.log"))
    return {"linear": linear_run, "cosine": root / "cosine"}


def verifies(run_dir: Path, step: int) -> bool:
    """Whether a checkpoint restores onto the run's state, carries a content hash and matches it, with
    finite parameters (what resume, cvae-eval and cvae-sample check)."""
    from cvae_exp.runs import checkpoint
    from cvae_exp.runs.trained_run import run_config, state_target

    cfg = run_config(run_dir)
    manager = checkpoint.make_manager(run_dir, 1, read_only=True)
    try:
        restored = checkpoint.restore_first(manager, state_target(cfg), [step])
    except Exception:  # UserError: it did not restore or verify
        return False
    finally:
        manager.close()
    return restored.step == step and checkpoint.DIGEST in restored.meta


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    (dest / "metrics.json").unlink()
    return dest


# ----------------------------------------------------------------------------- bit-exact resume


def test_n_steps_then_resume_to_2n_is_bit_exact(tiny_mnist, env, straight, tmp_path):
    run = tmp_path / "run"
    ok(train(tiny(tiny_mnist, run, {"trainer.max_steps": N, **LINEAR}), env, tmp_path / "first.log"))
    assert steps(run)[-1] == N
    # The resume names only what it changes: max_steps, a cadence (checkpoint.every) and logging (progress);
    # data, model, optimizer and cadences come from the run's own saved config, not the defaults.
    changed = ["trainer.max_steps=80", "checkpoint.every=10", "trainer.progress=true", "resume=true"]
    text = ok(train([f"hydra.run.dir={run}", *changed], env, tmp_path / "second.log", fresh_process=True))
    assert f"Resumed from step {N}" in text
    # The run's record is what it trained: its launch overrides, with the resume's merged in.
    record = (run / ".hydra" / "overrides.yaml").read_text()
    for line in ("optimizer.warmup_steps=60", f"data.path={tiny_mnist}", "model.hidden=[32]", *changed):
        assert f"- {line}\n" in record, record
    assert "trainer.max_steps=40" not in record and "max_steps: 80" in (run / ".hydra" / "config.yaml").read_text()

    assert metrics(run)["params_sha256"] == metrics(straight["linear"])["params_sha256"]
    assert metrics(run)["step"] == 2 * N
    resumed, reference = curves(run), curves(straight["linear"])
    assert resumed == reference  # train/* and val/* at every logged step, identical
    lr = reference["train/lr"]
    assert lr[N] < lr[N + 10] < lr[2 * N]  # the restart fell inside the warm-up: the schedule's count was restored


# ----------------------------------------------------------------------------- preemption


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(tiny_mnist, env, straight, tmp_path):
    run, log = tmp_path / "run", tmp_path / "preempted.log"
    # Evaluating and logging at every step makes each step slow enough that the signal lands long before
    # max_steps; the resume goes back to the usual cadences (a change that is allowed).
    slow = {"trainer.max_steps": M, **COSINE, "trainer.eval_every": 1, "trainer.log_every": 1, "checkpoint.every": 10}
    proc = launch(tiny(tiny_mnist, run, slow), env, log)
    wait_for(lambda: steps(run), proc, log)  # it has made progress
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, log)

    assert code == 128 + signal.SIGTERM, text[-3000:]  # 143: stopped cleanly, but not finished
    assert "Traceback" not in text
    stop = re.search(r"Stopped by SIGTERM at step (\d+) with the checkpoint (\S+) written", text)
    assert stop, text[-3000:]
    k = int(stop.group(1))
    assert 10 <= k < M
    assert Path(stop.group(2)) == run / "checkpoints" / str(k) and k == steps(run)[-1]  # saved at that step
    assert not tmp_folders(run)  # Orbax's save completed before the exit
    printed = re.search(r"Continue with: cvae-train (.+)$", text, re.MULTILINE)
    assert printed and printed.group(1) == f"hydra.run.dir={run} resume=true", text[-3000:]
    assert k in curves(run)["train/loss"]  # TensorBoard was flushed up to the stop
    assert not (run / "metrics.json").exists() and not (run / ".lock").exists()

    # Exactly the printed command: the run's own config (including its every-step cadences) is the base.
    text = ok(train(shlex.split(printed.group(1)), env, tmp_path / "r.log"))
    assert f"Resumed from step {k}" in text
    assert metrics(run)["params_sha256"] == metrics(straight["cosine"])["params_sha256"]
    assert_curves_contain(curves(run), curves(straight["cosine"]))


def test_a_second_signal_exits_at_once(tiny_mnist, env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = launch(tiny(tiny_mnist, run, {"trainer.max_steps": 100_000, "checkpoint.every": 10}), env, log)
    wait_for(lambda: steps(run), proc, log)
    proc.send_signal(signal.SIGTERM)
    # Signals of one kind sent back to back merge into one: send the second once the first was seen,
    # while the run is still finishing its step, evaluating and saving.
    wait_for(lambda: "Received SIGTERM" in log.read_text(), proc, log, poll=0.001)
    proc.send_signal(signal.SIGTERM)
    code, text = finish(proc, log, timeout=60)
    assert code == -signal.SIGTERM, text[-3000:]  # died of the second signal: no waiting for the save
    assert "Stopped by" not in text


# ----------------------------------------------------------------------------- hard kills and damaged checkpoints


def test_sigkill_while_a_checkpoint_is_written_then_resume(tiny_mnist, env, tmp_path):
    run, log = tmp_path / "run", tmp_path / "killed.log"
    often = {"trainer.max_steps": 100_000, "checkpoint.every": 5, "trainer.log_every": 5, "trainer.eval_every": 100_000}
    proc = launch(tiny(tiny_mnist, run, often), env, log)
    wait_for(lambda: steps(run), proc, log)  # one checkpoint has completed
    wait_for(lambda: tmp_folders(run), proc, log, poll=0.001)  # the next one is being written
    proc.kill()
    proc.wait()
    assert tmp_folders(run), "the kill landed after the write finished"
    newest = steps(run)[-1]

    # The killed run could not remove its lock file, but the kernel released its lock: nothing to take over.
    assert (run / ".lock").read_text().split() == [str(proc.pid), socket.gethostname()]
    end = newest + 10  # max_steps may change on resume
    text = ok(
        train(tiny(tiny_mnist, run, {**often, "trainer.max_steps": end, "resume": "true"}), env, tmp_path / "r.log")
    )
    assert f"Resumed from step {newest}" in text
    assert metrics(run)["step"] == end


def _truncate(checkpoint: Path) -> None:
    for f in (checkpoint / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 8:
            with open(f, "r+b") as handle:
                handle.truncate(f.stat().st_size // 2)


def _remove_one_file(checkpoint: Path) -> None:
    next(f for f in sorted((checkpoint / "state").rglob("*")) if f.is_file() and f.parent.name == "d").unlink()


def test_damaged_checkpoints_are_reported_skipped_and_kept(tiny_mnist, env, straight, tmp_path):
    run = copy_run(straight["linear"], tmp_path / "run")
    *_, older, middle, newest = steps(run)
    _truncate(run / "checkpoints" / str(newest))
    _remove_one_file(run / "checkpoints" / str(middle))
    damaged = {s: file_tree(run / "checkpoints" / str(s)) for s in (newest, middle)}

    text = ok(
        train(tiny(tiny_mnist, run, {"trainer.max_steps": 2 * N, **LINEAR, "resume": "true"}), env, tmp_path / "r.log")
    )
    for s in (newest, middle):
        assert f"Checkpoint at step {s} ({run / 'checkpoints' / str(s)}) could not be restored and is skipped" in text
    assert f"Resumed from step {older}" in text
    # Nothing deleted: the damaged checkpoints were moved aside as they were, so their steps could be saved again.
    for s, tree in damaged.items():
        assert file_tree(run / "damaged_checkpoints" / str(s)) == tree
    assert newest in steps(run)
    # And the run continued from the older checkpoint exactly.
    assert metrics(run)["params_sha256"] == metrics(straight["linear"])["params_sha256"]
    assert curves(run) == curves(straight["linear"])


def test_no_restorable_checkpoint_exits_nonzero_and_deletes_nothing(tiny_mnist, env, straight, tmp_path):
    run = copy_run(straight["linear"], tmp_path / "run")
    for s in steps(run):
        _truncate(run / "checkpoints" / str(s))
    before = file_tree(run / "checkpoints")

    code, text = train(
        tiny(tiny_mnist, run, {"trainer.max_steps": 2 * N, **LINEAR, "resume": "true"}), env, tmp_path / "r.log"
    )
    assert code == 2, text[-3000:]
    found = ", ".join(map(str, sorted(steps(run), reverse=True)))
    assert (
        f"error: None of the {len(steps(run))} checkpoints in {run / 'checkpoints'} (steps {found}) could be restored."
        in text
    )
    assert "Traceback" not in text
    assert file_tree(run / "checkpoints") == before
    assert not (run / "damaged_checkpoints").exists()


# ----------------------------------------------------------------------------- resume with a changed config


def test_resume_refuses_changed_shapes_and_names_the_keys(tiny_mnist, env, straight, tmp_path):
    run = copy_run(straight["linear"], tmp_path / "run")
    before = file_tree(run / "checkpoints")
    shapes = {"model.hidden": "[16]", "model.latent_dim": 3, "data.condition": "none"}
    allowed = {
        "trainer.max_steps": 3 * N,
        "trainer.eval_every": 10,
        "checkpoint.every": 10,
        "logger.tensorboard": "false",
    }
    code, text = train(
        tiny(tiny_mnist, run, {**LINEAR, **shapes, **allowed, "resume": "true"}), env, tmp_path / "r.log"
    )

    assert code == 2, text[-3000:]
    listed = re.search(
        rf"error: The checkpoint at step {2 * N} in \S+ was trained with different (.+?); resume it", text
    )
    assert listed, text[-3000:]
    assert listed.group(1).split(", ") == list(shapes)  # exactly the changed keys that shapes depend on
    assert "Data:" not in text and "Traceback" not in text  # refused before the data was loaded
    assert file_tree(run / "checkpoints") == before


# ----------------------------------------------------------------------------- numerical faults


def test_nan_stops_with_the_step_or_is_skipped_and_counted(tiny_mnist, env, tmp_path):
    # Adam's step is about lr per parameter whatever the gradient: a warm-up towards lr=100 blows the model up
    # after a few dozen steps (checked: step 42 on the 2026-12-03 machine; warming up to lr=10 over 100 steps,
    # which did on an earlier one, grew the loss to 1e24 there without overflowing), so checkpoints come first.
    blowup = {
        "optimizer.lr": 100,
        "optimizer.warmup_steps": 400,
        "trainer.max_steps": 60,
        "checkpoint.every": 5,
        "trainer.log_every": 1,
    }
    jobs = {
        "stop": tiny(tiny_mnist, tmp_path / "stop", blowup),
        # no bound on the share of skipped steps: the run goes on to the end
        "skip": tiny(tiny_mnist, tmp_path / "skip", {**blowup, "trainer.nan_policy": "skip", "trainer.skip_limit": 1}),
        # the default bound, 10% of the steps since the last evaluation (every 20 steps)
        "bounded": tiny(tiny_mnist, tmp_path / "bounded", {**blowup, "trainer.nan_policy": "skip"}),
    }
    results = {name: train(args, env, tmp_path / f"{name}.log") for name, args in jobs.items()}

    code, text = results["stop"]
    assert code == 2, text[-3000:]
    found = re.search(
        r"error: The loss became NaN or infinite at step (\d+)\. Training stopped; "
        r"the last good checkpoint is step (\d+) in (\S+)\.",
        text,
    )
    assert found and "Traceback" not in text, text[-3000:]
    bad, good = int(found.group(1)), int(found.group(2))
    saved = steps(tmp_path / "stop")
    assert saved and max(saved) == good < bad  # kept, and nothing saved after the NaN
    assert bad - good <= 5  # the last checkpoint before the NaN was not lost either
    assert Path(found.group(3)) == tmp_path / "stop" / "checkpoints"
    assert verifies(tmp_path / "stop", good)  # restores, matches its content hash, finite parameters
    assert max(curves(tmp_path / "stop")["train/loss"]) < bad

    text = ok(results["skip"])
    skipped = metrics(tmp_path / "skip")["skipped_steps"]
    counted = curves(tmp_path / "skip")["train/skipped_steps"]
    assert metrics(tmp_path / "skip")["step"] == 60
    assert 0 < skipped < 60 and counted[60] == skipped
    assert counted[1] == 0 and list(counted.values()) == sorted(counted.values())  # counted as they happen
    # The skipped updates never reached the parameters (applied, their NaN gradients would make them NaN).
    assert math.isfinite(metrics(tmp_path / "skip")["val/recon"])

    code, text = results["bounded"]
    assert code == 2 and "Traceback" not in text, text[-3000:]
    found = re.search(
        r"error: trainer\.nan_policy=skip discarded (\d+) of the 20 steps since step (\d+) \((\d+)%\), more than "
        r"trainer\.skip_limit=0\.1 \(10%\), by step (\d+)\. Training stopped; the last good checkpoint is step (\d+) in",
        text,
    )
    assert found, text[-3000:]
    skipped, since, share, at, good = map(int, found.groups())
    assert at == since + 20 and skipped > 2 and share == round(100 * skipped / 20)
    assert counted[at] - counted[since] == skipped  # the same count as the unbounded run's, up to there
    assert max(steps(tmp_path / "bounded")) == good < at and verifies(tmp_path / "bounded", good)


# ----------------------------------------------------------------------------- run directories


def test_a_held_lock_refuses_and_is_left_alone(tiny_mnist, run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:  # this test process holds the kernel lock, as a live run would
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()} {socket.gethostname()}\n")
        held.flush()
        before = tree_digest(run)
        result = run_cli(tiny(tiny_mnist, run, {"trainer.max_steps": 5}))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"is in use by a live run (PID {os.getpid()} on {socket.gethostname()})" in result.stderr
    assert "Traceback" not in result.stderr
    assert tree_digest(run) == before  # the lock file as it was; no .hydra/, no log, no checkpoints/
    # A lock file whose holder is gone is no lock: see test_sigkill_while_a_checkpoint_is_written_then_resume.


def test_multirun_jobs_get_their_own_directories_and_resume_with_auto(tiny_mnist, env, tmp_path):
    sweep = tmp_path / "sweep"
    sweep_args = {"hydra.sweep.dir": sweep, "resume": "auto"}  # auto: a fresh start where no checkpoint is
    args = tiny(tiny_mnist, tmp_path / "unused", {"trainer.max_steps": 2, **sweep_args}, "seed=0,1", "-m")
    text = ok(train(args, env, tmp_path / "multirun.log"))
    assert "Resumed" not in text
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    hashes = {metrics(job)["params_sha256"] for job in jobs}
    assert len(hashes) == 2  # each job wrote its own result
    assert all(steps(job) == [2] for job in jobs)

    # The same sweep launched again, further: each job continues its own run (a requeued sweep).
    text = ok(
        train(
            [f"hydra.sweep.dir={sweep}", "resume=auto", "trainer.max_steps=4", "seed=0,1", "-m"],
            env,
            tmp_path / "again.log",
        )
    )
    assert text.count("Resumed from step 2") == 2
    assert all(steps(job) == [2, 4] and metrics(job)["step"] == 4 for job in jobs)
    for seed, job in enumerate(jobs):
        record = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"- seed={seed}\n" in record and "- trainer.max_steps=4\n" in record and "max_steps=2" not in record


def test_unretrieved_reads_of_a_damaged_checkpoint_print_no_traceback(caplog):
    """Orbax's gather may leave failed reads of a damaged checkpoint unretrieved; asyncio reports each, with a
    traceback, whenever it is collected (seen once in a resume's output). After a failed restore those
    reports are dropped; asyncio's other errors are not."""
    import asyncio
    import gc

    from cvae_exp.runs import checkpoint

    async def failed_read():
        raise ValueError("NOT_FOUND: Error opening ... [tensorstore_spec='...']")

    async def gather_that_does_not_wait():
        asyncio.ensure_future(failed_read())
        await asyncio.sleep(0.01)

    checkpoint._quiet_unretrieved_reads()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(gather_that_does_not_wait())
        gc.collect()
        logging.getLogger("asyncio").error("another asyncio error")
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text
    assert "another asyncio error" in caplog.text
