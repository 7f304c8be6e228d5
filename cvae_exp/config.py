"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

The schemas make OmegaConf reject a mistyped key or a wrong type while Hydra composes the config, so
the error names the key before anything runs. Values that have the right type but are impossible
(a negative learning rate, a batch larger than the data) are checked by `validate`, also before any
data is loaded or any function compiled.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf, open_dict

from cvae_exp.errors import UserError
from cvae_exp.models.kinds import KINDS, NAMES, kind


def log_dir(run_dir: str | None) -> str:
    """Where `cvae-eval` and `cvae-sample` keep their Hydra log: the run directory when it exists, else a
    temporary folder, so that a mistyped or missing run_dir is refused without being created (the
    `${cvae_log_dir:}` resolver of conf/eval.yaml and conf/sample.yaml)."""
    path = Path(str(run_dir)).expanduser() if run_dir is not None else None
    return str(path) if path and path.is_dir() else str(Path(tempfile.gettempdir()) / "cvae_exp_refused_runs")


OmegaConf.register_new_resolver("cvae_log_dir", log_dir, replace=True)

PRIORS = ("learned", "standard")
LIKELIHOODS = ("bernoulli", "gaussian", "discretized_gaussian", "discretized_logistic")
BINARIZE = ("static", "dynamic", "threshold", "none")
CONDITIONS = ("label", "none", "quadrants")
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("stop", "skip")
RESUME = ("false", "true", "auto")
SPLITS = ("val", "test")
QUADRANT_LAYOUTS = ("left_first", "top_first")
BASELINE_INTO = ("prior", "prior_and_generation")
SAFE_TARGET_PREFIXES = ("cvae_exp.", "optax.", "flax.")
MLP_NET = "cvae_exp.models.mlp.MLPNet"
CONV_NET = "cvae_exp.models.conv.ConvNet"
NET_ROLES = ("recognition", "prior", "generation", "baseline")  # cvae_exp.models.nets.ROLES
ACTIVATIONS = ("relu", "tanh")
KERNEL_INITS = ("lecun_normal", "glorot_uniform")
OUTPUT_BIASES = ("zero", "data_logit")
KL_ESTIMATES = ("analytic", "sampled")
VAL_FROM = ("random", "last")
SCHEDULES = ("constant", "cosine", "burda", "burda_unrounded")
EVAL_CHECKPOINTS = ("best", "last")


@dataclass
class ModelConfig:
    kind: str = "cvae"  # cvae | vae | gsnn | hybrid | baseline
    hidden: list[int] = field(default_factory=lambda: [500, 500])  # every MLP's hidden widths
    latent_dim: int = 20  # dimensions of z
    prior: str = "learned"  # learned p(z|x) or the fixed N(0, I)
    likelihood: str = "bernoulli"  # bernoulli (binarized pixels) | discretized_gaussian | discretized_logistic | gaussian (8-bit pixels: data.binarize=none; gaussian dequantizes)
    min_log_var: float = -6.0  # variance floor of the continuous gaussian likelihood, as a log-variance
    mixtures: int = 10  # discretized_logistic: mixture components per pixel (PixelCNN++ and VDVAE use 10)
    alpha: float = 0.5  # hybrid: alpha * L_CVAE + (1 - alpha) * L_GSNN
    beta: float = 1.0  # weight of the KL term
    kl_warmup_steps: int = 0  # KL weight ramps linearly from 0 to beta over these steps
    baseline_run: Optional[str] = None  # a finished model=baseline run (same task): its y_hat feeds the prior p(z|x)
    baseline_hidden: Optional[list[int]] = None  # that baseline's hidden widths (its model.hidden); null: model.hidden
    baseline_into: str = "prior"  # prior (the paper's Figure 1(d)) | prior_and_generation (y_hat into p(y|x,z) too)
    baseline_frozen: bool = False  # true: the pre-trained baseline stays fixed; false: fine-tuned with the rest
    activation: str = "relu"  # relu | tanh: between the layers of every network (model/net=mlp, conv)
    kernel_init: str = "lecun_normal"  # lecun_normal (Flax's default) | glorot_uniform (yburda/iwae, Keras)
    output_bias: str = "zero"  # zero | data_logit: the generation's output bias starts at logit(mean training pixel)
    iw_samples: int = 1  # k > 1: train on the importance-weighted bound with k samples of q (cvae, vae); 1: the ELBO
    kl: str = "analytic"  # analytic | sampled: at iw_samples=1, KL in closed form or log q - log p at the sample
    net: dict[str, Any] = field(
        default_factory=lambda: {"_target_": MLP_NET}
    )  # every network's builder and its keys (model/net=mlp|conv, or a trusted module's _target_); model.net.<role> for one role


@dataclass
class ConvNetConfig:
    """The keys of `model/net=conv` (cvae_exp.models.conv.ConvNet): every network convolutional, sized here and
    by the data's geometry."""

    _target_: str = CONV_NET  # the network's builder
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one stride-2 convolution per entry, its channels
    kernel: int = 3  # kernel height and width of every convolution
    blocks: int = 0  # residual blocks after each downsampling (and before each upsampling)
    norm: str = "none"  # none | group | layer: per-example GroupNorm (layer: one group), never batch statistics
    dense: list[int] = field(
        default_factory=lambda: [256]
    )  # dense layers (model.activation) at the bottleneck (flattened features + vectors)
    label: str = "bottleneck"  # bottleneck | channels: how a class label joins a network that reads images


