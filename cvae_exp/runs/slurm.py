"""SLURM as our launchers meet it (`hydra/launcher=slurm` and `vmap_slurm`, hydra_plugins/cvae_slurm_launcher):
whether the cluster is there, the submitit executor built from the launcher's keys, the jobs' states on a
cluster without an accounting database, and one sentence for each job that ended without a result.

Job states. submitit asks `sacct` for them. A cluster that keeps no accounting database
(AccountingStorageType=accounting_storage/none, as small and test clusters do) has nothing for sacct to read:
submitit then logs "Bypassing sacct error ..., status may be inaccurate" on every poll and learns a job's end
only from its result file, so a job that ends without one (cancelled, killed, refused by a check) is waited
for forever. On such a cluster `job_states()` gives submitit's jobs a watcher that reads `squeue` instead:
squeue lists running jobs, and finished ones for slurm.conf's MinJobAge (300 s by default); a job that is no
longer listed has ended (state ENDED). Where accounting is on, submitit's own watcher (sacct) is left as it is.
"""

from __future__ import annotations

import contextlib
import getpass
import io
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from cvae_exp.errors import UserError

log = logging.getLogger("cvae_exp")
_TIMEOUT_S = 10  # for scontrol and sinfo, which retry for a minute when the controller is away
# the keys of the launcher's config that are not sbatch parameters but submitit's executor's own
_INIT_KEYS = {"submitit_folder", "max_num_timeout"}


def launch_sweep(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    """`hydra/launcher=slurm`: hydra-submitit-launcher's launch (one array job, a task per job of the sweep,
    each running the task function through Hydra), after `check_cluster`, with `job_states()`, and every
    job that ended without a result named in one sentence (exit 2 when each said why itself, else 1). A
    refused sweep raises UserError (the plugin makes it one sentence and exit 2)."""
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides

    config = launcher.config
    if launcher.max_members is not None:
        raise UserError(
            f"hydra.launcher.max_members={launcher.max_members} is a key of hydra/launcher=vmap_slurm; "
            "hydra/launcher=slurm trains each job of the sweep on its own."
        )
    check_cluster("slurm", launcher.params.get("partition"))
    made = executor(launcher.params)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    log.info("SLURM sweep output dir: %s", sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    job_params, names = [], []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        shown = " ".join(filter_overrides(overrides))
        log.info("\t#%d : %s", idx, shown)
        names.append(f"job #{idx} ({shown})")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    with job_states():
        jobs = submit(made, launcher, *zip(*job_params, strict=True))
        results, failed, documented = outcomes(jobs, names)
    if failed:
        print("\n".join(failed), file=sys.stderr)
        sys.exit(2 if documented else 1)
    return results


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)


def check_cluster(launcher: str, partition: str | None) -> None:
    """Refuses, in one sentence, a multirun whose cluster cannot take jobs: no sbatch, a controller that does not
    answer, a partition it does not have. `launcher` names the choice (hydra/launcher=...)."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        raise UserError(
            f"hydra/launcher={launcher} submits SLURM jobs, and this machine has no sbatch on PATH: run the "
            "command on a SLURM login node (scripts/slurm_local.sh up starts a one-node cluster here)."
        )
    conf = os.environ.get("SLURM_CONF")
    if conf is not None and not Path(conf).is_file():
        raise UserError(f"hydra/launcher={launcher}: SLURM_CONF={conf} names no file (SLURM's clients read it).")
    try:
        ping = _run(["scontrol", "ping"])
    except subprocess.TimeoutExpired:
        ping = subprocess.CompletedProcess([], 1, "", f"no answer in {_TIMEOUT_S} s")
    said = ((ping.stdout + ping.stderr).strip().splitlines() or ["nothing"])[0]  # "Slurmctld(primary) at x is DOWN"
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        raise UserError(
            f"hydra/launcher={launcher}: SLURM's controller does not answer (scontrol ping: {said.strip()}); "
            "check SLURM_CONF and that the cluster is up."
        )
    if partition is not None:
        names = [p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).stdout.split()]
        if partition not in names:
            raise UserError(
                f"hydra.launcher.partition={partition} is not a partition of this cluster "
                f"(it has: {', '.join(names) or 'none'})."
            )


def executor(params: dict):
    """A submitit executor for SLURM from the launcher's keys (hydra-submitit-launcher's SlurmQueueConf), the
    way that plugin maps them: the shared keys as they are, the others with the `slurm_` prefix."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    made = submitit.AutoExecutor(
        cluster="slurm", folder=params["submitit_folder"], slurm_max_num_timeout=params["max_num_timeout"]
    )
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    made.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items() if k not in _INIT_KEYS})
    return made


