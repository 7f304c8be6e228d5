"""What every entry point shares: the config directory, the console (log lines through tqdm, library
noise off unless `verbose=true`, each command's `--help`), the schemas, and the way a command ends on a
documented failure (one sentence on stderr and its exit code). Entry points import this module and
nothing of each other.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from cvae_exp.config import register_configs
from cvae_exp.errors import STORAGE_EXIT_CODE, Interrupted, UserError, storage_error
from cvae_exp.runs.process_log import primary_only

log = logging.getLogger("cvae_exp")
logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save and restore at INFO
# Orbax also logs, with a traceback, a save that failed in the background; the run reports it itself, once.
logging.getLogger("absl").addFilter(lambda r: not (r.exc_info and storage_error(r.exc_info[1]) is not None))
# The configs: cvae_exp/conf in an installed package (pyproject maps the repository's conf/ there), the
# repository's conf/ beside the package in a checkout or an editable install (as `make` does).
_PACKAGE = Path(__file__).resolve().parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"
register_configs()

# What libraries log about themselves on every command, hidden unless verbose=true: {logger: what it says}.
LIBRARY_NOTES = {
    # JAX probing for a TPU this machine does not have (an INFO line on every CPU or GPU machine).
    "jax._src.xla_bridge": re.compile(r"Unable to initialize backend"),
    # Hugging Face datasets noting, when it is imported, which array libraries it found ("JAX version ...").
    "datasets": re.compile(r"\w+ version \S+ available\.$"),
    # Orbax restoring, as asked, from a checkpoint manager opened read-only (cvae-eval, cvae-sample).
    "absl": re.compile(r"CheckpointManagerOptions\.read_only=True|Given directory is read only"),
}
# and datasets' progress bars while it decodes Parquet ("Generating train split"), read when it is imported.
NO_DATASETS_BARS = "HF_DATASETS_DISABLE_PROGRESS_BARS"


def console(task):
    """Runs a Hydra task with the console set up: log lines go through tqdm, so a line logged while the
    progress bar is up prints on its own line and the bar redraws below it; the libraries' notes
    (LIBRARY_NOTES, and Orbax's INFO lines) stay out of the console and the run's log unless
    `verbose=true`. Our own warnings are always shown. In a run of several processes only process 0 logs below
    WARNING (cvae_exp.runs.process_log)."""

    @functools.wraps(task)
    def run(cfg, *args, **kwargs):
        with quiet_console(shown=bool(cfg.get("verbose", False))), primary_only(cfg):
            return task(cfg, *args, **kwargs)

    return run


@contextlib.contextmanager
def quiet_console(shown: bool) -> Iterator[None]:
    """`console`'s set-up for code that is not a Hydra task (the vmap launcher): log lines through tqdm, and the
    libraries' notes hidden unless `shown` (verbose=true)."""
    with library_notes(shown=shown), logging_redirect_tqdm():
        yield


@contextlib.contextmanager
def library_notes(shown: bool) -> Iterator[None]:
    """Hides LIBRARY_NOTES and datasets' bars while inside (unless the user set NO_DATASETS_BARS), or,
    `shown`, lets Orbax log at INFO too; restores all on the way out."""
    absl = logging.getLogger("absl")
    level = absl.level
    hidden = {} if shown else {name: _Hide(pattern) for name, pattern in LIBRARY_NOTES.items()}
    no_bars = not shown and NO_DATASETS_BARS not in os.environ
    if shown:
        absl.setLevel(logging.INFO)
    for name, hide in hidden.items():
        logging.getLogger(name).addFilter(hide)
    # datasets reads the variable when it is imported; where that has happened already (a caller that imported
    # it, a command run from Python), its switch turns them off instead
    loaded = sys.modules.get("datasets.utils") if no_bars else None
    switched = loaded is not None and not loaded.are_progress_bars_disabled()
    if no_bars:
        os.environ[NO_DATASETS_BARS] = "1"
    if switched:
        loaded.disable_progress_bars()
    try:
        yield
    finally:
        absl.setLevel(level)
        for name, hide in hidden.items():
            logging.getLogger(name).removeFilter(hide)
        if no_bars:
            os.environ.pop(NO_DATASETS_BARS, None)
        if switched:
            loaded.enable_progress_bars()


class _Hide(logging.Filter):
    def __init__(self, pattern: re.Pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None


# ----------------------------------------------------------------------------- --help (conf/hydra/help)


def command_doc(job_name: str) -> str:
    """The `--help` header: the docstring of the entry point's module (Hydra's job name is its file name)."""
    try:
        doc = importlib.import_module(f"cvae_exp.{job_name}").__doc__
    except ImportError:  # hydra.job.name=<another name> on the command line
        doc = None
    return (doc or job_name).strip().replace("`", "")


def command_groups(choices) -> str:
    """The `--help` section on the groups this command composes (its defaults' choices; Hydra's own are
    left to --hydra-help), each with the options Hydra would accept and the default marked, less the
    schemas that register_configs keeps in the ConfigStore for validation (`model_schema`, ...); nothing
    for a command without groups."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    lines = []
    for group, choice in sorted(OmegaConf.to_container(choices).items()):
        if group == "hydra" or group.startswith("hydra/"):
            continue
        schemas = {Path(name).stem for name in _stored(group)}
        options = [name for name in sorted(loader.get_group_options(group)) if name not in schemas]
        lines.append(f"{group}: {', '.join(options)}  (default: {choice or 'none'})")
    if not lines:
        return ""
    return "== Configuration groups ==\nChoose one option per group (group=option):\n\n" + "\n".join(lines) + "\n\n"


def _stored(group: str) -> list[str]:
    try:
        return ConfigStore.instance().list(group)
    except OSError:  # no schema in this group
        return []


OmegaConf.register_new_resolver("cvae_command_doc", command_doc, replace=True)
OmegaConf.register_new_resolver("cvae_command_groups", command_groups, replace=True)


def exit_on_user_error(fn):
    """Runs an entry point; its documented failures become one sentence on stderr and an exit code: a
    UserError 2, a refused file-system operation 74, a stop signal outside the loop 128 + its number.
    Whatever a refused or interrupted launch created is removed (cvae_exp.runs.launch.discard)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _exit(f"error: {err}", 2)
        except Interrupted as err:
            from cvae_exp.runs.launch import startup_message

            _exit(err.message or startup_message(err.signum), 128 + err.signum)
        except Exception as err:
            storage = storage_error(err)
            if storage is None:
                _discard()  # a crash before the run was accepted leaves no empty folder behind either
                raise
            _exit(f"error: {storage}", STORAGE_EXIT_CODE)

    return wrapped


def _discard() -> None:
    from cvae_exp.runs import launch

    launch.discard()


def _exit(message: str, code: int) -> None:
    _discard()
    print(message, file=sys.stderr)
    sys.exit(code)


def no_wait_after_storage_failure(app):
    """Wraps a console script: after a file-system failure (exit code 74) the process ends at once, without
    the interpreter's wait for writer threads (TensorBoard's, Orbax's) that may be stuck on the failed file
    system, so the command never hangs. The run lock is released by then; nothing else waits to be written."""

    @functools.wraps(app)
    def run(*args, **kwargs):
        try:
            return app(*args, **kwargs)
        except SystemExit as exit_:
            if exit_.code == STORAGE_EXIT_CODE:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(STORAGE_EXIT_CODE)
            raise

    return run