@dataclass
class MLPNetConfig:
    """The keys of `model/net=mlp` (cvae_exp.models.mlp.MLPNet, the default): every network an MLP of model.hidden."""

    _target_: str = MLP_NET  # the network's builder


BUILTIN_NETS = {MLP_NET: MLPNetConfig, CONV_NET: ConvNetConfig}


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist
    path: Optional[str] = (
        None  # a local folder: Parquet (Hub layout), images (imagefolder layout) or IDX; unset: the Hub
    )
    hub: Optional[str] = None  # a Hub dataset <owner/name> (cached by datasets), instead of the one `name` stands for
    image_column: Optional[str] = None  # the image column of a table; null: the Image feature (else `image`)
    label_column: Optional[str] = None  # the class label column; null: the ClassLabel feature (else `label`)
    resize: Optional[list[int]] = None  # [H, W]: resize every image to H x W (bilinear); null: all must be one size
    binarize: str = "dynamic"  # static | dynamic | threshold | none
    val_size: int = 5000  # carved from the training split with `split_seed`
    split_seed: int = 0  # seed of the train/val split
    val_from: str = "random"  # random (with split_seed) | last: the last val_size digits of the training file
    val_holdout: bool = True  # false: the val digits are trained on too (a monitor of fit, not a held-out set)
    shuffle: bool = True  # false: every epoch visits the training digits in the same order (the split's)
    binarize_seed: int = 42  # static / dynamic: seed of the one fixed Bernoulli draw of every split that is scored
    condition: str = "label"  # label | none | quadrants
    n_given: int = 1  # quadrants given (quadrant task): 1, 2 or 3, in the order of quadrant_layout
    quadrant_layout: str = "left_first"  # left_first: bottom-left, +top-left, +top-right | top_first
    omission_rate: float = 0.0  # probability of blanking a random square of the condition


@dataclass
class OptimizerConfig:
    _target_: str = "cvae_exp.training.optim.make_optimizer"  # the factory hydra.utils.instantiate calls
    transform: dict[str, Any] = field(
        default_factory=lambda: {"_target_": "optax.adam", "_partial_": True}
    )  # a partial optax constructor (optax.adam, optax.adamw, ...) and its arguments
    lr: float = 1e-3  # peak learning rate
    schedule: str = "constant"  # constant | cosine (cosine decays to 0 at trainer.max_steps) | burda | burda_unrounded
    steps_per_epoch: Optional[int] = None  # burda schedules: steps in an epoch; null: training digits // batch_size
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    clip_norm: Optional[float] = None  # clip gradients to this global norm; null: no clipping


@dataclass
class TrainerConfig:
    max_steps: int = 5000  # optimizer steps in all (a resumed run continues up to it)
    batch_size: int = 128  # global batch, split over devices
    eval_every: int = 1000  # steps between validation passes (and image grids)
    eval_batch_size: int = 1000  # batch of the validation pass, rounded up to a multiple of the devices
    log_every: int = 50  # steps between train/* scalars (the only host syncs of the loop)
    devices: str = "all"  # all | N
    precision: str = "fp32"  # fp32 | bf16 (bf16 matmul inputs, fp32 params and accumulation)
    nan_policy: str = "stop"  # stop | skip
    skip_limit: float = 0.1  # nan_policy=skip: stop (exit 2) when more than this share of the steps since the last evaluation was skipped
    progress: bool = True  # tqdm progress bar
    num_seeds: int = 1  # K > 1: K models with seeds seed..seed+K-1 trained together by jax.vmap
    data_on_device: bool = True  # training split held on the devices, batches cut inside the step (one process)
    steps_per_dispatch: int = (
        1  # N > 1: up to N steps per dispatch between log/eval/checkpoint steps (data on the device)
    )
    patience: int = 0  # early stopping: stop after this many evaluations in a row without a better val/elbo; 0: off
    min_delta: float = 0.0  # early stopping: a better val/elbo is one lower than the best so far by more than this


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is also saved at the end)
    keep: int = 3  # newest checkpoints kept, besides the best by val/elbo
    enabled: bool = True  # false: no checkpoints at all (benchmarks, throwaway runs)


@dataclass
class LoggerConfig:
    tensorboard: bool = True  # write <run dir>/tb event files
    images: bool = True  # reconstruction and per-class sample grids at each evaluation


@dataclass
class EvalConfig:
    samples: int = 100  # importance samples S per example
    split: str = "test"  # val | test
    chunk: int = 100  # samples evaluated at once (memory: batch x chunk x pixels)
    batch_size: int = 500  # examples evaluated at once
    seed_index: int = 0  # runs with trainer.num_seeds=K: which of the K models (seed + seed_index)
    examples: int = 0  # evaluate the first N digits of the split only; 0: all of them
    tag: str = ""  # non-empty: write eval_<split>_<tag>.json (studies beside the table) instead of eval_<split>.json
    progress: bool = True  # cvae-eval: a progress bar with the time left (TQDM_DISABLE=1 also turns it off)
    checkpoint: str = "best"  # best (by val/elbo) | last: the newest checkpoint (protocols that score the final model)


