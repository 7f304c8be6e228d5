"""The one factory that builds the Flax NNX network of a config and the data's geometry (`build_model`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cvae_exp.data.geometry import Geometry
from cvae_exp.models.cvae import CVAE, Baseline
from cvae_exp.models.kinds import kind
from cvae_exp.models.mlp import MLP

__all__ = ["CVAE", "Baseline", "MLP", "build_model", "data_logit"]


def build_model(model_cfg, x_dim: int, geometry: Geometry, *, precision: str = "fp32", seed: int = 0, output_bias=None):
    """(graphdef, params as a plain dict) of the network for `model.kind`: a Baseline, or a CVAE
    with the networks its objective needs (and a baseline submodule when `model.baseline_run` is set),
    predicting images of `geometry` (y has geometry.dims dimensions) from conditions of `x_dim`.
    The steps merge the two back inside jit. `output_bias` [y_dim], when given, is the first value of the
    output layer's bias (model.output_bias=data_logit)."""
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    y_dim = geometry.dims
    common = dict(
        hidden=list(model_cfg.hidden),
        likelihood=model_cfg.likelihood,
        min_log_var=model_cfg.min_log_var,
        channels=geometry.channels,
        mixtures=model_cfg.mixtures,
        activation=model_cfg.activation,
        kernel_init=model_cfg.kernel_init,
        dtype=dtype,
        rngs=nnx.Rngs(seed),
    )
    what = kind(model_cfg.kind)
    if not what.latent:
        model = Baseline(x_dim, y_dim, **common)
    else:
        model = CVAE(
            x_dim,
            y_dim,
            latent_dim=model_cfg.latent_dim,
            prior="standard" if what.fixed_prior else model_cfg.prior,
            recognition=what.recognition,
            # model.baseline_run: the baseline network inside the CVAE (its parameters come from that run's
            # checkpoint later, in cvae_exp.runs.trained_run; only the architecture is decided here, from this config alone).
            baseline_hidden=list(model_cfg.baseline_hidden or model_cfg.hidden) if model_cfg.baseline_run else None,
            baseline_into=model_cfg.baseline_into,
            baseline_frozen=model_cfg.baseline_frozen,
            **common,
        )
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if output_bias is not None:
        net = params["generation"] if what.latent else params["net"]
        last = net[f"dense{len(model_cfg.hidden)}"]
        last["bias"] = jnp.asarray(output_bias, last["bias"].dtype).reshape(last["bias"].shape)
    return graphdef, params


def data_logit(images) -> np.ndarray:
    """logit(mean training pixel), the mean clipped to [0.001, 0.999]: the output bias yburda/iwae (datasets.py
    get_train_bias_np) and nbip/IWAE (iwae1.py get_bias) start the decoder from; `images` uint8 [N, pixels]."""
    mean = np.clip(np.asarray(images).mean(axis=0, dtype=np.float64) / 255.0, 0.001, 0.999)
    return (-np.log(1.0 / mean - 1.0)).astype(np.float32)
