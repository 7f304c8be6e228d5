"""Shared fixtures: a tiny MNIST-like dataset in the Hub's Parquet layout, the CLI runner, shrunken overrides.

Nothing here touches the network or the user's caches: the decoded-array cache (`CVAE_EXP_CACHE`) and the
Hugging Face caches point into pytest's temporary directory, and the Hub is switched off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

# The tests' own process computes on the CPU, as the CLI subprocesses do (cli_env), before anything imports JAX.
os.environ["JAX_PLATFORMS"] = "cpu"

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

SIDE = 28
N_TRAIN, N_TEST = 1200, 300
CLI_TIMEOUT_S = 300


def digit_like(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 28, 28] images that are easy to learn: a class-dependent blob and stroke, jittered, plus noise.

    Class c puts a 7x7 blob at one of ten positions on a 4x3 grid and a vertical stroke in column 4 + 2c;
    each image is shifted by up to one pixel and gets faint noise, so the classes differ but no two images
    are identical.
    """
    images = np.zeros((len(labels), SIDE, SIDE), np.float32)
    for i, c in enumerate(labels):
        r0, c0 = 2 + 8 * (c // 4), 2 + 6 * (c % 4)
        dr, dc = rng.integers(-1, 2, size=2)
        images[i, r0 + dr : r0 + dr + 7, c0 + dc : c0 + dc + 7] = 1.0
        col = 4 + 2 * int(c) + dc
        images[i, 3:25, col : col + 2] = np.maximum(images[i, 3:25, col : col + 2], 0.8)
    images += rng.normal(0.0, 0.05, images.shape).astype(np.float32)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_hub_layout(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> Path:
    """`<root>/mnist/{train,test}-00000-of-00001.parquet` with the features of the Hub's ylecun/mnist."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    rng = np.random.default_rng(seed)
    out = root / "mnist"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = digit_like(labels, rng)
        ds = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
        ds.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> str:
    """The folder to pass as `data.path=`: 1,200 train / 300 test synthetic digits in the Hub layout."""
    return str(write_hub_layout(tmp_path_factory.mktemp("tiny_mnist")))


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
    """Points every cache this process or its children might write into a temporary folder, and goes offline.

    One persistent XLA compilation cache serves the whole session, this process and every CLI subprocess
    (and, under pytest-xdist, every worker: it sits beside their temporary folders): the same program loads
    the same executable, so results are unchanged, and most tiny runs skip their compile time."""
    root = tmp_path_factory.mktemp("caches")
    values = {
        "CVAE_EXP_CACHE": str(root / "cvae_exp"),
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **xla_cache(_session_folder(tmp_path_factory) / "xla_cache"),
    }
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    import jax

    # JAX read its environment when it was imported (at collection); the cache is switched on here too.
    jax.config.update("jax_compilation_cache_dir", values["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield values
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def cli_env(_private_caches) -> dict[str, str]:
    """The environment of CLI subprocesses: the private caches, CPU only, no progress bars or Hydra tracebacks."""
    env = dict(os.environ)
    env.update(_private_caches)
    env.update({"JAX_PLATFORMS": "cpu", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _session_folder(tmp_path_factory) -> Path:
    """This session's temporary folder: the one above the workers' under pytest-xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def xla_cache(folder: Path) -> dict[str, str]:
    """The environment of a persistent XLA compilation cache in `folder` that keeps every executable."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(folder),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


# The longest test files, started first: with one file per worker (--dist loadfile), a long file that
# starts last keeps its worker busy after the other has finished (measured: 28 s of a 5-minute suite).
LONGEST_FIRST = [
    "test_table_script.py",
    "test_parallel.py",
    "test_reliability.py",
    "test_vmap_launcher.py",
    "test_reliability_record.py",
    "test_evaluate.py",
]


def pytest_collection_modifyitems(items):
    """Every worker collects the same order: the files of LONGEST_FIRST in its order, then the rest as found."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


LINEAR_STEPS = 80
LINEAR = {"optimizer.warmup_steps": 60}  # linear warm-up past step 40: resumed steps depend on the restored count


@pytest.fixture(scope="session")
def linear_run(tiny_mnist, cli_env, tmp_path_factory) -> Path:
    """An uninterrupted tiny run of 80 steps with a linear warm-up (checkpoints and evaluations every 20 steps;
    kept: 40, 60, 80): what resumed runs must reproduce, and what tests copy to damage."""
    from cli_runs import ok, tiny, train

    root = tmp_path_factory.mktemp("linear_run")
    ok(train(tiny(tiny_mnist, root / "run", {"trainer.max_steps": LINEAR_STEPS, **LINEAR}), cli_env, root / "run.log"))
    return root / "run"


def run_module(module: str, args, *, env: dict[str, str], cwd, timeout: float = CLI_TIMEOUT_S):
    """`python -m <module> *args` as a subprocess: how users run every entry point."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return run_module("cvae_exp.train", args, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def run_cli(cli_env, tmp_path) -> Callable[..., subprocess.CompletedProcess]:
    """`run_cli(args, cwd=None, env=None, timeout=...)`: `python -m cvae_exp.train *args` as a subprocess.

    cwd defaults to the test's tmp_path, so Hydra's default `outputs/` never lands in the repository;
    `env` entries are added to the private-cache environment.
    """

    def run(args, cwd=None, env=None, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
        return _run(list(args), Path(cwd or tmp_path), {**cli_env, **(env or {})}, timeout)

    return run


def in_process(module: str, args, *, env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    """`<module>.main()` in this process, as `python -m <module> *args` would run it (Hydra's run directory,
    `.hydra/`, the job log, the exit code), its output captured: a run without a new interpreter's start-up
    (JAX, Hydra, datasets imported once) and with the executables this process has already compiled.
    Python's sys.stdout and sys.stderr are captured, and so is what is written to the file descriptors 1 and 2
    underneath (C++ libraries' logs), which is added after it.

    For what does not depend on the process boundary: trained fixtures, what a command computes and writes,
    resumes of runs that another process left. Signals, locks held by other processes, crashes and the
    first run of a process (the console tests) stay subprocesses (`run_module`). `env` may change variables
    that are read at run time (caches, TQDM_DISABLE), not those read when JAX starts (JAX_PLATFORMS,
    XLA_FLAGS: those runs stay subprocesses)."""
    import importlib
    import io
    import logging
    import tempfile
    import threading
    import warnings
    from contextlib import ExitStack, redirect_stderr, redirect_stdout

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
        if env.get(name) != os.environ.get(name):
            raise ValueError(f"{name} is read when JAX starts: run this command as a subprocess")
    main = importlib.import_module(module).main
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level, saved_hook = root.handlers[:], root.level, threading.excepthook
    saved_filters = warnings.filters[:]
    out, err = io.StringIO(), io.StringIO()
    # Hydra's logging set-up shuts the existing handlers down, and absl's (Orbax logs through absl) closes its
    # stream unless that is the current sys.stderr: while the run's output is captured, it writes there.
    absl = sys.modules.get("absl.logging")
    absl_handler = absl.get_absl_handler().python_handler if absl else None
    saved_absl_stream = absl_handler.stream if absl_handler else None
    os.environ.update(env)
    sys.argv = [module, *map(str, args)]
    os.chdir(cwd)
    below = tempfile.TemporaryFile()  # fds 1 and 2, for the duration of the run
    saved_fds = []
    saved_exit = os._exit

    def no_process_exit(code):  # the exit 74 path ends the process at once: not this one
        raise RuntimeError(f"{module} called os._exit({code}): run this command as a subprocess")

    os._exit = no_process_exit
    try:
        with ExitStack() as stack:
            stack.enter_context(redirect_stdout(out))
            stack.enter_context(redirect_stderr(err))
            for fd in (1, 2):
                saved_fds.append(os.dup(fd))
                os.dup2(below.fileno(), fd)
            if absl_handler:
                absl_handler.stream = err
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        os._exit = saved_exit
        for fd, saved in zip((1, 2), saved_fds, strict=False):  # fewer if dup failed
            os.dup2(saved, fd)
            os.close(saved)
        for handler in root.handlers[:]:  # Hydra's (and absl's, once Orbax loads) handlers go; files are closed,
            if handler not in saved_handlers:  # so the job log is on disk; streams are not (one is pytest's)
                root.removeHandler(handler)
                if isinstance(handler, logging.FileHandler):
                    handler.close()
        root.handlers[:] = saved_handlers
        if absl_handler:
            absl_handler.stream = saved_absl_stream
        root.setLevel(saved_level)
        threading.excepthook = saved_hook
        warnings.filters[:] = saved_filters
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # the run's Hydra config (Hydra leaves it set after a multirun)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    below.seek(0)
    native = below.read().decode(errors="replace")
    below.close()
    return subprocess.CompletedProcess([module, *map(str, args)], code, out.getvalue(), err.getvalue() + native)


@pytest.fixture(scope="session")
def session_cli(cli_env, tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """The same runner for module- or session-scoped fixtures (cwd: a session temporary folder), which train
    what tests then inspect: in this process (`in_process`), unless `env` names what only a new process can
    take (XLA_FLAGS) or `subprocess=True`."""
    default_cwd = tmp_path_factory.mktemp("cli_cwd")

    def run(args, cwd=None, env=None, timeout: float = CLI_TIMEOUT_S, subprocess=False):
        full_env = {**cli_env, **(env or {})}
        if subprocess or "XLA_FLAGS" in (env or {}):
            return _run(list(args), Path(cwd or default_cwd), full_env, timeout)
        return in_process("cvae_exp.train", list(args), env=full_env, cwd=Path(cwd or default_cwd))

    return run


# Impossible values (the types are right, so the config composes): (overrides, what the one sentence that
# refuses them must contain). test_config checks validate and the CLI on them; test_reliability_inputs
# checks, with its own cases added, that they are refused before any work starts.
IMPOSSIBLE = [
    (["optimizer.lr=0"], "optimizer.lr=0"),
    (["optimizer.lr=-0.001"], "optimizer.lr=-0.001"),
    (["trainer.batch_size=0"], "trainer.batch_size=0"),
    (["model.latent_dim=0"], "model.latent_dim=0"),
    (["trainer.eval_every=0"], "trainer.eval_every=0"),
    (["model.alpha=1.5"], "model.alpha=1.5"),
    (["data.condition=quadrants", "data.n_given=4"], "data.n_given=4"),
    (["model.kind=foo"], "model.kind=foo"),
    (["data.binarize=maybe"], "data.binarize=maybe"),
    (["optimizer.transform._target_=os.system"], "optimizer.transform._target_=os.system is refused"),
]


def bench_here(monkeypatch, folder: Path):
    """`cvae_exp.bench.bench` to call on a composed config in this process: no Hydra, `folder` the run directory
    (the working directory), the peak a fixed 1e12 FLOP/s (test_bench's CLI test measures it)."""
    import cvae_exp.cli  # noqa: F401  (registers the config schemas)
    from cvae_exp.bench import bench

    monkeypatch.chdir(folder)
    monkeypatch.setattr("cvae_exp.bench.measured_peak", lambda *a: 1e12)
    return bench


def compose_config(overrides=(), *, hydra_config: bool = False):
    """The config `cvae-train` would compose from `overrides` (with Hydra's own node when asked), with no
    global Hydra state left behind."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)
    finally:
        GlobalHydra.instance().clear()


def shrunk(data_path: str, run_dir: Path | str | None = None, *extra: str) -> list[str]:
    """Overrides that make a real config train in seconds on the tiny dataset; `extra` overrides go last."""
    args = [
        f"data.path={data_path}",
        "data.val_size=200",
        "model.hidden=[64]",
        "model.latent_dim=4",
        "trainer.batch_size=32",
        "trainer.eval_batch_size=100",
        "trainer.progress=false",
        "trainer.log_every=10",
        "trainer.eval_every=30",
        "checkpoint.every=30",
    ]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return args + list(extra)


@pytest.fixture(scope="session")
def small_overrides(tiny_mnist) -> Callable[..., list[str]]:
    """`small_overrides(run_dir=None, *extra)`: the shrunken override list on the tiny dataset."""

    def make(run_dir=None, *extra: str) -> list[str]:
        return shrunk(tiny_mnist, run_dir, *extra)

    return make