@dataclass
class BenchConfig:
    steps: int = 100  # timed training steps (cvae-bench)
    warmup: int = 10  # untimed steps first (compilation, caches)
    reference: bool = True  # also time a bare jitted loop of the same model, for comparison
    members: int = 0  # K >= 2: time a vmap group of K members (seeds seed.., two learning rates) instead of one run


@dataclass
class ClusterConfig:
    coordinator_address: Optional[str] = None  # host:port of process 0; set all three for multi-host
    num_processes: Optional[int] = None  # processes in the run
    process_id: Optional[int] = None  # this process, 0..num_processes-1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 0  # one root key per run: parameters, data order and every step's randomness
    resume: str = "false"  # false | true | auto (resume when the run dir holds a checkpoint)
    resume_data_change: bool = (
        False  # resume: let data.* or the data itself (source, split sizes) differ from the run's
    )
    verbose: bool = False  # also show what JAX and Orbax log about themselves (the TPU probe, read-only restores)
    trust_modules: list[str] = field(
        default_factory=list
    )  # packages whose model.net targets this command may import (e.g. [mypkg]); never read from a saved run


@dataclass
class EvalApp:
    """The config of `cvae-eval` and `cvae-sample`: a run directory and how to evaluate it."""

    run_dir: str = MISSING  # the cvae-train run directory to evaluate
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # key of the importance samples
    verbose: bool = False  # as in cvae-train
    trust_modules: list[str] = field(
        default_factory=list
    )  # as in cvae-train: a run built with a user's network needs its package named again here


def register_configs() -> None:
    """Registers the schemas; the YAML files in conf/ list them first in their defaults. Also registers the vmap
    launcher (`register_launcher`)."""
    register_launcher()
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="eval_app_schema", node=EvalApp)
    for group, node in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("optimizer", OptimizerConfig),
        ("trainer", TrainerConfig),
        ("checkpoint", CheckpointConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def register_launcher() -> None:
    """`hydra/launcher=vmap` under every install: its config in the ConfigStore and its class among Hydra's plugins,
    from here. Hydra finds plugins by scanning the hydra_plugins namespace package with pkgutil, which does not see
    a package that setuptools' default editable install (`pip install -e .`) maps in through its import finder;
    imported by name, it is found under every install (wheel, editable, compat). Hydra's own scan still finds it
    where it can (`cvae-train --info plugins`)."""
    try:
        from hydra.core.plugins import Plugins

        from hydra_plugins.cvae_vmap_launcher.config import VmapLauncherConf
        from hydra_plugins.cvae_vmap_launcher.vmap_launcher import VmapLauncher
    except ImportError:  # installed without its plugin package: Hydra's scan is all there is
        return
    ConfigStore.instance().store(group="hydra/launcher", name="vmap", node=VmapLauncherConf, provider="cvae_exp")
    Plugins.instance().register(VmapLauncher)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value} is not one of {', '.join(allowed)}.")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise UserError(f"{key}={value} must be at least {low}.")


