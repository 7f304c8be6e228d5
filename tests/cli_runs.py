"""Helpers for the tests that run `cvae-train`: tiny runs on the `tiny_mnist` dataset, in this process or as
new processes (in the background, or several together), and what they leave on disk (checkpoints, metrics,
TensorBoard curves)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tbevents

RUN_TIMEOUT_S = 240
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax writes `<step>.orbax-checkpoint-tmp-<n>/` and renames it when done


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


def train(args: list[str], env: dict, log: Path, *, fresh_process: bool = False) -> tuple[int, str]:
    """`cvae-train *args` (cwd: the log's folder), its output also in `log`: in this process (conftest's
    `in_process`), or as a new process where that is what is tested (`fresh_process=True`: a resume in a fresh
    interpreter) or where only one can take the environment (XLA_FLAGS)."""
    if fresh_process or env.get("XLA_FLAGS") != os.environ.get("XLA_FLAGS"):
        return finish(launch(args, env, log), log)
    from conftest import in_process

    result = in_process("cvae_exp.train", args, env=env, cwd=log.parent)
    text = result.stdout + result.stderr
    log.write_text(text)
    return result.returncode, text


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


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (hidden ones included): what a command may not change."""
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }
