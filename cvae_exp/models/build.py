"""The one factory that builds the Flax NNX network of a config and the data's geometry (`build_model`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from cvae_exp.data.geometry import Geometry
from cvae_exp.models.cvae import CVAE, Baseline
from cvae_exp.models.kinds import kind
from cvae_exp.models.mlp import MLP
from cvae_exp.models.nets import NetFactory

__all__ = ["CVAE", "Baseline", "MLP", "build_model"]

MLP_NET = {"_target_": "cvae_exp.models.mlp.MLPNet"}  # model.net of a config saved before the seam existed


def build_model(
    model_cfg,
    x_dim: int,
    geometry: Geometry,
    *,
    precision: str = "fp32",
    seed: int = 0,
    condition: str | None = None,
):
    """(graphdef, params as a plain dict) of the network for `model.kind`: a Baseline, or a CVAE
    with the networks its objective needs (and a baseline submodule when `model.baseline_run` is set),
    predicting images of `geometry` (y has geometry.dims dimensions) from conditions of `x_dim`: an image of
    the geometry for `condition="quadrants"` (None: when x_dim is the image's size), else a vector. Every
    network comes from `model.net` (cvae_exp.models.nets). The steps merge the two back inside jit."""
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    y_dim = geometry.dims
    net = model_cfg.get("net") or MLP_NET
    net = dict(net) if isinstance(net, dict) else _plain(net)
    nets = NetFactory(net, geometry, hidden=list(model_cfg.hidden), dtype=dtype, rngs=nnx.Rngs(seed))
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
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
