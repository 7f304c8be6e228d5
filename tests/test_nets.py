"""The networks' seam (cvae_exp.models.nets): the default MLP is the network it replaced, the convolutional
network fits every geometry, kind and likelihood with per-example outputs and z's sample axes, bf16, and its
convolutions are counted in the FLOPs; configs that cannot build a network are refused in one sentence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compose_config
from flax import nnx
from omegaconf import OmegaConf

from cvae_exp import cli
from cvae_exp.config import ModelConfig, validate
from cvae_exp.data.geometry import MNIST, Geometry
from cvae_exp.errors import UserError
from cvae_exp.models.build import build_model
from cvae_exp.models.mlp import MLP
from cvae_exp.runs.checkpoint import changed_shape_keys
from cvae_exp.training.steps import Task, loss_fn

assert cli.CONF_DIR  # importing cvae_exp.cli registers the config schemas that compose_config needs

CONV = {"_target_": "cvae_exp.models.conv.ConvNet", "channels": [4, 8], "kernel": 3, "dense": [16]}


def model_cfg(kind="cvae", net=None, **values):
    cfg = OmegaConf.structured(ModelConfig(kind=kind, hidden=[16], latent_dim=3, **values))
    if net is not None:
        cfg.net = net
    return cfg


def batch_of(geometry: Geometry, n: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, geometry.dims)).astype(np.uint8),
        "label": rng.integers(0, max(geometry.classes, 1), n).astype(np.int32),
    }


def x_dim(condition: str, geometry: Geometry) -> int:
    return {"label": geometry.classes, "quadrants": geometry.dims, "none": 0}[condition]


def built(cfg, x: int, geometry: Geometry, **kwargs):
    """build_model's (graphdef, params), its initializers run as one compiled program (eager, every layer's
    draw compiles its own: seconds on a busy CPU); the same draws, bit for bit."""
    found = []

    def params():
        graphdef, values = build_model(cfg, x, geometry, **kwargs)
        found.append(graphdef)
        return values

    values = jax.jit(params)()
    return found[0], values


def test_the_default_mlp_is_the_network_it_replaced():
    """The same parameters (paths, values: one Rngs drawn in the same order) and the same outputs, bit for bit,
    as the three MLPs CVAE.__init__ built before the seam: the default's params_sha256 cannot move."""
    graphdef, params = build_model(model_cfg(), 10, MNIST, seed=3)
    rngs = nnx.Rngs(3)
    old = {
        "recognition": MLP([10 + 784, 16, 6], rngs=rngs),
        "prior_net": MLP([10, 16, 6], rngs=rngs),
        "generation": MLP([10 + 3, 16, 784], rngs=rngs),
    }
    old_params = {name: nnx.to_pure_dict(nnx.state(m)) for name, m in old.items()}
    assert jax.tree.structure(params) == jax.tree.structure(old_params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, old_params)))
    model = nnx.merge(graphdef, params)
    x, y = jax.nn.one_hot(jnp.arange(4), 10), jnp.ones((4, 784)) * 0.5
    z = jax.random.normal(jax.random.key(0), (2, 4, 3))  # sample axes in front, as the IS estimator passes z
    assert np.array_equal(model.encode(x, y)[0], old["recognition"](jnp.concatenate([x, y], -1))[..., :3])
    expected = old["generation"](jnp.concatenate([jnp.broadcast_to(x, (2, 4, 10)), z], -1))
    assert np.array_equal(model.generate(z, x)[0], expected)


def test_every_network_takes_the_models_activation_init_and_output_bias():
    """model.activation, model.kernel_init and model.output_bias=data_logit: the MLP default builds the MLP they
    build (the same draws, the bias at the output layer, tanh between layers), and the convolutional network
    uses them too (Glorot's kernels, tanh, the bias per output pixel)."""
    bias = np.linspace(-3.0, 3.0, 784, dtype=np.float32)
    options = dict(activation="tanh", kernel_init="glorot_uniform", output_bias="data_logit")
    graphdef, params = built(model_cfg("vae", **options), 0, MNIST, seed=3, output_bias=bias)

    def old_mlps():
        rngs = nnx.Rngs(3)
        old = {
            name: MLP(sizes, activation="tanh", kernel_init="glorot_uniform", rngs=rngs)
            for name, sizes in [("recognition", [784, 16, 6]), ("generation", [3, 16, 784])]
        }
        old["generation"].dense1.bias[...] = jnp.asarray(bias)
        return {name: nnx.to_pure_dict(nnx.state(m)) for name, m in old.items()}

    old_params = jax.jit(old_mlps)()
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, old_params)))
    z = jax.random.normal(jax.random.key(0), (2, 4, 3))
    h = jnp.tanh(z @ old_params["generation"]["dense0"]["kernel"] + old_params["generation"]["dense0"]["bias"])
    expected = h @ old_params["generation"]["dense1"]["kernel"] + bias
    generated = nnx.merge(graphdef, params).generate(z, jnp.zeros((4, 0)))[0]
    np.testing.assert_allclose(generated, expected, rtol=1e-5, atol=1e-5)

    conv = {**CONV, "channels": [4]}
    graphdef, params = built(
        model_cfg("baseline", conv, **options), 784, MNIST, condition="quadrants", output_bias=bias
    )
    np.testing.assert_array_equal(params["net"]["out_bias"], bias.reshape(28, 28, 1))
    assert nnx.merge(graphdef, params).net.activation == "tanh"
    limit = np.sqrt(6 / (9 * 1 + 9 * 4))  # glorot_uniform's on the first kernel: 3 x 3, 1 -> 4 channels
    assert np.abs(params["net"]["down0"]["kernel"]).max() <= limit  # LeCun normal's 36 draws would pass it
    plain = abstract_model(model_cfg("baseline", conv), 784, MNIST, "quadrants")[1]
    assert "out_bias" not in plain["net"]  # model.output_bias=zero: the parameters of a run before the option


