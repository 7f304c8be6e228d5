"""One launch of `cvae-train` as it touches the disk: nothing is written until the run is accepted.

Hydra creates the job's folder and would write `.hydra/` and the job log before the task function runs,
that is before the command has been checked. conf/config.yaml therefore turns Hydra's own copy off
(`hydra.output_subdir: null`), points the job log at `RunLog`, which holds its records in memory, and
registers `LaunchRecord`, a Hydra callback that notes which folders of the job's directory exist before
Hydra creates them. Then:

- `accept(...)` once the run is accepted (checked, its checkpoint restored, about to train): writes
  `<run dir>/.hydra/{config,hydra,overrides}.yaml` — for a resumed run its own config, with the resuming
  command's overrides merged into the ones it was launched with — and lets the log reach its file;
- `discard()` when the command is refused or interrupted before that: drops the held log records and
  removes the folders this launch created, if they are still empty. Nothing else was written.

Writes that fail on a background thread (TensorBoard's event writer, the log file) are remembered by
`watch_background_writes` and raised on the main thread by `check_background_writes`, at the loop's
log steps, so a full disk ends the run there with one sentence (cvae_exp.errors.storage_error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cvae_exp import stop_signals
from cvae_exp.errors import STORAGE_EXIT_CODE, Interrupted, storage_error

RECORD_DIR = ".hydra"


class _Launch:
    """This process's current run: the folders its launch created, and whether it was accepted."""

    made_by_hydra: list[Path] = []  # noted by LaunchRecord for the next run of this process
    created: list[Path] = []  # deepest first
    accepted: bool = False
    failures: list[BaseException] = []  # background write failures, first first
    replaced: dict[Path, bytes] = {}  # files a multirun rewrites before its jobs are checked: their old bytes


def begin() -> None:
    """A run starts (cvae_exp.runs.job.run_training): nothing of it is accepted or created yet but what Hydra
    made for it."""
    _Launch.created, _Launch.made_by_hydra = _Launch.made_by_hydra, []
    _Launch.accepted = False
    _Launch.failures = []


def _missing(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first. A file where a folder must be is a
    file-system failure, reported here because Hydra would create the folder before any check runs."""
    out, p = [], path.absolute()
    while not p.exists():
        out.append(p)
        p = p.parent
    if not p.is_dir():
        print(f"error: {path} cannot be created: {p} is a file, not a folder.", file=sys.stderr)
        sys.exit(STORAGE_EXIT_CODE)
    return out


class LaunchRecord(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): which folders of the job's directory this
    launch creates, known before Hydra creates them."""

    def __init__(self) -> None:
        self.missing: list[Path] = []
        self.sweep: Path | None = None
        self.sweep_children: set[str] = set()

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self.missing = _missing(Path(str(config.hydra.run.dir)))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep = Path(str(config.hydra.sweep.dir)).absolute()
        self.missing = _missing(self.sweep)
        self.sweep_children = set(os.listdir(self.sweep)) if self.sweep.is_dir() else set()
        # Hydra's sweeper rewrites <sweep dir>/multirun.yaml before any job is checked: a relaunch that is
        # refused puts the old one back (cvae_exp.runs.launch.discard)
        record = self.sweep / "multirun.yaml"
        _Launch.replaced = {record: record.read_bytes()} if record.is_file() else {}

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        created = list(self.missing)
        job = Path(config.hydra.runtime.output_dir)
        if self.sweep is not None and job.is_relative_to(self.sweep) and job != self.sweep:
            parts = job.relative_to(self.sweep).parts
            if parts[0] not in self.sweep_children:  # Hydra makes the job's folders below the sweep dir
                created += [self.sweep.joinpath(*parts[: i + 1]) for i in range(len(parts))]
        _Launch.made_by_hydra = sorted(set(created), key=lambda p: len(p.parts), reverse=True)


class LogFile(logging.FileHandler):
    """A log file whose failed write (a full disk) is remembered for the main thread, naming the file (one
    sentence, exit 74), instead of logging's own traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if err is not None and storage_error(err) is not None:
            _note_failure(with_path(err, self.baseFilename))
        else:
            super().handleError(record)


def with_path(err: BaseException, path) -> BaseException:
    """`err` naming `path` when it is an OSError that names no file (a failed write names none)."""
    if isinstance(err, OSError) and not err.filename and err.errno and path:
        return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))
    return err


class RunLog(LogFile):
    """The job's log file (conf/config.yaml puts it in Hydra's job_logging): records wait in memory until
    the run is accepted, so a refused command leaves no log; a write that fails later is remembered for
    the main thread (one sentence, exit 74) instead of logging's own traceback."""

    def __init__(self, filename=os.devnull, mode: str = "a", encoding=None, delay: bool = True, errors=None):
        # (no filename: `hydra/job_logging=disabled` or `none`, which keep a file handler without one, unused)
        super().__init__(filename, mode, encoding, delay=True, errors=errors)
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def accept(self) -> None:
        held, self._held = self._held or [], None
        for record in held:
            super().emit(record)

    def drop(self) -> None:
        """The held records go: the command was refused."""
        if self._held is not None:
            self._held = []


