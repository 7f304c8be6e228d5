"""A value given as `${oc.env:NAME}` is recorded as written, never resolved, wherever a run stores its config
(checkpoint meta, TensorBoard hparams, .hydra/, logs, metrics.json), by a single run and by the vmap launcher;
a resume with the variable set compares the run's config resolved, and one without it is refused by name."""

from __future__ import annotations

from pathlib import Path

from cli_runs import metrics, tiny, train

SECRET = "s3cr3t-token-7f1d9c"
WRITTEN = "${oc.env:CVAE_TEST_SECRET}"


def files_holding(root: Path, needle: str) -> list[str]:
    return [
        str(f.relative_to(root)) for f in sorted(root.rglob("*")) if f.is_file() and needle.encode() in f.read_bytes()
    ]


def test_a_secret_from_the_environment_is_never_written_resolved(tiny_mnist, cli_env, tmp_path):
    env = {**cli_env, "CVAE_TEST_SECRET": SECRET}
    run = tmp_path / "run"
    # data.hub is read only without data.path: the secret travels through the config and nowhere else
    args = tiny(tiny_mnist, run, {"trainer.max_steps": 10, "checkpoint.every": 10, "data.hub": WRITTEN})
    code, text = train(args, env, tmp_path / "run.log")
    assert code == 0, text[-3000:]
    assert files_holding(run, SECRET) == [] and SECRET not in text
    assert "checkpoints/10/meta/metadata" in files_holding(run, WRITTEN)  # recorded as written
    assert any(f.startswith("tb/") for f in files_holding(run, WRITTEN))  # the hparams summary too

    code, text = train([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=20"], env, tmp_path / "again.log")
    assert code == 0, text[-3000:]
    assert metrics(run)["step"] == 20 and files_holding(run, SECRET) == []

    unset = {k: v for k, v in env.items() if k != "CVAE_TEST_SECRET"}
    code, text = train([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=30"], unset, tmp_path / "unset.log")
    assert code == 2 and f"error: data.hub={WRITTEN} cannot be resolved" in text, text[-3000:]


def test_the_vmap_launcher_records_it_as_written_too(tiny_mnist, cli_env, tmp_path):
    env = {**cli_env, "CVAE_TEST_SECRET": SECRET}
    sweep = tmp_path / "sweep"
    args = tiny(tiny_mnist, sweep, {"trainer.max_steps": 10, "checkpoint.every": 10, "data.hub": WRITTEN})
    args = ["-m", "hydra/launcher=vmap", *(a for a in args if not a.startswith("hydra.run.dir=")), "seed=0,1"]
    code, text = train([*args, f"hydra.sweep.dir={sweep}"], env, tmp_path / "sweep.log")
    assert code == 0, text[-3000:]
    assert files_holding(sweep, SECRET) == []
    held = files_holding(sweep, WRITTEN)
    assert {"0/checkpoints/10/meta/metadata", "1/checkpoints/10/meta/metadata"} <= set(held)
    assert any(f.startswith("1/tb/") for f in held)
