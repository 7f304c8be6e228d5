"""Orbax checkpoints: one factory, saving, and the resume order written down once.

Resume order: `resume=false` starts fresh (and refuses a run directory that already holds
checkpoints, so nothing on disk is overwritten); `resume=true` restores the newest checkpoint in
`<run dir>/checkpoints/` that restores cleanly, skipping (and naming) any that does not, and moves
the skipped ones to `<run dir>/damaged_checkpoints/` (nothing is deleted); `resume=auto` does the
same when there is a checkpoint and starts fresh otherwise. A resume whose config changes what the
arrays' shapes depend on (SHAPE_KEYS) is refused before anything is restored.

Each checkpoint `<step>/` holds two items: `state` (step, params, optimizer state, RNG key data;
restored onto abstract arrays that carry the target sharding) and `meta` (JSON: the config, the data it
was trained on and the metrics at that step). Checkpoints kept: the newest `keep`, plus the best by val/elbo.

Verified: `meta["sha256"]` records, at save time, a SHA-256 of the state's array values and one of the
rest of `meta`. A restore (resume, cvae-eval, cvae-sample) recomputes both and checks that the parameters
are finite; a checkpoint that fails is reported by step and path, set aside in `damaged_checkpoints/`
(`set_aside`) and the next one is tried. Checkpoints saved before the hash existed restore with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cvae_exp.errors import UserError

log = logging.getLogger(__name__)
pp = ocp.checkpoint_managers.preservation_policy

# Keys whose change makes a checkpoint's arrays mean something else (or not fit at all).
SHAPE_KEYS = (
    "model.kind",
    "model.hidden",
    "model.latent_dim",
    "model.prior",
    "model.likelihood",
    "model.mixtures",
    "model.activation",
    "data.name",
    "data.condition",
    "optimizer.transform",
    "optimizer.clip_norm",
    "trainer.num_seeds",
    "model.baseline_run",
    "model.baseline_hidden",
    "model.baseline_into",
    "model.net",  # every network's builder and its keys (a config saved without it: the MLP)
)


def _quiet_orphaned_reads() -> None:
    """Drops the "Event loop is closed" errors of TensorStore reads that outlive an Orbax restore.

    When a damaged checkpoint fails to restore, Orbax closes its event loop while other reads are still
    in flight; each one then reports, as an unraisable exception, a traceback that says nothing about
    the checkpoint (that is reported once, by step and path). Every other unraisable error passes on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "quiets_orphaned_reads", False):
        return

    def hook(unraisable):
        err = unraisable.exc_value
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed":
            return
        if _abandoned_orbax_read(unraisable):
            return
        previous(unraisable)

    hook.quiets_orphaned_reads = True
    sys.unraisablehook = hook


def _abandoned_orbax_read(unraisable) -> bool:
    """An Orbax read coroutine of a restore that failed (a damaged checkpoint, or one deleted while being read),
    closed when it is collected: Orbax turns the GeneratorExit into "Encountered error while reading array
    index", which Python can only print ("Exception ignored in: <coroutine ...>", a traceback). The restore's
    failure itself is reported once, by step and path."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is None or "/orbax/" not in code.co_filename.replace("\\", "/"):
        return False
    err = unraisable.exc_value
    while err is not None:
        if isinstance(err, GeneratorExit):
            return True
        err = err.__cause__ or err.__context__
    return False


def make_manager(run_dir: Path, keep: int, read_only: bool = False) -> ocp.CheckpointManager:
    """The one CheckpointManager of a run, under `<run dir>/checkpoints` (Orbax needs an absolute path)."""
    _quiet_orphaned_reads()
    # max_to_keep together with best_fn would evict the newest checkpoints and break resume;
    # a combined preservation policy keeps the newest `keep` and the best one.
    policy = pp.AnyPreservationPolicy(
        [
            pp.LatestN(n=keep),
            pp.BestN(get_metric_fn=lambda m: -m["val/elbo"], n=1, keep_checkpoints_without_metrics=False),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        # The step's folders are made in save() itself, so a folder that cannot be created fails there, on
        # this thread; made asynchronously, the failure left Orbax's other save threads waiting 20 minutes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
    )
    return ocp.CheckpointManager((run_dir / "checkpoints").resolve(), item_names=("state", "meta"), options=options)


def state_sha256(state: Any) -> str:
    """SHA-256 over the state's array values (leaves in sorted path order, with dtype and shape)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]  # host sync: checkpoint steps only
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        a = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def meta_sha256(meta: dict) -> str:
    """SHA-256 of the JSON item as Orbax writes and reads it back, without the hash itself."""
    body = {k: v for k, v in meta.items() if k != DIGEST}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


