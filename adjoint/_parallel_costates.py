"""The costate recursion evaluated in parallel over the stages (an associative scan).

The backward pass is affine in the costate:

    λ(N) = ∂C/∂X(N),   λ(k-1) = A(k)ᵀ λ(k) + c(k-1),
    A(k) = ∂f_k/∂X(k-1),   c(k-1) = ∂C/∂X(k-1),

(λ = −B in the paper's sign). Affine maps compose associatively,
(M₁, v₁) ∘ (M₂, v₂) = (M₁M₂, M₁v₂ + v₁), so all of λ(0..N-1) follow from one
`jax.lax.associative_scan` in O(log N) depth instead of N sequential steps, at the
price of forming the Jacobians A(k) and their n×n products (O(N n³) work instead of
O(N n²), n the size of one pattern's state): worth it only for small states and long
horizons on parallel hardware. The control gradients dC/dW(k) = ∂f_kᵀ/∂W(k) · λ(k)
are then independent of one another and computed for all k at once (`vmap`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float

from ._multistage import (
    AbstractCostateAdjoint,
    _backward_nonfinite_error,
    _combine,
    _forward_stacked,
    _parts,
    _split_shared,
)


def _compose(later, earlier):
    # associative_scan(reverse=True) hands (accumulated maps of larger k, map of smaller
    # k); the result applies the larger-k maps first: λ = M_k (M_acc λ + v_acc) + v_k.
    m_acc, v_acc = later
    m_k, v_k = earlier
    return m_k @ m_acc, jnp.einsum("...ij,...j->...i", m_k, v_acc) + v_k


def affine_costates(
    transposed_jacobians: Float[Array, "N *batch n n"],
    offsets: Float[Array, "N *batch n"],
    terminal: Float[Array, "*batch n"],
) -> Float[Array, "N *batch n"]:
    """λ(0..N-1) of the affine recursion λ(N) = `terminal`,
    λ(i) = Mᵢ λ(i+1) + vᵢ (Mᵢ = `transposed_jacobians[i]`, vᵢ = `offsets[i]`), by
    `jax.lax.associative_scan` in O(log N) depth."""
    m_acc, v_acc = jax.lax.associative_scan(_compose, (transposed_jacobians, offsets), reverse=True)
    return jnp.einsum("k...ij,...j->k...i", m_acc, terminal) + v_acc


class ParallelCostates(AbstractCostateAdjoint):
    """Differentiate a stacked `Multistage` with the costate recursion solved by an
    associative scan over the stages (O(log N) depth; see the module docstring).

    The forward pass stores the states (with `checkpoint_every` the backward pass first
    recomputes them: it needs all of them at once). The backward pass forms each
    pattern's Jacobian A(k) = ∂f_k/∂X(k-1) with `jax.jacfwd` (states flattened), solves
    for λ(0..N-1) in parallel, then evaluates every stage's `costate` at its λ(k) at
    once: dC/dW(k) for per-stage leaves, Σ_k dC/dW(k) for shared ones (this holds the
    N per-stage terms before summing them).

    Use it as `Multistage(stacked_stage, adjoint=ParallelCostates())`.
    """

    def backward(self, system, x0, residuals, ct_trajectory, ct_final):
        if not system.stacked:
            raise ValueError(
                "ParallelCostates needs the stacked layout (one stacked stage, run with "
                "lax.scan); got a tuple of stages"
            )
        xs = residuals.states
        if xs is None:  # checkpointed forward pass: recompute every state
            xs = _forward_stacked(system, x0)
        per_stage, shared, static = _parts(system)
        n = xs.shape[0]
        x_prev = jnp.concatenate([x0[None], xs[:-1]])  # X(0..N-1)
        pattern = x0.shape[1:]
        size = x0[0].size

        def transposed_jacobian(d, x):  # A(k)ᵀ of one pattern, states flattened
            stage = _combine(d, shared, static)
            flat = lambda v: stage(v.reshape(pattern)).reshape(-1)  # noqa: E731
            return jax.jacfwd(flat)(x.reshape(-1)).T

        a_t = jax.vmap(lambda d, xp: jax.vmap(lambda x: transposed_jacobian(d, x))(xp))(
            per_stage, x_prev
        )  # (N, P, n, n)
        if ct_final is not None:
            lam_n, offsets = ct_final, jnp.zeros_like(x_prev)
        else:
            lam_n, offsets = ct_trajectory[n], ct_trajectory[:n]
        flat = lambda v, lead: v.reshape(v.shape[:lead] + (size,))  # noqa: E731
        lam = affine_costates(a_t.astype(lam_n.dtype), flat(offsets, 2), flat(lam_n, 1)).reshape(
            x_prev.shape
        )  # λ(0..N-1)
        lam_next = jnp.concatenate([lam[1:], lam_n[None]])  # λ(1..N)

        def stage_grad(d, xp, xn, lk):
            _, grad = _combine(d, shared, static).costate(xp, xn, lk)
            return eqx.filter(grad, eqx.is_array)

        grads = jax.vmap(stage_grad)(per_stage, x_prev, xs, lam_next)
        grads_stage, grads_shared = _split_shared(system, grads)
        if grads_shared is not None:
            summed = jtu.tree_map(lambda g, w: g.sum(0).astype(w.dtype), grads_shared, shared)
            treedef = jtu.tree_structure(system.stages)
            leaves = zip(
                treedef.flatten_up_to(grads_stage),
                treedef.flatten_up_to(summed),
                system.shared_leaves,
            )
            grads_stage = treedef.unflatten([s if m else g for g, s, m in leaves])
        lam0 = lam[0]
        if system.check_finite:
            finite = lambda t: jnp.isfinite(t).reshape(n, -1).all(axis=1)  # noqa: E731
            grad_flags = jnp.stack(
                [jnp.ones((n,), bool)]
                + [finite(g) for g in jtu.tree_leaves(grads) if eqx.is_inexact_array(g)]
            ).all(axis=0)
            lam0, grads_stage = _backward_nonfinite_error(
                (lam0, grads_stage), finite(lam_next), grad_flags, jnp.isfinite(lam0).all()
            )
        return lam0, grads_stage

    def value_and_grad(self, problem, u: Array):
        """(C(u), dC/du) of an `adjoint.control.ControlProblem` with this adjoint: the
        control layer's `costates=` strategy interface."""
        problem = eqx.tree_at(lambda p: p.adjoint, problem, self)
        return jax.value_and_grad(problem.cost)(u)