def _run_logs() -> list[RunLog]:
    return [h for h in logging.getLogger().handlers if isinstance(h, RunLog)]


def _write(file: Path, text: str) -> None:
    """Replaces `file` whole (a temporary file renamed), so a record is never half written."""
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def _write_bytes(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def accept(
    run_dir: Path,
    cfg: DictConfig,
    overrides: list[str] | None = None,
    choices: dict | None = None,
    write_record: bool = True,
) -> None:
    """The run is accepted: its record goes to `<run dir>/.hydra/` (`write_record`: process 0 of a run)
    and the held log to its file.

    `overrides` and `choices` (config-group choices) describe the run as trained; by default this
    launch's own. Without Hydra (train(cfg) called directly) only the log is released."""
    from hydra.core.hydra_config import HydraConfig

    if write_record and HydraConfig.initialized():
        hydra_cfg = OmegaConf.to_container(
            HydraConfig.instance().cfg, resolve=False
        )  # {"hydra": ...}, as Hydra saves it
        if overrides is not None:
            hydra_cfg["hydra"]["overrides"]["task"] = list(overrides)
        if choices:
            hydra_cfg["hydra"]["runtime"]["choices"].update(choices)
        write_run_record(run_dir, cfg, OmegaConf.create(hydra_cfg), hydra_cfg["hydra"]["overrides"]["task"])
    release_log()
    _Launch.accepted = True


def write_run_record(run_dir: Path, cfg: DictConfig, hydra_cfg: DictConfig, overrides: list[str]) -> None:
    """<run dir>/.hydra/{config,hydra,overrides}.yaml, as Hydra writes them for any job (`hydra_cfg`: its
    {"hydra": ...} node), each file replaced whole."""
    out = run_dir / RECORD_DIR
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "config.yaml", OmegaConf.to_yaml(cfg))
    _write(out / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
    _write(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def mark_accepted() -> None:
    """A job of a multirun the launcher trains itself (hydra/launcher=vmap) is accepted: a later refusal of
    the command keeps what the sweep wrote."""
    _Launch.accepted = True


def release_log() -> None:
    """The held log records go to their file, and so do the next ones (also cvae-eval and cvae-sample,
    once the run they read has loaded)."""
    for handler in _run_logs():
        handler.accept()


def discard() -> None:
    """A refused or interrupted command: its held log records go, and so do the folders its launch
    created (still empty: nothing else was written). An accepted run keeps everything."""
    if _Launch.accepted:
        return
    for file, old in _Launch.replaced.items():
        with contextlib.suppress(OSError):
            _write_bytes(file, old)
    _Launch.replaced = {}
    for handler in _run_logs():
        handler.drop()
    for folder in _Launch.created:
        with contextlib.suppress(OSError):  # not empty, or gone: leave it
            folder.rmdir()
    _Launch.created = []


def created(folder: Path) -> None:
    """A folder this launch is about to create: `discard` removes it again (if still empty)."""
    _Launch.created.insert(0, folder)


def _note_failure(err: BaseException) -> None:
    if not _Launch.failures:
        _Launch.failures.append(err)


def watch_background_writes() -> None:
    """File-system failures on other threads (TensorBoard's event writer) are remembered, not printed."""
    previous = threading.excepthook
    if getattr(previous, "watches_writes", False):
        return

    def hook(args):
        if storage_error(args.exc_value) is not None:
            # TensorBoard's writer thread knows its event file; the failed write itself names none
            events = getattr(getattr(args.thread, "_record_writer", None), "_file_name", None)
            _note_failure(with_path(args.exc_value, events))
        else:
            previous(args)

    hook.watches_writes = True
    threading.excepthook = hook


def check_background_writes() -> None:
    """Raises, on the main thread, the first write that failed on another thread."""
    if _Launch.failures:
        raise _Launch.failures.pop(0)


class Interruptible:
    """SIGTERM and SIGINT outside the training loop (start-up; the final evaluation) end the command at once:
    the handler raises `Interrupted` wherever the main thread is, so the run lock and the rest unwind. The
    loop installs its own handler (checkpoint, then stop) over this one. A second signal kills the process.

    A library may swallow the exception (code that catches everything); `check()`, called between the
    phases of a run, raises it again. `after_training`, once set, is the message for a signal after the
    loop (`{signal}` stands for its name); before it, nothing is trained."""

    def __init__(self) -> None:
        self.after_training: str | None = None
        self.received: int | None = None
        self._previous: dict = {}
        self._unraisable = sys.unraisablehook

    def __enter__(self) -> Interruptible:
        early = stop_signals.take_pending()  # noted since the command's first line (cvae_exp/train.py)
        if early is not None:
            raise Interrupted(early, startup_message(early))
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (some launchers): no handler
                pass
        self._unraisable = sys.unraisablehook
        sys.unraisablehook = self._unraisable_hook
        return self

    def _unraisable_hook(self, unraisable) -> None:
        """Where the handler ran inside code whose exceptions Python can only report (a garbage-collector
        callback, e.g. JAX's), `Interrupted` is not reported as "Exception ignored ...": check() raises it."""
        if not isinstance(unraisable.exc_value, Interrupted):
            self._unraisable(unraisable)

    def _handle(self, signum, frame) -> None:
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once
        self.received = signum
        if stop_signals.importing(frame):  # raised there, it would break a C extension's start (a crash at exit)
            stop_signals.raise_after_import(frame, self.check)
            return
        self.check()

    def check(self) -> None:
        if self.received is not None:
            stop_signals.stop_tracing()
            after, name = self.after_training, signal.Signals(self.received).name
            raise Interrupted(self.received, after.format(signal=name) if after else startup_message(self.received))

    def __exit__(self, exc_type, exc, tb) -> None:
        stop_signals.stop_tracing()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = self._unraisable
        if exc is not None and self.received is not None and not isinstance(exc, (Interrupted, SystemExit)):
            # A library caught the Interrupted our handler raised and raised its own (datasets wraps any error
            # while it generates a split): the command was stopped by the signal, and says so.
            self.check()


def startup_message(signum: int) -> str:
    return (
        f"Stopped by {signal.Signals(signum).name} during start-up, before the first training step: "
        "nothing was trained yet and no checkpoint was written."
    )


def multirun_swept_keys() -> list[str]:
    """In a multirun job: the config keys its sweep varies, read from the sweep's multirun.yaml (the job's own
    overrides hold one value each); else []."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return []
    record = Path(str(HydraConfig.get().sweep.dir)) / "multirun.yaml"
    try:
        return swept_by(OmegaConf.load(record).hydra)
    except (OSError, ValueError, AttributeError):
        return []


def swept_by(hydra_cfg) -> list[str]:
    """The keys a multirun's `hydra` node sweeps: its sweeper's params, then the sweeps on its command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    params = hydra_cfg.sweeper.get("params") or {}
    return list(dict.fromkeys([*params, *(o.key_or_group for o in parsed if o.is_sweep_override())]))
