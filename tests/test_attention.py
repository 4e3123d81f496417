"""`jaxpar.attention`: the backend's implementation equals jax.nn.dot_product_attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar
from jaxpar.softmax_attention import attention


def _qkv(heads, kv_heads, length=12, kv_length=12, head_dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (2, length, heads, head_dim)),
            jax.random.normal(keys[1], (2, kv_length, kv_heads, head_dim)),
            jax.random.normal(keys[2], (2, kv_length, kv_heads, head_dim)))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_values_and_gradients_equal_jax_dot_product_attention(heads, kv_heads, causal):
    q, k, v = _qkv(heads, kv_heads)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    ours = jax.value_and_grad(lambda *a: loss(lambda *b: attention(*b, causal=causal), *a),
                              argnums=(0, 1, 2))(q, k, v)
    ref = jax.value_and_grad(
        lambda *a: loss(lambda *b: jax.nn.dot_product_attention(*b, is_causal=causal), *a),
        argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_causal_mask_with_more_keys_than_queries_matches_jax():
    q, k, v = _qkv(4, 4, length=5, kv_length=12)
    np.testing.assert_allclose(attention(q, k, v, scale=0.3),
                               jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3),
                               rtol=1e-5, atol=1e-6)


def test_cpu_takes_the_einsums_and_accelerators_jaxs_fused_path(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k))
    q, k, v = _qkv(4, 4)
    attention(q, k, v)
    assert calls == []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    attention(q, k, v, causal=False)
    assert calls == [{"is_causal": False, "scale": None}]


def test_is_exported_and_rejects_mismatched_heads_with_the_numbers():
    assert jaxpar.attention is attention
    q, k, v = _qkv(4, 3)
    with pytest.raises(ValueError, match=r"query heads \(4\) a multiple of their heads \(3\)"):
        attention(q, k, v)