def _targets(node: Any, path: str = "optimizer") -> list[tuple[str, str]]:
    """Every `_target_` inside a config node, with where it sits (instantiate also builds those in lists)."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_":
                found.append((f"{path}._target_", str(v)))
            else:
                found.extend(_targets(v, f"{path}.{k}"))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(_targets(v, f"{path}[{i}]"))
    return found


def check_targets(cfg: DictConfig) -> None:
    """Refuses a `_target_` (the optimizer's, the networks') that resolves to an object defined outside the safe
    packages or, for a network, the packages this command trusts (`trust_modules`).

    `validate` checks the prefix only, which an attribute chain gets past (`cvae_exp.data.sources.os.system`
    is os.system); resolving imports the target's package, so this runs after the cheap checks.
    """
    from hydra._internal.utils import _locate  # what instantiate resolves with (get_object also logs errors)

    trust = tuple(f"{t}." for t in trusted_modules(cfg))
    found = [(w, t, SAFE_TARGET_PREFIXES) for w, t in _targets(OmegaConf.to_container(cfg.optimizer, resolve=True))]
    net = OmegaConf.to_container(cfg.model.net, resolve=True) if "net" in cfg.model else {}
    found += [(w, t, SAFE_TARGET_PREFIXES + trust) for w, t in _targets(net, "model.net")]
    for where, target, allowed in found:
        if where.startswith("model.net") and not target.startswith(allowed):
            raise UserError(_untrusted(where, target))  # not even imported
        try:
            obj = _locate(target)
        except Exception as err:  # ImportError, AttributeError, ...: the target does not exist
            raise UserError(f"{where}={target} cannot be imported ({type(err).__name__}).") from None
        home = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")  # a module has only __name__
        if not f"{home}.".startswith(allowed):
            names = ", ".join(p.rstrip(".") for p in allowed)
            raise UserError(
                f"{where}={target} is refused: it resolves to an object from {home or 'an unknown module'}, and "
                f"configs may only build objects from {names}."
            )


def trusted_modules(cfg: DictConfig) -> list[str]:
    """The packages whose networks this command may build: `trust_modules`, as the command line gave it."""
    return [str(t) for t in cfg.get("trust_modules") or []]


def _untrusted(where: str, target: str) -> str:
    package = target.split(".")[0]
    return (
        f"{where}={target} is refused: building it would import {package}, which this command does not trust; "
        f"name it on the command line with trust_modules=[{package}] (a saved config never grants that)."
    )


def with_trust(cfg: DictConfig, trust) -> DictConfig:
    """A saved run's config with this command's `trust_modules` (a saved config's own is never used)."""
    with open_dict(cfg):
        cfg.trust_modules = [str(t) for t in trust or []]
    return cfg


def net_nodes(net: dict) -> list[tuple[str, dict]]:
    """(where, node) of every network builder in a `model.net` node: its own, then each role's own node."""
    top = {k: v for k, v in net.items() if k not in NET_ROLES}
    return [("model.net", top)] + [(f"model.net.{r}", net[r]) for r in NET_ROLES if r in net]


def differing_keys(prefix: str, was: dict, now: dict) -> list[str]:
    """The keys below `prefix` whose values differ (model.net.channels rather than model.net); another
    `_target_` is another network altogether, named alone."""
    if was.get("_target_") != now.get("_target_"):
        return [f"{prefix}._target_"]
    out = []
    for k in sorted(set(was) | set(now), key=str):
        a, b = was.get(k), now.get(k)
        if a != b:
            both = isinstance(a, dict) and isinstance(b, dict)
            out += differing_keys(f"{prefix}.{k}", a, b) if both else [f"{prefix}.{k}"]
    return out


def role_net(net: dict, role: str) -> dict:
    """The node that builds the `role` network (cvae_exp.models.nets.NetFactory.node)."""
    own = net.get(role)
    return own if isinstance(own, dict) else {k: v for k, v in net.items() if k not in NET_ROLES}


def check_net(cfg: DictConfig) -> None:
    """Refuses a `model.net` that cannot build networks, naming the key: a node without `_target_`, a key or a
    value that model/net=mlp or conv does not take, or (imported by no one yet) a module the command does not
    trust. A trusted module's keys are its own: its constructor checks them."""
    trust = tuple(f"{t}." for t in trusted_modules(cfg))
    for i, t in enumerate(trusted_modules(cfg)):
        if not t or not all(part.isidentifier() for part in t.split(".")):
            raise UserError(f"trust_modules[{i}]={t} is not a module name (mypkg or mypkg.nets).")
    net = OmegaConf.to_container(cfg.model.net, resolve=True)
    for where, node in net_nodes(net):
        if not isinstance(node, dict) or not node.get("_target_"):
            raise UserError(
                f"{where} names no network: set {where}._target_ (model/net=mlp or conv, or your module's)."
            )
        target = str(node["_target_"])
        schema = BUILTIN_NETS.get(target)
        if schema is None:
            if not target.startswith(SAFE_TARGET_PREFIXES + trust):
                raise UserError(_untrusted(f"{where}._target_", target))
            continue
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        except Exception as err:  # an unknown key, a wrong type
            keys = ", ".join(f.name for f in dataclasses.fields(schema))
            bad = getattr(err, "full_key", "") or ""
            raise UserError(
                f"{where}.{bad} is not a key of {target} (it takes {keys})."
                if "Key" in type(err).__name__
                else f"{where}.{bad}: {str(err).splitlines()[0]}"
            ) from None
        if schema is ConvNetConfig:
            _check_conv(where, merged)


def _check_conv(where: str, c: DictConfig) -> None:
    if not c.channels:
        raise UserError(f"{where}.channels=[] must list at least one convolution's channels.")
    for key in ("channels", "dense"):
        for i, width in enumerate(c[key]):
            _at_least(f"{where}.{key}[{i}]", width, 1)
    _at_least(f"{where}.kernel", c.kernel, 1)
    _at_least(f"{where}.blocks", c.blocks, 0)
    _choice(f"{where}.norm", c.norm, ("none", "group", "layer"))
    _choice(f"{where}.label", c.label, ("bottleneck", "channels"))


# Factories that moved since a run saved its config: {the target it recorded: where it is now}.
MOVED_TARGETS = {"cvae_exp.optim.make_optimizer": "cvae_exp.training.optim.make_optimizer"}


# Keys renamed since a run saved its config: {group: {old name: new name}}.
RENAMED_KEYS = {"data": {"hub_id": "hub"}}


def _renamed(saved: Any) -> Any:
    """A saved config with the keys renamed since it was saved under their new names."""
    plain = OmegaConf.to_container(saved) if isinstance(saved, DictConfig) else saved
    if not isinstance(plain, dict):
        return saved
    out = dict(plain)
    for group, names in RENAMED_KEYS.items():
        node = out.get(group)
        if isinstance(node, dict) and any(old in node for old in names):
            out[group] = {names.get(k, k): v for k, v in node.items()}
    return out


# Keys added since a run could have saved its config, each with the value that reproduces how runs behaved
# before it existed (a function of the saved config where that depends on it). A saved config without such a
# key takes this value (resume, cvae-eval, cvae-sample), not today's default; NOT_RECORDED: no value of today
# reproduces it (it compares as different, and the key takes today's default). Keys added in neither this
# table nor the saved config are compared nowhere (`saved_value`).
NOT_RECORDED = "<not recorded: the run predates this key>"
ADDED_KEYS: dict[str, Any] = {
    "model.baseline_run": None,
    "model.baseline_hidden": None,
    # the aid fed y_hat to the prior and the generation networks until model.baseline_into existed
    "model.baseline_into": lambda c: "prior_and_generation" if _get(c, "model.baseline_run") else "prior",
    "model.baseline_frozen": False,
    "data.quadrant_layout": "top_first",  # top-left, top-right, bottom-left, until left_first was added
    # static and dynamic scored another draw (seeds 12345/12346, drawn after the split) before binarize_seed
    "data.binarize_seed": lambda c: NOT_RECORDED if _get(c, "data.binarize") in ("static", "dynamic") else 42,
    "trainer.num_seeds": 1,
    "trainer.patience": 0,
    "trainer.min_delta": 0.0,
    "trainer.skip_limit": 1.0,  # nan_policy=skip never stopped for the share of skipped steps
    # the data's geometry and 8-bit likelihoods (MNIST's columns, sizes and likelihoods until then)
    "data.image_column": None,
    "data.label_column": None,
    "data.resize": None,
    "model.mixtures": 10,
    # the external checks' protocols (ReLU networks, LeCun-normal init, the ELBO, a random split, shuffled epochs)
    "model.activation": "relu",
    "model.kernel_init": "lecun_normal",
    "model.output_bias": "zero",
    "model.iw_samples": 1,
    "model.kl": "analytic",
    "data.val_from": "random",
    "data.val_holdout": True,
    "data.shuffle": True,
    "optimizer.steps_per_epoch": None,
    "model.net": lambda c: {"_target_": MLP_NET},  # every network an MLP of model.hidden until model.net existed
    # (trainer.data_on_device is not here: either feed trains the same parameters, so today's faster default)
}
_ABSENT = object()


def _get(config: Any, dotted_key: str, default: Any = None) -> Any:
    for part in dotted_key.split("."):
        if not (isinstance(config, (dict, DictConfig)) and part in config):
            return default
        config = config[part]
    return config


def recorded(cfg: DictConfig) -> dict:
    """The config as runs record it (checkpoint meta, TensorBoard hparams): interpolations as written, never
    resolved, as Hydra's .hydra/config.yaml holds them, so that `${oc.env:TOKEN}` is stored as that text and
    not as the secret. What computes uses the resolved values; `resolved_record` reads a record back."""
    return OmegaConf.to_container(cfg, resolve=False)


def resolved_record(saved: Any) -> Any:
    """A recorded config with its interpolations resolved here and now (for comparing it with this launch's
    resolved config); one that cannot be resolved stays as written (and differs). Records from before
    `recorded` hold resolved values already."""
    if not isinstance(saved, (dict, DictConfig)):
        return saved
    node = OmegaConf.create(saved) if isinstance(saved, dict) else saved

    def walk(container, path):
        if isinstance(container, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in container.items()}
        if isinstance(container, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(container)]
        if isinstance(container, str) and "${" in container:
            try:
                value = OmegaConf.select(node, path, throw_on_resolution_failure=True)
                return (
                    OmegaConf.to_container(value, resolve=True)
                    if isinstance(value, (DictConfig, ListConfig))
                    else value
                )
            except Exception:  # an unset variable, a key that is gone: as written
                return container
        return container

    return walk(OmegaConf.to_container(node, resolve=False), "")


def saved_value(saved: Any, dotted_key: str) -> Any:
    """A key's value in a saved config: its own, or (added since) the value of ADDED_KEYS that reproduces how
    the run behaved; `_ABSENT` for a key in neither, which comparisons skip."""
    value = _get(saved, dotted_key, _ABSENT)
    if value is _ABSENT and dotted_key in ADDED_KEYS:
        value = ADDED_KEYS[dotted_key]
        value = value(saved) if callable(value) else value
    return value


def differs(saved: Any, current: Any, dotted_key: str) -> bool:
    """Whether a key of the current config differs from the run's saved one (a key the saved run could not
    have had, and that ADDED_KEYS does not know, does not)."""
    return bool(differing(resolved_record(saved), current, [dotted_key]))


def differing(record: Any, current: Any, dotted_keys: Iterable[str]) -> list[str]:
    """The keys among `dotted_keys`, in their order, that `differs` names, given the saved config already
    resolved (`resolved_record`): a caller comparing many keys resolves it once."""
    out = []
    for key in dotted_keys:
        was = saved_value(record, key)
        if was is not _ABSENT and was != _get(current, key):
            out.append(key)
    return out


def with_added_keys(saved: Any) -> dict:
    """A saved config as a plain dict, with the keys of ADDED_KEYS it lacks set to their values from before."""
    out = OmegaConf.to_container(saved, resolve=False) if isinstance(saved, DictConfig) else copy.deepcopy(saved)
    for key in ADDED_KEYS:
        value = saved_value(out, key)
        if _get(out, key, _ABSENT) is _ABSENT and value != NOT_RECORDED:
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def onto_schema(saved: Any) -> DictConfig:
    """A saved config (dict or DictConfig) merged onto the schema: keys added since it was saved get the values
    that reproduce how it ran (ADDED_KEYS; else their defaults), keys and factories that moved since are found where
    they are now, and types are checked."""
    out = OmegaConf.merge(OmegaConf.structured(Config), with_added_keys(_renamed(saved)))
    target = out.optimizer.get("_target_")
    if target in MOVED_TARGETS:
        out.optimizer._target_ = MOVED_TARGETS[target]
    return out


def read_run_config(run_dir: Path, key: str) -> DictConfig:
    """The config a cvae-train run directory was launched with (`.hydra/config.yaml`), onto the schema;
    `key` names the setting that pointed here in the error when the directory is not a run."""
    file = run_dir / ".hydra" / "config.yaml"
    if not file.is_file():
        raise UserError(f"{key} is not a cvae-train run directory: {file} is missing.")
    try:
        return onto_schema(OmegaConf.load(file))
    except Exception as err:  # YAML or schema errors: the file is not a config this version reads
        raise UserError(f"{key} has an unreadable config {file} ({type(err).__name__}).") from None


def check_baseline_run(cfg: DictConfig) -> None:
    """Refuses a `model.baseline_run` that cannot start this model's baseline network, naming the key.

    It must be a finished `model=baseline` run of the same quadrant task, with a checkpoint, and the model a
    cvae, gsnn or hybrid with a learned prior. Reads only the run's saved config and lists its checkpoint
    folder, so it is as cheap as the other checks; the parameters are read when training starts.
    """
    m, d = cfg.model, cfg.data
    if m.baseline_run is None:
        return
    key = f"model.baseline_run={m.baseline_run}"
    if not kind(m.kind).aided or m.prior != "learned":
        raise UserError(
            f"{key} feeds a baseline's prediction to the learned prior network of a cvae, gsnn or hybrid, "
            f"but model.kind={m.kind} with model.prior={m.prior} has none."
        )
    if d.condition != "quadrants":
        raise UserError(f"{key} needs data.condition=quadrants (the baseline completes images), not {d.condition}.")
    run = Path(m.baseline_run).expanduser()
    if not run.is_dir():
        raise UserError(f"{key} does not exist: train the model=baseline run first, or fix the path.")
    saved = read_run_config(run, key)
    if saved.model.kind not in KINDS or kind(saved.model.kind).latent:  # the baseline network has no z
        raise UserError(f"{key} is a model.kind={saved.model.kind} run; it must be a model=baseline run.")
    for name in ("name", "condition", "n_given", "quadrant_layout"):
        if saved.data[name] != d[name]:
            raise UserError(
                f"{key} was trained with data.{name}={saved.data[name]}, but this run has data.{name}={d[name]}: "
                "the baseline must solve the same task."
            )
    if saved.model.likelihood != m.likelihood:
        raise UserError(
            f"{key} was trained with model.likelihood={saved.model.likelihood}, but this run has "
            f"model.likelihood={m.likelihood}."
        )
    was, now = role_net(_plain(saved.model.net), "baseline"), role_net(_plain(m.net), "baseline")
    if was != now:
        keys = ", ".join(differing_keys("model.net", was, now))
        raise UserError(
            f"{key} was trained with different {keys} than this model's baseline network would have: give this "
            "run the model.net of that run (model/net=...)."
        )
    if saved.model.output_bias != m.output_bias and now.get("_target_") != MLP_NET:
        raise UserError(  # the MLP's output bias is its last layer's; another network's may be a parameter of its own
            f"{key} was trained with model.output_bias={saved.model.output_bias}, but this run has "
            f"model.output_bias={m.output_bias}, which gives its {now.get('_target_')} baseline network other parameters."
        )
    if saved.model.activation != m.activation:
        raise UserError(
            f"{key} was trained with model.activation={saved.model.activation}, but this run has "
            f"model.activation={m.activation}."
        )
    hidden = list(m.baseline_hidden or m.hidden)
    if list(saved.model.hidden) != hidden:
        raise UserError(
            f"{key} has model.hidden={list(saved.model.hidden)}, but this model's baseline network would have "
            f"{hidden}: set model.baseline_hidden={list(saved.model.hidden)}."
        )
    folder = run / "checkpoints"
    if not (folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())):
        raise UserError(f"{key} holds no checkpoint in {folder}: let the baseline run save one first.")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def check_likelihood(likelihood: str, binarize: str) -> None:
    """Every figure a run reports is a log-likelihood of its data: Bernoulli for binarized pixels, a
    probability of the 256 values for 8-bit pixels, the continuous Gaussian only on dequantized ones."""
    if likelihood == "bernoulli" and binarize == "none":
        raise UserError(
            "model.likelihood=bernoulli scores binarized pixels, but data.binarize=none keeps 8-bit ones: use "
            "model.likelihood=discretized_gaussian, discretized_logistic or gaussian (dequantized), or binarize."
        )
    if likelihood == "gaussian" and binarize != "none":
        raise UserError(
            f"model.likelihood=gaussian is a density of continuous values, so it needs data.binarize=none (8-bit "
            f"pixels, dequantized), not data.binarize={binarize}: use model.likelihood=bernoulli for binarized pixels."
        )


