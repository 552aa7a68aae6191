"""Multistage systems and the costate recursion that differentiates them.

Forward pass (∂L/∂B = 0):   X(k) = f_k(X(k-1); W(k)),  k = 1..N,  X(0) = x0.
Backward pass (∂L/∂X = 0):  λ(N) = ∂C/∂X(N),
                            λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1).
Optimality (∂L/∂W):         dC/dW(k) = ∂C/∂W(k) + ∂f_kᵀ/∂W(k) · λ(k).

Internally the recursion carries λ(k) = ∂C/∂X(k), the cotangent that `jax.grad` hands
to a custom VJP. The paper's multiplier is B(k) = −λ(k); `adjoint.costates` reports B.
"""

import abc
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._stage import AbstractStage


def _stage_name(k: int, stage) -> str:
    return f"stage {k} ({type(stage).__name__})"


class AbstractAdjoint(eqx.Module):
    """How a `Multistage` is differentiated: the strategy object of the system."""

    @abc.abstractmethod
    def trajectory(self, system: "Multistage", x0: Array) -> PyTree[Array]:
        """Forward pass on a batch `x0` (leading pattern axis); returns X(0..N)."""

    def final(self, system: "Multistage", x0: Array) -> Array:
        """X(N) alone (a strategy may differentiate this more cheaply)."""
        return self.trajectory(system, x0)[-1]


class CostateAdjoint(AbstractAdjoint):
    """Differentiate with the explicit costate recursion (a custom VJP).

    The forward pass stores the states X(0..N) and nothing else; the backward pass
    runs λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1) from k = N down to 1 using each
    stage's `costate` (analytic where the stage provides one, `jax.vjp` of that stage
    alone otherwise). The backward pass is itself differentiable JAX, so grad-of-grad
    works.
    """

    def trajectory(self, system, x0):
        return _costate_trajectory((system, x0), False)

    def final(self, system, x0):
        return _costate_trajectory((system, x0), True)


class AutodiffAdjoint(AbstractAdjoint):
    """Differentiate the plain forward pass with JAX's reverse mode (the baseline)."""

    def trajectory(self, system, x0):
        return _forward(system, x0)


