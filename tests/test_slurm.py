"""cvae-train on a real SLURM cluster (scripts/slurm_local.sh: one node, partition `debug`, no accounting), through
sbatch, srun, scontrol and scancel: a sweep with hydra/launcher=slurm, a requeued job, signals before a time limit,
a run of two tasks, a cancelled run resumed, and vmap groups as SLURM jobs. `make test-cluster` runs them (the
`slurm` marker keeps them out of `make test`); without SLURM's packages they skip, saying so.

Every run trains the same tiny config (STEPS steps, a checkpoint every EVERY); each is compared with the same
seed's run trained here without SLURM (`separate`)."""

from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import slurm_cluster
from cli_runs import launch, metrics, ok, steps, train
from conftest import in_process, run_module

pytestmark = pytest.mark.slurm

STEPS, EVERY = 1500, 250  # long enough to interrupt mid-run (the tiny model trains ~400 steps/s on 2 cores)
SHORT = 200  # the two-process run's steps (gloo's all-reduce on 2 shared cores makes each step slow)
# what a job asks of the one-node cluster (conf/hydra/launcher/slurm.yaml asks for a GPU and 32 GB)
RESOURCES = [
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
LINE_PREFIX = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]")  # a log line's timestamp


def tiny_args(data: str, run_dir: Path | None = None, seed: int | str = 0, max_steps: int = STEPS) -> list[str]:
    args = [
        f"data.path={data}",
        "data.val_size=200",
        "model.hidden=[32]",
        "model.latent_dim=4",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=100",
        "trainer.progress=false",
        "logger.images=false",
        f"trainer.max_steps={max_steps}",
        f"trainer.eval_every={EVERY}",
        f"checkpoint.every={EVERY}",
        f"seed={seed}",
    ]
    return args + ([f"hydra.run.dir={run_dir}"] if run_dir is not None else [])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    started = slurm_cluster.start(folder)
    yield started
    slurm_cluster.stop(folder)


@pytest.fixture(scope="module")
def separate(tiny_mnist, cli_env, tmp_path_factory) -> dict:
    """The runs the SLURM ones are compared with, trained in this process without SLURM: {seed: its
    metrics.json} for seeds 0 and 1, and "short": seed 0 for SHORT steps."""
    root = tmp_path_factory.mktemp("separate")
    out = {}
    for name, seed, max_steps in ((0, 0, STEPS), (1, 1, STEPS), ("short", 0, SHORT)):
        ok(train(tiny_args(tiny_mnist, root / str(name), seed, max_steps), cli_env, root / f"{name}.log"))
        out[name] = metrics(root / str(name))
    return out