# 28 -> 14 -> 7 and 20 x 36 -> 10 x 18 -> 5 x 9: odd sizes after striding, cropped back on the way up
GEOMETRIES = [MNIST, Geometry(32, 32, 3, 3, ("r", "g", "b")), Geometry(20, 36, 1, 3, ("0", "1", "2"))]
CASES = [  # (kind, condition, likelihood): every kind, every condition, the likelihoods' heads
    ("cvae", "label", "bernoulli"),
    ("cvae", "quadrants", "discretized_logistic"),
    ("vae", "none", "discretized_gaussian"),
    ("gsnn", "quadrants", "bernoulli"),
    ("hybrid", "quadrants", "gaussian"),
    ("baseline", "quadrants", "discretized_gaussian"),
]


def abstract_model(cfg, x: int, geometry: Geometry, condition: str, precision: str = "fp32"):
    """(graphdef, abstract params) of build_model, traced only: no initializer is compiled or run."""
    found = []

    def params():
        graphdef, values = build_model(cfg, x, geometry, condition=condition, precision=precision)
        found.append(graphdef)
        return values

    shapes = jax.eval_shape(params)
    return found[0], shapes


def random_params(shapes, seed: int = 0):
    """Values for abstract parameters, drawn by numpy on the host (Flax's initializers compile a program per
    shape, seconds each on a busy CPU); what these tests check holds for any parameters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g.height}x{g.width}x{g.channels}")
def test_conv_networks_fit_every_geometry_kind_and_likelihood(geometry):
    """Every case traced, without compiling anything: a loss per example, gradients of the parameters' shapes
    (tests/test_net_runs.py trains on 28 x 28 x 1 and 32 x 32 x 3)."""
    for kind, condition, likelihood in CASES:
        if condition == "quadrants" and geometry.height % 2:  # quadrants need an even size
            condition = "label"
        cfg = model_cfg(kind, CONV, likelihood=likelihood, mixtures=2)
        if kind == "hybrid":  # with the training aid: a conv baseline inside, its y_hat into prior and generation
            cfg.baseline_run, cfg.baseline_into = "/a/baseline/run", "prior_and_generation"
        task = Task(kind, condition, geometry, dynamic=likelihood == "bernoulli", dequantize=likelihood == "gaussian")
        batch = batch_of(geometry)
        graphdef, params = abstract_model(cfg, x_dim(condition, geometry), geometry, condition)

        def losses(p, graphdef=graphdef, task=task, batch=batch):
            loss = loss_fn(p, graphdef, batch, jax.random.key(1), jnp.int32(0), task, True)[0]
            return loss, jax.grad(lambda q: loss_fn(q, graphdef, batch, jax.random.key(1), 0, task, True)[0].mean())(p)

        loss, grads = jax.eval_shape(losses, params)
        assert loss.shape == (5,) and jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(np.shape, params)
        if kind == "hybrid":  # the aid's baseline is a ConvNet too
            assert "to_map" in params["baseline"]["net"] and "last" in params["generation"]


def test_conv_outputs_depend_on_their_own_example_only_and_take_sample_axes():
    """No batch statistics: an example's output is the same whatever else is in its batch (evaluations pad
    batches; vmapped seeds share none), with GroupNorm in residual blocks (`layer` is GroupNorm with one group;
    `none` has no statistics at all); z [S, B, L] gives what S separate calls give."""
    net = {**CONV, "norm": "group", "blocks": 1}
    graphdef, shapes = abstract_model(model_cfg("cvae", net), MNIST.dims, MNIST, "quadrants")
    params = random_params(shapes)

    @jax.jit
    def outputs(params, x, z):
        model = nnx.merge(graphdef, params)
        per_sample = jnp.stack([model.generate(z[s], x)[0] for s in range(len(z))])
        return model.prior(x)[0], model.encode(x, x)[1], model.generate(z, x)[0], per_sample

    x = jax.random.uniform(jax.random.key(0), (4, 784))
    other = x.at[1:].set(jax.random.uniform(jax.random.key(1), (3, 784)))
    z = jax.random.normal(jax.random.key(2), (3, 4, 3))
    first, second = outputs(params, x, z), outputs(params, other, z)
    for a, b in zip(first[:2], second[:2], strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
    stacked, per_sample = first[2:]
    assert stacked.shape == (3, 4, 784)
    np.testing.assert_allclose(stacked, per_sample, rtol=1e-5, atol=1e-5)


def test_image_outputs_enter_the_heads_in_their_layout():
    """A (mean, log-variance) head reads an image's first half of channels as means; Bernoulli reads in place."""
    from cvae_exp.models.cvae import OutputHead

    h = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(1, 2, 3, 4)  # [B, H, W, 2 C] with C = 2
    mean, log_var = OutputHead("discretized_gaussian", -6.0, channels=2).from_image(h).reshape(1, 2, 12)[0]
    np.testing.assert_array_equal(mean, h[0, ..., :2].reshape(-1))
    np.testing.assert_array_equal(log_var, h[0, ..., 2:].reshape(-1))
    np.testing.assert_array_equal(OutputHead("bernoulli", -6.0).from_image(h)[0], h.reshape(-1))


