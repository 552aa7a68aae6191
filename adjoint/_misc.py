"""Small helpers shared by several modules of the package (private)."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu


def _default_dtype(dtype):
    """`dtype`, or JAX's default float when None; a TypeError if it is not floating."""
    if dtype is None:
        dtype = jnp.zeros(()).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be floating, got {dtype}")
    return dtype


def _is_none(x) -> bool:
    return x is None


def _tree_add(a, b):
    """Leafwise a + b, a `None` leaf standing for zero."""
    return jtu.tree_map(
        lambda x, y: y if x is None else (x if y is None else x + y), a, b, is_leaf=_is_none
    )


def _inexact(tree):
    """`tree` filtered to its inexact arrays (the controls), other leaves None."""
    return eqx.filter(tree, eqx.is_inexact_array)
