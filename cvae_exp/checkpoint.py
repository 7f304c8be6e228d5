"""Orbax checkpoints: one factory, saving, and the resume order written down once.

Resume order: `resume=false` starts fresh (and refuses a run directory that already holds
checkpoints, so nothing on disk is overwritten); `resume=true` restores the newest checkpoint in
`<run dir>/checkpoints/` that restores cleanly, skipping (and naming) any that does not, and moves
the skipped ones to `<run dir>/damaged_checkpoints/` (nothing is deleted); `resume=auto` does the
same when there is a checkpoint and starts fresh otherwise. A resume whose config changes what the
arrays' shapes depend on (SHAPE_KEYS) is refused before anything is restored.

Each checkpoint `<step>/` holds two items: `state` (step, params, optimizer state, RNG key data;
restored onto abstract arrays that carry the target sharding) and `meta` (JSON: the config and the
metrics at that step). Checkpoints kept: the newest `keep`, plus the best by val/elbo.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import jax
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
    "data.name",
    "data.condition",
    "optimizer.transform",
    "optimizer.clip_norm",
    "trainer.num_seeds",
    "model.baseline_run",
    "model.baseline_hidden",
    "model.baseline_into",
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
        if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_orphaned_reads = True
    sys.unraisablehook = hook


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
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager((run_dir / "checkpoints").resolve(), item_names=("state", "meta"), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Starts an async save; `meta["val/elbo"]`, when present, ranks the checkpoint for 'best'."""
    metrics = {"val/elbo": meta["val/elbo"]} if "val/elbo" in meta else None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, metrics=metrics, force=True)


def abstract(state: Any) -> Any:
    """Shape/dtype/sharding stand-ins for `state`, the target that restored arrays are placed onto."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def restore_newest(manager: ocp.CheckpointManager, target: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores, or None when there is none."""
    return restore_first(manager, target, sorted(manager.all_steps(), reverse=True))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """The JSON item of one checkpoint, or None when it cannot be read."""
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception:  # a damaged checkpoint; restore_first reports it when it matters
        return None


def first_config(manager: ocp.CheckpointManager, steps: list[int]) -> tuple[int, dict] | None:
    """(step, config) from the first of `steps` whose JSON item reads (only JSON is read)."""
    for step in steps:
        meta = read_meta(manager, step)
        if meta is not None:
            return step, meta.get("config", {})
    return None


def newest_config(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """(step, config) from the newest checkpoint whose JSON item reads; only JSON is read, so a resume
    with a changed model is refused in milliseconds rather than failing on mismatched array shapes."""
    return first_config(manager, sorted(manager.all_steps(), reverse=True))


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> None:
    """Moves the checkpoints newer than the restored `step` (they failed to restore) to
    `<run dir>/damaged_checkpoints/`, so that the resumed run can save those steps again and the
    newest-N policy does not count them; nothing is deleted."""
    directory = Path(manager.directory)
    newer = [s for s in manager.all_steps() if s > step]
    for s in newer if jax.process_index() == 0 else []:  # one process moves, all see the result
        dest = directory.parent / "damaged_checkpoints" / str(s)
        n = 1
        while dest.exists():  # the same step damaged again in a later resume
            dest, n = dest.with_name(f"{s}-{n}"), n + 1
        dest.parent.mkdir(exist_ok=True)
        (directory / str(s)).rename(dest)
        log.warning("Moved the damaged checkpoint at step %d to %s (kept, not deleted).", s, dest)
    if newer:
        ocp.multihost.sync_global_processes("set_aside_newer")
        manager.reload()


def best_first(manager: ocp.CheckpointManager) -> list[int]:
    """Steps ordered best val/elbo first; checkpoints without a val/elbo follow, newest first."""
    steps = sorted(manager.all_steps(), reverse=True)
    scored = {s: (read_meta(manager, s) or {}).get("val/elbo") for s in steps}
    return sorted(steps, key=lambda s: (scored[s] is None, scored[s] if scored[s] is not None else -s))


def restore_first(manager: ocp.CheckpointManager, target: Any, steps: list[int]) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the first of `steps` that restores, or None when `steps` is empty.

    A checkpoint that fails (truncated or missing files, a killed writer) is reported by step and
    path and skipped; none is deleted. If checkpoints exist but none restores, that is an error.
    """
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # Orbax raises many types for damaged files; all mean "skip it"
            where = Path(manager.directory) / str(step)
            log.warning("Checkpoint at step %d (%s) could not be restored and is skipped: %s", step, where, _short(err))
            continue
        return step, restored["state"], dict(restored["meta"])
    if steps:
        raise UserError(
            f"None of the {len(steps)} checkpoints in {manager.directory} (steps {', '.join(map(str, steps))}) could be restored."
        )
    return None


def changed_shape_keys(saved: dict, current: dict) -> list[str]:
    """The SHAPE_KEYS whose values differ between a checkpoint's config and the current one."""

    def get(cfg: dict, dotted: str):
        for part in dotted.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg

    return [k for k in SHAPE_KEYS if get(saved, k) != get(current, k)]


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"
