"""Gradient parity: the costate recursion against `jax.grad` and finite differences."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree, Scalar

from ._lagrangian import costates
from ._multistage import AutodiffAdjoint, Multistage


def _rel(err, scale):
    return err / jnp.maximum(scale, jnp.finfo(jnp.result_type(scale)).tiny)


class GradientCheck(eqx.Module):
    """Worst relative errors of the costate gradients, per stage k = 1..N.

    - `autodiff_error[k-1]`: max |g_costate − g_jax.grad| / max |g_jax.grad| over
      stage k's controls.
    - `finite_difference_error[k-1]`: |⟨g_costate, v⟩ − (C(W+εv) − C(W−εv))/2ε| /
      max(|⟨g, v⟩|, |C| ε) for a random direction v in stage k's controls.
    - `input_autodiff_error`, `input_finite_difference_error`: the same for
      B(0) = −dC/dX(0).
    - `epsilon`: the finite-difference step used.
    """

    autodiff_error: Array
    finite_difference_error: Array
    input_autodiff_error: Array
    input_finite_difference_error: Array
    epsilon: float = eqx.field(static=True)

    @property
    def worst(self) -> tuple[float, float]:
        """(worst autodiff error, worst finite-difference error) over all stages."""
        return (
            float(jnp.max(self.autodiff_error)),
            float(jnp.max(self.finite_difference_error)),
        )

    def worst_stage(self) -> int:
        """The 1-based stage with the largest autodiff disagreement."""
        return int(jnp.argmax(self.autodiff_error)) + 1

    def table(self) -> str:
        rows = ["stage | vs jax.grad | vs finite differences", "--- | --- | ---"]
        for k in range(self.autodiff_error.shape[0]):
            rows.append(
                f"{k + 1} | {float(self.autodiff_error[k]):.2e} | "
                f"{float(self.finite_difference_error[k]):.2e}"
            )
        rows.append(
            f"input B(0) | {float(self.input_autodiff_error):.2e} | "
            f"{float(self.input_finite_difference_error):.2e}"
        )
        return "\n".join(rows)


def _stage_mask(system: Multistage, k: int, tree: PyTree) -> PyTree:
    """Zero every entry of `tree` (shaped like the system's controls) but stage k's."""
    if system.stacked:

        def mask(x):
            if x is None:
                return None
            onehot = (jnp.arange(x.shape[0]) == k - 1).astype(x.dtype)
            return x * onehot.reshape((-1,) + (1,) * (x.ndim - 1))

        return jtu.tree_map(mask, tree, is_leaf=lambda x: x is None)
    stages = tuple(
        s if i == k - 1 else jtu.tree_map(jnp.zeros_like, s) for i, s in enumerate(tree.stages)
    )
    return eqx.tree_at(lambda s: s.stages, tree, stages, is_leaf=lambda x: x is None)


def check_gradients(
    system: Multistage,
    x0: Array,
    cost: Callable[[PyTree[Array]], Scalar],
    *,
    control_cost: Callable[[Multistage], Scalar] | None = None,
    epsilon: float | None = None,
    key: PRNGKeyArray | None = None,
) -> GradientCheck:
    """Compare the costate recursion with `jax.grad` of the plain forward pass and with
    central finite differences, stage by stage. Use float64 for meaningful finite
    differences (in float32 expect errors around 1e-2).

    **Arguments:** as `adjoint.costates`, plus the finite-difference `epsilon`
    (default: eps^(1/3) of the dtype) and a `key` for the random directions.
    """
    if key is None:
        key = jax.random.key(0)
    record = costates(system, x0, cost, control_cost=control_cost)
    params, static = eqx.partition(system, eqx.is_inexact_array)
    dtype = jtu.tree_leaves(params)[0].dtype
    if epsilon is None:
        epsilon = float(jnp.finfo(dtype).eps) ** (1 / 3)

    def total_with(static_part):
        def total(p, x):
            s = eqx.combine(p, static_part)
            c = cost(s.trajectory(x))
            return c if control_cost is None else c + control_cost(s)

        return total

    total = total_with(static)
    reference = eqx.tree_at(lambda s: s.adjoint, system, AutodiffAdjoint())
    ref_params, ref_static = eqx.partition(reference, eqx.is_inexact_array)
    ref_grads, ref_x = jax.grad(total_with(ref_static), argnums=(0, 1))(ref_params, x0)
    value = total(params, x0)
    n = system.n_stages
    leaves = jtu.tree_leaves(params)
    keys = jax.random.split(key, len(leaves) + 1)
    direction = jtu.tree_unflatten(
        jtu.tree_structure(params),
        [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys[1:], leaves)],
    )

    ad_err, fd_err = [], []
    for k in range(1, n + 1):
        g = _stage_mask(system, k, record.grads)
        r = _stage_mask(system, k, ref_grads)
        diff = max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(jtu.tree_leaves(g), jtu.tree_leaves(r))
        )
        scale = max(float(jnp.max(jnp.abs(b))) for b in jtu.tree_leaves(r))
        ad_err.append(_rel(jnp.asarray(diff), jnp.asarray(scale)))
        v = _stage_mask(system, k, direction)
        plus = total(jtu.tree_map(lambda p, d: p + epsilon * d, params, v), x0)
        minus = total(jtu.tree_map(lambda p, d: p - epsilon * d, params, v), x0)
        fd = (plus - minus) / (2 * epsilon)
        an = sum(jnp.vdot(a, d) for a, d in zip(jtu.tree_leaves(g), jtu.tree_leaves(v)))
        fd_err.append(jnp.abs(an - fd) / jnp.maximum(jnp.abs(an), jnp.abs(value) * epsilon))

    # B(0) = −dC/dX(0)
    dx = -record.initial_costate
    x_err = _rel(jnp.max(jnp.abs(dx - ref_x)), jnp.max(jnp.abs(ref_x)))
    v = jax.random.normal(keys[0], jnp.shape(x0), dtype)
    fd = (total(params, x0 + epsilon * v) - total(params, x0 - epsilon * v)) / (2 * epsilon)
    an = jnp.vdot(dx, v)
    x_fd = jnp.abs(an - fd) / jnp.maximum(jnp.abs(an), jnp.abs(value) * epsilon)
    return GradientCheck(
        autodiff_error=jnp.stack(ad_err),
        finite_difference_error=jnp.stack(fd_err),
        input_autodiff_error=x_err,
        input_finite_difference_error=x_fd,
        epsilon=epsilon,
    )
