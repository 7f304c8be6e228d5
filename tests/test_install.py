"""A plain, non-editable install works away from the repository: the wheel carries the configs (conf/ as
cvae_exp/conf) and the bundled sample, and cvae-train runs from another folder with nothing of the checkout.

The wheel is built offline from this checkout (no build isolation) and installed without its dependencies
into a fresh virtual environment that borrows the test environment's packages through a .pth file, so the
test needs no network; what it checks is the package itself."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import CLI_TIMEOUT_S, REPO, shrunk


def test_non_editable_install_trains_from_another_folder(tiny_mnist, cli_env, tmp_path):
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run([*build, str(REPO)], check=True, capture_output=True, timeout=CLI_TIMEOUT_S)
    (wheel,) = wheels.glob("cvae_exp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cvae_exp/conf/config.yaml" in names and "cvae_exp/conf/experiment/sohn2015.yaml" in names
    # the vmap launcher, in Hydra's plugin namespace (a namespace package: no hydra_plugins/__init__.py)
    assert "hydra_plugins/cvae_vmap_launcher/vmap_launcher.py" in names and "hydra_plugins/__init__.py" not in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=CLI_TIMEOUT_S)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")  # jax, hydra, ... of this environment
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=CLI_TIMEOUT_S)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}
    found = subprocess.run(
        [str(python), "-c", "import cvae_exp; print(cvae_exp.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(REPO) not in found and str(venv) in found  # the installed copy, not the checkout
    run = elsewhere / "run"
    proc = subprocess.run(
        [
            str(venv / "bin" / "cvae-train"),
            *shrunk(tiny_mnist, run, "trainer.max_steps=5", "trainer.eval_every=5", "checkpoint.every=5"),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["step"] == 5
    plugins = subprocess.run(
        [str(venv / "bin" / "cvae-train"), "--info", "plugins"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert "VmapLauncher" in plugins.stdout, plugins.stdout[-2000:]  # Hydra's own scan finds it


def test_plain_editable_install_finds_the_vmap_launcher(cli_env, tmp_path):
    """`pip install -e .`, the editable install most people type (not the Makefile's compat mode): setuptools maps
    the packages in through an import finder that Hydra's plugin scan (pkgutil) does not see, so cvae_exp registers
    `hydra/launcher=vmap` itself. The launcher is found and runs (it refuses max_members=0 with its own sentence)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=CLI_TIMEOUT_S)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n")  # jax, hydra, ... of this environment
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    subprocess.run(
        [*install, "--no-build-isolation", "-e", str(REPO)], check=True, capture_output=True, timeout=CLI_TIMEOUT_S
    )
    assert list(site.glob("__editable__*finder.py")), sorted(p.name for p in site.iterdir())  # the finder, not compat

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}
    args = [
        "-m",
        "hydra/launcher=vmap",
        "hydra.launcher.max_members=0",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 's'}",
    ]
    proc = subprocess.run(
        [str(venv / "bin" / "cvae-train"), *args],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: hydra.launcher.max_members=0 must be at least 1 (or null for no cap)."
