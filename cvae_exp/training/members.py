"""The member axis of a vmap group: the jobs of a multirun that train as one program.

A job's config splits in two. Its *member values* (`MEMBER_KEYS`: the seed, the optimizer's scalars, the
KL weight and hybrid mix, the quadrants given, the step budget and early stopping) may differ between
the members of a group; everything else is its *static signature*, which changes shapes or the traced
program, and jobs of one signature form a partition. Inside a group, a member value that is the same for
every member stays a Python constant, exactly as in a separate run; one that differs is traced: the
optimizer's through `optax.inject_hyperparams` (it lives in the optimizer state, one value per member),
the task's as a per-member array beside the state, `data.n_given` as the mask picked by index.

A member's checkpoint is an ordinary single run's (`plain_state`): the injected optimizer state is saved
as the inner state it wraps, so cvae-eval, cvae-sample and `resume=true` read a group's job directory as
they read any run's.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hydra.utils import instantiate

from cvae_exp.config import dotted
from cvae_exp.training import steps
from cvae_exp.training.optim import Optimizer, make_optimizer

# The keys whose values may differ inside a group (optimizer.transform's float arguments, b1, b2, eps,
# weight_decay, ..., too); every other key is part of the static signature.
MEMBER_KEYS = (
    "seed",
    "optimizer.lr",
    "optimizer.clip_norm",
    "model.beta",
    "model.alpha",
    "data.n_given",
    "trainer.max_steps",
    "trainer.patience",
    "trainer.min_delta",
)
TASK_KEYS = {"model.beta": "beta", "model.alpha": "alpha", "data.n_given": "n_given"}  # traced into the Task


def member_values(plain: dict) -> dict[str, Any]:
    """The values of a job (a resolved plain config) that may differ inside its group."""
    values = dotted(plain)
    out = {k: values[k] for k in MEMBER_KEYS if k in values}
    for k, v in values.items():
        if k.startswith("optimizer.transform.") and isinstance(v, float):
            out[k] = v
    if out.get("optimizer.clip_norm") is None:  # no clipping is another program than some clipping
        out.pop("optimizer.clip_norm", None)
    if plain["optimizer"]["schedule"] == "cosine":  # the decay ends at max_steps: part of the program
        out.pop("trainer.max_steps")
    return out


def signature(plain: dict) -> str:
    """Everything of a job but its member values, as one string: jobs with equal signatures can share a group."""
    values = dotted(plain)
    for k in member_values(plain):
        values.pop(k)
    return json.dumps(values, sort_keys=True, default=str)


def partition(plains: list[dict], max_members: int | None = None) -> list[list[int]]:
    """Job indices grouped by static signature, in order of first appearance; groups larger than
    `max_members` are cut into consecutive chunks of at most that many."""
    by_signature: dict[str, list[int]] = {}
    for i, plain in enumerate(plains):
        by_signature.setdefault(signature(plain), []).append(i)
    size = max_members or max(len(plains), 1)
    return [jobs[i : i + size] for jobs in by_signature.values() for i in range(0, len(jobs), size)]


def varying(plains: list[dict]) -> list[str]:
    """The member keys whose values differ between the members of a group."""
    values = [member_values(p) for p in plains]
    return sorted(k for k in values[0] if len({json.dumps(v.get(k)) for v in values}) > 1)


# ----------------------------------------------------------------------------- the group's optimizer


@dataclasses.dataclass(frozen=True)
class MemberOptimizer:
    """Every member's optimizer, one transformation: the scalars in `traced` (those that differ between the
    members) are injected hyperparameters, read from each member's optimizer state; the rest are constants."""

    build: Callable[..., Optimizer]  # traced values by name -> the member's Optimizer (make_optimizer's)
    traced: tuple[str, ...]  # injected hyperparameter names: "lr", "clip_norm", or a transform argument

    def init(self, values: dict) -> optax.GradientTransformation:
        """Member's transformation (its init stores its own hyperparameter values)."""
        if not self.traced:
            return self.build().tx
        factory = lambda **hp: self.build(**hp).tx
        factory.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in self.traced]
        )
        return optax.inject_hyperparams(factory)(**{n: values[n] for n in self.traced})

    def for_state(self, tx: optax.GradientTransformation, opt_state) -> Optimizer:
        """Inside the member's traced step: the transformation and its learning-rate schedule."""
        if not self.traced:
            return self.build()._replace(tx=tx)
        return Optimizer(tx, self.build(**opt_state.hyperparams).schedule)