class Multistage(eqx.Module):
    """A cascade of stages X(k) = f_k(X(k-1); W(k)), k = 1..N (Bryson & Ho's
    multistage system; a layered network whose controls are its weights).

    **Layouts:**

    - `Multistage([stage_1, ..., stage_N])`: any mix of stages, run unrolled.
    - `Multistage(stacked_stage)`: one stage whose controls carry a leading axis N
      (for example `eqx.filter_vmap(lambda k: Dense(n, n, key=k))(keys)`, or
      `Multistage.stack([...])`), run with `lax.scan`, so compile time does not grow
      with N. Each slice must map a state to a state of the same shape.

    **Arguments:**

    - `stages`: as above.
    - `adjoint`: how the system is differentiated; `CostateAdjoint()` (default) or
      `AutodiffAdjoint()`.
    - `check_finite`: if True, the forward and backward passes raise (under `jit`
      too) naming where the first non-finite value appeared: the input X(0), a state
      X(k), a costate B(k) (B(0) included) or a control gradient dC/dW(k).

    Calling `system(x0)` returns X(N); `system.trajectory(x0)` returns X(0..N). `x0`
    is one pattern or a batch with a leading pattern axis.
    """

    stages: tuple[AbstractStage, ...] | AbstractStage
    adjoint: AbstractAdjoint
    stacked: bool = eqx.field(static=True)
    check_finite: bool = eqx.field(static=True)

    def __init__(
        self,
        stages: Sequence[AbstractStage] | AbstractStage,
        *,
        adjoint: AbstractAdjoint = CostateAdjoint(),
        check_finite: bool = False,
    ):
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be an AbstractAdjoint, got {type(adjoint).__name__}")
        self.adjoint = adjoint
        self.check_finite = bool(check_finite)
        if isinstance(stages, AbstractStage):
            self.stacked = True
            self.stages = stages
            _check_stacked(stages)
        elif isinstance(stages, Sequence) and not isinstance(stages, str):
            stages = tuple(stages)
            if len(stages) == 0:
                raise ValueError("Multistage needs at least one stage; got none")
            for k, stage in enumerate(stages, start=1):
                if not isinstance(stage, AbstractStage):
                    raise TypeError(
                        f"stage {k} must be an adjoint.AbstractStage, got {type(stage).__name__}"
                    )
            self.stacked = False
            self.stages = stages
            _check_chain(stages)
        else:
            raise TypeError(
                "stages must be a sequence of AbstractStage (tuple layout) or one "
                f"stacked AbstractStage, got {type(stages).__name__}"
            )

    @classmethod
    def stack(cls, stages: Sequence[AbstractStage], **kwargs) -> "Multistage":
        """Stack N identical stages (same type, shapes and static fields) into the
        stacked layout, run with `lax.scan`."""
        stages = tuple(stages)
        if len(stages) == 0:
            raise ValueError("Multistage.stack needs at least one stage; got none")
        dynamic = [eqx.partition(s, eqx.is_array) for s in stages]
        static0 = dynamic[0][1]
        for k, (_, static) in enumerate(dynamic[1:], start=2):
            if jtu.tree_structure(static) != jtu.tree_structure(static0) or (
                jtu.tree_leaves(static) != jtu.tree_leaves(static0)
            ):
                raise ValueError(
                    f"Multistage.stack: stage {k} differs from stage 1 in its "
                    "structure or static fields; use the tuple layout instead"
                )
        try:
            stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *[d for d, _ in dynamic])
        except ValueError as err:
            raise ValueError(
                f"Multistage.stack: stages have controls of different shapes ({err})"
            ) from None
        return cls(eqx.combine(stacked, static0), **kwargs)

    @property
    def n_stages(self) -> int:
        """N, the number of stages."""
        if self.stacked:
            return jtu.tree_leaves(eqx.filter(self.stages, eqx.is_array))[0].shape[0]
        return len(self.stages)

    def stage(self, k: int) -> AbstractStage:
        """Stage k (1-based, as in the paper: stage k maps X(k-1) to X(k))."""
        n = self.n_stages
        if not 1 <= k <= n:
            raise IndexError(f"stage index {k} out of range 1..{n}")
        if self.stacked:
            dynamic, static = eqx.partition(self.stages, eqx.is_array)
            return eqx.combine(jtu.tree_map(lambda x: x[k - 1], dynamic), static)
        return self.stages[k - 1]

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        """Shape of one pattern of X(0), if the first stage declares it."""
        return self.stage(1).in_shape

    def as_batch(self, x0: Array) -> tuple[Array, bool]:
        """Return `x0` with a leading pattern axis, and whether one was added."""
        x0 = jnp.asarray(x0)
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            raise TypeError(f"x0 must be a floating array, got dtype {x0.dtype}")
        shape = self.in_shape
        if shape is None:
            if x0.ndim == 0:
                raise ValueError("x0 must have a leading pattern axis; got a scalar")
            return x0, False
        if x0.shape == shape:
            return x0[None], True
        if x0.shape[1:] == shape:
            return x0, False
        raise ValueError(
            f"x0 has shape {x0.shape}, but {_stage_name(1, self.stage(1))} expects "
            f"one pattern of shape {shape} or a batch of shape (P, {', '.join(map(str, shape))})"
        )

    def trajectory(self, x0: Array) -> PyTree[Array]:
        """All states X(0), ..., X(N).

        A tuple of arrays in the tuple layout; one array with leading axis N+1 in the
        stacked layout. Each state has x0's pattern axis if x0 has one.
        """
        xb, added = self.as_batch(x0)
        states = self.adjoint.trajectory(self, xb)
        if added:
            states = jtu.tree_map(lambda s: _unbatch(s, self.stacked), states)
        return states

    def __call__(self, x0: Array) -> Array:
        """X(N), the final state."""
        xb, added = self.as_batch(x0)
        out = self.adjoint.final(self, xb)
        return out[0] if added else out


def _unbatch(s: Array, stacked: bool) -> Array:
    return s[:, 0] if stacked else s[0]


