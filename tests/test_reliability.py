"""Issue 6, reliability: bit-exact resume, preemption, damaged checkpoints, changed configs on resume,
numerical faults and run-directory locks, through the real `cvae-train` CLI.

Every training run is tiny (one hidden layer of 32, four latents, batches of 32 on the 1,200-digit
`tiny_mnist`) and shares one persistent XLA compilation cache, so after the first run a subprocess
costs mostly its imports. Independent runs are started together. Input validation, safe targets and
the pickle ban are in test_reliability_inputs.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tbevents

N = 40  # bit-exact resume: N steps, stop, resume to 2N
M = 300  # preemption: the cosine schedule's horizon; long enough that the signal lands well before it
LINEAR = {"optimizer.warmup_steps": 60}  # linear warm-up past N: the resumed steps depend on the restored count
COSINE = {"optimizer.schedule": "cosine", "optimizer.warmup_steps": 20}  # decays to 0 at trainer.max_steps
RUN_TIMEOUT_S = 240
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes `<step>.orbax-checkpoint-tmp-<n>/` and renames it when done


# ----------------------------------------------------------------------------- helpers


def tiny(data: str, run_dir: Path, changes: dict | None = None, *flags: str) -> list[str]:
    """The overrides of a tiny run in `run_dir`; `changes` replace or add keys, `flags` go last (e.g. -m)."""
    values = {
        "data.path": data,
        "data.val_size": 200,
        "model.hidden": "[32]",
        "model.latent_dim": 4,
        "trainer.batch_size": 32,
        "trainer.eval_batch_size": 100,
        "trainer.progress": "false",
        "logger.images": "false",
        "trainer.log_every": 10,
        "trainer.eval_every": 20,
        "checkpoint.every": 20,
        "hydra.run.dir": run_dir,
        **(changes or {}),
    }
    return [f"{k}={v}" for k, v in values.items()] + list(flags)


def launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`python -m cvae_exp.train *args` in the background, stdout and stderr into `log` (no pipe to fill)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cvae_exp.train", *map(str, args)],
            cwd=log.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{' '.join(proc.args[3:])} ran past {timeout} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def together(jobs: dict[str, list[str]], env: dict, root: Path) -> dict[str, tuple[int, str]]:
    """Runs the jobs at the same time (the machine's cores are shared anyway) and returns (code, output) each."""
    procs = {name: launch(args, env, root / f"{name}.log") for name, args in jobs.items()}
    return {name: finish(proc, root / f"{name}.log") for name, proc in procs.items()}


def train(args: list[str], env: dict, log: Path) -> tuple[int, str]:
    return finish(launch(args, env, log), log)


def ok(result: tuple[int, str]) -> str:
    code, text = result
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    return text


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = RUN_TIMEOUT_S, poll: float = 0.01):
    """Polls `predicate()` until it returns something truthy; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before it was interrupted:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    proc.kill()
    pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")


def steps(run_dir: Path) -> list[int]:
    """The finished checkpoints in a run directory (Orbax's temporary folders are not steps)."""
    folder = run_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def tmp_folders(run_dir: Path) -> list[str]:
    folder = run_dir / "checkpoints"
    return [p.name for p in folder.iterdir() if TMP_MARK in p.name] if folder.is_dir() else []


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def curves(run_dir: Path) -> dict[str, dict[int, float]]:
    """TensorBoard scalars as {tag: {step: value}}, purges applied; throughput is wall-clock, so left out."""
    return {
        tag: dict(points)
        for tag, points in tbevents.scalars(run_dir / "tb").items()
        if not tag.endswith("examples_per_s")
    }


def assert_curves_contain(resumed: dict, straight: dict) -> None:
    """Every point of the uninterrupted run is in the resumed run, with the same value bit for bit."""
    assert set(resumed) == set(straight)
    for tag, points in straight.items():
        assert {s: resumed[tag].get(s) for s in points} == points, tag


def file_tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(cli_env, tmp_path_factory) -> dict[str, str]:
    """The CLI environment plus a persistent XLA compilation cache shared by this module's runs
    (the same program loads the same executable, so results are unchanged; runs take seconds, not tens)."""
    cache = tmp_path_factory.mktemp("xla_cache")
    return {
        **cli_env,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def straight(tiny_mnist, env, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs that tests compare with or copy: 'linear' (2N steps, linear warm-up) and
    'cosine' (M steps, warm-up then cosine decay)."""
    root = tmp_path_factory.mktemp("straight")
    jobs = {
        "linear": tiny(tiny_mnist, root / "linear", {"trainer.max_steps": 2 * N, **LINEAR}),
        "cosine": tiny(tiny_mnist, root / "cosine", {"trainer.max_steps": M, **COSINE}),
    }
    for result in together(jobs, env, root).values():
        ok(result)
    return {name: root / name for name in jobs}


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    (dest / "metrics.json").unlink()
    return dest


# ----------------------------------------------------------------------------- bit-exact resume


def test_n_steps_then_resume_to_2n_is_bit_exact(tiny_mnist, env, straight, tmp_path):
    run = tmp_path / "run"
    ok(train(tiny(tiny_mnist, run, {"trainer.max_steps": N, **LINEAR}), env, tmp_path / "first.log"))
    assert steps(run)[-1] == N
    # The resume changes what may change: max_steps, a cadence (checkpoint.every) and logging (progress).
    changed = {"trainer.max_steps": 2 * N, "checkpoint.every": 10, "trainer.progress": "true", "resume": "true"}
    text = ok(train(tiny(tiny_mnist, run, {**LINEAR, **changed}), env, tmp_path / "second.log"))
    assert f"Resumed from step {N}" in text

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
    assert f"cvae-train hydra.run.dir={run} resume=true" in text
    assert k in curves(run)["train/loss"]  # TensorBoard was flushed up to the stop
    assert not (run / "metrics.json").exists() and not (run / ".lock").exists()

    text = ok(
        train(tiny(tiny_mnist, run, {"trainer.max_steps": M, **COSINE, "resume": "true"}), env, tmp_path / "r.log")
    )
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

    end = newest + 10  # max_steps may change on resume
    text = ok(
        train(tiny(tiny_mnist, run, {**often, "trainer.max_steps": end, "resume": "true"}), env, tmp_path / "r.log")
    )
    assert "Taking over the stale lock" in text  # the killed run could not remove its lock
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
    # Adam's step is about lr per parameter whatever the gradient: warming up to lr=10 blows the model up
    # after a few dozen steps (checked: step 62 here), so a few checkpoints come first.
    blowup = {
        "optimizer.lr": 10,
        "optimizer.warmup_steps": 100,
        "trainer.max_steps": 100,
        "checkpoint.every": 5,
        "trainer.log_every": 1,
    }
    jobs = {
        "stop": tiny(tiny_mnist, tmp_path / "stop", blowup),
        "skip": tiny(tiny_mnist, tmp_path / "skip", {**blowup, "trainer.nan_policy": "skip"}),
    }
    results = together(jobs, env, tmp_path)

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
    assert max(curves(tmp_path / "stop")["train/loss"]) < bad

    text = ok(results["skip"])
    skipped = metrics(tmp_path / "skip")["skipped_steps"]
    counted = curves(tmp_path / "skip")["train/skipped_steps"]
    assert metrics(tmp_path / "skip")["step"] == 100
    assert 0 < skipped < 100 and counted[100] == skipped
    assert counted[1] == 0 and list(counted.values()) == sorted(counted.values())  # counted as they happen
    # The skipped updates never reached the parameters (applied, their NaN gradients would make them NaN).
    assert math.isfinite(metrics(tmp_path / "skip")["val/recon"])


# ----------------------------------------------------------------------------- run directories


def test_a_live_lock_refuses_and_is_left_alone(tiny_mnist, run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(str(os.getpid()))  # this test process: alive
    result = run_cli(tiny(tiny_mnist, run, {"trainer.max_steps": 5}))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"is in use by a live run (PID {os.getpid()})" in result.stderr
    assert "Traceback" not in result.stderr
    assert (run / ".lock").read_text() == str(os.getpid())
    assert not (run / "checkpoints").exists()
    # The stale case (the PID is gone): see test_sigkill_while_a_checkpoint_is_written_then_resume.


def test_multirun_jobs_get_their_own_directories(tiny_mnist, env, tmp_path):
    sweep = tmp_path / "sweep"
    args = tiny(tiny_mnist, tmp_path / "unused", {"trainer.max_steps": 2, "hydra.sweep.dir": sweep}, "seed=0,1", "-m")
    ok(train(args, env, tmp_path / "multirun.log"))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    hashes = {metrics(job)["params_sha256"] for job in jobs}
    assert len(hashes) == 2  # each job wrote its own result
    assert all(steps(job) == [2] for job in jobs)
