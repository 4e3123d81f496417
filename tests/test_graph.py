"""trace_graph: groups, matmuls, FLOPs and saved activations of a model, with shapes only."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxpar.models import gpt
from jaxpar.models.presets import preset
from jaxpar.planners.graph import Group, ModelGraph, Tensor
from jaxpar.tracing.graph import trace_graph
from jaxpar.tracing.params import abstract_params


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
        "attention/qkv/kernel": (("embed",), ("heads", "kv")),  # its (q, k, v) dim unnamed
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


def _blocks(graph: ModelGraph) -> Group:
    return next(g for g in graph.groups if g.name == "blocks")


def _known(tensor: Tensor) -> bool:
    """Every dimension that could be split (size > 1) has a logical name."""
    return all(a is not None for a, d in zip(tensor.logical_axes, tensor.shape) if d > 1)


def test_saved_tensors_are_one_layers_with_bytes_of_their_shape(tiny):
    for group in tiny.groups:
        for t in group.saved + group.saved_remat:
            assert len(t.shape) == len(t.logical_axes)
            assert t.nbytes in (math.prod(t.shape) * 4, math.prod(t.shape))  # f32, bool
            assert "layers" not in t.logical_axes


def test_remat_saves_only_each_layer_input(tiny):
    blocks = _blocks(tiny)
    assert blocks.saved_remat == (Tensor((4, 64, 64), 4 * 64 * 64 * 4,
                                         ("batch", "length", "embed")),)
    assert blocks.saved_bytes > 5 * blocks.saved_bytes_remat
    assert all(g.saved == g.saved_remat for g in tiny.groups if g.repeat == 1)


def test_dots_saves_only_the_outputs_of_contractions(tiny):
    """Under remat "dots" a layer keeps the output of each of its matmuls and of attention's
    two contractions (scores, and scores times values), nothing elementwise."""
    blocks = _blocks(tiny)
    kept = [t.nbytes for t in blocks.saved_dots]
    for mm in blocks.matmuls:
        kept.remove(mm.out_bytes)
    attention = [t for t in blocks.saved_dots if t.logical_axes[:2] == ("batch", "heads")]
    assert sorted(kept) == sorted(t.nbytes for t in attention) and len(attention) == 2
    dots = sum(t.nbytes for t in blocks.saved_dots)
    assert blocks.saved_bytes_remat < dots < blocks.saved_bytes / 2
    assert all(g.saved_dots == g.saved for g in tiny.groups if g.repeat == 1)


@pytest.mark.parametrize("overrides", [{}, {"tied": False, "positions": "rotary"}])
def test_saved_activations_name_their_logical_axes(overrides):
    cfg = dataclasses.replace(preset("tiny"), **overrides)
    saved = _blocks(trace_graph(gpt.build(cfg), gpt.lm_loss, _tokens(4, 64))).saved
    total = sum(t.nbytes for t in saved)
    assert all("batch" in t.logical_axes for t in saved)
    assert sum(t.nbytes for t in saved if _known(t)) >= 0.9 * total
    split = [t for t in saved if {"heads", "mlp"} & set(t.logical_axes)]
    assert sum(t.nbytes for t in split) > 0.4 * total
    b, length, h = 4, 64, cfg.heads
    scores = [s for s in split if s.shape[-2:] == (length, length)]  # attention logits, weights
    assert scores and all(s.nbytes == b * h * length * length * 4 for s in scores)
    assert all(s.logical_axes[-4:] == ("batch", "heads", "length", "length") for s in scores)
    hidden = [s for s in split if "mlp" in s.logical_axes]
    assert hidden and all(s.logical_axes == ("batch", "length", "mlp") for s in hidden)


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
    # no constrain calls: names come from the batch (its first dim) and the parameters
    hidden, out = graph.groups
    assert hidden.saved == (Tensor((b, d_in), b * d_in * 4, ("batch", None)),)  # remat: input
    assert Tensor((b, d_hidden), b * d_hidden * 4, ("batch", "mlp")) in out.saved
    assert all(t.logical_axes[:1] == ("batch",) for t in out.saved if t.shape)


def test_json_round_trip(tiny):
    assert all(g.saved for g in tiny.groups if g.name != "positions")
    assert ModelGraph.from_json(tiny.to_json()) == tiny
