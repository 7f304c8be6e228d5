"""How much of a training step is dispatch: the run's own jitted step called once per step from Python, against
the same step run `block` times inside one `jax.lax.scan` (one dispatch per block), on the same state.

    .venv/bin/python scripts/dispatch_share.py experiment=burda2016_vae data.path=<MNIST> [block=100 rounds=20]

Prints one JSON line: ms per step both ways (medians over `rounds` alternating windows of `block` steps), the
share of a step-by-step step that the scan removes (`scan_saves` = 1 - scan / loop), the cost of a call that
does no work with the same arguments and donation (`null_step_ms`, its share of a step `null_share`), and
whether both ways reach the same parameters after the same steps (the scan body is the same pure function).
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main(argv: list[str]) -> None:
    import jax
    from hydra import compose, initialize_config_dir

    from cvae_exp.cli import CONF_DIR  # also registers the config schemas
    from cvae_exp.config import validate
    from cvae_exp.training import experiment, steps

    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("block", "rounds"))
    block, rounds = int(opts.get("block", 100)), int(opts.get("rounds", 20))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[a for a in argv if a.split("=", 1)[0] not in ("block", "rounds")])
    validate(cfg)
    exp = experiment.build_experiment(cfg)
    mesh = experiment.training_mesh(cfg)
    placed = experiment.on_devices(exp, cfg, mesh)
    feed = placed.feed
    assert feed.on_device, "trainer.data_on_device=true: the step cuts its own batch"

    def one(state, arrays):
        return steps.train_update(
            state, feed.cut(arrays, state["step"]), graphdef=exp.graphdef, opt=exp.opt, task=exp.task
        )

    step = jax.jit(one, donate_argnums=(0,))

    def many(state, arrays):
        return jax.lax.scan(lambda s, _: one(s, arrays), state, None, length=block)

    scan = jax.jit(many, donate_argnums=(0,))

    def idle(state, arrays):  # the step's signature and donation, no work: what one call costs the host
        return {**state, "step": state["step"] + 1}, {"loss": state["step"]}

    null = jax.jit(idle, donate_argnums=(0,))
    arrays = feed(0)  # one epoch's order: enough for the windows timed here

    def fresh():  # the run's first state, built anew (the steps donate theirs)
        return jax.device_put(steps.init_state(exp.build_params(cfg.seed), exp.opt.tx, cfg.seed), placed.state_sharding)

    state = fresh()
    state, _ = step(state, arrays)  # compile both
    state, _ = scan(state, arrays)
    state, _ = null(state, arrays)
    jax.block_until_ready(state)
    loop_ms, scan_ms, null_ms = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(block):
            state, _ = null(state, arrays)
        jax.block_until_ready(state)
        null_ms.append((time.perf_counter() - t0) / block * 1e3)
        t0 = time.perf_counter()
        for _ in range(block):
            state, metrics = step(state, arrays)
        jax.block_until_ready(state)
        loop_ms.append((time.perf_counter() - t0) / block * 1e3)
        t0 = time.perf_counter()
        state, metrics = scan(state, arrays)
        jax.block_until_ready(state)
        scan_ms.append((time.perf_counter() - t0) / block * 1e3)

    # Same parameters both ways from the same state (a fresh copy of the first one for each).
    a, b = fresh(), fresh()
    for _ in range(block):
        a, _ = step(a, arrays)
    b, _ = scan(b, arrays)
    same = steps.params_sha256(a["params"]) == steps.params_sha256(b["params"])
    loop, scanned = statistics.median(loop_ms), statistics.median(scan_ms)
    print(
        json.dumps(
            {
                "loop_ms_per_step": loop,
                "scan_ms_per_step": scanned,
                "scan_saves": 1 - scanned / loop,
                "null_step_ms": statistics.median(null_ms),
                "null_share": statistics.median(null_ms) / loop,
                "block": block,
                "rounds": rounds,
                "batch_size": cfg.trainer.batch_size,
                "same_params_after_one_block": same,
                "device": str(jax.devices()[0]),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
