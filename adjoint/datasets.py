"""Small data sets generated in code (no downloads).

Each returns `(inputs, targets)` with a leading pattern axis, in the requested dtype.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


def spirals(n: int, *, key: PRNGKeyArray, noise: float = 0.05, dtype=None) -> tuple[Array, Array]:
    """Two interleaved spirals in the plane; targets ±1 (one output unit)."""
    if n < 2:
        raise ValueError(f"spirals: n must be at least 2, got {n}")
    dtype = dtype or jnp.zeros(()).dtype
    tkey, nkey = jax.random.split(key)
    half = n // 2
    t = jnp.sqrt(jax.random.uniform(tkey, (half,), dtype)) * 3 * jnp.pi
    arm = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1) / (3 * jnp.pi)
    x = jnp.concatenate([arm, -arm])
    x = x + noise * jax.random.normal(nkey, x.shape, dtype)
    y = jnp.concatenate([jnp.ones((half, 1), dtype), -jnp.ones((half, 1), dtype)])
    return x.astype(dtype), y


def parity(n_bits: int, *, dtype=None) -> tuple[Array, Array]:
    """All 2**n_bits binary patterns in {-1, 1}; target +1 for an odd number of +1s."""
    if not 1 <= n_bits <= 16:
        raise ValueError(f"parity: n_bits must be in 1..16, got {n_bits}")
    dtype = dtype or jnp.zeros(()).dtype
    codes = jnp.arange(2**n_bits)
    bits = (codes[:, None] >> jnp.arange(n_bits)) & 1
    x = (2 * bits - 1).astype(dtype)
    y = jnp.where(bits.sum(1, keepdims=True) % 2 == 1, 1.0, -1.0).astype(dtype)
    return x, y
