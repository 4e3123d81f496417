"""GPT-style decoder in Flax NNX with logical axis names on every parameter and activation.

Pre-LayerNorm blocks (causal self-attention, GELU MLP), learned or rotary positions, tied
or untied output embedding. Blocks are stacked on a leading `layers` axis and applied with
`nnx.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxpar.context import constrain
from jaxpar.models.presets import GPTConfig, preset
from jaxpar.softmax_attention import attention
from jaxpar.tracing.stages import Stages, run_stack


def _init(std: float, axes: tuple[str, ...]):
    return nnx.with_partitioning(nnx.initializers.normal(std), axes)


def _layer_norm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        cfg.embed,
        epsilon=1e-5,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
        rngs=rngs,
    )


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotate feature pairs of x (batch, length, heads, kv) by position-dependent angles."""
    length, half = x.shape[1], x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = jnp.arange(length, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # query, key and value projections fused into one matmul (one weight to gather)
        self.qkv = nnx.Einsum(
            "btd,dshk->btshk", (cfg.embed, 3, cfg.heads, cfg.head_dim),
            kernel_init=_init(0.02, ("embed", None, "heads", "kv")), rngs=rngs,
        )
        self.out = nnx.Einsum(
            "bthk,hkd->btd",
            (cfg.heads, cfg.head_dim, cfg.embed),
            kernel_init=_init(cfg.out_std, ("heads", "kv", "embed")),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        names = ("batch", "length", "heads", "kv")
        qkv = constrain(self.qkv(x), ("batch", "length", None, "heads", "kv"))
        q, k, v = (constrain(qkv[:, :, i], names) for i in range(3))
        if self.cfg.positions == "rotary":
            q, k = rotary(q), rotary(k)
        y = attention(q, k, v, causal=True)
        return constrain(self.out(constrain(y, names)), ("batch", "length", "embed"))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.up = nnx.Linear(
            cfg.embed, cfg.mlp, kernel_init=_init(0.02, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs,
        )
        self.down = nnx.Linear(
            cfg.mlp, cfg.embed, kernel_init=_init(cfg.out_std, ("mlp", "embed")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(jax.nn.gelu(self.up(x)), ("batch", "length", "mlp"))
        return constrain(self.down(h), ("batch", "length", "embed"))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.attention_norm = _layer_norm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.mlp_norm = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nnx.Module):
    """Decoder-only transformer; `__call__` maps tokens (batch, length) to logits."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab, cfg.embed, embedding_init=_init(0.02, ("vocab", "embed")), rngs=rngs
        )
        if cfg.positions == "learned":
            self.positions = nnx.Param(
                _init(0.01, ("length", "embed"))(rngs.params(), (cfg.length, cfg.embed))
            )

        @nnx.split_rngs(splits=cfg.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = _layer_norm(cfg, rngs)
        if not cfg.tied:
            self.unembed = nnx.Linear(
                cfg.embed, cfg.vocab, use_bias=False,
                kernel_init=_init(0.02, ("embed", "vocab")), rngs=rngs,
            )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token (and learned position) embeddings of (batch, length) tokens."""
        x = self.embed(tokens)
        if self.cfg.positions == "learned":
            x = x + self.positions[: tokens.shape[1]]
        return constrain(x, ("batch", "length", "embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        """Output logits of the last block's activations."""
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.cfg.tied else self.unembed(x)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = run_stack(self.blocks, self.embed_tokens(tokens), _apply_block)
        return self.logits(x)


def _apply_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


def _token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def lm_loss(model: GPT, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross entropy; batch holds `inputs` and `targets`, (batch, length)."""
    return _token_loss(model(batch["inputs"]), batch["targets"])


# The same loss split around the block stack, for pipelined plans.
lm_stages = Stages(
    stack="blocks",
    pre=lambda model, batch: model.embed_tokens(batch["inputs"]),
    layer=_apply_block,
    post=lambda model, x, batch: _token_loss(model.logits(x), batch["targets"]),
)


def build(cfg: GPTConfig | str, **overrides) -> Callable[[nnx.Rngs], GPT]:
    """A constructor `rngs -> GPT` for a config or preset name, as `jaxpar.parallelize` wants."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    cfg = dataclasses.replace(cfg, **overrides)
    return lambda rngs: GPT(cfg, rngs)
