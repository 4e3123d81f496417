"""Llama-style decoder in Flax NNX with logical axis names on every parameter and activation.

Pre-RMSNorm blocks (no biases anywhere), rotary positions, grouped-query attention (key and
value heads named `kv_heads`, fewer than the query `heads`), SwiGLU MLP, untied output head;
shapes of Llama 3 (8B, 70B) in `presets.py`. Blocks are either stacked on a leading `layers`
axis and scanned like the GPT's (`blocks="stacked"`) or a list applied one by one in a
Python loop (`blocks="unrolled"`), each through `jaxpar.layer`.

The loss and its pipeline split are the GPT's (`lm_loss`, `lm_stages`): they use only
`embed_tokens`, the `blocks` stack and `logits`, which this model has under the same names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
from flax import nnx

from jaxpar.context import constrain, layer
from jaxpar.models.gpt import _apply_block, _init, lm_loss, lm_stages, rotary
from jaxpar.models.presets import LlamaConfig, llama_preset
from jaxpar.softmax_attention import attention
from jaxpar.tracing.stages import run_stack

__all__ = ["Llama", "build", "lm_loss", "lm_stages"]


def _rms_norm(cfg: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        cfg.embed, epsilon=cfg.norm_eps,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)), rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q = nnx.Einsum(
            "btd,dhk->bthk", (cfg.embed, cfg.heads, cfg.head_dim),
            kernel_init=_init(0.02, ("embed", "heads", "kv")), rngs=rngs,
        )
        # key and value projections fused into one matmul (one weight to gather)
        self.kv = nnx.Einsum(
            "btd,dshk->btshk", (cfg.embed, 2, cfg.kv_heads, cfg.head_dim),
            kernel_init=_init(0.02, ("embed", None, "kv_heads", "kv")), rngs=rngs,
        )
        self.out = nnx.Einsum(
            "bthk,hkd->btd", (cfg.heads, cfg.head_dim, cfg.embed),
            kernel_init=_init(cfg.out_std, ("heads", "kv", "embed")), rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        q_names = ("batch", "length", "heads", "kv")
        kv_names = ("batch", "length", "kv_heads", "kv")
        q = constrain(self.q(x), q_names)
        kv = constrain(self.kv(x), ("batch", "length", None, "kv_heads", "kv"))
        k, v = (constrain(kv[:, :, i], kv_names) for i in range(2))
        q, k = rotary(q, self.cfg.rope_base), rotary(k, self.cfg.rope_base)
        y = attention(q, k, v, causal=True)
        return constrain(self.out(constrain(y, q_names)), ("batch", "length", "embed"))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        # gate and up projections fused into one matmul
        self.gate_up = nnx.Einsum(
            "btd,dsf->btsf", (cfg.embed, 2, cfg.mlp),
            kernel_init=_init(0.02, ("embed", None, "mlp")), rngs=rngs,
        )
        self.down = nnx.Linear(
            cfg.mlp, cfg.embed, use_bias=False,
            kernel_init=_init(cfg.out_std, ("mlp", "embed")), rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        gate_up = constrain(self.gate_up(x), ("batch", "length", None, "mlp"))
        h = constrain(jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], ("batch", "length", "mlp"))
        return constrain(self.down(h), ("batch", "length", "embed"))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.attention_norm = _rms_norm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
    """Decoder-only transformer; `__call__` maps tokens (batch, length) to logits."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab, cfg.embed, embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs
        )
        if cfg.blocks == "stacked":
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0,
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, rngs)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        self.unembed = nnx.Linear(
            cfg.embed, cfg.vocab, use_bias=False,
            kernel_init=_init(0.02, ("embed", "vocab")), rngs=rngs,
        )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings of (batch, length) tokens (positions enter as rotations)."""
        return constrain(self.embed(tokens), ("batch", "length", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Output logits of the last block's activations."""
        return constrain(self.unembed(self.final_norm(x)), ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed_tokens(tokens)
        if self.cfg.blocks == "stacked":
            x = run_stack(self.blocks, x, _apply_block)
        else:
            for block in self.blocks:
                x = layer(_apply_block)(block, x)
        return self.logits(x)


def build(cfg: LlamaConfig | str, **overrides) -> Callable[[nnx.Rngs], Llama]:
    """A constructor `rngs -> Llama` for a config or preset name, as `jaxpar.parallelize`
    wants; e.g. `build("llama3-8b", blocks="unrolled")`."""
    cfg = llama_preset(cfg) if isinstance(cfg, str) else cfg
    cfg = dataclasses.replace(cfg, **overrides)
    return lambda rngs: Llama(cfg, rngs)