def test_bf16_conv_step_agrees_with_fp32():
    task = Task(kind="cvae", condition="quadrants", geometry=MNIST, dynamic=True, precision="bf16")
    batch = batch_of(MNIST, 16)
    results = {}
    cfg = model_cfg("cvae", {**CONV, "channels": [4]})  # one level: the bf16 path is the same at every level
    params = random_params(abstract_model(cfg, 784, MNIST, "quadrants")[1])
    for precision in ("fp32", "bf16"):
        graphdef, shapes = abstract_model(cfg, 784, MNIST, "quadrants", precision)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))  # parameters stay fp32

        def mean_loss(p, graphdef=graphdef):
            return loss_fn(p, graphdef, batch, jax.random.key(3), jnp.int32(0), task, train=True)[0].mean()

        results[precision] = jax.jit(jax.value_and_grad(mean_loss))(params)
    (loss32, g32), (loss16, g16) = results["fp32"], results["bf16"]
    assert float(loss16) != float(loss32) and abs(float(loss16) - float(loss32)) < 2e-2 * abs(float(loss32))
    a = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g16)])
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98


def test_convolutions_are_counted_where_xla_gives_no_cost():
    """The jaxpr's count (cvae-bench's fallback) meets XLA's own within 5% on a convolutional step, where the
    matrix products alone would miss most of it."""
    from cvae_exp.bench import jaxpr_flops

    wide = {**CONV, "channels": [16, 32], "dense": [64], "blocks": 1}  # traced only: no size is too slow
    graphdef, params = abstract_model(model_cfg("cvae", wide), 784, MNIST, "quadrants")
    task = Task(kind="cvae", condition="quadrants", geometry=MNIST, dynamic=True)
    batch = batch_of(MNIST, 8)
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, graphdef, batch, jax.random.key(0), 0, task, True)[0].mean()))
    xla = grad.lower(params).cost_analysis()["flops"]
    jaxpr = jax.make_jaxpr(grad)(params).jaxpr
    counted = jaxpr_flops(jaxpr)
    assert 0.95 * xla < counted <= xla


@pytest.mark.parametrize(
    ("overrides", "sentence"),
    [
        (
            ["model/net=conv", "+model.net.chanels=[8]"],
            "model.net.chanels is not a key of cvae_exp.models.conv.ConvNet",
        ),
        (["model/net=conv", "model.net.norm=batch"], "model.net.norm=batch is not one of none, group, layer"),
        (["model/net=conv", "model.net.channels=[]"], "model.net.channels=[] must list"),
        (["model/net=conv", "model.net.dense=[0]"], "model.net.dense[0]=0 must be at least 1"),
        (["+model.net.generation.width=3"], "model.net.generation names no network"),
        (["model.net._target_=mypkg.nets.Net"], "trust_modules=[mypkg]"),
        (["+model.net.prior._target_=os.system"], "model.net.prior._target_=os.system is refused"),
        (["trust_modules=[my-pkg]"], "trust_modules[0]=my-pkg is not a module name"),
    ],
)
def test_a_network_config_that_cannot_build_is_refused_naming_the_key(overrides, sentence):
    with pytest.raises(UserError) as err:
        validate(compose_config(overrides))
    assert sentence in str(err.value)


def test_the_network_is_part_of_the_shapes_and_old_runs_hold_the_mlp():
    mlp = OmegaConf.to_container(compose_config([]), resolve=True)
    conv = OmegaConf.to_container(compose_config(["model/net=conv"]), resolve=True)
    wider = OmegaConf.to_container(compose_config(["model/net=conv", "model.net.channels=[8,16]"]), resolve=True)
    old = {**mlp, "model": {k: v for k, v in mlp["model"].items() if k != "net"}}  # saved before model.net
    assert changed_shape_keys(old, mlp) == []
    assert changed_shape_keys(old, conv) == ["model.net._target_"]
    assert changed_shape_keys(conv, wider) == ["model.net.channels"]
