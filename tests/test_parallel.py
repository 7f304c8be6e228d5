"""Scale-out: one jit over every local device, two JAX processes on loopback, Hydra's launchers.

Devices are simulated on the CPU (XLA_FLAGS=--xla_force_host_platform_device_count=N, which must be
set before JAX starts, hence subprocesses). The one-device reference and the launchers' own command run in
the tests' process (one CPU device; the launchers start the jobs' processes).
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from cli_runs import metrics

STEPS = ["trainer.max_steps=20", "trainer.eval_every=20", "checkpoint.every=20", "trainer.batch_size=32"]


def devices_env(n: int) -> dict[str, str]:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def assert_same_training(a: dict, b: dict, rel: float = 1e-4) -> None:
    assert a["step"] == b["step"]
    for key in ("val/elbo", "val/kl", "val/recon"):
        assert a[key] == pytest.approx(b[key], rel=rel), key


@pytest.fixture(scope="module")
def one_device_run(tiny_mnist, session_cli, tmp_path_factory) -> dict:
    from conftest import shrunk

    run_dir = tmp_path_factory.mktemp("one_device") / "r"
    out = session_cli(shrunk(tiny_mnist, run_dir, *STEPS, "seed=3"))  # this process: one CPU device
    assert out.returncode == 0, out.stderr[-3000:]
    return metrics(run_dir)


def test_four_devices_match_one(one_device_run, small_overrides, run_cli, tmp_path):
    out = run_cli(small_overrides(tmp_path / "r", *STEPS, "seed=3"), env=devices_env(4))
    assert out.returncode == 0, out.stderr[-3000:]
    four = metrics(tmp_path / "r")
    assert (four["devices"], one_device_run["devices"]) == (4, 1)
    assert_same_training(four, one_device_run)
    assert "Devices: 4" in out.stderr + out.stdout


def test_devices_subset_and_indivisible_batch(small_overrides, run_cli, tmp_path):
    out = run_cli(small_overrides(tmp_path / "a", *STEPS, "trainer.devices=2"), env=devices_env(4))
    assert out.returncode == 0, out.stderr[-3000:]
    assert metrics(tmp_path / "a")["devices"] == 2

    out = run_cli(small_overrides(tmp_path / "b", *STEPS, "trainer.batch_size=30"), env=devices_env(4))
    assert out.returncode == 2
    assert "trainer.batch_size=30" in out.stderr and "4 devices" in out.stderr
    assert "Traceback" not in out.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(one_device_run, tiny_mnist, cli_env, tmp_path):
    """Two JAX processes on 127.0.0.1 (gloo collectives), one CPU device each, one global batch."""
    from conftest import shrunk

    run_dir = tmp_path / "r"
    port = free_port()
    procs = []
    for pid in range(2):
        args = shrunk(tiny_mnist, run_dir, *STEPS, "seed=3")
        args += [
            f"cluster.coordinator_address=127.0.0.1:{port}",
            "cluster.num_processes=2",
            f"cluster.process_id={pid}",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cvae_exp.train", *args],
                cwd=tmp_path,
                env={**cli_env, **devices_env(1)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:  # a process that lost its peer would wait for it forever
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, err[-3000:]
    two = metrics(run_dir)
    assert (two["devices"], two["processes"]) == (2, 2)
    assert_same_training(two, one_device_run)
    assert (run_dir / "checkpoints" / "20").is_dir()


def test_submitit_local_sweep(small_overrides, cli_env, tmp_path):
    """The SLURM launcher's local executor: two tiny jobs, each in its own run directory (and process)."""
    from conftest import in_process

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "seed=0,1"]
    out = in_process("cvae_exp.train", [*args, *small_overrides(None, *STEPS)], env=cli_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [j.name for j in jobs] == ["0", "1"]
    assert metrics(jobs[0])["params_sha256"] != metrics(jobs[1])["params_sha256"]


def test_joblib_sweep(small_overrides, cli_env, tmp_path):
    from conftest import in_process

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}"]
    overrides = [*args, *small_overrides(None, *STEPS, "model.latent_dim=2,4")]
    out = in_process("cvae_exp.train", overrides, env=cli_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
