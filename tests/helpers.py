"""Shared test helpers: tree comparisons and finite differences."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def _wider(x, y):
    return np.promote_types(np.asarray(x).dtype, np.asarray(y).dtype)


def tree_max_rel_error(a, b) -> float:
    """max |a − b| / max |b| over all array leaves (None leaves skipped)."""
    la = [x for x in jtu.tree_leaves(a) if x is not None]
    lb = [x for x in jtu.tree_leaves(b) if x is not None]
    assert len(la) == len(lb), (len(la), len(lb))
    # each pair compared in the wider of its two dtypes (float32 against float64, ...)
    diff = max(
        float(jnp.max(jnp.abs(jnp.asarray(x, _wider(x, y)) - jnp.asarray(y, _wider(x, y)))))
        for x, y in zip(la, lb)
    )
    scale = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return diff / max(scale, 1e-300)


def assert_tree_allclose(a, b, rtol=1e-10):
    err = tree_max_rel_error(a, b)
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def finite_difference_grad(f, x, eps=1e-6):
    """Central finite differences of a scalar f at a float64 array x (tiny sizes only)."""
    x = np.asarray(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        g[i] = (float(f(jnp.asarray(x + e))) - float(f(jnp.asarray(x - e)))) / (2 * eps)
    return jnp.asarray(g)


def directional_fd(f, params, direction, eps=1e-6):
    """(f(p + εv) − f(p − εv)) / 2ε for pytrees p, v."""
    plus = jtu.tree_map(lambda p, v: p + eps * v, params, direction)
    minus = jtu.tree_map(lambda p, v: p - eps * v, params, direction)
    return (f(plus) - f(minus)) / (2 * eps)


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b)))


def random_like(key, tree):
    leaves, treedef = jtu.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jtu.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
