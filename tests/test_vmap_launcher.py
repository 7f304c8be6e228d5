"""`hydra/launcher=vmap`: a multirun's same-shape jobs train as one vmapped program, and each job stays an
ordinary job equal to its separate run. Partitioning is pure (no JAX); the group itself runs in process
(equivalence, per-member budgets and NaN failures, resume); one CLI sweep covers the real launcher path,
the job directories, cvae-report and HPARAMS."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import tbevents
import yaml
from conftest import compose_config, in_process, run_module, shrunk
from omegaconf import open_dict

from cvae_exp import cli
from cvae_exp.training import members

assert cli.CONF_DIR  # importing cvae_exp.cli registers the config schemas that compose_config needs

# ----------------------------------------------------------------------------- partitioning (pure)


def plain(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(list(overrides)), resolve=True)


def test_jobs_partition_by_static_signature_and_max_members_chunks():
    jobs = [
        plain(f"optimizer.lr={lr}", f"seed={s}", f"model.latent_dim={z}", "model.beta=0.5" if s else "model.beta=1")
        for z in (4, 8)
        for lr in (1e-3, 3e-4)
        for s in (0, 1)
    ]
    assert members.partition(jobs) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the latent size changes shapes
    assert members.partition(jobs, max_members=3) == [[0, 1, 2], [3], [4, 5, 6], [7]]
    assert members.varying(jobs[:4]) == ["model.beta", "optimizer.lr", "seed"]
    # what changes the traced program splits too; the step budget does only where the schedule depends on it
    assert len(members.partition([plain(), plain("trainer.batch_size=64"), plain("model.kind=vae")])) == 3
    assert len(members.partition([plain(), plain("trainer.max_steps=10"), plain("optimizer.transform.b1=0.8")])) == 1
    cosine = ("optimizer.schedule=cosine", "optimizer.warmup_steps=2")
    assert len(members.partition([plain(*cosine), plain(*cosine, "trainer.max_steps=10")])) == 2
    # clipping or not is another program; two clip norms are one
    assert len(members.partition([plain(), plain("optimizer.clip_norm=1.0")])) == 2
    assert len(members.partition([plain("optimizer.clip_norm=1.0"), plain("optimizer.clip_norm=2.0")])) == 1


def test_a_traced_quadrant_count_picks_the_same_mask():
    import jax
    import numpy as np

    from cvae_exp.data.geometry import MNIST
    from cvae_exp.data.pipeline import _given, quadrant_mask

    picked = jax.jit(lambda n: _given(n, "left_first", MNIST))
    for n in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(picked(np.int32(n))), quadrant_mask(n, "left_first", MNIST))


# ----------------------------------------------------------------------------- one group, in process

STEPS = 20
QUADRANTS = ("data.condition=quadrants", "trainer.eval_every=10", "checkpoint.every=10", "logger.images=false")
MEMBERS = {  # job number: its own overrides
    0: ("seed=0", "optimizer.lr=1e-3", f"trainer.max_steps={STEPS}"),
    1: ("seed=1", "optimizer.lr=3e-4", "model.beta=0.5", "data.n_given=2", "trainer.max_steps=10"),
    2: ("seed=0", "optimizer.lr=1e8", f"trainer.max_steps={STEPS}"),  # diverges: only this job fails
    3: ("seed=1", "optimizer.lr=1e-3", "trainer.max_steps=40", "trainer.patience=1", "trainer.min_delta=1e9"),
}  # job 3 stops early at its second evaluation (step 20): nothing can improve by 1e9


def make_job(tiny_mnist, run_dir: Path, num: int, overrides: tuple[str, ...]):
    from omegaconf import OmegaConf

    from cvae_exp.runs.vmap_sweep import SweepJob

    cfg = compose_config(shrunk(tiny_mnist, None, *QUADRANTS, *overrides), hydra_config=True)
    hydra = cfg.hydra
    with open_dict(hydra):
        hydra.job.name, hydra.job.num = "train", num
    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return SweepJob(num, task, hydra, run_dir, list(overrides))


def separate_run(tiny_mnist, run_dir: Path, overrides, monkeypatch) -> dict:
    from cvae_exp.runs.job import run_training

    run_dir.mkdir(parents=True)
    monkeypatch.chdir(run_dir)  # no Hydra: the run directory is the working directory
    run_training(compose_config(shrunk(tiny_mnist, None, *QUADRANTS, *overrides)))
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def group_dirs(tiny_mnist, tmp_path_factory):
    from cvae_exp.runs.vmap_sweep import train_partition

    root = tmp_path_factory.mktemp("group")
    jobs = [make_job(tiny_mnist, root / str(n), n, o) for n, o in MEMBERS.items()]
    group = train_partition(jobs, 0, ["seed", "optimizer.lr"])
    return root, jobs, group


def test_each_member_equals_its_separate_run_and_a_diverging_one_fails_alone(
    group_dirs, tiny_mnist, tmp_path, monkeypatch
):
    root, _, group = group_dirs
    assert "The loss became NaN or infinite at step" in group[2].error and group[2].metrics is None
    assert not (root / "2" / "metrics.json").exists()
    assert group[0].error is None and group[1].error is None
    for n in (0, 1):
        together = json.loads((root / str(n) / "metrics.json").read_text())
        alone = separate_run(tiny_mnist, tmp_path / str(n), MEMBERS[n], monkeypatch)
        assert together["step"] == alone["step"] == (STEPS if n == 0 else 10)  # its own budget
        for key in ("val/elbo", "val/kl", "test/elbo", "test/recon"):
            assert together[key] == pytest.approx(alone[key], rel=1e-5), (n, key)
        assert together["group"] == {
            "partition": 0,
            "index": n,
            "members": [0, 1, 2, 3],
            "size": 4,
            "traced": [
                "data.n_given",
                "model.beta",
                "optimizer.lr",
                "seed",
                "trainer.max_steps",
                "trainer.min_delta",
                "trainer.patience",
            ],
        }
        # an ordinary job: its record, log, TensorBoard run, single-run checkpoints
        assert (root / str(n) / ".hydra" / "config.yaml").is_file() and (root / str(n) / "train.log").is_file()
        assert tbevents.load(root / str(n) / "tb").steps("val/elbo") == ([10, 20] if n == 0 else [10])
    assert sorted(int(p.name) for p in (root / "1" / "checkpoints").iterdir()) == [10]  # frozen after its budget
    stopped = json.loads((root / "3" / "metrics.json").read_text())
    logged = tbevents.load(root / "3" / "tb")
    best = min(zip(logged.values("val/elbo"), logged.steps("val/elbo"), strict=True))[1]
    assert stopped["stopped_early"] and stopped["step"] == 20 and stopped["best_step"] == best  # the best logged
    assert sorted(int(p.name) for p in (root / "3" / "checkpoints").iterdir()) == [10, 20]


def test_a_killed_group_resumes_bit_for_bit(group_dirs):
    from cvae_exp.runs.vmap_sweep import train_partition

    root, jobs, _ = group_dirs
    kept = (0, 1, 3)
    before = {n: json.loads((root / str(n) / "metrics.json").read_text()) for n in kept}
    # as if killed after the step-10 checkpoints: the step-20 ones and every metrics.json gone; job 1 had
    # finished at 10, so the group restarts from step 10
    for n in (0, 3):
        shutil.rmtree(root / str(n) / "checkpoints" / str(STEPS))
    for n in kept:
        os.remove(root / str(n) / "metrics.json")
    group = train_partition([jobs[n] for n in kept], 0, [])
    assert [m.resumed_from for m in group] == [10, 10, 10]
    for n in kept:
        after = json.loads((root / str(n) / "metrics.json").read_text())
        assert after["params_sha256"] == before[n]["params_sha256"]
        assert after["val/elbo"] == before[n]["val/elbo"]


def test_a_job_dir_of_another_model_is_refused_by_name_and_left_as_it_is(group_dirs, tiny_mnist):
    from cvae_exp.errors import UserError
    from cvae_exp.runs.vmap_sweep import check

    root, _, _ = group_dirs
    before = sorted(p.name for p in (root / "0" / "checkpoints").iterdir())
    other = make_job(tiny_mnist, root / "0", 0, (*MEMBERS[0], "model.latent_dim=8"))
    with pytest.raises(
        UserError, match=r"^Job 0: The checkpoint at step \d+ .* was trained with different model.latent_dim"
    ):
        check(other, [])
    assert sorted(p.name for p in (root / "0" / "checkpoints").iterdir()) == before
    check(make_job(tiny_mnist, root / "0", 0, MEMBERS[0]), [])  # its own model: accepted


# ----------------------------------------------------------------------------- the real launcher, once


def test_cli_sweep_writes_ordinary_jobs_in_two_partitions_and_cvae_report_lists_them(tiny_mnist, cli_env, tmp_path):
    sweep = tmp_path / "sweep"
    common = ["-m", "hydra/launcher=vmap", *shrunk(tiny_mnist), "trainer.max_steps=10", "trainer.eval_every=10"]
    common += ["checkpoint.every=10", "logger.images=false"]
    args = [*common, "optimizer.lr=1e-3,3e-4", "model.latent_dim=2,4", f"hydra.sweep.dir={sweep}"]
    proc = in_process("cvae_exp.train", args, env=cli_env, cwd=tmp_path)  # Hydra finds the plugin as the CLI does
    assert proc.returncode == 0, proc.stderr[-3000:]
    groups = {}
    for n in range(4):
        job = sweep / str(n)
        given = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        result = json.loads((job / "metrics.json").read_text())
        assert result["step"] == 10 and (job / "checkpoints" / "10").is_dir() and (job / "train.log").is_file()
        groups.setdefault(given["model.latent_dim"], set()).add((result["group"]["partition"], n))
        assert tbevents.hparam_order(job / "tb")[:2] == ["optimizer.lr", "model.latent_dim"]  # swept keys first
        assert tbevents.hparams_shown_first(job / "tb", 2) == ["model.latent_dim", "optimizer.lr"]  # as TB sorts
        assert not [p for p in (job / "tb").iterdir() if p.is_dir()]  # one TensorBoard run per job
    assert sorted(len(g) for g in groups.values()) == [2, 2]  # two partitions, one per latent size
    assert len({p for g in groups.values() for p, _ in g}) == 2
    report = in_process("cvae_exp.report", [sweep], env=cli_env, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-2000:]
    assert report.stdout.count(" ok") >= 4

    refused = [*common, "optimizer.lr=1e-3,0", f"hydra.sweep.dir={tmp_path / 'no'}"]
    refused = run_module("cvae_exp.train", refused, env=cli_env, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Job 1: optimizer.lr=0") and "must be positive" in lines[0]
    assert sorted(p.name for p in (tmp_path / "no").iterdir()) == ["multirun.yaml"]  # no job directory