def wait_for_checkpoint(cluster, job_id: str, run_dir: Path, log: Path) -> int:
    """Polls until the running job has written its first checkpoint; returns the newest step."""
    deadline = time.monotonic() + slurm_cluster.JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if steps(run_dir):
            return steps(run_dir)[-1]
        state = cluster.job(job_id).get("JobState")
        if state not in (None, "PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} is {state} before its first checkpoint:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"no checkpoint in {run_dir}:\n{log.read_text()[-3000:]}")


def submitit_job(sweep: Path, task: int, launcher: subprocess.Popen, log: Path) -> str:
    """The SLURM id of the submitit job of a sweep's `task`: `<array job>_<task>`, or `<job>` when the sweep
    has one job (no array), read from the name of the pickle submitit writes for it."""
    pattern = re.compile(rf"^(\d+)(_{task})?_submitted\.pkl$" if task == 0 else rf"^(\d+_{task})_submitted\.pkl$")
    deadline = time.monotonic() + slurm_cluster.JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        for pickle in (sweep / ".submitit").rglob("*_submitted.pkl"):
            found = pattern.match(pickle.name)
            if found:
                return found[0].removesuffix("_submitted.pkl")
        if launcher.poll() is not None:
            pytest.fail(f"the launcher ended ({launcher.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no SLURM job for task {task} in {sweep}")


def once_each(text: str) -> list[str]:
    """The log lines (timestamps removed) that appear more than once."""
    lines = [LINE_PREFIX.sub("", line) for line in text.splitlines() if LINE_PREFIX.match(line)]
    return [line for line, n in Counter(lines).items() if n > 1]


def test_the_script_stops_exactly_what_it_started_and_a_stopped_cluster_is_refused(
    cluster, tiny_mnist, cli_env, tmp_path
):
    """`down` ends the daemons `up` started in its folder and nothing else; a sweep sent to that cluster
    afterwards is refused in one sentence (exit 2) before any job directory is made, and so is one whose
    resources sbatch refuses."""
    status = subprocess.run(["bash", str(slurm_cluster.SCRIPT), "status", str(cluster.folder)], capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert status.returncode == 0 and re.search(r"^debug\*?\s+up\s.*\bidle\b", status.stdout, re.M), status.stdout
    other = slurm_cluster.start(tmp_path / "other")  # a second cluster beside the session's, on its own ports
    pids = [int((other.folder / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd")]
    assert other.run("sinfo", "-h", "-o", "%P %t").stdout.split() == ["debug*", "idle"]
    slurm_cluster.stop(other.folder)
    time.sleep(0.2)
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert "is UP" in cluster.run("scontrol", "ping").stdout  # the session's cluster is untouched
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=vmap_slurm",
        *RESOURCES,
        f"hydra.sweep.dir={sweep}",
        *tiny_args(tiny_mnist, seed="0,1"),
    ]
    out = in_process("cvae_exp.train", args, env=other.env(cli_env), cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines() == [
        "error: hydra/launcher=vmap_slurm: SLURM's controller does not answer (scontrol ping: Slurmctld(primary) "
        f"at {other.run('hostname', '-s').stdout.strip()} is DOWN); check SLURM_CONF and that the cluster is up."
    ]
    assert not sweep.exists() or [p.name for p in sweep.iterdir() if p.is_dir()] == []
    # the running cluster, asked for a GPU it does not have (the default config asks for one per node)
    refused = [arg for arg in args if "gpus_per_node" not in arg and "sweep.dir" not in arg]
    out = in_process("cvae_exp.train", [*refused, f"hydra.sweep.dir={tmp_path / 'gpu'}"], env=cluster.env(cli_env),
                     cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert (
        out.stderr.strip()
        .splitlines()[0]
        .startswith("error: sbatch refused the jobs (sbatch: error: Invalid generic resource (gres) specification)")
        and len(out.stderr.strip().splitlines()) == 1
    ), out.stderr


def test_a_two_job_sweep_through_sbatch(cluster, tiny_mnist, cli_env, separate, tmp_path):
    """hydra/launcher=slurm: one array job of two tasks; both job directories complete, equal to the runs
    trained without SLURM, cvae-report lists them, and no sacct noise on the console (job states from squeue:
    cvae_exp/runs/slurm.py)."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=slurm", *RESOURCES, f"hydra.sweep.dir={sweep}", *tiny_args(tiny_mnist, seed="0,1")]
    out = run_module("cvae_exp.train", args, env=cluster.env(cli_env), cwd=tmp_path)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert "sacct" not in console and "Bypassing" not in console and "Traceback" not in console, console
    assert len(list((sweep / ".submitit").glob("*_[01]/*_0_log.out"))) == 2  # ran as SLURM array tasks
    for seed in (0, 1):
        job = metrics(sweep / str(seed))
        assert job["step"] == STEPS and job["params_sha256"] == separate[seed]["params_sha256"]
    report = in_process("cvae_exp.report", [sweep], env=cli_env, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.count(" ok") >= 2, report.stdout


def test_b_a_requeued_job_continues_from_its_newest_checkpoint(cluster, tiny_mnist, cli_env, separate, tmp_path):
    """`scontrol requeue` of a running job: SIGTERM, a checkpoint at the current step, SLURM starts the same
    command again (resume=false is read as auto under SLURM), and the final parameters are the uninterrupted
    run's, bit for bit."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = cluster.sbatch(slurm_cluster.python_module("cvae_exp.train", *tiny_args(tiny_mnist, run, 0)), log, cli_env)
    wait_for_checkpoint(cluster, job, run, log)
    cluster.run("scontrol", "requeue", job)
    cluster.release(job)
    info = cluster.wait_job(job, {"COMPLETED"}, log)
    assert info["Restarts"] == "1"
    text = log.read_text()
    stopped = re.search(r"Stopped by SIGTERM at step (\d+) with the checkpoint", text)
    resumed = re.findall(r"Resumed from step (\d+)", text)
    assert stopped and 0 < int(stopped[1]) < STEPS, text[-3000:]
    assert resumed == [stopped[1]]  # from the checkpoint the stop wrote, the newest
    assert metrics(run)["params_sha256"] == separate[0]["params_sha256"]


def test_b_submitits_signal_before_the_time_limit_saves_then_requeues(cluster, tiny_mnist, cli_env, separate, tmp_path):
    """hydra/launcher=slurm asks SLURM for USR2 before the time limit (sbatch --signal=USR2@signal_delay_s);
    `scancel --signal=USR2` delivers the same now. The run saves a checkpoint at the current step first, then
    submitit's handler requeues the job, which continues from that checkpoint to the uninterrupted result."""
    sweep, log = tmp_path / "sweep", tmp_path / "launcher.log"
    args = ["-m", "hydra/launcher=slurm", *RESOURCES, f"hydra.sweep.dir={sweep}", *tiny_args(tiny_mnist, seed=1)]
    launcher = launch(args, cluster.env(cli_env), log)
    try:
        job = submitit_job(sweep, 0, launcher, log)
        wait_for_checkpoint(cluster, job, sweep / "0", log)
        cluster.run("scancel", "--signal=USR2", job)
        cluster.release(job)
        assert launcher.wait(slurm_cluster.JOB_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        launcher.kill()
    text = (sweep / "0" / "train.log").read_text()
    stopped = re.search(r"Stopped by SIGUSR2 at step (\d+) with the checkpoint", text)
    assert stopped and 0 < int(stopped[1]) < STEPS, text[-3000:]
    assert re.findall(r"Resumed from step (\d+)", text) == [stopped[1]]
    assert metrics(sweep / "0")["params_sha256"] == separate[1]["params_sha256"]


def test_c_two_tasks_are_one_run_logged_once(cluster, tiny_mnist, cli_env, separate, tmp_path):
    """`srun -n 2 cvae-train`: JAX's distributed runtime from SLURM's variables, over gloo; one run of two
    processes, the same val/elbo as one process, and each log line once (process 0's; the other's warnings only)."""
    run = tmp_path / "run"
    command = ["srun", "-n", "2", "--cpus-per-task=1", *slurm_cluster.python_module("cvae_exp.train",
               *tiny_args(tiny_mnist, run, 0, SHORT))]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, env=cluster.env(cli_env), cwd=tmp_path,
                         timeout=slurm_cluster.JOB_TIMEOUT_S, check=False)  # fmt: skip
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    two = metrics(run)
    assert (two["processes"], two["devices"]) == (2, 2)
    assert abs(two["val/elbo"] - separate["short"]["val/elbo"]) <= 1e-4
    assert console.count("Devices: 2 (cpu), processes: 2") == 1 and console.count("Done: ") == 1, console
    assert once_each(console) == [] and once_each((run / "train.log").read_text()) == []


@pytest.mark.parametrize("signal", ["TERM", "USR1"])
def test_d_a_cancelled_or_signalled_run_resumes_with_resume_true(
    signal, cluster, tiny_mnist, cli_env, separate, tmp_path
):
    """`scancel` (SIGTERM), or the USR1 that `sbatch --signal=USR1@...` sends before a time limit: the run saves
    a checkpoint at the current step and ends; `cvae-train hydra.run.dir=<run> resume=true` finishes it as if
    never stopped."""
    run, log = tmp_path / "run", tmp_path / "job.log"
    job = cluster.sbatch(slurm_cluster.python_module("cvae_exp.train", *tiny_args(tiny_mnist, run, 1)), log, cli_env)
    wait_for_checkpoint(cluster, job, run, log)
    cluster.run("scancel", *([] if signal == "TERM" else [f"--signal={signal}"]), job)
    info = cluster.wait_job(job, {"CANCELLED"} if signal == "TERM" else {"FAILED"}, log)
    if signal != "TERM":
        assert info["ExitCode"] == "138:0"  # 128 + SIGUSR1: stopped, not finished
    stopped = re.search(rf"Stopped by SIG{signal} at step (\d+) with the checkpoint", log.read_text())
    assert stopped and int(stopped[1]) in steps(run) and int(stopped[1]) < STEPS, log.read_text()[-3000:]
    assert not (run / "metrics.json").exists()
    ok(train([f"hydra.run.dir={run}", "resume=true"], cli_env, tmp_path / "resume.log"))
    assert f"Resumed from step {stopped[1]}" in (tmp_path / "resume.log").read_text()
    assert metrics(run)["params_sha256"] == separate[1]["params_sha256"]


def test_vmap_groups_run_as_slurm_jobs_and_resume_when_requeued(cluster, tiny_mnist, cli_env, separate, tmp_path):
    """hydra/launcher=vmap_slurm: four jobs (seeds 0, 1, 0, 1) in two partitions of two (max_members=2), one SLURM
    job each. The first group is requeued mid-run and continues from its newest checkpoint to the same parameters
    as the second, uninterrupted one, bit for bit; every job directory is an ordinary job's, as a local vmap sweep
    writes it, and each member equals its separate run (to float32 rounding: a vmapped program is not the same
    program, and 1,500 steps of Adam carry its rounding to about 3e-5 of val/elbo)."""
    sweep, log = tmp_path / "sweep", tmp_path / "launcher.log"
    args = ["-m", "hydra/launcher=vmap_slurm", "hydra.launcher.max_members=2", *RESOURCES,
            f"hydra.sweep.dir={sweep}", *tiny_args(tiny_mnist, seed="0,1,0,1")]  # fmt: skip
    launcher = launch(args, cluster.env(cli_env), log)
    try:
        job = submitit_job(sweep, 0, launcher, log)
        wait_for_checkpoint(cluster, job, sweep / "0", log)
        cluster.run("scontrol", "requeue", job)
        cluster.release(job)
        assert launcher.wait(slurm_cluster.JOB_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        launcher.kill()
    assert "4 jobs in 2 partition(s)" in log.read_text()
    results = [metrics(sweep / str(n)) for n in range(4)]
    for n, result in enumerate(results):
        job_dir, seed = sweep / str(n), n % 2
        assert result["group"]["partition"] == n // 2 and result["group"]["members"] == [n - seed, n - seed + 1]
        assert result["step"] == STEPS and (job_dir / "checkpoints" / str(STEPS)).is_dir()
        assert (job_dir / ".hydra" / "config.yaml").is_file() and (job_dir / "train.log").is_file()
        assert list((job_dir / "tb").iterdir())
        for key in ("val/elbo", "val/kl", "test/elbo", "test/recon"):
            assert result[key] == pytest.approx(separate[seed][key], rel=1e-4), (n, key)
    text = (sweep / "0" / "train.log").read_text()
    stopped = re.search(r"Stopped by SIGTERM at step (\d+) with every job's checkpoint", text)
    assert stopped and 0 < int(stopped[1]) < STEPS and f"job 0, Resumed from step {stopped[1]} " in text, text[-3000:]
    assert "Resumed" not in (sweep / "2" / "train.log").read_text()
    assert [r["params_sha256"] for r in results[:2]] == [r["params_sha256"] for r in results[2:]]
