"""`attention`: the model-facing attention hook, beside `constrain` and `layer`.

Models call `jaxpar.attention(q, k, v, causal=True)` instead of choosing a kernel
themselves; it runs the fastest correct implementation the backend has:

- CPU: two einsums around an fp32 softmax (the small GPT preset's step on 8 CPU devices is
  5-6% faster than with `jax.nn.dot_product_attention`'s XLA path, dp8 and fsdp8).
- GPU and TPU: `jax.nn.dot_product_attention`, which takes the fused cuDNN kernel where
  dtype and shapes allow and XLA's otherwise.

Grouped-query attention is handled: keys and values may have fewer heads than queries, as
long as the query heads are a multiple of theirs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
              scale: float | None = None) -> jax.Array:
    """Softmax attention of queries (batch, length, heads, head_dim) over keys and values
    (batch, kv_length, kv_heads, head_dim); returns (batch, length, heads, head_dim).
    `scale` defaults to 1 / sqrt(head_dim)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if k.shape != v.shape or heads % kv_heads:
        raise ValueError(f"keys {k.shape} and values {v.shape} must have one shape, and the "
                         f"query heads ({heads}) a multiple of their heads ({kv_heads})")
    if jax.default_backend() != "cpu":
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return _einsum_attention(q, k, v, causal, scale)


def _einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
                      scale: float | None) -> jax.Array:
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)
    if kv_heads < heads:  # each key / value head serves a group of query heads
        q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
        scores_spec, out_spec = "bqhgd,bkhd->bhgqk", "bhgqk,bkhd->bqhgd"
    else:
        scores_spec, out_spec = "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"
    scores = jnp.einsum(scores_spec, q, k, preferred_element_type=jnp.float32)
    if causal:  # query i sees keys 0..i, as in jax.nn.dot_product_attention
        mask = jnp.arange(length)[:, None] >= jnp.arange(k.shape[1])[None, :]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum(out_spec, probs, v).reshape(batch, length, heads, head_dim)
