"""Issue 15, a run's record is exactly what was trained, through the real `cvae-train`, `cvae-eval` CLI:

- a refused command changes nothing on disk (not the run's `.hydra/`, its log or checkpoints; no new folder);
- a resume on other data (`data.*`, or the data itself: source, split sizes) is refused unless asked for;
- checkpoints carry a content hash: flipped bits are detected on resume and by cvae-eval, reported by
  step and path, set aside in `damaged_checkpoints/`, and the next valid checkpoint is used;
- a file-system failure (a full disk, a folder that cannot be made) ends the run with one sentence and exit
  code 74, the lock released and the earlier checkpoints intact;
- SIGTERM / SIGINT during start-up exit with 143 / 130 and one sentence: nothing was trained.

The runs are the tiny ones of test_reliability.py (cli_runs.tiny): copies of conftest's linear_run (80 steps,
checkpoints kept at 40, 60 and 80), sharing the session's XLA compilation cache.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import (
    finish,
    launch,
    metrics,
    steps,
    tiny,
    tmp_folders,
    train,
    tree_digest,
    wait_for,
)
from conftest import LINEAR_STEPS as STEPS  # the base run's; its checkpoints: 40, 60, 80
from conftest import in_process, write_hub_layout


@pytest.fixture(scope="module")
def env(cli_env) -> dict[str, str]:
    return cli_env


@pytest.fixture(scope="module")
def base(tiny_mnist, env, linear_run, tmp_path_factory) -> dict[str, Path]:
    """'run': conftest's linear_run; 'own_data': 20 steps on a private copy of tiny_mnist (which a test changes)."""
    root = tmp_path_factory.mktemp("base")
    data = root / "data"
    shutil.copytree(tiny_mnist, data)
    code, text = train(tiny(str(data), root / "own_data", {"trainer.max_steps": 20}), env, root / "own_data.log")
    assert code == 0, text[-3000:]
    return {"run": linear_run, "own_data": root / "own_data", "data": data}


