"""What a finished training run writes to metrics.json (`cvae_exp.runs.metrics.final_metrics`), without training:
its inputs are made by hand, so each rule of the file has its own check. No JAX."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvae_exp.runs.metrics import final_metrics, strict, summarize

MACHINE = {"devices": 2, "processes": 1, "hardware": "2 x cpu (cpu), 2 CPU cores"}


class Early:
    def __init__(self, done: bool, best_step: int | None):
        self.done, self.best_seen_step = done, best_step


def seed_result(seed: int, elbo: float, skipped: int) -> dict:
    return {
        "seed": seed,
        "val/elbo": elbo,
        "test/elbo": elbo + 1,
        "skipped_steps": skipped,
        "params_sha256": f"h{seed}",
    }


def metrics(per_seed, val, test, **changes) -> dict:
    args = dict(
        step=60,
        val=val,
        test=test,
        per_seed=per_seed,
        steps_run=60,
        batch_size=100,
        train_seconds=2.0,
        wall_seconds=5.0,
        previous={},
        source="parquet:data",
        train_examples=55000,
        early=Early(False, None),
        machine=MACHINE,
    )
    return final_metrics(**(args | changes))


def test_one_seed_reports_its_values_and_no_seed_list():
    out = metrics([seed_result(5, 185.0, 1)], {"val/elbo": 185.0}, {"test/elbo": np.float64(184.0)})
    assert out["val/elbo"] == 185.0 and out["test/elbo"] == 184.0 and isinstance(out["test/elbo"], float)
    assert out["examples_per_s"] == 60 * 100 / 2.0
    assert out["params_sha256"] == "h5" and out["skipped_steps"] == 1
    assert (out["devices"], out["processes"], out["hardware"]) == (2, 1, MACHINE["hardware"])
    assert (out["wall_s"], out["data_source"], out["train_examples"], out["step"]) == (5.0, "parquet:data", 55000, 60)
    assert (out["stopped_early"], out["best_step"]) == (False, None)
    assert "num_seeds" not in out and "seeds" not in out and "per_seed" not in out


def test_several_seeds_report_means_every_seed_and_the_first_seeds_hash():
    per_seed = [seed_result(5, 180.0, 1), seed_result(6, 190.0, 2)]
    val = summarize({"val/elbo": np.array([180.0, 190.0])})  # as the loop's last evaluation leaves it
    out = metrics(per_seed, val, {"test/elbo": np.array([181.0, 191.0])}, early=Early(True, 40))
    assert out["val/elbo"] == 185.0 and out["test/elbo"] == 186.0
    assert "per_seed" not in out  # the seeds' own values are under "seeds"
    assert out["num_seeds"] == 2 and out["seeds"] == per_seed
    assert out["examples_per_s"] == 60 * 100 * 2 / 2.0  # all seeds together
    assert out["skipped_steps"] == 3 and out["params_sha256"] == "h5"
    assert (out["stopped_early"], out["best_step"]) == (True, 40)


def test_a_run_that_trained_nothing_keeps_the_throughput_it_had():
    out = metrics([seed_result(5, 185.0, 0)], {"val/elbo": 185.0}, {}, steps_run=0, previous={"examples_per_s": 812.5})
    assert out["examples_per_s"] == 812.5
    assert metrics([seed_result(5, 185.0, 0)], {}, {}, steps_run=0)["examples_per_s"] is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_written_as_null(bad):
    out = strict(metrics([seed_result(5, bad, 0)], {"val/elbo": bad}, {"test/elbo": 1.0}))
    assert out["val/elbo"] is None and out["test/elbo"] == 1.0