def data_columns(cfg: DictConfig):
    """How the data's tables are read (cvae_exp.data.decode.Columns), from data.image_column,
    data.label_column and data.resize."""
    from cvae_exp.data.decode import Columns

    d = cfg.data
    resize = tuple(int(v) for v in d.resize) if d.resize is not None else None
    return Columns(d.image_column, d.label_column, resize)


def check_data_path(cfg: DictConfig) -> None:
    """data.path (and a table's image and label columns) checked in milliseconds, before any work: a model
    conditioned on labels needs a label column."""
    from cvae_exp.data import sources

    labels = cfg.data.condition == "label" and not kind(cfg.model.kind).fixed_prior
    sources.check_path(cfg.data.path, data_columns(cfg), needs_labels=labels)


def check_network_options(m: DictConfig) -> None:
    """The networks' activation and initialisation, and the importance-weighted objective (cvae and vae only:
    the GSNN term and the baseline have no q to weight)."""
    _choice("model.activation", m.activation, ACTIVATIONS)
    _choice("model.kernel_init", m.kernel_init, KERNEL_INITS)
    _choice("model.output_bias", m.output_bias, OUTPUT_BIASES)
    if m.output_bias == "data_logit" and m.likelihood != "bernoulli":
        raise UserError(f"model.output_bias=data_logit sets Bernoulli logits, but model.likelihood={m.likelihood}.")
    _at_least("model.iw_samples", m.iw_samples, 1)
    _choice("model.kl", m.kl, KL_ESTIMATES)
    what = kind(m.kind)
    if (m.iw_samples > 1 or m.kl == "sampled") and not (what.recognition and not what.prior_term):
        setting = f"model.iw_samples={m.iw_samples}" if m.iw_samples > 1 else "model.kl=sampled"
        raise UserError(f"{setting} weights samples of q(z | x, y): only model.kind=cvae or vae has that objective.")


