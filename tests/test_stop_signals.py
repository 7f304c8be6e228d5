"""SIGTERM at any moment of a `cvae-train` start-up ends it with one sentence and exit code 143, never with a
negative code: not before the run's handler is installed (Python's default ended it silently, -15), not inside an
import (raised there, `Interrupted` broke jaxlib's extension start and the interpreter crashed at exit, -11),
not in the vmap launcher; and a signal that lands while the last step logs is not ignored.

The 20 launches run 10 at a time (each is stopped within seconds); the signal times spread over the whole
start-up, from the interpreter's first imports to the first steps. About 30 s on two loaded cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
from cli_runs import tiny

from cvae_exp.training import loop as fit_loop

LAUNCHES = 20
PARALLEL = 10
STARTUP_S = 4.0  # signal times spread over [0, this] after the command's first line; its loop starts after 3 to 6 s


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the kernel's SigCgt mask): from then on the command, not the
    interpreter's own start-up, is what a signal meets."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line for line in status if line.startswith("SigCgt:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def stop_at(args: list[str], env: dict, delay: float, log) -> tuple[int, str]:
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)
        while not catches_sigterm(proc.pid) and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = "timeout"
    return code, log.read_text()


def test_sigterm_at_any_moment_of_the_start_up_exits_143_with_one_sentence(tiny_mnist, cli_env, tmp_path):
    env = {**cli_env, "PYTHONFAULTHANDLER": "1"}  # a crash would print its Python stack

    def launch(i: int) -> tuple[float, int, str]:
        delay = STARTUP_S * i / (LAUNCHES - 1)
        changes = {"trainer.max_steps": 100000, "checkpoint.every": 100000, "trainer.eval_every": 100000}
        if i % 4 == 3:  # every fourth through the vmap launcher
            args = ["-m", "hydra/launcher=vmap", *tiny(tiny_mnist, tmp_path / f"r{i}", changes), "seed=0,1"]
            args = [a for a in args if not a.startswith("hydra.run.dir")] + [f"hydra.sweep.dir={tmp_path / f'r{i}'}"]
        else:
            args = tiny(tiny_mnist, tmp_path / f"r{i}", changes)
        code, out = stop_at([sys.executable, "-m", "cvae_exp.train", *args], env, delay, tmp_path / f"r{i}.log")
        return delay, code, out

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(launch, range(LAUNCHES)))
    took = time.monotonic() - started
    for delay, code, out in results:
        assert code == 143, f"SIGTERM after {delay:.2f} s: exit code {code}\n{out[-3000:]}"
        assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
        assert "Stopped by SIGTERM" in out, out[-3000:]
    print(f"{LAUNCHES} launches stopped in {took:.0f} s")


def test_a_signal_while_the_last_step_logs_stops_the_run_with_its_checkpoint():
    """fit on a counting step: SIGTERM arrives during the last step's logging (after the loop read its flag)."""
    saved = []

    class Hooks:
        def on_log(self, done, metrics, jobs, examples_per_s, skipped):
            if done == 10:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop's StopRequest: noted, not fatal

        def on_eval(self, done, state, jobs):
            return [{"val/elbo": 1.0} for _ in jobs]

        def on_checkpoint(self, job, done, state, val):
            saved.append(done)

        def fail(self, job, err):
            return str(err)

        def snapshot(self, state, job):
            return state

    plan = fit_loop.Plan(log_every=5, eval_every=1000, checkpoint_every=1000, batch_size=1)
    job = fit_loop.Job(range(0, 1), 10, fit_loop.EarlyStopping())
    state = {"step": jnp.int32(0), "nonfinite": jnp.int32(0), "first_nonfinite": jnp.int32(-1)}

    def train_step(state, batch):
        return {**state, "step": state["step"] + 1}, {"loss": jnp.float32(0.0)}

    state, stopped = fit_loop.fit(state, train_step, lambda step: None, plan, [job], Hooks())
    assert int(state["step"]) == 10 and saved == [10]
    assert stopped == signal.SIGTERM  # the caller exits 143 and names the checkpoint, as for any stop
