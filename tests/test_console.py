"""The console (cvae_exp.cli): log lines never share a terminal line with the progress bar, the libraries'
notes about themselves are hidden unless `verbose=true` while our own warnings are shown, and each
command's `--help` lists its own config groups, no schema.

Three launches: `cvae-train verbose=true` into a terminal (a pty) with the bar on, `cvae-eval` of that
run as a default command, and one process that prints every command's `--help`. JAX_PLATFORMS is unset
in the first two, so that JAX probes for a TPU as it does on a user's machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_S, CONF_DIR

from cvae_exp.cli import NO_DATASETS_BARS, library_notes

TPU_PROBE = "Unable to initialize backend"  # jax._src.xla_bridge, at INFO, on every machine without a TPU
READ_ONLY = ("read_only=True", "read only")  # Orbax's two notes on a checkpoint manager opened read-only
LOG_LINE = re.compile(r"\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[[A-Z]+\] - ")  # Hydra's console format


def probing_env(cli_env: dict) -> dict:
    """The CLI environment with JAX free to probe its platforms and tqdm free to draw."""
    return {k: v for k, v in cli_env.items() if k not in ("JAX_PLATFORMS", "TQDM_DISABLE")}


def in_terminal(args: list[str], env: dict, cwd: Path, timeout: float = CLI_TIMEOUT_S) -> tuple[int, str]:
    """Runs a command with stdout and stderr on one 120-column pty, as in a terminal; returns what the
    terminal received, byte for byte (carriage returns and all)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm sizes its bar by it
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    received, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the command has ended and closed the terminal
                break
            if not chunk:
                break
            received += chunk
        else:
            proc.kill()
            pytest.fail(f"{' '.join(args)} ran past {timeout} s:\n{received.decode(errors='replace')[-3000:]}")
    finally:
        os.close(leader)
    return proc.wait(), received.decode(errors="replace")


@pytest.fixture(scope="module")
def verbose_run(tiny_mnist, cli_env, tmp_path_factory) -> tuple[Path, str]:
    """A tiny `cvae-train verbose=true` in a terminal with the bar on; a log line (step 5's evaluation)
    comes while the bar is up. Returns the run dir and what the terminal received."""
    root = tmp_path_factory.mktemp("console")
    run_dir = root / "run"
    overrides = {
        "data.path": tiny_mnist,
        "data.val_size": 200,
        "model.hidden": "[32]",
        "model.latent_dim": 4,
        "trainer.batch_size": 32,
        "trainer.eval_batch_size": 100,
        "trainer.max_steps": 10,
        "trainer.log_every": 5,
        "trainer.eval_every": 5,
        "checkpoint.every": 10,
        "logger.images": "false",
        "trainer.progress": "true",
        "verbose": "true",
        "hydra.run.dir": run_dir,
    }
    args = [sys.executable, "-m", "cvae_exp.train", *(f"{k}={v}" for k, v in overrides.items())]
    code, received = in_terminal(args, probing_env(cli_env), root)
    assert code == 0, received[-3000:]
    return run_dir, received


def test_log_lines_and_the_bar_keep_to_their_own_lines(verbose_run):
    _, received = verbose_run
    seen_under_the_bar = 0
    for line in received.split("\n"):
        match = LOG_LINE.search(line)
        if match is None:
            continue
        shown = line.rstrip("\r").rsplit("\r", 1)[-1]  # what the terminal shows: the text after the last return
        assert LOG_LINE.match(shown), f"a log line shares its line with the bar: {shown!r}"
        seen_under_the_bar += "%|" in line[: match.start()]  # the bar was drawn there, then cleared
    assert seen_under_the_bar, f"no line was logged while the bar was up:\n{received[-3000:]}"


def test_verbose_shows_the_libraries_notes(verbose_run):
    _, received = verbose_run
    assert TPU_PROBE in received, received[-3000:]