def check_keys(cfg: DictConfig, schema: type | None = None) -> None:
    """Refuses a key the schema does not have, such as one added with `+` (`+trainer.max_stepz=5`), which
    Hydra accepts; open nodes (optimizer.transform) take any key. Then every value must resolve
    (`check_interpolations`)."""
    from omegaconf.errors import ConfigKeyError

    try:
        OmegaConf.merge(OmegaConf.structured(schema or Config), OmegaConf.to_container(cfg, resolve=False))
    except ConfigKeyError as err:
        raise UserError(
            f"{err.full_key} is not a config key (see docs/configuration.md for the keys there are)."
        ) from None
    check_interpolations(cfg)


def check_interpolations(cfg: DictConfig) -> None:
    """Refuses, naming the key, an interpolation that cannot be resolved (`${oc.env:X}` with X unset, a key
    that refers to itself, a key that does not exist), before anything reads it: resolved later, it would be
    a traceback in the middle of the command."""
    from omegaconf.errors import OmegaConfBaseException

    def walk(node, path: str) -> None:
        written = OmegaConf.to_container(node, resolve=False)
        for key in written if isinstance(node, DictConfig) else range(len(written)):
            where = f"{path}[{key}]" if isinstance(node, ListConfig) else f"{path}.{key}" if path else str(key)
            if where == "hydra" or OmegaConf.is_missing(node, key):  # Hydra's own node; a ??? (its own check)
                continue
            raw = written[key]
            try:
                value = node[key]
            except OmegaConfBaseException as err:
                reason = re.sub(r"^\w+ raised while resolving interpolation: ", "", str(err).splitlines()[0]).rstrip(
                    "."
                )
                raise UserError(f"{where}={raw} cannot be resolved: {reason}.") from None
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value, where)

    walk(cfg, "")


