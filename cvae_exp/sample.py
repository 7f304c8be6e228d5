"""`cvae-sample run_dir=<run dir>`: PNG grids of what the run's best checkpoint draws.

    cvae-sample run_dir=outputs/2026-11-26/10-00-00 [sample.cols=10] [sample.walk=9] [seed=0]

Writes into `<run dir>/samples/` (and logs to `<run dir>/tb/` under `samples/<name>` at the checkpoint's step),
in the data's geometry (grayscale or RGB, images of its height and width):
- `class_samples.png`: one row per class (the first `sample.classes` classes), named on the left, `sample.cols`
  samples each, when the condition is the label; `samples.png`: 10 x `sample.cols` unconditional samples for a
  VAE (z from the prior; every grid shows the decoder's mean);
- `completions.png` (quadrant task): one row per input: the condition (unobserved pixels grey),
  `sample.completions` samples, the truth;
- `reconstructions.png` (models with a recognition network): inputs on the top row, their
  reconstructions through q(z | x, y) below;
- `latent_walk.png` (latent_dim=2): z on a `sample.walk` x `sample.walk` grid over [-2, 2]^2 in the
  prior's standard coordinates (z = mean + sigma * u), decoded; one panel per class (rows of 5, the first
  `sample.classes`) for the label condition, one panel otherwise (for the quadrant task: conditioned on the first input digit).
  Columns run along z1 from -2 to 2, rows along z2 from 2 (top) to -2.
Every grid has a grey 1-pixel border between images and is scaled up `sample.scale` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from cvae_exp.cli import CONF_DIR, console, exit_on_user_error, no_wait_after_storage_failure
from cvae_exp.config import check_keys, require_run_dir, trained_run_config, trusted_modules
from cvae_exp.errors import UserError
from cvae_exp.models.kinds import kind
from cvae_exp.runs import launch

PANEL_GAP = 4  # white pixels between the per-class panels of the latent walk


@dataclass
class SampleOptions:
    cols: int = 10
    classes: int = 20  # class-conditional samples and latent walks: the first this many classes, one row each
    inputs: int = 10
    completions: int = 6
    walk: int = 9
    scale: int = 2
    split: str = "val"
    out: str = "samples"
    tensorboard: bool = True


@dataclass
class SampleApp:
    run_dir: str = MISSING
    seed: int = 0
    sample: SampleOptions = field(default_factory=SampleOptions)
    verbose: bool = False  # as in cvae-train
    trust_modules: list[str] = field(default_factory=list)  # as in cvae-train: a user's network's package, again


ConfigStore.instance().store(name="sample_app_schema", node=SampleApp)


def validate(opts) -> None:
    for key in ("cols", "classes", "inputs", "completions", "walk", "scale"):
        if getattr(opts, key) < 1:
            raise UserError(f"sample.{key}={getattr(opts, key)} must be at least 1.")
    if opts.split not in ("val", "test"):
        raise UserError(f"sample.split={opts.split} is not one of val, test.")


def mosaic(panels: list[np.ndarray], cols: int, gap: int = PANEL_GAP) -> np.ndarray:
    """Equal-sized [H, W] (or [H, W, 3]) panels in rows of `cols`, `gap` white pixels around each; one panel is
    returned as is."""
    if len(panels) == 1:
        return panels[0]
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // cols)
    out = np.ones((rows * h + (rows + 1) * gap, cols * w + (cols + 1) * gap, *panels[0].shape[2:]), np.float32)
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        out[gap + r * (h + gap) : gap + r * (h + gap) + h, gap + c * (w + gap) : gap + c * (w + gap) + w] = panel
    return out


def save_png(grid: np.ndarray, file: Path, scale: int) -> None:
    from PIL import Image

    img = Image.fromarray((np.clip(grid, 0.0, 1.0) * 255.0).round().astype(np.uint8))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(file, optimize=True)


def latent_walk(graphdef, params, x, n: int):
    """[n, n, dims] decoder means over a grid of u in [-2, 2]^2, z = prior mean + sigma * u, for one condition x [1, d]."""
    import jax.numpy as jnp
    from flax import nnx

    from cvae_exp.models.distributions import mean_of

    model = nnx.merge(graphdef, params)
    u = jnp.linspace(-2.0, 2.0, n)
    z1, z2 = jnp.meshgrid(u, u[::-1], indexing="xy")  # row r, column c -> (u[c], u[n - 1 - r])
    grid = jnp.stack([z1.ravel(), z2.ravel()], axis=-1)
    xs = jnp.repeat(x, n * n, axis=0)
    mean, log_var = model.prior(xs)
    return mean_of(model.generate(mean + jnp.exp(0.5 * log_var) * grid, xs)).reshape(n, n, -1)


def draw(run, opts, seed: int) -> dict[str, np.ndarray]:
    """{name: [H, W] grid in [0, 1]} for the pictures that fit the run's model and task (each jitted once)."""
    import functools

    import jax
    import jax.numpy as jnp

    from cvae_exp.data.pipeline import prepare
    from cvae_exp.training import images
    from cvae_exp.training.grids import tile

    task, graphdef, params = run.task, run.graphdef, run.params
    geometry = task.geometry
    key = jax.random.key(seed)
    split = run.splits.val if opts.split == "val" else run.splits.test
    n = min(opts.inputs, len(split.images))
    few = {"image": split.images[:n], "label": split.labels[:n]}
    grids = {}

    def stack(fn, *args, **static) -> np.ndarray:
        """[rows, cols, dims] from one of cvae_exp.training.images' drawings, jitted with its static arguments bound."""
        return np.asarray(jax.jit(functools.partial(fn, graphdef, task=task, **static))(params, *args))

    if task.condition == "quadrants":
        completions = stack(images.completions, few, jax.random.fold_in(key, 0), samples=int(opts.completions))
        grids["completions"] = tile(completions, geometry)
    else:
        name = "class_samples" if task.condition == "label" else "samples"  # a VAE's are unconditional
        rows = images.class_rows(task, int(opts.classes))
        samples = stack(images.class_samples, jax.random.fold_in(key, 1), cols=int(opts.cols), rows=rows)
        grids[name] = images.class_grid(samples, task)
    if kind(task.kind).recognition:  # inputs on the top row, reconstructions below
        pairs = stack(images.reconstructions, few, jax.random.fold_in(key, 2)).swapaxes(0, 1)
        grids["reconstructions"] = tile(pairs, geometry)
    if kind(task.kind).latent and run.cfg.model.latent_dim == 2:
        if task.condition == "label":
            classes = min(geometry.classes, int(opts.classes))
            conditions = [jax.nn.one_hot(jnp.array([c]), geometry.classes) for c in range(classes)]
        elif task.condition == "quadrants":
            x, _, _ = prepare({name: v[:1] for name, v in few.items()}, key, task)
            conditions = [x]
        else:
            conditions = [jnp.zeros((1, 0), jnp.float32)]
        walk = jax.jit(lambda p, x: latent_walk(graphdef, p, x, int(opts.walk)))  # compiled once for all classes
        panels = [tile(np.asarray(walk(params, x)), geometry) for x in conditions]
        grids["latent_walk"] = mosaic(panels, cols=5)
    return grids