def submit(made, function, *arguments) -> list:
    """`made.map_array(function, *arguments)`: one array job; sbatch's refusal (resources this cluster does not
    have: a GPU on a CPU partition, more memory than a node) is a UserError naming what sbatch said."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal too: it is in ours
            return made.map_array(function, *arguments)
    except (FailedJobError, FailedSubmissionError) as err:
        said = (str(err).strip().splitlines() or ["nothing"])[-1]
        raise UserError(
            f"sbatch refused the jobs ({said}): check hydra.launcher's resources (partition, gpus_per_node, "
            "cpus_per_task, mem_gb, timeout_min) against this cluster (sinfo -N -l lists its nodes)."
        ) from None


def accounting() -> bool:
    """Whether the cluster keeps an accounting database (what sacct reads)."""
    out = _run(["scontrol", "show", "config"]).stdout
    found = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.MULTILINE)
    return found is None or found.group(1) != "accounting_storage/none"


@contextlib.contextmanager
def job_states() -> Iterator[None]:
    """While inside, submitit's SLURM jobs read their states from squeue when the cluster has no accounting
    (see the module's docstring); afterwards submitit's own watcher is back."""
    from submitit.slurm.slurm import SlurmJob

    if accounting():
        yield
        return
    before = SlurmJob.watcher
    SlurmJob.watcher = _queue_watcher()
    try:
        yield
    finally:
        SlurmJob.watcher = before


# States that end a job unless the job is being requeued (it then turns PENDING within a second).
UNSETTLED_STATES = frozenset({"FAILED", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL"})


def _queue_watcher():
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """submitit's watcher, reading `squeue` (every job of this user, array tasks one a line) for sacct."""

        def _make_command(self) -> list[str] | None:
            if not self._registered - self._finished:
                return None
            return ["squeue", "--noheader", "--array", "--states=all", "--user", getpass.getuser(), "--format=%i|%T|%N"]

        def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
            text = string if isinstance(string, str) else string.decode()
            listed = {}
            for line in text.splitlines():
                job_id, _, rest = line.strip().partition("|")
                state, _, nodes = rest.partition("|")
                if job_id and state:
                    listed[job_id] = {"JobID": job_id, "State": state, "NodeList": nodes}
            # a job of ours that squeue no longer lists has ended (sbatch returns once the job is queued)
            for job_id in self._registered - self._finished:
                listed.setdefault(job_id, {"JobID": job_id, "State": "ENDED", "NodeList": ""})
            return self._settled(listed)

        def _settled(self, listed: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
            """A failed-looking state counts only when two reads in a row give it: while submitit requeues a
            preempted job, squeue can list it FAILED for a moment before it is pending again, and submitit
            would take that for the job's end (seen once in the cluster tests)."""
            seen = getattr(self, "_failing", set())
            self._failing = set()
            for job_id, info in listed.items():
                if info["State"] in UNSETTLED_STATES:
                    self._failing.add(job_id)
                    if job_id not in seen:
                        listed[job_id] = {**info, "State": "REQUEUED"}
            return listed

    return QueueWatcher(delay_s=15)  # squeue is cheap: a job's end is seen within 15 s


def outcomes(jobs: Sequence, names: Sequence[str]) -> tuple[list, list[str], bool]:
    """Waits for every submitit job; returns the results of task 0 (None for a job that failed), one sentence
    for each job that ended without a result or raised, naming it (`names`) and its log, and whether every
    failed job said why itself (its own one-sentence error: a documented failure, exit 2)."""
    from submitit.core.utils import UncompletedJobError

    results, failed, documented = [], [], True
    for job, name in zip(jobs, names, strict=True):
        try:
            results.append(job.results()[0])
        except UncompletedJobError as err:
            results.append(None)
            said = _said(job)
            documented = documented and said is not None
            why = f"failed: {said}" if said else _why(job, err)
            failed.append(f"error: {name}, SLURM job {job.job_id}, {why} (its log: {job.paths.stderr})")
    return results, failed, documented


def _said(job) -> str | None:
    """The job's own one-sentence error: the last 'error: ...' line of its stderr."""
    text = job.stderr() or ""
    said = [line.strip() for line in text.splitlines() if line.strip().startswith("error: ")]
    return said[-1][len("error: ") :] if said else None


def _why(job, err: Exception) -> str:
    from submitit.core.utils import FailedJobError

    if isinstance(err, FailedJobError):
        return "raised an exception"
    return f"ended {job.state} without a result (the same command continues it from its checkpoints)"