def copy_run(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def one_line(text: str) -> str:
    """The single non-empty line of a command's stderr (asserting that there is exactly one)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def flip_one_bit(checkpoint: Path, rng: random.Random) -> None:
    """One bit of the checkpoint's array data (the largest file of its TensorStore database) inverted."""
    data = max(
        (f for f in (checkpoint / "state").rglob("*") if f.is_file() and f.parent.name == "d"), key=os.path.getsize
    )
    raw = bytearray(data.read_bytes())
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    data.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- refusals change nothing


def test_refused_commands_change_nothing_on_disk(tiny_mnist, base, env, tmp_path):
    # Each refusal of the run gets its own copy.
    # (A fresh launch on a run's directory, and a + key: test_train_e2e and test_config, the same way.)
    runs = {name: copy_run(base["run"], tmp_path / name) for name in ("shapes", "data")}
    before = {name: tree_digest(run) for name, run in runs.items()}  # .hydra/, train.log, tb/, checkpoints/, ...
    (tmp_path / "fresh").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    jobs = {
        # a resume that changes what the saved arrays' shapes depend on
        "shapes": [f"hydra.run.dir={runs['shapes']}", "resume=true", "model.hidden=[16]"],
        # a resume that changes the data
        "data": [f"hydra.run.dir={runs['data']}", "resume=true", "data.binarize=static"],
        # resume=true where there is no run (a mistyped directory)
        "missing": [f"hydra.run.dir={tmp_path / 'no_such_run'}", "resume=true"],
        # a bad value in a fresh run with the default outputs/<date>/<time>/ directory
        "fresh": ["optimizer.lr=0", f"data.path={tiny_mnist}"],
        # a run directory that cannot be made: a file where a folder must be (a file-system failure)
        "under_a_file": tiny(tiny_mnist, tmp_path / "a_file" / "run"),
    }
    logs = {name: (tmp_path / "fresh" if name == "fresh" else tmp_path) / f"{name}.log" for name in jobs}
    # (exit 74 ends the process at once, without waiting for writer threads: only a process of its own can)
    results = {name: train(args, env, logs[name], fresh_process=name == "under_a_file") for name, args in jobs.items()}
    checkpoints = runs["shapes"] / "checkpoints"
    expected = {
        "shapes": (
            2,
            f"error: The checkpoint at step {STEPS} in {checkpoints} was trained with different model.hidden;",
        ),
        "data": (
            2,
            f"error: Resuming the run in {runs['data']} with data.binarize=static (trained with dynamic) would",
        ),
        "missing": (2, f"error: resume=true, but {tmp_path / 'no_such_run' / 'checkpoints'} holds no checkpoint"),
        "fresh": (2, "error: optimizer.lr=0.0 must be positive."),
        "under_a_file": (
            74,
            f"error: {tmp_path / 'a_file' / 'run'} cannot be created: {tmp_path / 'a_file'} is a file",
        ),
    }
    for name, (code, text) in results.items():
        assert code == expected[name][0], f"{name}: {text[-3000:]}"
        assert "Traceback" not in text, f"{name}: {text[-3000:]}"
        assert one_line(_errors(text)).startswith(expected[name][1]), f"{name}: {text[-3000:]}"
    assert {name: tree_digest(run) for name, run in runs.items()} == before
    assert not (tmp_path / "no_such_run").exists()
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["fresh.log"]  # no outputs/<date>/<time>/
    assert (tmp_path / "a_file").read_text() == "not a folder"


def _errors(text: str) -> str:
    """The lines of a command's output that are not log records (its stderr sentence)."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("[20"))


# ----------------------------------------------------------------------------- the data a run trained on


def test_a_resume_on_changed_data_is_refused_unless_asked(base, env, tmp_path):
    run = copy_run(base["own_data"], tmp_path / "run")
    before = tree_digest(run)
    # The same data.path, other contents: 800 training digits instead of 1,200 (600 after validation).
    shutil.rmtree(base["data"])
    write_hub_layout(base["data"], n_train=800, seed=1)

    code, text = train([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=30"], env, tmp_path / "r.log")
    assert code == 2 and "Traceback" not in text, text[-3000:]
    assert one_line(_errors(text)).startswith(
        "error: The data differs from what the checkpoint at step 20 was trained on (train 600 instead of 1000); "
    ), text[-3000:]
    assert tree_digest(run) == before


def test_resume_data_change_lets_other_data_through_for_this_launch_only():
    """The opt-in, without a second training run: the data check passes with it and not without, and the
    saved run's own value of it is never the base (PER_LAUNCH)."""
    from omegaconf import OmegaConf

    from cvae_exp.errors import UserError
    from cvae_exp.runs import resume

    saved = resume.SavedRun({"resume_data_change": True}, 20, {"source": "a", "train": 1000}, [], {})
    now = {"source": "a", "train": 600}
    with pytest.raises(UserError, match=r"\(train 600 instead of 1000\)"):
        resume.check_data(saved, OmegaConf.create({"resume_data_change": False}), now)
    resume.check_data(saved, OmegaConf.create({"resume_data_change": True}), now)
    assert "resume_data_change" in resume.PER_LAUNCH


# ----------------------------------------------------------------------------- verified checkpoints


def test_flipped_bits_are_detected_on_resume_and_the_older_checkpoint_continues(base, env, tmp_path):
    run = copy_run(base["run"], tmp_path / "run")
    (run / "metrics.json").unlink()
    flip_one_bit(run / "checkpoints" / str(STEPS), random.Random(0))
    damaged = tree_digest(run / "checkpoints" / str(STEPS))

    code, text = train([f"hydra.run.dir={run}", "resume=true"], env, tmp_path / "r.log")
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert (
        f"Checkpoint at step {STEPS} ({run / 'checkpoints' / str(STEPS)}) failed verification and is skipped: "
        "its arrays do not match the content hash saved with them" in text
    )
    assert f"Resumed from step {STEPS - 20}" in text
    assert tree_digest(run / "damaged_checkpoints" / str(STEPS)) == damaged  # moved as it was, not deleted
    # Trained again from the older checkpoint, it is the uninterrupted run, bit for bit.
    assert metrics(run)["params_sha256"] == metrics(base["run"])["params_sha256"]


def test_cvae_eval_skips_a_damaged_best_checkpoint(base, env, tmp_path):
    run = copy_run(base["run"], tmp_path / "run")
    val = {
        s: json.loads((run / "checkpoints" / str(s) / "meta" / "metadata").read_text())["val/elbo"] for s in steps(run)
    }
    best, second = sorted(val, key=val.get)[:2]
    flip_one_bit(run / "checkpoints" / str(best), random.Random(1))

    proc = in_process(
        "cvae_exp.evaluate", [f"run_dir={run}", "eval.samples=5", "eval.split=val"], env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"Checkpoint at step {best} ({run / 'checkpoints' / str(best)}) failed verification"
        in proc.stderr + proc.stdout
    )
    assert json.loads((run / "eval_val.json").read_text())["checkpoint_step"] == second
    assert best not in steps(run) and (run / "damaged_checkpoints" / str(best)).is_dir()


def test_single_bit_flips_in_array_data_are_always_detected(base, tmp_path):
    """In process, many flips: each one either fails to restore or fails verification, unless it left every
    value as it was (then there is nothing to detect). Before content hashes, 28 of 30 restored silently."""
    import jax
    import numpy as np

    from cvae_exp.runs import checkpoint
    from cvae_exp.runs.trained_run import run_config, state_target

    cfg = run_config(base["run"])
    target = state_target(cfg)
    reference = checkpoint.restore_first(checkpoint.make_manager(base["run"], 1, read_only=True), target, [STEPS])
    values = jax.tree.leaves(jax.device_get(reference.state))
    rng, silent, unchanged = random.Random(2), 0, 0
    for trial in range(30):
        run = tmp_path / f"run{trial}"  # the checkpoint alone is what a restore reads
        shutil.copytree(base["run"] / "checkpoints" / str(STEPS), run / "checkpoints" / str(STEPS))
        flip_one_bit(run / "checkpoints" / str(STEPS), rng)
        manager = checkpoint.make_manager(run, 1, read_only=True)
        try:
            restored = checkpoint.restore_first(manager, target, [STEPS])
        except Exception:  # UserError: did not restore or did not verify: detected
            continue
        finally:
            manager.close()
        same = all(
            np.array_equal(a, b) for a, b in zip(values, jax.tree.leaves(jax.device_get(restored.state)), strict=True)
        )
        unchanged += same
        silent += not same
        shutil.rmtree(run)
    assert silent == 0 and unchanged < 30


# ----------------------------------------------------------------------------- file-system failures


def test_a_full_disk_ends_the_run_with_one_sentence_and_exit_74(base, env, tmp_path):
    run = copy_run(base["run"], tmp_path / "run")
    (run / "metrics.json").unlink()
    earlier = {s: tree_digest(run / "checkpoints" / str(s)) for s in steps(run)}
    biggest = max(f.stat().st_size for f in (run / "checkpoints" / str(STEPS) / "state").rglob("*") if f.is_file())
    limit = biggest // 2  # no file may grow past this: a checkpoint's array data cannot be written

    # What a full disk does to a write, for this process only (root ignores permissions, and tests cannot
    # mount a small file system): no file may grow past `limit`, and the write fails with EFBIG (SIGXFSZ
    # ignored) instead of killing the process.
    full_disk = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "sys.argv[0] = 'cvae-train'; runpy.run_module('cvae_exp.train', run_name='__main__')"
    )
    args = [f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=1000"]  # from step 80
    proc = subprocess.run(
        [sys.executable, "-c", full_disk, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    line = one_line(proc.stderr)
    assert re.fullmatch(
        rf"error: The file system refused {re.escape(str(run / 'checkpoints'))}/\S+: File too large \(EFBIG\)\.", line
    ), line
    # Which save fails depends on how TensorStore splits the array data into files that time (one file of
    # 568 kB at step 40, two of about 290 kB at step 80, more under load): a save whose every file stays under
    # the limit is a complete checkpoint. The failure of the first save that hit the limit surfaces at the
    # next log step, or at the latest when the next save waits for it: the run never logs two steps past it.
    # The failed save's unfinished folder stays, set apart; the newest of the earlier checkpoints and those
    # completed before the failure are kept, and an earlier one that stays is unchanged.
    failed = sorted(int(name.split(".")[0]) for name in tmp_folders(run))
    assert failed and failed[0] > STEPS, failed
    assert f"step {failed[0] + 40}:" not in proc.stdout
    assert not (run / ".lock").exists()
    kept = steps(run)
    completed = [s for s in kept if s not in earlier]
    assert all(s < failed[0] for s in completed), (completed, failed)
    assert set(sorted({*earlier, *completed})[-3:]) <= set(kept)  # checkpoint.keep=3 (and the best)
    assert {s: tree_digest(run / "checkpoints" / str(s)) for s in kept if s in earlier} == {
        s: d for s, d in earlier.items() if s in kept
    }


def test_a_full_disk_under_the_vmap_launcher_names_the_file(tiny_mnist, env, tmp_path):
    """The same full disk (RLIMIT_FSIZE) under hydra/launcher=vmap, checkpoints off, so that what fails is a
    file written on another thread (TensorBoard's event file) or the job's log: its path is named."""
    from cvae_exp.data import sources

    sources.load(path=tiny_mnist)  # decoded and cached (CVAE_EXP_CACHE) before the disk is full
    limit = 20000  # above multirun.yaml (about 6 kB), below a 300-step event file or log
    full_disk = (
        "import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "sys.argv[0] = 'cvae-train'; runpy.run_module('cvae_exp.train', run_name='__main__')"
    )
    sweep = tmp_path / "sweep"
    changes = {"trainer.max_steps": 300, "trainer.log_every": 1, "checkpoint.enabled": "false"}
    args = ["-m", "hydra/launcher=vmap", *tiny(tiny_mnist, sweep, changes), "optimizer.lr=1e-3,3e-3"]
    args = [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.sweep.dir={sweep}"]
    no_xla_cache = {
        k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE") and "COMPILATION_CACHE" not in k
    }
    proc = subprocess.run(
        [sys.executable, "-c", full_disk, *args],
        cwd=tmp_path,
        env=no_xla_cache,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and "Logging error" not in proc.stderr
    line = one_line(proc.stderr)
    assert re.fullmatch(
        rf"error: The file system refused {re.escape(str(sweep))}/[01]/(tb/events\.out\.tfevents\.\S+|train\.log): "
        r"File too large \(EFBIG\)\.",
        line,
    ), line


def test_only_file_system_errors_are_reported_as_such():
    from cvae_exp.errors import storage_error

    full = storage_error(OSError(28, "No space left on device", "/r/checkpoints/5"))
    assert str(full) == "The file system refused /r/checkpoints/5: No space left on device (ENOSPC)."
    tensorstore = ValueError('Error writing "w": Failed writing: "/r/d/ab": Failed to write: [os_error_code=\'30\']')
    assert str(storage_error(tensorstore)) == "The file system refused /r/d/ab: Read-only file system (EROFS)."
    # as TensorStore also quotes its spec: {"driver":"file","file_io_locking":...} is no file of the run
    spec = 'Error writing local file "/r/d/cd": [os_error_code=27] [tensorstore_spec=\'{\\"driver\\":\\"file\\",\\"file_io_locking\\":{}}\']'
    assert str(storage_error(ValueError(spec))) == "The file system refused /r/d/cd: File too large (EFBIG)."
    assert storage_error(ConnectionRefusedError(111, "Connection refused")) is None  # not the file system's
    assert storage_error(ValueError("a bug")) is None


def test_a_checkpoint_folder_that_vanishes_ends_the_run_at_once(base, env, tmp_path):
    """The checkpoints folder is moved away while the run trains and a file takes its name: the next save cannot
    make its folder (as with a read-only one, which tests cannot make: they run as root)."""
    run, log = copy_run(base["run"], tmp_path / "run"), tmp_path / "run.log"
    (run / "metrics.json").unlink()
    proc = launch([f"hydra.run.dir={run}", "resume=true", "trainer.max_steps=100000"], env, log)
    wait_for(lambda: STEPS + 20 in steps(run), proc, log, poll=0.001)  # a checkpoint saved after the resume
    (run / "checkpoints").rename(tmp_path / "moved")
    (run / "checkpoints").write_text("not a folder")
    code, text = finish(proc, log, timeout=60)
    assert code == 74 and "Traceback" not in text, text[-3000:]
    line = one_line(_errors(text))
    assert line.startswith(f"error: The file system refused {run / 'checkpoints'}") and "(ENOTDIR)." in line, line
    assert not (run / ".lock").exists()
    moved = {int(p.name) for p in (tmp_path / "moved").iterdir() if p.name.isdigit()}
    assert STEPS + 20 in moved  # what was saved before the folder went is where it went, complete


# ----------------------------------------------------------------------------- signals during start-up


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_start_up_exits_at_once_with_nothing_trained(tiny_mnist, env, sig, tmp_path):
    # Private data caches, so that the start-up reads and decodes the data (and compiles) after "Devices:".
    private = {"CVAE_EXP_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    run, log = tmp_path / "run", tmp_path / "run.log"
    proc = launch(tiny(tiny_mnist, run, {"trainer.max_steps": 1000}), {**env, **private}, log)
    wait_for(lambda: "Devices:" in log.read_text(), proc, log, poll=0.005)
    proc.send_signal(sig)
    code, text = finish(proc, log, timeout=60)
    assert code == 128 + sig, text[-3000:]
    assert "Traceback" not in text
    assert (
        f"Stopped by {signal.Signals(sig).name} during start-up, before the first training step: "
        "nothing was trained yet and no checkpoint was written." in text
    )
    assert not steps(run) and not (run / ".lock").exists()
    assert (run / ".hydra").exists() or not run.exists()  # a launch not yet accepted leaves nothing


def test_a_start_up_signal_inside_a_garbage_collector_callback_is_raised_later_not_reported(capsys):
    """The start-up handler raises where the main thread is; inside a gc callback (JAX has one) Python can only
    report that exception ("Exception ignored in ...", a traceback in the output): it is not reported, and
    check() between the phases of the run raises it."""
    import gc

    from cvae_exp.errors import Interrupted
    from cvae_exp.runs.launch import Interruptible

    with Interruptible() as guard:

        def callback(phase, info):
            if phase == "start" and guard.received is None:
                guard._handle(signal.SIGINT, None)  # as the signal would, at this point

        gc.callbacks.append(callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(callback)
        assert guard.received == signal.SIGINT
        assert "Exception ignored" not in capsys.readouterr().err
        with pytest.raises(Interrupted):
            guard.check()
    assert sys.unraisablehook != guard._unraisable_hook  # restored on the way out
