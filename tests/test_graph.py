"""trace_graph: groups, matmuls, FLOPs and saved activations of a model, with shapes only."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxpar.graph import trace_graph
from jaxpar.models import gpt
from jaxpar.models.presets import preset
from jaxpar.planners.graph import ModelGraph
from jaxpar.trace import abstract_params


def _tokens(batch: int, length: int) -> dict:
    spec = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return {"inputs": spec, "targets": spec}


@pytest.fixture(scope="module")
def tiny() -> ModelGraph:
    return trace_graph(gpt.build("tiny"), gpt.lm_loss, _tokens(4, 64))


@pytest.mark.parametrize("name, overrides, batch, length", [
    ("tiny", {}, 4, 64),
    ("tiny", {}, 2, 32),  # shorter than the learned positions table
    ("tiny", {"tied": False, "positions": "rotary"}, 2, 64),
    ("gpt3-175b", {}, 8, 2048),
    ("megatron-1.7b", {}, 4, 2048),
])
def test_flops_match_analytic_formula(name, overrides, batch, length):
    cfg = dataclasses.replace(preset(name), **overrides)
    graph = trace_graph(gpt.build(cfg), gpt.lm_loss, _tokens(batch, length))
    expected = cfg.flops_per_token(length) * batch * length
    assert 3 * graph.flops_fwd == pytest.approx(expected, rel=0.01)
    assert graph.batch_size == batch and graph.batch_bytes == 2 * batch * length * 4


def test_gpt_groups_in_layer_order(tiny):
    assert [g.name for g in tiny.groups] == ["embed", "positions", "blocks", "final_norm"]
    assert [g.repeat for g in tiny.groups] == [1, 1, preset("tiny").layers, 1]


def test_params_cover_every_parameter_once(tiny):
    _, _, table = abstract_params(gpt.build("tiny"))
    assert sorted(p.path for p in tiny.params) == sorted(p.path for p in table)
    for group in tiny.groups:
        assert all(p.path.split("/")[0] == group.name for p in group.params)


def test_gpt_matmuls_name_their_logical_axes(tiny):
    groups = {g.name: g for g in tiny.groups}
    blocks = {m.param.removeprefix("blocks/"): (m.contracting, m.free)
              for m in groups["blocks"].matmuls}
    assert blocks == {
        "attention/query/kernel": (("embed",), ("heads", "kv")),
        "attention/key/kernel": (("embed",), ("heads", "kv")),
        "attention/value/kernel": (("embed",), ("heads", "kv")),
        "attention/out/kernel": (("heads", "kv"), ("embed",)),
        "mlp/up/kernel": (("embed",), ("mlp",)),
        "mlp/down/kernel": (("mlp",), ("embed",)),
    }
    [attend] = groups["embed"].matmuls  # the lookup is a gather, the tied output a matmul
    assert (attend.param, attend.contracting, attend.free) == (
        "embed/embedding", ("embed",), ("vocab",))
    b, t, e, v = 4, 64, 64, 256
    assert (attend.flops, attend.in_bytes, attend.out_bytes) == (
        2 * b * t * e * v, b * t * e * 4, b * t * v * 4)
    up = next(m for m in groups["blocks"].matmuls if m.param.endswith("up/kernel"))
    assert up.flops == 2 * b * t * e * 4 * e  # one layer's


def test_remat_saves_only_each_layer_input(tiny):
    blocks = next(g for g in tiny.groups if g.name == "blocks")
    layer_input = 4 * 64 * 64 * 4  # batch x length x embed, float32
    assert blocks.saved_bytes_remat == pytest.approx(layer_input, rel=0.1)
    assert blocks.saved_bytes > 5 * blocks.saved_bytes_remat
    assert all(g.saved_bytes == g.saved_bytes_remat for g in tiny.groups if g.repeat == 1)


class _MLP(nnx.Module):
    """A model jaxpar never saw: no scan, no jaxpar hooks; its hidden layer under nnx.remat
    with relu (custom_jvp) and its output under lax.cond, so the walk meets those too."""

    def __init__(self, rngs: nnx.Rngs, d_in: int = 16, d_hidden: int = 32, d_out: int = 4):
        def init(axes):
            return nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)

        self.hidden = nnx.Linear(d_in, d_hidden, kernel_init=init(("embed", "mlp")),
                                 bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                                 ("mlp",)), rngs=rngs)
        self.out = nnx.Linear(d_hidden, d_out, use_bias=False,
                              kernel_init=init(("mlp", "vocab")), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.remat(lambda layer, x: jax.nn.relu(layer(x)))(self.hidden, x)
        return jax.lax.cond(jnp.all(x > 0), self.out,
                            lambda h: jnp.zeros((h.shape[0], self.out.out_features)), h)


def _mse(model: _MLP, batch: dict) -> jax.Array:
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def test_unseen_model_traces_with_sensible_groups():
    b, d_in, d_hidden, d_out = 8, 16, 32, 4
    batch = {"x": jnp.ones((b, d_in)), "y": jnp.zeros((b, d_out))}
    graph = trace_graph(_MLP, _mse, batch)
    assert [(g.name, g.repeat) for g in graph.groups] == [("hidden", 1), ("out", 1)]
    assert graph.flops_fwd == 2 * b * (d_in * d_hidden + d_hidden * d_out)
    assert [(m.param, m.contracting, m.free) for g in graph.groups for m in g.matmuls] == [
        ("hidden/kernel", ("embed",), ("mlp",)), ("out/kernel", ("mlp",), ("vocab",))]
    assert (graph.batch_size, graph.batch_bytes) == (b, b * (d_in + d_out) * 4)
    assert all(g.saved_bytes > 0 for g in graph.groups)


def test_json_round_trip(tiny):
    assert ModelGraph.from_json(tiny.to_json()) == tiny