def resume_mode(cfg: DictConfig) -> str:
    """`resume` as one of false | true | auto (Hydra parses `resume=true` as a bool)."""
    return str(cfg.resume).lower()


def require_run_dir(cfg: DictConfig, command: str) -> None:
    """`cvae-eval` and `cvae-sample` need the run to work on; without one, one sentence says so."""
    if OmegaConf.is_missing(cfg, "run_dir"):
        raise UserError(f"run_dir is missing: {command} run_dir=<a cvae-train run directory> names the run to use.")


def trained_run_config(run_dir: Path) -> DictConfig:
    """The config of the cvae-train run in `run_dir`, refused with one sentence where the directory is no run
    or holds no checkpoints/ folder."""
    cfg = read_run_config(run_dir, f"run_dir={run_dir}")
    if not (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir={run_dir} holds no checkpoints/ folder.")
    return cfg


def validate_eval(cfg: DictConfig) -> None:
    _at_least("eval.samples", cfg.eval.samples, 1)
    _at_least("eval.chunk", cfg.eval.chunk, 1)
    _at_least("eval.batch_size", cfg.eval.batch_size, 1)
    _at_least("eval.seed_index", cfg.eval.seed_index, 0)
    _at_least("eval.examples", cfg.eval.examples, 0)
    if not all(c.isalnum() or c in "-_" for c in cfg.eval.tag):
        raise UserError(f"eval.tag={cfg.eval.tag} may hold only letters, digits, '-' and '_' (it names a file).")
    _choice("eval.split", cfg.eval.split, SPLITS)
    _choice("eval.checkpoint", cfg.eval.checkpoint, EVAL_CHECKPOINTS)


# Step counts: the step counter and the schedules count in int32 on the devices.
STEP_KEYS = (
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.log_every",
    "checkpoint.every",
    "model.kl_warmup_steps",
    "optimizer.warmup_steps",
)
MAX_STEPS = 2**31 - 1


def check_numbers(cfg: DictConfig) -> None:
    """Every float key (optimizer.transform's arguments too) must be a finite number: NaN passes every
    comparison the checks below make, and an infinity means nothing here. A step count must fit the
    devices' int32 step counter."""
    import math

    check_interpolations(cfg)  # a resumed run's saved config is checked here first
    values = dotted(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True))
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value} must be a finite number.")
    for key in STEP_KEYS:
        if isinstance(values.get(key), int) and values[key] > MAX_STEPS:
            raise UserError(f"{key}={values[key]} is beyond the step counter's range (at most {MAX_STEPS:,}).")


