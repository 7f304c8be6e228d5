"""TensorBoard output through tensorboardX: scalars, image grids and the hparams summary.

Only process 0 writes. On resume the writer purges events at or past the restored step, so a
curve never doubles back on itself.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter

HPARAMS_PREFIX = "z_hparams/"  # the hparams summary's metric names


_QUEUE = 1000  # events tensorboardX holds before its writer thread takes them (its default, 10, is one log step)


class Writer:
    """A SummaryWriter under `<run dir>/tb` (or `<run dir>/tb/<name>`, one TensorBoard run per seed of
    a K-seed run), or a no-op on other processes / when disabled."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, resume_step: int | None = None, name: str = ""):
        self._w = None
        if enabled and jax.process_index() == 0:
            purge = resume_step + 1 if resume_step is not None else None
            # a queue long enough for a log step's events: a put waits only on a writer thread that is behind
            where = str(run_dir / "tb" / name if name else run_dir / "tb")
            self._w = SummaryWriter(where, purge_step=purge, max_queue=_QUEUE)

    def _check_alive(self) -> None:
        """tensorboardX writes events on a thread; when a write fails there (a full disk) that thread ends
        and the next events would fill its queue and block this thread forever. Raise instead: the failure
        itself, as cvae_exp.runs.launch noted it, or one naming the event folder."""
        events = getattr(self._w.file_writer, "event_writer", None) if self._w.file_writer else None
        worker = getattr(events, "_worker", None)
        if worker is None or worker.is_alive():
            return
        queue = getattr(events, "_event_queue", None)
        if queue is not None:
            queue.cancel_join_thread()  # its events can no longer be written: do not wait for them at exit
        self._w = None
        from cvae_exp.runs.launch import check_background_writes

        check_background_writes()
        raise OSError(errno.EIO, "TensorBoard's event writer stopped", events.get_logdir())

    def scalars(self, metrics: Mapping[str, float], step: int) -> None:
        for tag, value in metrics.items():
            if self._w:
                self._check_alive()  # before every event: one put into a dead writer's full queue never returns
                self._w.add_scalar(tag, float(value), step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        """`grid`: a [H, W] (grayscale) or [H, W, 3] (RGB) array in [0, 1] (`cvae_exp.training.grids`)."""
        if self._w:
            self._check_alive()
            grid = np.clip(grid, 0.0, 1.0)
            if grid.ndim == 2:
                self._w.add_image(tag, grid[None], step, dataformats="CHW")
            else:
                self._w.add_image(tag, grid, step, dataformats="HWC")

    def hparams(
        self, hparams: Mapping[str, object], metrics: Mapping[str, float], *, step: int = 0, differs: Sequence[str] = ()
    ) -> None:
        """The HPARAMS summary, in this run's own event file (add_hparams would write a sub-run, `tb/<name>`,
        which TensorBoard lists as a second run of every job). Metric names are prefixed `z_hparams/`: distinct
        from the scalar tags, and sorting below train/ and val/ in the Scalars tab, where their one-point series
        land. TensorBoard's HPARAMS view shows first the hparams marked `differs` (then the rest by name):
        `differs` names them (a sweep's swept keys), and they are also declared first (`hparams_first`) for
        TensorBoards that keep the declared order."""
        if self._w:
            from tensorboardX.summary import hparams as hparams_summaries

            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
            named = {f"{HPARAMS_PREFIX}{k}": float(v) for k, v in metrics.items()}
            experiment, start, end = hparams_summaries(clean, named)
            _mark_differing(experiment, set(differs))
            for summary in (experiment, start, end):
                self._w.file_writer.add_summary(summary, step)
            for tag, value in named.items():
                self._w.add_scalar(tag, value, step)

    def flush(self) -> None:
        if self._w:
            self._w.flush()

    def close(self) -> None:
        if self._w:
            self._w.close()


_DIFFERS = b"\x38\x01"  # HParamInfo field 7 (`differs`, bool) = true: TensorBoard's api.proto, not tensorboardX's


def _mark_differing(experiment_summary, names: set[str]) -> None:
    """Sets `differs` on the named hparams of a tensorboardX experiment summary (in place). TensorBoard sorts the
    HPARAMS columns by (not differs, name); tensorboardX's copy of the proto predates the field, so it is added
    as the encoded field, which protobuf keeps as an unknown field and TensorBoard reads."""
    if not names:
        return
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    value = experiment_summary.value[0]
    data = HParamsPluginData()
    data.ParseFromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        if info.name in names:
            info.MergeFromString(_DIFFERS)
    value.metadata.plugin_data.content = data.SerializeToString()


def hparams_first(hparams: dict, swept: list[str]) -> dict:
    """`hparams` with the swept keys first, in sweep order (the ones TensorBoard's HPARAMS shows by default)."""
    first = [k for k in swept if k in hparams]
    return {k: hparams[k] for k in first} | {k: v for k, v in hparams.items() if k not in first}
