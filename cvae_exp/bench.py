"""`cvae-bench`: the real training step on the real data path, timed, beside a bare JAX loop.

    cvae-bench experiment=sohn2015 data.path=<mnist> trainer.batch_size=128 bench.steps=150

    cvae-bench experiment=sohn2015 data.path=<mnist> trainer.batch_size=128 bench.members=8   (a vmap group)

Prints one JSON object as its last line (and writes bench.json into the run directory):
examples_per_s (all seeds together), step_ms (median), flops_per_example (see `step_flops`),
peak_flops and peak_source (the device's known dense peak where we know it, else the best of repeated
same-dtype matrix products timed here; never below the rate the step itself reached), mfu (in [0, 1]), and, with bench.reference=true, the bare
loop's examples_per_s and the ratio between the two (timed in alternating windows, medians); with
trainer.precision=bf16 also the same loop in fp32 (fp32_examples_per_s, speedup_over_fp32).
No logging, evaluation or checkpoints.
"""

from __future__ import annotations

import json
import statistics
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from cvae_exp.cli import CONF_DIR, console, exit_on_user_error
from cvae_exp.config import check_data_path, check_keys, check_targets, validate
from cvae_exp.errors import UserError

WINDOW = 10  # steps between host syncs while timing; step_ms is the median over windows


def timed_windows(runners: dict, steps: int, window: int = WINDOW) -> dict[str, list[float]]:
    """Seconds per step of each runner, window by window, the runners taking turns.

    `runners[name](n)` runs n steps and blocks on the result. Alternating windows expose every runner
    to the same machine conditions (frequency changes, other processes), so their ratio is fair.
    """
    per_step = {name: [] for name in runners}
    for start in range(0, steps, window):
        n = min(window, steps - start)
        for name, run in runners.items():
            t0 = time.perf_counter()
            run(n)
            per_step[name].append((time.perf_counter() - t0) / n)
    return per_step


# Dense tensor-core peaks (no sparsity) from NVIDIA's data sheets, SXM parts; fp32 matmuls run as TF32 there
# under JAX's default precision. H200 is the H100's chip with more memory.
KNOWN_PEAKS = {
    "H100": {"fp32": 494.7e12, "bf16": 989.4e12},
    "H200": {"fp32": 494.7e12, "bf16": 989.4e12},
}


def measured_peak(dtype_name: str, device) -> float:
    """FLOP/s of large square matrix products in `dtype`: the best over a few sizes and repeats."""
    import jax
    import jax.numpy as jnp

    sizes = (4096, 8192) if device.platform != "cpu" else (1024, 2048, 3072)
    dtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    mm = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
    best = 0.0
    for n in sizes:
        a = jax.device_put(jnp.ones((n, n), dtype), device)
        mm(a).block_until_ready()
        for _ in range(5 if device.platform == "cpu" else 20):
            t0 = time.perf_counter()
            mm(a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def peak(dtype_name: str, device, achieved: float) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it comes from). A measured peak is a lower estimate of the real one:
    where the training step itself ran faster (`achieved`, per device), the step's rate is the bound."""
    for name, peaks in KNOWN_PEAKS.items():
        if name in device.device_kind:
            return peaks[
                dtype_name
            ], f"known: NVIDIA {name} SXM dense {'TF32' if dtype_name == 'fp32' else 'BF16'} peak"
    measured = measured_peak(dtype_name, device)
    source = f"measured: best of repeated {dtype_name} square matrix products on this device"
    if achieved > measured:
        return achieved, source + ", raised to the training step's own rate, which exceeded them"
    return measured, source


def step_flops(step, *args) -> float:
    """FLOPs of one call: XLA's cost analysis of the lowered (not yet compiled) module, where every backend
    counts the matmuls and convolutions (a GPU's compiled module hides them in library calls); where a backend
    gives none, the matrix products and convolutions of the jaxpr (`jaxpr_flops`), which dominate this model's
    count."""
    import jax

    lowered = step.lower(*args)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        return float(cost["flops"])
    return jaxpr_flops(jax.make_jaxpr(step)(*args).jaxpr)


