"""The one factory that builds the Flax NNX network of a config and the data's geometry (`build_model`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvae_exp.data.geometry import Geometry
from cvae_exp.errors import UserError
from cvae_exp.models.cvae import CVAE, Baseline
from cvae_exp.models.kinds import kind
from cvae_exp.models.mlp import MLP
from cvae_exp.models.nets import NetFactory

__all__ = ["CVAE", "Baseline", "MLP", "build_model", "data_logit"]

MLP_NET = {"_target_": "cvae_exp.models.mlp.MLPNet"}  # model.net of a config saved before the seam existed


def build_model(
    model_cfg,
    x_dim: int,
    geometry: Geometry,
    *,
    precision: str = "fp32",
    seed: int = 0,
    condition: str | None = None,
    output_bias=None,
    abstract: bool = False,
):
    """(graphdef, params as a plain dict) of the network for `model.kind`: a Baseline, or a CVAE
    with the networks its objective needs (and a baseline submodule when `model.baseline_run` is set),
    predicting images of `geometry` (y has geometry.dims dimensions) from conditions of `x_dim`: an image of
    the geometry for `condition="quadrants"` (None: when x_dim is the image's size), else a vector. Every
    network comes from `model.net` (cvae_exp.models.nets). The steps merge the two back inside jit.
    `output_bias` [y_dim], when given, is the first value of the output network's bias
    (model.output_bias=data_logit; the network's `start_output_bias`). With `abstract=True`, only the
    parameters' shapes, traced and never computed (a restore target, a run read from its checkpoint).

    The network is built op by op: each initializer's small program is compiled once per shape and process
    and serves every network with a layer of that shape (one jitted program per network compiled less for
    one cold run, and more for a sweep or the tests, whose networks differ)."""

    def construct():
        return _construct(model_cfg, x_dim, geometry, precision, jax.random.key(seed), condition, output_bias)

    graphdef, params = nnx.split(nnx.eval_shape(construct) if abstract else construct())
    return graphdef, nnx.to_pure_dict(params)


def _construct(model_cfg, x_dim: int, geometry: Geometry, precision: str, key, condition, output_bias):
    """The network of `build_model` as an NNX module, its initializers drawn from `key` (or traced, under
    eval_shape)."""
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    y_dim = geometry.dims
    net = model_cfg.get("net") or MLP_NET
    net = dict(net) if isinstance(net, dict) else _plain(net)
    nets = NetFactory(
        net,
        geometry,
        hidden=list(model_cfg.hidden),
        dtype=dtype,
        rngs=nnx.Rngs(key),
        activation=model_cfg.activation,
        kernel_init=model_cfg.kernel_init,
        output_bias=model_cfg.output_bias == "data_logit",
    )
    x_image = condition == "quadrants" if condition is not None else (x_dim > 0 and x_dim == y_dim)
    common = dict(
        nets=nets,
        x_image=x_image,
        likelihood=model_cfg.likelihood,
        min_log_var=model_cfg.min_log_var,
        channels=geometry.channels,
        mixtures=model_cfg.mixtures,
    )
    what = kind(model_cfg.kind)
    if not what.latent:
        model = Baseline(x_dim, y_dim, **common)
    else:
        aided = bool(model_cfg.baseline_run)
        model = CVAE(
            x_dim,
            y_dim,
            latent_dim=model_cfg.latent_dim,
            prior="standard" if what.fixed_prior else model_cfg.prior,
            recognition=what.recognition,
            # model.baseline_run: the baseline network inside the CVAE (its parameters come from that run's
            # checkpoint later, in cvae_exp.runs.trained_run; only the architecture is decided here, from this config alone).
            aided=aided,
            baseline_hidden=list(model_cfg.baseline_hidden or model_cfg.hidden) if aided else None,
            baseline_into=model_cfg.baseline_into,
            baseline_frozen=model_cfg.baseline_frozen,
            **common,
        )
    if output_bias is not None:
        start_output_bias(model.generation if what.latent else model.net, output_bias)
    return model


def start_output_bias(net, bias) -> None:
    """Sets the output bias of the generation (or baseline) network to `bias` [y_dim], through the network's
    `start_output_bias` (MLPNet: its last layer's bias; ConvNet: its per-pixel output bias); a network without
    one is refused in one sentence."""
    start = getattr(net, "start_output_bias", None)
    if start is None:
        raise UserError(
            f"model.output_bias=data_logit needs a network with a start_output_bias(bias) method, and "
            f"{type(net).__module__}.{type(net).__name__} has none (see docs/extending.md)."
        )
    start(jnp.asarray(bias, jnp.float32))


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def data_logit(images) -> np.ndarray:
    """logit(mean training pixel), the mean clipped to [0.001, 0.999]: the output bias yburda/iwae (datasets.py
    get_train_bias_np) and nbip/IWAE (iwae1.py get_bias) start the decoder from; `images` uint8 [N, pixels]."""
    mean = np.clip(np.asarray(images).mean(axis=0, dtype=np.float64) / 255.0, 0.001, 0.999)
    return (-np.log(1.0 / mean - 1.0)).astype(np.float32)
