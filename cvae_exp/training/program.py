"""What a group of models trains with, built once: the jitted step, the evaluation, the feed, the first states.

One model (a group of one) keeps the unvmapped step, so a single run's numerics are those of a plain jitted
loop. Several models (trainer.num_seeds=K, or a vmap launcher's group) are members of one vmapped step: the
member values that differ between them are traced (cvae_exp.training.members), the rest stay constants.

A *job* (cvae_exp.training.loop.Job) owns a range of members and has a plain state, the one its run's
checkpoints hold: one model's state, or (num_seeds) the K members' stacked states. `job_state`,
`job_target` and `group_state` convert between a job's plain state and the group's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax

from cvae_exp.training import devices, members, steps
from cvae_exp.training.feed import make_feed
from cvae_exp.training.images import drawings


@dataclass
class Program:
    plains: list[dict]  # each member's resolved config
    vmapped: bool  # False: one model, the unvmapped step
    exp: Any  # the Experiment (data, network)
    task: steps.Task  # the step's static Task (the traced fields replaced per member)
    jitted: Callable  # the jitted step, (state, feed(step), *extra) -> (state, metrics), donated state
    extra: tuple  # its arguments besides state and batch: () or (the traced Task fields on the devices,)
    jitted_block: Callable | None  # n steps in one dispatch (trainer.steps_per_dispatch > 1), or None
    eval_step: Callable  # (params, batch, keys) -> weighted sums (per member when vmapped)
    feed: Any  # feed(step): the step's second argument
    fresh: list[dict]  # each member's first state, on the host (the group's member shape)
    traced: list[str]  # the member keys that differ between members (traced per member)
    task_values: dict  # the traced Task fields, per member (numpy)
    state_sharding: Any
    batch_sharding: Any
    eval_sharding: Any
    eval_batch: int  # trainer.eval_batch_size rounded up to a multiple of the devices
    eval_keys: Any  # one validation key, or one per member

    @property
    def size(self) -> int:
        return len(self.plains)

    def step(self, state, batch):
        """One training step of every member: (state, feed(step)) -> (state, metrics)."""
        return self.jitted(state, batch, *self.extra)

    def block(self, state, arrays, n: int):
        """`n` training steps in one dispatch (inside one epoch): (state, the last step's metrics)."""
        return self.jitted_block(state, arrays, n, *self.extra)

    def evaluate(self, params, split) -> dict:
        """Means over a split with the fixed validation keys: floats, or arrays of one value per member."""
        return steps.evaluate(self.eval_step, params, split, self.eval_batch, self.eval_sharding, self.eval_keys)

    def member_params(self, params, i: int):
        return steps.member(params, i) if self.vmapped else params

    def member_key(self, i: int):
        return steps.member(self.eval_keys, i) if self.vmapped else self.eval_keys

    def member_task(self, i: int) -> steps.Task:
        values = {name: type(getattr(self.task, name))(v[i]) for name, v in self.task_values.items()}
        return dataclasses.replace(self.task, **values)

    def drawer(self) -> Callable:
        """(member i, params, key) -> {tag: grid}: what member i draws for TensorBoard (jitted per task)."""
        cache: dict = {}

        def draw(i: int, params, key):
            task = self.member_task(i)
            if task not in cache:
                cache[task] = drawings(self.exp.graphdef, task, self.exp.splits.val)
            return cache[task](self.member_params(params, i), key)

        return draw

    # ------------------------------------------------------------------ a job's plain state and the group's

    def job_state(self, state, span: range):
        """The plain state of the job owning members `span` (what its checkpoints hold), out of the group's."""
        if not self.vmapped or len(span) > 1:
            return state  # one model, or K seeds that are the whole group (nothing injected: only seeds differ)
        return members.plain_state(steps.member(state, span.start))

    def job_target(self, span: range):
        """The abstract plain state of that job, with the group's sharding: what its checkpoints restore onto."""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.state_sharding), self.fresh_job_state(span)
        )

    def group_state(self, job_states: list, spans: list[range]):
        """The group's state on the devices from each job's plain state (fresh or restored). Members that no
        span covers (jobs that stand at another step after a relaunch) hold their fresh state, at step 0:
        they are stepped along, ignored, so that the members that train run the very program of the whole
        group (a vmapped product rounds differently with another number of members)."""
        if not self.vmapped:
            return jax.device_put(job_states[0], self.state_sharding)
        per_member = list(self.fresh)
        for plain, span in zip(job_states, spans, strict=True):
            parts = [plain] if len(span) == 1 else [steps.member(plain, k) for k in range(len(span))]
            for p, i in zip(parts, span, strict=True):
                per_member[i] = members.from_plain(p, self.fresh[i])
        return jax.device_put(steps.stack(per_member), self.state_sharding)

    def fresh_job_state(self, span: range):
        """A job's plain state before training (its members' first states)."""
        if not self.vmapped:
            return self.fresh[0]
        plain = [members.plain_state(self.fresh[i]) for i in span]
        return plain[0] if len(span) == 1 else steps.stack(plain)


