"""The README's command lines run as written, in order, in a fresh folder (the first creates the run directory
the next ones use), each made short the same way: the tests' small dataset and network appended (the Hub is not
reachable here), every `trainer.max_steps=N` divided by 100 and every `cvae-eval` given 10 importance
samples (its default is 100; `eval.samples=N` is divided by 100). The long ones are left out: `make` lines and
the five-job `sweep=latent_dim` multirun (tests/test_sweep.py runs sweeps); `~/shapes`, the
reader's own image folder, is one the test writes (32 x 32 RGB, 3 classes); `<date>/<time>` is the sweep the
commands before it wrote."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import in_process
from own_data import write_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["data.val_size=200", "model.hidden=[16]", "trainer.batch_size=32", "trainer.eval_batch_size=100"]
SMALL += ["trainer.progress=false", "logger.images=false", "trainer.log_every=10"]


def readme_commands() -> list[list[str]]:
    """Every `cvae-*` command of the README's bash blocks, as words, comments dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README.read_text(), re.DOTALL | re.MULTILINE)
    lines = [line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line.split() for line in lines if line.startswith("cvae-") and "sweep=latent_dim" not in line]


def shortened(words: list[str], data: str, root: Path) -> tuple[str, list[str]]:
    command, args = words[0], [w.replace("~/shapes", str(root / "shapes")) for w in words[1:]]
    module = {"cvae-train": "cvae_exp.train", "cvae-eval": "cvae_exp.evaluate", "cvae-sample": "cvae_exp.sample",
              "cvae-report": "cvae_exp.report", "cvae-bench": "cvae_exp.bench"}[command]  # fmt: skip
    args = [re.sub(r"^trainer\.max_steps=(\d+)$", lambda m: f"trainer.max_steps={int(m[1]) // 100}", a) for a in args]
    if "<date>/<time>" in " ".join(args):
        newest = max((root / "outputs" / "multirun").glob("*/*"))
        args = [a.replace("outputs/multirun/<date>/<time>", str(newest.relative_to(root))) for a in args]
    if command == "cvae-eval":
        args = [re.sub(r"^eval\.samples=(\d+)$", lambda m: f"eval.samples={int(m[1]) // 100}", a) for a in args]
        args += [] if any(a.startswith("eval.samples=") for a in args) else ["eval.samples=10"]
    if command == "cvae-train":
        steps = [] if any(a.startswith("trainer.max_steps=") for a in args) else ["trainer.max_steps=10"]
        own = [] if any(a.startswith("data.path=") for a in args) else [f"data.path={data}"]
        args += [*own, *SMALL, *steps, "trainer.eval_every=10", "checkpoint.every=10"]
    return module, args


def test_the_readmes_commands_run_as_written(tiny_mnist, cli_env, tmp_path):
    write_image_folder(tmp_path / "shapes")
    commands = readme_commands()
    assert len(commands) >= 7 and {c[0] for c in commands} >= {"cvae-train", "cvae-eval", "cvae-sample"}
    for words in commands:
        module, args = shortened(words, tiny_mnist, tmp_path)
        done = in_process(module, args, env=cli_env, cwd=tmp_path)
        assert done.returncode == 0, (" ".join(words), done.stderr[-3000:])
    run = tmp_path / "outputs" / "my_run"
    assert (run / "metrics.json").is_file() and (run / "eval.json").is_file() and any((run / "samples").iterdir())
