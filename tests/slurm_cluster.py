"""The one-node SLURM cluster of scripts/slurm_local.sh, for tests/test_slurm.py: started once per session in a
temporary folder, SLURM_CONF pointing the clients at it, stopped at the end. Where SLURM's Debian packages are
missing the tests skip, naming them (make test-cluster prints the reasons: -rs). Also: submitting a job with
sbatch, and reading its state from scontrol (the cluster keeps no accounting database, so no sacct)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
MISSING_PACKAGES = 3  # slurm_local.sh's exit code when SLURM is not installed
JOB_TIMEOUT_S = 240


@dataclass
class Cluster:
    folder: Path
    conf: Path

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command (scontrol, squeue, scancel, ...) against this cluster."""
        out = subprocess.run(args, capture_output=True, text=True, env=self.env(dict(os.environ)), timeout=60)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def sbatch(self, command: list[str], log: Path, env: dict[str, str], *options: str) -> str:
        """Submits `srun <command>` as a batch job (its output appended to `log`, so a requeued job's runs are
        all there); returns the job id."""
        wrap = shlex.join(["srun", "--unbuffered", *command])
        args = ["sbatch", "--parsable", f"--output={log}", "--open-mode=append", "--cpus-per-task=1", *options]
        out = subprocess.run(
            [*args, f"--wrap={wrap}"], capture_output=True, text=True, env=self.env(env), cwd=log.parent, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as {key: value} (JobState, Restarts, ExitCode, Reason, ...); {} once it is gone."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}

    def wait_job(self, job_id: str, states: set[str], log: Path | None = None, timeout: float = JOB_TIMEOUT_S):
        """Polls until the job is in one of `states`; fails (with the job's log) if it ends in another."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
                break
            time.sleep(0.2)
        tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
        pytest.fail(f"job {job_id} is {info.get('JobState')} (waited for {sorted(states)}):\n{tail}")

    def release(self, job_id: str) -> None:
        """Starts a requeued job now: SLURM holds a requeued job for two minutes (its BeginTime)."""
        self.wait_job(job_id, {"PENDING"})
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")


def start(folder: Path) -> Cluster:
    """`slurm_local.sh up` in `folder`; skips the tests when SLURM is not installed, fails if it will not start."""
    out = subprocess.run(
        ["bash", str(SCRIPT), "up", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode == MISSING_PACKAGES:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, f"scripts/slurm_local.sh up failed ({out.returncode}):\n{out.stdout}{out.stderr}"
    return Cluster(folder, folder / "slurm.conf")


def stop(folder: Path) -> None:
    subprocess.run(["bash", str(SCRIPT), "down", str(folder)], capture_output=True, text=True, timeout=120)


def python_module(module: str, *args) -> list[str]:
    """The command that runs `python -m <module> *args` with this interpreter (the job's step runs it)."""
    return [sys.executable, "-m", module, *map(str, args)]
