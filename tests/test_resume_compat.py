"""Resume tells data and configs apart by what they are, not by where they lie or which version wrote them:

- data is identified by its content (a SHA-256 of the decoded arrays, cached with them): the same data.path
  holding other digits (same split sizes) is refused, naming the path, unless resume_data_change=true; a
  checkpoint from before the digest resumes as before;
- a run saved by an older version, whose config lacks keys added since, resumes: each missing key takes the
  value that reproduces how the run behaved (cvae_exp.config.ADDED_KEYS), never a false "different ...".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_runs import metrics, steps, tiny, train
from conftest import write_hub_layout

from cvae_exp import cli
from cvae_exp.runs import checkpoint

assert cli.CONF_DIR  # registers the config schemas

# keys added to the config after the first versions (with what they mean for an old run)
LATER_KEYS = [
    "model.baseline_into",
    "model.baseline_frozen",
    "model.baseline_hidden",
    "trainer.patience",
    "trainer.min_delta",
    "trainer.skip_limit",
    "trainer.num_seeds",
    "trainer.data_on_device",  # not in ADDED_KEYS (either feed trains the same): today's default
    "data.quadrant_layout",
]


@pytest.fixture(scope="module")
def trained(cli_env, tmp_path_factory) -> dict[str, Path]:
    """20 steps (checkpoints at 10 and 20) on a private copy of the tiny data, which tests may change."""
    root = tmp_path_factory.mktemp("compat")
    data = write_hub_layout(root / "data")
    code, text = train(
        tiny(str(data), root / "run", {"trainer.max_steps": 20, "checkpoint.every": 10}), cli_env, root / "run.log"
    )
    assert code == 0, text[-3000:]
    return {"run": root / "run", "data": data, "root": root}


def rewrite_saved(run: Path, change) -> None:
    """`change(dict)` applied to the config (and data record) every checkpoint's meta and .hydra/config.yaml
    hold, as an older version would have written them: the meta's content hash recomputed."""
    for step in steps(run):
        file = run / "checkpoints" / str(step) / "meta" / "metadata"
        meta = json.loads(file.read_text())
        change(meta)
        meta[checkpoint.DIGEST]["meta"] = checkpoint.meta_sha256(meta)
        file.write_text(json.dumps(meta))
    record = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(record.read_text())
    change({"config": config, "data": {}})
    record.write_text(yaml.safe_dump(config))


def drop(meta: dict, dotted_keys: list[str]) -> None:
    for key in dotted_keys:
        *parents, leaf = key.split(".")
        node = meta["config"]
        for part in parents:
            node = node[part]
        node.pop(leaf)


def resume(run: Path, env, *extra: str) -> tuple[int, str]:
    args = [f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=30", *extra]
    return train(args, env, run.parent / f"{run.name}-resume.log")


def test_a_run_saved_before_later_keys_resumes(trained, cli_env, tmp_path):
    run = shutil.copytree(trained["run"], tmp_path / "old")
    rewrite_saved(run, lambda meta: drop(meta, LATER_KEYS))
    code, text = resume(run, cli_env)
    assert code == 0, text[-3000:]
    assert "Resumed from step 20" in text and metrics(run)["step"] == 30


def test_added_keys_take_the_values_they_had_before(trained):
    from cvae_exp.config import NOT_RECORDED, differs, onto_schema, saved_value

    old = yaml.safe_load((trained["run"] / ".hydra" / "config.yaml").read_text())
    for key in ("model.baseline_into", "data.quadrant_layout", "data.binarize_seed", "trainer.skip_limit"):
        section, leaf = key.split(".")
        old[section].pop(leaf)
    cfg = onto_schema(old)
    assert cfg.data.quadrant_layout == "top_first"  # the layout before left_first was added
    assert cfg.trainer.skip_limit == 1.0 and cfg.model.baseline_into == "prior"  # not aided: either means the same
    aided = {**old, "model": {**old["model"], "baseline_run": "/runs/baseline"}}
    assert saved_value(aided, "model.baseline_into") == "prior_and_generation"  # the aid's first wiring
    # a dynamic run from before binarize_seed scored another draw: not reproducible, so it differs
    assert saved_value(old, "data.binarize_seed") == NOT_RECORDED
    assert differs(old, {"data": {"binarize_seed": 42}}, "data.binarize_seed")
    assert not differs(old, {"model": {"kind": "cvae", "new_key": 3}}, "model.new_key")  # unknown then: not compared


def test_other_contents_at_the_same_path_are_refused(trained, cli_env, tmp_path):
    data = shutil.copytree(trained["data"], tmp_path / "data")
    run = shutil.copytree(trained["run"], tmp_path / "run")

    def trained_here(meta):  # as if trained on this copy
        meta["config"]["data"]["path"] = str(data)
        if meta["data"]:
            meta["data"]["source"] = f"parquet:{data.resolve()}"

    rewrite_saved(run, trained_here)
    write_hub_layout(data, seed=7)  # other digits, the same split sizes
    code, text = resume(run, cli_env, f"data.path={data}")
    assert code == 2, text[-3000:]
    assert (
        f"error: The contents of data.path={data} differ from the data the checkpoint at step 20 was trained on" in text
    )
    assert steps(run) == [10, 20] and metrics(run)["step"] == 20  # nothing changed
    code, text = resume(run, cli_env, f"data.path={data}", "resume_data_change=true")  # deliberately
    assert code == 0, text[-3000:]
    assert metrics(run)["step"] == 30


def test_a_checkpoint_from_before_the_content_digest_resumes(trained, cli_env, tmp_path):
    run = shutil.copytree(trained["run"], tmp_path / "run")
    rewrite_saved(run, lambda meta: meta["data"].pop("content_sha256", None))
    code, text = resume(run, cli_env)
    assert code == 0, text[-3000:]
    assert metrics(run)["step"] == 30