DIGEST = "sha256"


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Starts an async save of `state` and `meta` with their content hash; `meta["val/elbo"]`, when present,
    ranks the checkpoint for 'best'."""
    meta = {**meta, DIGEST: {"state": state_sha256(state), "meta": meta_sha256(meta)}}
    metrics = {"val/elbo": meta["val/elbo"]} if "val/elbo" in meta else None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, metrics=metrics, force=True)


def raise_failed_save(manager: ocp.CheckpointManager) -> None:
    """Raises the error of a background save that failed (a full disk, a vanished folder); while a save
    is still running it returns at once, so the loop can call it on log steps."""
    if not manager.is_saving_in_progress():
        manager.wait_until_finished()  # re-raises a finished save's error; cheap when there is none


def abstract(state: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `state`, the target that restored arrays are placed onto."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


@dataclass
class Restored:
    step: int
    state: Any
    meta: dict
    damaged: list[int] = field(default_factory=list)  # steps tried before it that failed (to set aside)


def restore_newest(manager: ocp.CheckpointManager, target: Any) -> Restored | None:
    """The newest checkpoint that restores and verifies, or None when there is none."""
    return restore_first(manager, target, sorted(manager.all_steps(), reverse=True))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The JSON item of one checkpoint, or None when it cannot be read or does not match its hash."""
    try:
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception:  # a damaged checkpoint; restore_first reports it when it matters
        return None
    digest = meta.get(DIGEST)
    return meta if digest is None or digest.get("meta") == meta_sha256(meta) else None


def first_meta(manager: ocp.CheckpointManager, steps: list[int]) -> tuple[int, dict] | None:
    """(step, meta) of the first of `steps` whose JSON item reads and verifies (only JSON is read)."""
    for step in steps:
        meta = read_meta(manager, step)
        if meta is not None:
            return step, meta
    return None


