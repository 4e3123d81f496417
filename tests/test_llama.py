"""The Llama reference model: presets match Meta's sizes, both block forms compute the same
loss, it trains on one device, and every parameter carries logical axes."""

import math

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxpar
from jaxpar.models.llama import build, lm_loss, lm_stages
from jaxpar.models.presets import LLAMA_PRESETS, llama_preset
from jaxpar.tracing.params import abstract_params

from oracle import assert_same_run, parallel_run, single_device_run, token_batches

# Parameter counts (billions) of Meta's Llama 3 model card / config files.
PUBLISHED_BILLIONS = {"llama3-8b": 8.03, "llama3-70b": 70.55}


def _model(cfg, blocks: str = "stacked", seed: int = 0) -> nnx.Module:
    with nnx.use_eager_sharding(False):  # no mesh: the logical axes stay metadata
        return build(cfg, blocks=blocks)(nnx.Rngs(seed))


def _batch(cfg, seed: int = 0) -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(seed), (2, cfg.length + 1), 0, cfg.vocab)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("name", LLAMA_PRESETS)
@pytest.mark.parametrize("blocks", ["stacked", "unrolled"])
def test_num_params_counts_the_built_model(name, blocks):
    model = nnx.eval_shape(lambda: _model(name, blocks))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == LLAMA_PRESETS[name].num_params


@pytest.mark.parametrize("name", PUBLISHED_BILLIONS)
def test_preset_sizes_match_the_model_card(name):
    assert LLAMA_PRESETS[name].num_params / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name],
                                                                  rel=0.005)


@pytest.mark.parametrize("name", PUBLISHED_BILLIONS)
def test_flops_per_token_is_six_n_plus_attention(name):
    cfg = LLAMA_PRESETS[name]
    dense = 6 * (cfg.num_params - cfg.vocab * cfg.embed)  # the input embedding is a lookup
    attention = 6 * 2 * cfg.layers * cfg.length * cfg.heads * cfg.head_dim
    assert cfg.flops_per_token() == pytest.approx(dense + attention, rel=0.01)


@pytest.mark.parametrize("blocks", ["stacked", "unrolled"])
def test_traces_abstractly_with_every_parameter_annotated(blocks):
    _, _, params = abstract_params(build("llama3-8b", blocks=blocks))
    assert all(len(p.logical_axes) == len(p.shape) for p in params)
    kv = [p for p in params if p.path.endswith("attention/kv/kernel")]
    assert len(kv) == (1 if blocks == "stacked" else 32)
    assert all(p.logical_axes[-4:] == ("embed", None, "kv_heads", "kv") for p in kv)
    assert all(p.shape[-2:] == (8, 128) for p in kv)
    stacked = [p for p in params if p.path.startswith("blocks/")]
    if blocks == "stacked":
        assert all(p.logical_axes[0] == "layers" and p.shape[0] == 32 for p in stacked)
    else:
        assert len(stacked) == 32 * 7 and not any("layers" in p.logical_axes for p in params)


def test_stacked_and_unrolled_blocks_give_the_same_loss():
    cfg = llama_preset("llama-tiny")
    stacked = _model(cfg)
    unrolled = _model(cfg, "unrolled", seed=1)
    params = nnx.to_pure_dict(nnx.state(stacked, nnx.Param))
    layers = params.pop("blocks")
    params["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(cfg.layers)}
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(unrolled, state)

    batch = _batch(cfg)
    loss = lm_loss(stacked, batch)
    assert float(lm_loss(unrolled, batch)) == pytest.approx(float(loss), rel=1e-5)
    assert float(lm_stages(stacked, batch)) == pytest.approx(float(loss), rel=1e-6)
    # the copy changed the unrolled model: its own initialisation gave another loss
    assert float(lm_loss(_model(cfg, "unrolled", seed=1), batch)) != float(loss)


@pytest.mark.parametrize("blocks", ["stacked", "unrolled"])
def test_training_step_reaches_every_parameter(blocks):
    cfg = llama_preset("llama-tiny")
    model = _model(cfg, blocks)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    batch = _batch(cfg)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lm_loss)(model, batch)
        optimizer.update(model, grads)
        return loss, grads

    loss, grads = step(model, optimizer, batch)
    assert jnp.isfinite(loss)
    flat = nnx.to_flat_state(grads)
    assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dead = ["/".join(map(str, path)) for path, g in flat
            if not (jnp.all(jnp.isfinite(g.get_value())) and jnp.any(g.get_value() != 0))]
    assert not dead, f"no gradient reaches {dead}"
    assert jnp.isfinite(lm_loss(model, batch))


@pytest.mark.parametrize("blocks, spec, options", [
    ("stacked", "fsdp2+tp4", {}),  # 2 kv heads under tp4: replicated over tensor
    ("unrolled", "dp2+fsdp2+tp2", {"remat": True, "microbatches": 2}),
])
def test_trains_like_the_single_device_program(blocks, spec, options):
    cfg = llama_preset("llama-tiny")
    model_fn, optimizer = build(cfg, blocks=blocks), optax.adamw(1e-3)
    batches = token_batches(16, cfg.length, 3, cfg.vocab)
    par = jaxpar.parallelize(model_fn, optimizer, lm_loss, jaxpar.named_plan(spec, 8, **options),
                             batches[0])
    assert_same_run(parallel_run(par, batches),
                    single_device_run(model_fn, optimizer, lm_loss, batches), elementwise=False)