def build_program(exp, plains: list[dict], mesh, baseline: Any = None) -> Program:
    """The program that trains the members `plains` (resolved configs of one static signature) of `exp`, built
    from the first's config; `baseline`: the pre-trained baseline's params of an aided run
    (cvae_exp.runs.trained_run). One member is the unvmapped step."""
    t = plains[0]["trainer"]
    k = len(plains)
    vmapped = k > 1
    seeds = [p["seed"] for p in plains]
    state_sharding = devices.replicated(mesh)
    batch_sharding = devices.data_sharded(mesh, k)
    eval_sharding = devices.data_sharded(mesh)  # every member is evaluated on the same batch
    feed = make_feed(exp.splits.train, t["batch_size"], seeds, state_sharding, batch_sharding, t["data_on_device"])
    common = dict(
        plains=plains,
        exp=exp,
        feed=feed,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        eval_sharding=eval_sharding,
        eval_batch=devices.round_to_devices(t["eval_batch_size"], mesh),
    )
    blocks = t.get("steps_per_dispatch", 1) > 1 and feed.on_device
    if not vmapped:  # one model: the plain jitted step
        step = steps.make_train_step(exp.graphdef, exp.opt, exp.task, state_sharding, 1, feed)
        block = (
            steps.make_train_step(exp.graphdef, exp.opt, exp.task, state_sharding, 1, feed, True) if blocks else None
        )
        eval_step = steps.make_eval_step(exp.graphdef, exp.task, state_sharding, 1)
        fresh = [exp.init_state(seeds[0], baseline=baseline)]
        return Program(vmapped=False, task=exp.task, jitted=step, extra=(), jitted_block=block, eval_step=eval_step, fresh=fresh, traced=[], task_values={},
                       eval_keys=steps.eval_keys(seeds[0]), **common)  # fmt: skip
    traced = members.varying(plains)
    opt, txs, fresh = members.initial_states(exp, plains, traced, baseline)
    values = members.task_values(plains, traced)
    hp = jax.device_put(values, state_sharding)  # the traced Task fields, placed once
    task = members.base_task(exp.task, plains[0])  # the Task fields no member traces, from the members' own
    group_step = members.make_group_train_step(exp.graphdef, opt, txs[0], task, state_sharding, feed, k)
    block = (
        members.make_group_train_step(exp.graphdef, opt, txs[0], task, state_sharding, feed, k, True)
        if blocks
        else None
    )
    group_eval = members.make_group_eval_step(exp.graphdef, task, state_sharding)
    return Program(
        vmapped=True,
        task=task,
        jitted=group_step,
        extra=(hp,),
        jitted_block=block,
        eval_step=lambda params, batch, keys: group_eval(params, batch, keys, hp),
        fresh=fresh,
        traced=traced,
        task_values=values,
        eval_keys=jax.numpy.stack([steps.eval_keys(s) for s in seeds]),
        **common,
    )