def validate(cfg: DictConfig) -> None:
    """Refuses impossible values with one sentence naming the key; cheap, runs before any work."""
    check_numbers(cfg)
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.trainer
    _choice("model.kind", m.kind, NAMES)
    _choice("model.prior", m.prior, PRIORS)
    _choice("model.likelihood", m.likelihood, LIKELIHOODS)
    _at_least("model.latent_dim", m.latent_dim, 1)
    for i, width in enumerate(m.hidden):
        _at_least(f"model.hidden[{i}]", width, 1)
    if not 0.0 <= m.alpha <= 1.0:
        raise UserError(f"model.alpha={m.alpha} must lie in [0, 1].")
    _at_least("model.beta", m.beta, 0.0)
    _at_least("model.kl_warmup_steps", m.kl_warmup_steps, 0)
    _choice("data.binarize", d.binarize, BINARIZE)
    _choice("data.condition", d.condition, CONDITIONS)
    _choice("data.quadrant_layout", d.quadrant_layout, QUADRANT_LAYOUTS)
    if d.condition == "quadrants" and d.n_given not in (1, 2, 3):
        raise UserError(f"data.n_given={d.n_given} must be 1, 2 or 3.")
    if kind(m.kind).needs_condition and d.condition == "none":
        raise UserError(f"model.kind={m.kind} predicts y from a condition, but data.condition=none.")
    if kind(m.kind).prior_term and m.prior != "learned":
        raise UserError(f"model.kind={m.kind} trains through the prior network and needs model.prior=learned.")
    check_likelihood(m.likelihood, d.binarize)
    _at_least("model.mixtures", m.mixtures, 1)
    if d.resize is not None and (len(d.resize) != 2 or min(d.resize) < 1):
        raise UserError(f"data.resize={list(d.resize)} must be [height, width], two positive sizes (or null).")
    check_net(cfg)
    _choice("model.baseline_into", m.baseline_into, BASELINE_INTO)
    check_network_options(m)
    for i, width in enumerate(m.baseline_hidden or []):
        _at_least(f"model.baseline_hidden[{i}]", width, 1)
    check_baseline_run(cfg)
    if not 0.0 <= d.omission_rate <= 1.0:
        raise UserError(f"data.omission_rate={d.omission_rate} must lie in [0, 1].")
    _at_least("data.val_size", d.val_size, 1)
    _choice("data.val_from", d.val_from, VAL_FROM)
    if o.lr <= 0:
        raise UserError(f"optimizer.lr={o.lr} must be positive.")
    _choice("optimizer.schedule", o.schedule, SCHEDULES)
    if o.steps_per_epoch is not None:
        _at_least("optimizer.steps_per_epoch", o.steps_per_epoch, 1)
    _at_least("optimizer.warmup_steps", o.warmup_steps, 0)
    if o.schedule == "cosine" and o.warmup_steps >= t.max_steps:
        raise UserError(
            f"optimizer.warmup_steps={o.warmup_steps} leaves no steps to decay in: the cosine schedule needs it "
            f"below trainer.max_steps={t.max_steps}."
        )
    if o.clip_norm is not None and o.clip_norm <= 0:
        raise UserError(f"optimizer.clip_norm={o.clip_norm} must be positive (or null for no clipping).")
    for where, target in _targets(OmegaConf.to_container(o, resolve=True)):
        if not target.startswith(SAFE_TARGET_PREFIXES):
            raise UserError(
                f"{where}={target} is refused: configs may only build objects from "
                f"{', '.join(p.rstrip('.') for p in SAFE_TARGET_PREFIXES)}."
            )
    _at_least("trainer.max_steps", t.max_steps, 1)
    _at_least("trainer.batch_size", t.batch_size, 1)
    _at_least("trainer.eval_every", t.eval_every, 1)
    _at_least("trainer.eval_batch_size", t.eval_batch_size, 1)
    _at_least("trainer.log_every", t.log_every, 1)
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.nan_policy", t.nan_policy, NAN_POLICIES)
    if not 0.0 <= t.skip_limit <= 1.0:
        raise UserError(f"trainer.skip_limit={t.skip_limit} must lie in [0, 1].")
    _at_least("trainer.num_seeds", t.num_seeds, 1)
    _at_least("trainer.steps_per_dispatch", t.steps_per_dispatch, 1)
    _at_least("trainer.patience", t.patience, 0)
    _at_least("trainer.min_delta", t.min_delta, 0)
    if t.devices != "all" and not (str(t.devices).isdigit() and int(t.devices) >= 1):
        raise UserError(f"trainer.devices={t.devices} must be 'all' or a positive number.")
    _at_least("checkpoint.every", cfg.checkpoint.every, 1)
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 1)
    validate_eval(cfg)
    _choice("resume", resume_mode(cfg), RESUME)


def dotted(tree: dict, groups: tuple[str, ...] | None = None, prefix: str = "") -> dict:
    """A nested plain config as dotted keys ("optimizer.transform.b1": 0.9), of the top-level `groups` only
    when given; an empty mapping has no key to show and is left out."""
    out = {}
    for k, v in tree.items():
        if prefix == "" and groups is not None and k not in groups:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(dotted(v, groups, f"{name}."))
        else:
            out[name] = v
    return out