def jaxpr_flops(jaxpr) -> float:
    """2 x the multiply-adds of every matrix product (M x N x K) and convolution in `jaxpr` and the jaxprs
    nested in it (jit, custom_vjp, scan and vmap bodies; a scan's body counted once per iteration)."""
    import math

    from jax.extend.core import ClosedJaxpr, Jaxpr

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            total += 2.0 * _conv_macs(eqn)
        times = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():  # nested jaxprs: jit, custom_vjp, vmap'd bodies, ...
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, ClosedJaxpr):
                    total += times * jaxpr_flops(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    total += times * jaxpr_flops(sub)
    return total


def _conv_macs(eqn) -> float:
    """Multiply-adds of one `conv_general_dilated`: per output element, the kernel positions that meet a real
    input value (not padding, not a hole of lhs dilation, as XLA counts them), times the input features the
    kernel reads. The backward pass's transposed and dilated convolutions are counted the same way, so a
    stride-2 convolution's gradients count what its forward pass does, not the zeros they skip."""
    import math

    p = eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs, rhs, out = (v.aval.shape for v in (eqn.invars[0], eqn.invars[1], eqn.outvars[0]))
    pairs = 1
    for d, (lo, _) in enumerate(p["padding"]):
        size_in, size_k, size_out = lhs[lhs_spec[2 + d]], rhs[rhs_spec[2 + d]], out[out_spec[2 + d]]
        a, r, s = p["lhs_dilation"][d], p["rhs_dilation"][d], p["window_strides"][d]
        extent = (size_in - 1) * a + 1  # the dilated input
        pairs *= sum(
            1
            for o in range(size_out)
            for k in range(size_k)
            if 0 <= o * s + k * r - lo < extent and (o * s + k * r - lo) % a == 0
        )
    return math.prod(out[i] for i in out_spec[:2]) * pairs * rhs[rhs_spec[1]]


def bare_loop(exp, state, batch, warmup: int, seeds: int = 1):
    """A runner for the same model and loss in a plain loop: one jitted step with donated state, one
    batch already on the device, no data feeding, no metrics, no counters (vmapped over the seed axis
    when `seeds` > 1, as the framework's step is)."""
    import jax
    import optax

    from cvae_exp.training.steps import loss_fn

    graphdef, tx, task = exp.graphdef, exp.opt.tx, exp.task

    def step(params, opt_state, batch, key, i):
        grads = jax.grad(lambda p: loss_fn(p, graphdef, batch, key, i, task, train=True)[0].mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if seeds > 1:
        step = jax.vmap(step, in_axes=(0, 0, 0, None, None))
    step = jax.jit(step, donate_argnums=(0, 1))
    params, opt_state = state["params"], state["opt_state"]
    key = jax.random.key(0)
    count = 0

    def run(n):
        nonlocal params, opt_state, count
        for _ in range(n):
            params, opt_state = step(params, opt_state, batch, key, count)
            count += 1
        jax.block_until_ready(params)

    run(warmup)
    return run


def program_loop(exp, cfg: DictConfig, mesh, warmup: int, plains: list[dict]):
    """The step the training loop builds (cvae_exp.training.program) as a runner, with the run's feed (the
    split on the device, or host batches by step number) and donation: one model, K seeds, or a vmap group
    of the members `plains`. Returns (runner, flops per example from XLA, the first batch on the device, the
    members' first states as plain single-run states for the bare loop, the traced keys)."""
    import jax

    from cvae_exp.config import trusted_modules
    from cvae_exp.runs.trained_run import baseline_params
    from cvae_exp.training import devices, members, steps
    from cvae_exp.training.program import build_program

    program = build_program(exp, plains, mesh, baseline_params(cfg.model.baseline_run, trusted_modules(cfg)))
    spans = [range(i, i + 1) for i in range(program.size)]
    state = program.group_state([program.fresh_job_state(span) for span in spans], spans)
    feed = program.feed
    first = devices.put_batch(feed.sampler.batch(0), program.batch_sharding)  # the bare loop's one batch
    flops = step_flops(program.jitted, state, feed(0), *program.extra) / (cfg.trainer.batch_size * program.size)
    plain = [members.plain_state(s) for s in program.fresh]
    initial = jax.device_put(plain[0] if program.size == 1 else steps.stack(plain), program.state_sharding)
    initial = jax.tree.map(lambda a: a.copy(), initial)  # its own buffers: the program's loop donates its state
    count, metrics = 0, None

    per_dispatch = cfg.trainer.steps_per_dispatch if program.jitted_block is not None else 1
    epoch = getattr(feed, "steps_per_epoch", None) or per_dispatch

    def run(n):
        nonlocal state, metrics, count
        end = count + n
        while count < end:  # as the loop runs them: blocks of steps_per_dispatch inside an epoch, or one step
            k = min(per_dispatch, end - count, epoch - count % epoch)
            state, metrics = program.block(state, feed(count), k) if k > 1 else program.step(state, feed(count))
            count += k
        jax.block_until_ready(metrics)

    run(warmup)
    return run, flops, first, initial, program.traced


def member_plains(cfg: DictConfig, members: int) -> list[dict]:
    """The models cvae-bench times together: one; trainer.num_seeds=K seeds; or (bench.members=K) a vmap
    group of K members with seeds seed..seed+K-1 and, in turn, optimizer.lr and lr / 3, so the learning rate
    is an injected per-member hyperparameter, as in an lr x seed sweep."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(cfg, resolve=True)
    if not members:
        return [{**base, "seed": cfg.seed + i} for i in range(cfg.trainer.num_seeds)]
    plains = []
    for i in range(members):
        lr = base["optimizer"]["lr"] / (3 if i % 2 else 1)
        plains.append({**base, "seed": cfg.seed + i, "optimizer": {**base["optimizer"], "lr": lr}})
    return plains


def bench(cfg: DictConfig) -> dict:
    from cvae_exp.runs import launch

    launch.begin()  # a refused bench leaves nothing behind (cvae_exp.runs.launch.discard)
    check_keys(cfg)  # the bench's pre-flight: keys, values, the data path, the targets
    validate(cfg)
    check_data_path(cfg)
    check_targets(cfg)  # imports optax (and JAX): after the checks that need nothing

    from cvae_exp.training import devices

    devices.initialize_distributed(cfg.cluster)
    import jax

    from cvae_exp.runs.rundir import current_run_dir
    from cvae_exp.training.experiment import build_experiment, training_mesh

    train, options = cfg.trainer, cfg.bench
    if options.members and (options.members < 2 or train.num_seeds != 1):
        raise UserError(
            f"bench.members={options.members} times a vmap group of at least 2 members of one model each: "
            "set it to 2 or more, with trainer.num_seeds=1."
        )
    mesh = training_mesh(cfg)
    num_models = options.members or train.num_seeds  # trained together, vmapped: seeds or group members
    exp = build_experiment(cfg)
    launch.accept(current_run_dir(), cfg)  # checked and loaded: .hydra/ and the log may reach the run dir
    plains = member_plains(cfg, options.members)
    framework, flops_per_example, first, initial, traced = program_loop(exp, cfg, mesh, options.warmup, plains)
    runners = {"framework": framework}
    if options.reference:
        runners["reference"] = bare_loop(exp, initial, first, options.warmup, num_models)
        if train.precision == "bf16":  # the same loop in fp32, timed in the same alternating windows
            fp32_cfg = cfg.copy()
            fp32_cfg.trainer.precision = "fp32"
            fp32_exp = build_experiment(fp32_cfg)
            runners["fp32"] = program_loop(
                fp32_exp, fp32_cfg, mesh, options.warmup, member_plains(fp32_cfg, options.members)
            )[0]
    per_step = timed_windows(runners, options.steps, max(WINDOW, train.steps_per_dispatch))
    examples_per_s = {
        name: train.batch_size * num_models / statistics.median(times) for name, times in per_step.items()
    }
    step_s = statistics.median(per_step["framework"])
    device = jax.devices()[0]
    achieved = examples_per_s["framework"] * flops_per_example
    device_peak, peak_source = peak(train.precision, device, achieved / mesh.size)
    peak_flops = device_peak * mesh.size
    result = {
        "examples_per_s": examples_per_s["framework"],  # all seeds (or members) together
        "step_ms": step_s * 1e3,
        "flops_per_example": flops_per_example,
        "peak_flops": peak_flops,
        "peak_source": peak_source,
        "mfu": achieved / peak_flops if peak_flops else None,
        "device": f"{device.platform}:{device.device_kind}",
        "devices": mesh.size,
        "processes": jax.process_count(),
        "batch_size": train.batch_size,
        "precision": train.precision,
        "num_seeds": train.num_seeds,
        "members": options.members or None,  # a vmap group's members (bench.members), all together in examples_per_s
        "traced": traced if options.members else None,  # the member keys the group traced
        "steps": options.steps,
        "model": cfg.model.kind,
        "hidden": list(cfg.model.hidden),
        "net": OmegaConf.to_container(cfg.model.net, resolve=True),  # the networks timed (model/net=...)
        "latent_dim": cfg.model.latent_dim,
    }
    if options.reference:
        ref = examples_per_s["reference"]
        result |= {"reference_examples_per_s": ref, "ratio_to_reference": examples_per_s["framework"] / ref}
    if "fp32" in examples_per_s:
        fp32 = examples_per_s["fp32"]
        result |= {"fp32_examples_per_s": fp32, "speedup_over_fp32": examples_per_s["framework"] / fp32}
    run_dir = current_run_dir()
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
@exit_on_user_error
@console
def main(cfg: DictConfig) -> None:
    print(json.dumps(bench(cfg)))


if __name__ == "__main__":
    main()