def newest_meta(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """(step, meta) of the newest checkpoint whose JSON item verifies; only JSON is read, so a resume with a
    changed model is refused in milliseconds rather than failing on mismatched array shapes."""
    return first_meta(manager, sorted(manager.all_steps(), reverse=True))


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves checkpoints that failed to restore or verify to `<run dir>/damaged_checkpoints/`, so that a
    resumed run can save those steps again and the newest-N policy does not count them; nothing is
    deleted. A move the file system refuses raises (OSError: one sentence, exit 74)."""
    directory = Path(manager.directory)
    for s in steps if jax.process_index() == 0 else []:  # one process moves, all see the result
        dest = directory.parent / "damaged_checkpoints" / str(s)
        n = 1
        while dest.exists():  # the same step damaged again in a later resume
            dest, n = dest.with_name(f"{s}-{n}"), n + 1
        dest.parent.mkdir(exist_ok=True)
        (directory / str(s)).rename(dest)
        log.warning("Moved the damaged checkpoint at step %d to %s (kept, not deleted).", s, dest)
    if steps:
        ocp.multihost.sync_global_processes("set_aside")
        manager.reload()


def best_first(manager: ocp.CheckpointManager) -> list[int]:
    """Steps ordered best val/elbo first; checkpoints without a val/elbo follow, newest first."""
    steps = sorted(manager.all_steps(), reverse=True)
    scored = {s: (read_meta(manager, s) or {}).get("val/elbo") for s in steps}
    return sorted(steps, key=lambda s: (scored[s] is None, scored[s] if scored[s] is not None else -s))


def verify(state: Any, meta: dict) -> str | None:
    """Why a restored checkpoint cannot be trusted, or None: its JSON item or its arrays differ from the
    content hash recorded at save time, or its parameters are not finite."""
    digest = meta.get(DIGEST)
    if digest is not None and digest.get("meta") != meta_sha256(meta):
        return "its JSON item does not match the content hash saved with it"
    if digest is not None and digest.get("state") != state_sha256(state):
        return "its arrays do not match the content hash saved with them"
    params = jax.tree.leaves(jax.device_get(state["params"]))
    if not all(np.isfinite(a).all() for a in map(np.asarray, params) if a.dtype.kind in "fc"):
        return "its parameters are not finite"
    return None


def restore_first(manager: ocp.CheckpointManager, target: Any, steps: list[int]) -> Restored | None:
    """The first of `steps` that restores and verifies, or None when `steps` is empty.

    A checkpoint that fails (truncated or missing files, a killed writer, changed bytes, non-finite
    parameters) is reported by step and path and skipped; the caller sets the skipped ones aside. If
    checkpoints exist but none restores, that is an error, and nothing is moved.
    """
    damaged, vanished = [], []
    for step in steps:
        where = Path(manager.directory) / str(step)
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # Orbax raises many types for damaged files; all mean "skip it"
            _quiet_unretrieved_reads()
            if not where.exists():  # deleted while being read, by the keep policy of the run still training
                vanished.append(step)
                continue
            log.warning("Checkpoint at step %d (%s) could not be restored and is skipped: %s", step, where, _short(err))
            damaged.append(step)
            continue
        meta = dict(restored["meta"])
        problem = verify(restored["state"], meta)
        if problem:
            log.warning("Checkpoint at step %d (%s) failed verification and is skipped: %s.", step, where, problem)
            damaged.append(step)
            continue
        if DIGEST not in meta:
            log.warning(
                "Checkpoint at step %d (%s) has no content hash (saved by an older cvae_exp): restored unverified.",
                step,
                where,
            )
        return Restored(step, restored["state"], meta, damaged)
    if vanished:
        raise Vanished(vanished)
    if steps:
        raise UserError(
            f"None of the {len(steps)} checkpoints in {manager.directory} (steps {', '.join(map(str, steps))}) could be restored."
        )
    return None


class Vanished(Exception):
    """Checkpoints that were deleted while they were read (a run still training moves on and its keep policy
    deletes its older ones): not damaged; the reader looks again at what is there now."""

    def __init__(self, steps: list[int]):
        super().__init__(f"checkpoints deleted while being read: steps {', '.join(map(str, steps))}")
        self.steps = steps


def changed_shape_keys(saved: dict, current: dict) -> list[str]:
    """The SHAPE_KEYS whose values differ between a checkpoint's config, resolved (cvae_exp.config.resolved_record:
    a record holds interpolations as written), and the current one; a key added since the checkpoint was saved
    counts with the value it had then (cvae_exp.config.ADDED_KEYS). A node (model.net) is named by the keys below
    it that differ (model.net.channels), or by its _target_ when that differs."""
    from omegaconf import OmegaConf

    from cvae_exp.config import differing, differing_keys, saved_value

    changed = []
    for k in differing(saved, current, SHAPE_KEYS):
        was, now = saved_value(saved, k), saved_value(current, k)
        now = OmegaConf.to_container(now, resolve=True) if OmegaConf.is_config(now) else now
        changed += differing_keys(k, was, now) if isinstance(was, dict) and isinstance(now, dict) else [k]
    return changed


class _UnretrievedReads(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports (each with a traceback), which come when
    the failed reads of a damaged checkpoint that Orbax's gather did not wait for are collected, at any later
    moment: the damage is already reported, in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).partition("\n")[0].endswith("exception was never retrieved")


def _quiet_unretrieved_reads() -> None:
    """After a failed restore: asyncio's reports of its unretrieved reads are dropped from now on, and the
    ones already unreachable are collected here, so that none surfaces later in the run's output."""
    import gc

    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReads())
    gc.collect()


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def newest_good_before(manager, target, below: int) -> int | None:
    """The newest checkpoint before step `below` that restores and verifies (damaged ones set aside)."""
    steps = sorted((s for s in manager.all_steps() if s < below), reverse=True)
    try:
        restored = restore_first(manager, target, steps)
    except UserError:  # none of them verifies
        return None
    if restored is None:
        return None
    set_aside(manager, restored.damaged)
    return restored.step