def test_a_default_command_hides_the_libraries_notes(verbose_run, cli_env):
    run_dir, _ = verbose_run
    args = ["run_dir=" + str(run_dir), "eval.examples=10", "eval.samples=2", "eval.chunk=2", "eval.batch_size=10"]
    result = subprocess.run(
        [sys.executable, "-m", "cvae_exp.evaluate", *args],
        env=probing_env(cli_env),
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert '"ncll"' in result.stdout.splitlines()[-1]
    assert TPU_PROBE not in output, output
    for note in READ_ONLY:
        assert note not in output, output


def test_our_warnings_stay_when_the_libraries_notes_go(caplog):
    notes = {
        "jax._src.xla_bridge": "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so",
        "absl": "Given directory is read only=/runs/a/checkpoints",
        "datasets": "JAX version 0.10.2 available.",
    }
    ours = {
        "cvae_exp": "The Hub could not be reached (offline); using the bundled sample.",
        "absl": "Checkpoint save failed",
        "jax._src.xla_bridge": "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not installed.",
    }

    def shown(verbose: bool) -> set[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO), library_notes(shown=verbose):
            for name, message in [*notes.items(), *ours.items()]:
                logging.getLogger(name).warning(message)
        return {record.getMessage() for record in caplog.records}

    assert shown(verbose=False) == set(ours.values())
    assert shown(verbose=True) == set(ours.values()) | set(notes.values())


def test_datasets_bars_are_off_unless_verbose(monkeypatch):
    monkeypatch.delenv(NO_DATASETS_BARS, raising=False)
    with library_notes(shown=False):
        assert os.environ[NO_DATASETS_BARS] == "1"
    with library_notes(shown=True):
        assert NO_DATASETS_BARS not in os.environ
    assert NO_DATASETS_BARS not in os.environ
    monkeypatch.setenv(NO_DATASETS_BARS, "0")  # the user's own choice stands
    with library_notes(shown=False):
        assert os.environ[NO_DATASETS_BARS] == "0"


HELP = """
import sys
from cvae_exp import bench, evaluate, report, sample, train

for command, module in [("cvae-train", train), ("cvae-bench", bench), ("cvae-eval", evaluate),
                        ("cvae-sample", sample), ("cvae-report", report)]:
    print("=== " + command, flush=True)
    sys.argv = [command, "--help"]
    try:
        module.main()
    except SystemExit:
        pass
"""


def test_each_help_lists_its_own_groups_and_no_schema(cli_env):
    result = subprocess.run(
        [sys.executable, "-c", HELP], env=cli_env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    helps = dict(re.findall(r"=== (\S+)\n(.*?)(?=\n=== |\Z)", result.stdout, re.S))
    assert set(helps) == {"cvae-train", "cvae-bench", "cvae-eval", "cvae-sample", "cvae-report"}
    assert "_schema" not in result.stdout
    training_groups = {
        folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
        for folder in CONF_DIR.iterdir()
        if folder.is_dir() and folder.name != "hydra"
    }
    for command in ("cvae-train", "cvae-bench"):
        assert helps[command].startswith(command), helps[command][:200]  # the module's docstring
        section = helps[command].split("== Configuration groups ==")[1].split("== Config ==")[0]
        listed = dict(re.findall(r"^(\w+): (.*?)  \(default: \w+\)$", section, re.M))
        assert {group: options.split(", ") for group, options in listed.items()} == training_groups
    for command in ("cvae-eval", "cvae-sample"):
        assert helps[command].startswith(command + " run_dir="), helps[command][:200]
        assert "== Configuration groups ==" not in helps[command]
        assert not set(re.findall(r"^(\w+):", helps[command], re.M)) & set(training_groups), helps[command]
        assert "run_dir: ???" in helps[command]
    assert helps["cvae-report"].startswith("usage: cvae-report")


def test_the_vmap_launcher_prints_as_a_single_run_does(tiny_mnist, cli_env, tmp_path):
    """Its lines in the jobs' format (no raw `[HYDRA]` tags) and the libraries' notes hidden (no TPU probe), as
    every other command; JAX free to probe its platforms, as on a user's machine."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=vmap",
        *(f"{k}={v}" for k, v in {"data.path": tiny_mnist, "data.val_size": 200, "model.hidden": "[32]"}.items()),
        "model.latent_dim=4",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=100",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "checkpoint.every=2",
        "trainer.progress=false",
        "logger.images=false",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "cvae_exp.train", *args],
        env=probing_env(cli_env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "[HYDRA]" not in output and TPU_PROBE not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and all(LOG_LINE.match(line) for line in lines), output[-3000:]
    assert any("vmap group 0: jobs 0, 1" in line for line in lines)


def test_a_line_another_thread_logs_while_the_bar_closes_gets_its_own_line(monkeypatch):
    """tqdm.close drops the bar from those a log line clears before it takes tqdm's lock: a line logged by
    another thread in that moment (Orbax's save thread, with verbose=true) was written onto the bar. Here the
    other thread logs exactly then; the bar is closed as the training loop closes it (steps.close_bar)."""
    import io
    import threading

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cvae_exp.training.steps import close_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)  # the console, whose handlers logging_redirect_tqdm replaces
    log = logging.getLogger("test_console.saver")
    log.propagate, log.level = False, logging.INFO
    monkeypatch.setattr(log, "handlers", [logging.StreamHandler(term)])
    removed = tqdm._decr_instances.__func__
    threads = []

    def decr_then_log(cls, instance):
        removed(cls, instance)
        thread = threading.Thread(target=log.info, args=("[saver] wrote the checkpoint",))
        thread.start()
        thread.join(0.3)  # with the lock held, it waits until the bar is closed
        threads.append(thread)

    monkeypatch.setattr(tqdm, "_decr_instances", classmethod(decr_then_log))
    with logging_redirect_tqdm(loggers=[log]):
        bar = tqdm(total=3, file=term, mininterval=0)
        bar.update(3)
        close_bar(bar)
        threads[0].join()
    shown = [line.rsplit("\r", 1)[-1] for line in term.getvalue().split("\n")]
    assert "[saver] wrote the checkpoint" in shown, shown