def member_optimizer(
    optimizer: dict, total_steps: int, traced_keys: list[str], steps_per_epoch: int | None = None
) -> tuple[MemberOptimizer, Callable]:
    """The group's MemberOptimizer from a member's optimizer config (plain), and `values(optimizer config)`,
    a member's injected values. `traced_keys`: the varying member keys (optimizer.* ones are injected);
    `steps_per_epoch`: the experiment's epoch, for the schedules counted in epochs."""
    names = tuple(k.split(".")[-1] for k in traced_keys if k.startswith("optimizer."))
    transform = instantiate(optimizer["transform"])  # a functools.partial of an optax constructor

    def build(**hp) -> Optimizer:
        kwargs = {**transform.keywords, **{k: v for k, v in hp.items() if k not in ("lr", "clip_norm")}}
        return make_optimizer(
            functools.partial(transform.func, *transform.args, **kwargs),
            hp.get("lr", optimizer["lr"]),
            optimizer["schedule"],
            optimizer["warmup_steps"],
            hp.get("clip_norm", optimizer["clip_norm"]),
            total_steps,
            steps_per_epoch,
        )

    def values(member_optimizer_cfg: dict) -> dict:
        return {n: member_optimizer_cfg.get(n, member_optimizer_cfg["transform"].get(n)) for n in names}

    return MemberOptimizer(build, names), values


# ----------------------------------------------------------------------------- states and steps


def initial_states(exp, plains: list[dict], traced: list[str], baseline: Any = None):
    """The group's optimizer and each member's transformation and fresh state (on the host): member i starts
    as a separate run of `plains[i]` would, from its seed's parameters (with the pre-trained `baseline`'s,
    `trained_run.baseline_params`, in its baseline submodule when given). `exp`: the partition's Experiment."""
    from cvae_exp.training.experiment import with_baseline

    first = plains[0]
    opt, values = member_optimizer(first["optimizer"], first["trainer"]["max_steps"], traced, exp.steps_per_epoch)
    txs, states = [], []
    for plain in plains:
        tx = opt.init(values(plain["optimizer"]))
        params = exp.build_params(plain["seed"])
        if baseline is not None:
            params = with_baseline(params, baseline, exp.baseline_run)
        txs.append(tx)
        states.append(steps.init_state(params, tx, plain["seed"]))
    return opt, txs, states


def plain_state(member_state: dict) -> dict:
    """A member's state as a single run saves it: an injected optimizer state unwrapped to the state it wraps."""
    opt_state = member_state["opt_state"]
    if isinstance(opt_state, optax.InjectStatefulHyperparamsState):
        opt_state = opt_state.inner_state
    return {**member_state, "opt_state": opt_state}


def from_plain(plain: dict, fresh: dict) -> dict:
    """A restored single-run state back into the member's shape (`fresh`: its initial state, whose injected
    hyperparameters are the member's own)."""
    opt_state = fresh["opt_state"]
    if isinstance(opt_state, optax.InjectStatefulHyperparamsState):
        opt_state = opt_state._replace(count=jnp.asarray(plain["step"], jnp.int32), inner_state=plain["opt_state"])
    else:
        opt_state = plain["opt_state"]
    return {**plain, "opt_state": opt_state}


def base_task(task: steps.Task, plain: dict) -> steps.Task:
    """`task` (built from one config) with the member-valued Task fields of the config `plain`."""
    values = dotted(plain)
    dtypes = {"beta": float, "alpha": float, "n_given": int}
    return dataclasses.replace(task, **{name: dtypes[name](values[key]) for key, name in TASK_KEYS.items()})


def task_values(plains: list[dict], traced: list[str]) -> dict[str, np.ndarray]:
    """The per-member arrays of the Task fields that differ (beta, alpha, n_given)."""
    out = {}
    for key in traced:
        if key in TASK_KEYS:
            section, name = key.split(".")
            dtype = np.int32 if name == "n_given" else np.float32
            out[TASK_KEYS[key]] = np.array([p[section][name] for p in plains], dtype)
    return out


def make_group_train_step(
    graphdef, opt: MemberOptimizer, tx, task: steps.Task, state_sharding, feed, members: int = 2, block: bool = False
):
    """The group's jitted step `(state, batch, hp) -> (state, metrics)`, vmapped over the members; `hp` holds
    the per-member arrays of the traced Task fields. Every member steps every time: one that is done (its
    budget, early stopping) is snapshotted by the loop when it finishes and ignored afterwards, which costs
    nothing per step (keeping its state with a select over the whole state ran the CPU group at 0.77 of
    the bare loop instead of 0.96)."""

    def member_step(state, batch, hp):
        member_task = dataclasses.replace(task, **hp)
        member_opt = opt.for_state(tx, state["opt_state"])
        return steps.train_update(state, batch, graphdef=graphdef, opt=member_opt, task=member_task)

    # one member's batch has no member axis (its feed has one order): every member of one sees the same
    step = jax.vmap(member_step, in_axes=(0, 0 if members > 1 else None, 0))
    return steps.jit_step(step, task, state_sharding, feed, block)


def make_group_eval_step(graphdef, task: steps.Task, out_sharding) -> Callable:
    """(params, batch, keys, hp) -> weighted sums per member; every member sees the same batch."""

    def member_eval(params, batch, key, hp):
        member_task = dataclasses.replace(task, **hp)
        return steps.eval_sums(params, batch, key, graphdef=graphdef, task=member_task)

    return jax.jit(jax.vmap(member_eval, in_axes=(0, None, 0, 0)), out_shardings=out_sharding)