def sample_run(run_dir: str, opts, seed: int = 0, trust=()) -> list[Path]:
    from cvae_exp.runs.tensorboard import Writer
    from cvae_exp.runs.trained_run import load_run

    run = load_run(run_dir, trust=trust)
    launch.release_log()  # accepted: the log may reach <run dir>/sample.log
    out = Path(run_dir).resolve() / opts.out
    out.mkdir(parents=True, exist_ok=True)
    grids = draw(run, opts, seed)
    writer = Writer(Path(run_dir).resolve(), enabled=opts.tensorboard)  # no resume step: nothing is purged
    written = []
    for name, grid in grids.items():
        file = out / f"{name}.png"
        save_png(grid, file, opts.scale)
        writer.image(f"samples/{name}", grid, run.step)
        written.append(file)
    writer.close()
    return written


def run(cfg: DictConfig) -> list[Path]:
    """cvae-sample's work on a composed `sample` config: the PNG files it wrote (cvae_exp.api.sample)."""
    require_run_dir(cfg, "cvae-sample")
    check_keys(cfg, SampleApp)
    validate(cfg.sample)
    trained_run_config(Path(cfg.run_dir).resolve())  # a directory that is no trained run: refused before JAX starts
    return sample_run(cfg.run_dir, cfg.sample, cfg.seed, trusted_modules(cfg))


@no_wait_after_storage_failure
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="sample")
@exit_on_user_error
@console
def main(cfg: DictConfig) -> None:
    for file in run(cfg):
        print(file)


if __name__ == "__main__":
    main()