def _check_chain(stages: tuple[AbstractStage, ...]) -> None:
    """Trace the stages' shapes (no FLOPs) and name the first pair that does not chain."""
    shape = stages[0].in_shape
    if shape is None:
        return
    dtype = jtu.tree_leaves(eqx.filter(stages[0], eqx.is_inexact_array)) or [jnp.zeros(())]
    dtype = dtype[0].dtype
    for k, stage in enumerate(stages, start=1):
        declared = stage.in_shape
        if declared is not None and declared != shape:
            raise ValueError(
                f"{_stage_name(k - 1, stages[k - 2])} outputs states of shape {shape}, "
                f"but {_stage_name(k, stage)} expects shape {declared}"
            )
        try:
            out = jax.eval_shape(stage, jax.ShapeDtypeStruct(shape, dtype))
        except Exception as err:  # the user's stage failed on this shape
            raise ValueError(
                f"{_stage_name(k, stage)} cannot take a state of shape {shape}"
                + (f" from {_stage_name(k - 1, stages[k - 2])}" if k > 1 else "")
                + f": {type(err).__name__}: {err}"
            ) from None
        if not isinstance(out, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{_stage_name(k, stage)} must return one array, got {type(out).__name__}"
            )
        shape = out.shape


def _check_stacked(stage: AbstractStage) -> None:
    leaves = jtu.tree_leaves(eqx.filter(stage, eqx.is_array))
    hint = " (to build a one-stage system pass a list: Multistage([stage]))"
    if not leaves or any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError("a stacked stage needs controls with a leading stage axis N" + hint)
    lengths = {leaf.shape[0] for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(
            f"a stacked stage's arrays must share their leading axis N; got lengths "
            f"{sorted(lengths)}" + hint
        )
    dynamic, static = eqx.partition(stage, eqx.is_array)
    one = eqx.combine(jtu.tree_map(lambda x: x[0], dynamic), static)
    shape = one.in_shape
    if shape is None:
        return
    try:
        out = jax.eval_shape(one, jax.ShapeDtypeStruct(shape, leaves[0].dtype))
    except Exception as err:
        raise ValueError(
            f"a slice of the stacked stage cannot take a state of shape {shape}: "
            f"{type(err).__name__}: {err}" + hint
        ) from None
    if getattr(out, "shape", None) != shape:
        raise ValueError(
            f"each slice of a stacked stage must map a state to a state of the same "
            f"shape; {type(one).__name__} maps {shape} to {getattr(out, 'shape', out)}" + hint
        )


# --------------------------------------------------------------------------------------
# Forward pass (∂L/∂B = 0)
# --------------------------------------------------------------------------------------


def _nonfinite_error(x, flags: Array, what: str):
    """Raise (under jit too) naming the smallest stage k where the forward pass became
    non-finite."""
    bad = ~flags
    n = flags.shape[0]
    msgs = [
        f"stage {k}: {what.format(k=k)} became non-finite (forward pass)" for k in range(1, n + 1)
    ]
    return eqx.branched_error_if(x, bad.any(), jnp.argmax(bad), msgs)


def _all_finite(tree) -> Array:
    leaves = [jnp.isfinite(x).all() for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _input_error(x0: Array) -> Array:
    """Raise (under jit too) if X(0) = x0 itself is non-finite: no stage is at fault,
    and a saturating first stage (tanh(inf) = 1) would hide it from the states."""
    return eqx.error_if(
        x0, ~jnp.isfinite(x0).all(), "X(0): the input x0 is non-finite (forward pass)"
    )


def _backward_nonfinite_error(x, lam_flags: Array, grad_flags: Array, lam0_flag: Array):
    """Raise (under jit too) naming the first non-finite value of the backward pass, in
    the order the recursion computes them: B(N), dC/dW(N), B(N-1), ..., dC/dW(1), B(0)."""
    n = lam_flags.shape[0]
    pairs = jnp.stack([lam_flags, grad_flags], axis=1)[::-1].reshape(-1)
    flags = jnp.concatenate([pairs, lam0_flag[None]])
    msgs = []
    for k in range(n, 0, -1):
        msgs.append(f"stage {k}: costate B({k}) became non-finite (backward pass)")
        msgs.append(f"stage {k}: control gradient dC/dW({k}) became non-finite (backward pass)")
    msgs.append("stage 1: input costate B(0) = −dC/dX(0) became non-finite (backward pass)")
    bad = ~flags
    return eqx.branched_error_if(x, bad.any(), jnp.argmax(bad), msgs)


def _forward_stacked(system: Multistage, x0: Array) -> Array:
    """X(1..N) of the stacked layout as one array (N, P, ...), by `lax.scan`."""
    dynamic, static = eqx.partition(system.stages, eqx.is_array)

    def step(x, d):
        x = jax.vmap(eqx.combine(d, static))(x)
        return x, x

    if system.check_finite:
        x0 = _input_error(x0)
    _, xs = jax.lax.scan(step, x0, dynamic)
    if system.check_finite:
        flags = jnp.isfinite(xs).reshape(xs.shape[0], -1).all(axis=1)
        xs = _nonfinite_error(xs, flags, "state X({k})")
    return xs


def _forward_tuple(system: Multistage, x0: Array) -> tuple[Array, ...]:
    if system.check_finite:
        x0 = _input_error(x0)
    states = [x0]
    for stage in system.stages:
        states.append(jax.vmap(stage)(states[-1]))
    states = tuple(states)
    if system.check_finite:
        flags = jnp.stack([jnp.isfinite(x).all() for x in states[1:]])
        states = _nonfinite_error(states, flags, "state X({k})")
    return states


def _forward(system: Multistage, x0: Array) -> PyTree[Array]:
    """X(k) = f_k(X(k-1)) for k = 1..N on a batch of patterns: X(0..N)."""
    if system.stacked:
        return jnp.concatenate([x0[None], _forward_stacked(system, x0)])
    return _forward_tuple(system, x0)


# --------------------------------------------------------------------------------------
# Backward pass (∂L/∂X = 0) and the optimality condition (∂L/∂W)
# --------------------------------------------------------------------------------------


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def costate_recursion(
    system: Multistage,
    states: PyTree[Array],
    state_cotangents: PyTree[Array | None],
    *,
    keep_costates: bool = False,
):
    """Run λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1) from k = N to 1.

    **Arguments:** `states` X(0..N) on a batch of patterns (as `_forward` returns them);
    `state_cotangents` ∂C/∂X(0..N) in the same layout, `None` meaning zero.

    **Returns:** `(lam0, stage_grads, lams)`: λ(0) = dC/dX(0); the stages' control
    gradients ∂f_kᵀ/∂W(k) · λ(k) in the stages' own layout; λ(1..N) if
    `keep_costates` (a tuple, or an array with leading axis N), else None.
    """
    if system.stacked:
        return _recursion_stacked(
            system, states[0], states[1:], state_cotangents, None, keep_costates
        )
    return _recursion_tuple(system, states, state_cotangents, keep_costates)


def _recursion_tuple(system, states, cts, keep_costates):
    n = len(system.stages)
    cts = tuple(cts)
    lam = cts[n]
    if lam is None:
        lam = jnp.zeros_like(states[n])
    lams, grads = [lam], []
    for k in range(n, 0, -1):
        stage = system.stages[k - 1]
        lam_prev, grad = stage.costate(states[k - 1], states[k], lam)
        lam = _add(lam_prev, cts[k - 1])
        grads.append(grad)
        lams.append(lam)
    lams = lams[::-1]  # λ(0..N)
    grads = tuple(grads[::-1])
    lam0 = lams[0]
    if system.check_finite:
        lam_flags = jnp.stack([jnp.isfinite(x).all() for x in lams[1:]])
        grad_flags = jnp.stack([_all_finite(g) for g in grads])
        lam0, grads = _backward_nonfinite_error(
            (lam0, grads), lam_flags, grad_flags, jnp.isfinite(lam0).all()
        )
    return lam0, grads, (tuple(lams[1:]) if keep_costates else None)


def _recursion_stacked(system, x0, xs, ct_trajectory, ct_final, keep_costates):
    """The recursion as a reversed `lax.scan` over stage indices i = k − 1.

    The states X(1..N) (`xs`) and the trajectory's cotangent (N+1, P, ...) are read by
    index inside the loop, so nothing is sliced or concatenated outside it; when the
    cost reads X(N) alone (`ct_final`) no per-stage cotangent is added at all.
    """
    dynamic, static = eqx.partition(system.stages, eqx.is_array)
    n = xs.shape[0]
    if ct_final is not None:
        lam_n = ct_final
    elif ct_trajectory is not None:
        lam_n = ct_trajectory[n]
    else:
        lam_n = jnp.zeros_like(xs[-1])
    record = keep_costates or system.check_finite

    def step(lam, inputs):
        d, i = inputs
        x_next = jax.lax.dynamic_index_in_dim(xs, i, keepdims=False)
        x_prev = jax.lax.dynamic_index_in_dim(xs, jnp.maximum(i - 1, 0), keepdims=False)
        x_prev = jnp.where(i == 0, x0, x_prev)
        lam_prev, grad = eqx.combine(d, static).costate(x_prev, x_next, lam)
        if ct_trajectory is not None:
            lam_prev = lam_prev + jax.lax.dynamic_index_in_dim(ct_trajectory, i, keepdims=False)
        return lam_prev, (eqx.filter(grad, eqx.is_array), lam if record else None)

    lam0, (grads, lams) = jax.lax.scan(step, lam_n, (dynamic, jnp.arange(n)), reverse=True)
    if system.check_finite:
        lam_flags = jnp.isfinite(lams).reshape(lams.shape[0], -1).all(axis=1)
        grad_leaves = [g for g in jtu.tree_leaves(grads) if eqx.is_inexact_array(g)]
        grad_flags = jnp.stack(
            [jnp.ones((n,), bool)]
            + [jnp.isfinite(g).reshape(n, -1).all(axis=1) for g in grad_leaves]
        ).all(axis=0)
        lam0, grads = _backward_nonfinite_error(
            (lam0, grads), lam_flags, grad_flags, jnp.isfinite(lam0).all()
        )
    return lam0, grads, (lams if keep_costates else None)


def _system_grads(system: Multistage, stage_grads) -> Multistage:
    """Place stage gradients in a pytree shaped like `eqx.filter(system, inexact)`, each
    in its control's own dtype (as `jax.grad` returns them): with float16 controls and
    a float32 x0 the recursion runs in float32, and its results are cast back."""
    if system.stacked:
        stage_grads = eqx.combine(stage_grads, eqx.partition(system.stages, eqx.is_array)[1])
    grads = eqx.filter(eqx.tree_at(lambda s: s.stages, system, stage_grads), eqx.is_inexact_array)
    return jtu.tree_map(
        lambda g, p: None if g is None else g.astype(p.dtype),
        grads,
        eqx.filter(system, eqx.is_inexact_array),
        is_leaf=lambda x: x is None,
    )


# --------------------------------------------------------------------------------------
# The custom VJP: forward pass keeps the states, backward pass is the recursion.
# --------------------------------------------------------------------------------------


@eqx.filter_custom_vjp
def _costate_trajectory(vjp_arg, final_only: bool):
    system, x0 = vjp_arg
    states = _forward(system, x0)
    return states[-1] if final_only else states


@_costate_trajectory.def_fwd
def _costate_trajectory_fwd(perturbed, vjp_arg, final_only):
    del perturbed
    system, x0 = vjp_arg
    if system.stacked:
        xs = _forward_stacked(system, x0)  # X(1..N); X(0) is x0 itself
        out = xs[-1] if final_only else jnp.concatenate([x0[None], xs])
        return out, xs
    states = _forward_tuple(system, x0)
    return (states[-1] if final_only else states), states  # only the states are stored


@_costate_trajectory.def_bwd
def _costate_trajectory_bwd(residuals, cotangent, perturbed, vjp_arg, final_only):
    system, x0 = vjp_arg
    if system.stacked:
        ct_trajectory, ct_final = (None, cotangent) if final_only else (cotangent, None)
        lam0, stage_grads, _ = _recursion_stacked(
            system, x0, residuals, ct_trajectory, ct_final, keep_costates=False
        )
    else:
        n = len(system.stages)
        cts = (None,) * n + (cotangent,) if final_only else cotangent
        lam0, stage_grads, _ = _recursion_tuple(system, residuals, cts, keep_costates=False)
    grads = _system_grads(system, stage_grads)
    grads = jtu.tree_map(
        lambda p, g: g if p else None, perturbed[0], grads, is_leaf=lambda x: x is None
    )
    return grads, (lam0.astype(x0.dtype) if perturbed[1] else None)
