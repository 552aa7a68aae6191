"""Multistage systems and the costate recursion that differentiates them.

Forward pass (∂L/∂B = 0):   X(k) = f_k(X(k-1); W(k)),  k = 1..N,  X(0) = x0.
Backward pass (∂L/∂X = 0):  λ(N) = ∂C/∂X(N),
                            λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1).
Optimality (∂L/∂W):         dC/dW(k) = ∂C/∂W(k) + ∂f_kᵀ/∂W(k) · λ(k).

Internally the recursion carries λ(k) = ∂C/∂X(k), the cotangent that `jax.grad` hands
to a custom VJP. The paper's multiplier is B(k) = −λ(k); `adjoint.costates` reports B.
"""

import abc
from collections.abc import Callable, Sequence
from typing import no_type_check

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


class AbstractCostateAdjoint(AbstractAdjoint):
    """A strategy that differentiates with the costate recursion: the forward pass
    stores the states (or, with `checkpoint_every`, every k-th state) and the backward
    pass, `backward`, solves

        λ(N) = ∂C/∂X(N),   λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1),
        dC/dW(k) = ∂f_kᵀ/∂W(k) · λ(k)   (summed over k for a shared leaf W),

    for λ(0) and the control gradients. The strategies share one custom VJP and differ
    only in how they solve the recursion.
    """

    @abc.abstractmethod
    def backward(
        self,
        system: "Multistage",
        x0: Array,
        residuals: "_Residuals",
        ct_trajectory: PyTree[Array] | None,
        ct_final: Array | None,
    ) -> tuple[Array, PyTree[Array]]:
        """The backward pass: `(λ(0), control gradients in the stages' own layout)`,
        from the forward pass's `residuals` and the cotangent of the trajectory
        (`ct_trajectory`, ∂C/∂X(0..N)) or of X(N) alone (`ct_final`)."""

    def trajectory(self, system, x0):
        return _costate_trajectory((system, x0), False)

    def final(self, system, x0):
        return _costate_trajectory((system, x0), True)


class CostateAdjoint(AbstractCostateAdjoint):
    """Differentiate with the explicit costate recursion, run sequentially.

    The forward pass stores the states X(0..N) and nothing else (every k-th state with
    `Multistage(checkpoint_every=k)`); the backward pass runs
    λ(k-1) = ∂f_kᵀ/∂X(k-1) · λ(k) + ∂C/∂X(k-1) from k = N down to 1 using each stage's
    `costate` (analytic where the stage provides one, `jax.vjp` of that stage alone
    otherwise), summing the gradients of shared leaves in the scan carry. The backward
    pass is itself differentiable JAX, so grad-of-grad works.
    """

    def backward(self, system, x0, residuals, ct_trajectory, ct_final):
        if not system.stacked:
            n = len(system.stages)
            cts = (None,) * n + (ct_final,) if ct_trajectory is None else ct_trajectory
            lam0, stage_grads, _ = _recursion_tuple(
                system, residuals.states, cts, keep_costates=False
            )
            return lam0, stage_grads
        if residuals.states is None:
            return _recursion_checkpointed(system, x0, residuals.checkpoints, ct_final)
        lam0, stage_grads, _ = _recursion_stacked(
            system, x0, residuals.states, ct_trajectory, ct_final, keep_costates=False
        )
        return lam0, stage_grads


class AutodiffAdjoint(AbstractAdjoint):
    """Differentiate the plain forward pass with JAX's reverse mode (the baseline).

    With `Multistage(checkpoint_every=k)` the stacked forward pass of `__call__` is
    wrapped in `jax.checkpoint` per segment of k stages."""

    def trajectory(self, system, x0):
        return _forward(system, x0)

    def final(self, system, x0):
        if system.stacked and system.checkpoint_every is not None:
            return _forward_remat(system, x0)
        return _forward(system, x0)[-1]


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
    - `adjoint`: how the system is differentiated; `CostateAdjoint()` (default),
      `ParallelCostates()` (stacked layout) or `AutodiffAdjoint()`.
    - `shared` (stacked layout): a function selecting the leaves of the stacked stage
      that are *shared by every stage* (as `eqx.tree_at`'s `where`, e.g.
      `lambda s: s.cell`). These carry no stage axis; every stage uses the same value:
      the equality constraints W(1) = … = W(N) = W, whose gradient
      dC/dW = Σ_k ∂f_kᵀ/∂W · λ(k) is summed in the backward scan's carry (memory
      O(|W|), not O(N |W|)).
    - `checkpoint_every` (stacked layout): None (store all N+1 states) or k: calling
      the system stores only X(0), X(k), X(2k), … and the backward pass recomputes each
      segment of k states before running the recursion over it (memory about
      (N/k + k) states instead of N; about one extra forward pass; k ≈ √N minimises
      memory). `trajectory` returns every state anyway, so it stores them.
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
    shared_leaves: tuple[bool, ...] | None = eqx.field(static=True)
    checkpoint_every: int | None = eqx.field(static=True)

    @no_type_check  # checks its own arguments, naming the one at fault
    def __init__(
        self,
        stages: Sequence[AbstractStage] | AbstractStage,
        *,
        adjoint: AbstractAdjoint = CostateAdjoint(),
        shared: Callable[[AbstractStage], PyTree] | None = None,
        checkpoint_every: int | None = None,
        check_finite: bool = False,
    ):
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be an AbstractAdjoint, got {type(adjoint).__name__}")
        if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int)
            or isinstance(checkpoint_every, bool)
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be None or a positive int, got {checkpoint_every!r}"
            )
        self.adjoint = adjoint
        self.check_finite = bool(check_finite)
        self.checkpoint_every = checkpoint_every
        if isinstance(stages, AbstractStage):
            self.stacked = True
            self.stages = stages
            self.shared_leaves = None if shared is None else _shared_leaves(stages, shared)
            _check_stacked(stages, self.shared_leaves)
        elif isinstance(stages, Sequence) and not isinstance(stages, str):
            for name, value in (("shared", shared), ("checkpoint_every", checkpoint_every)):
                if value is not None:
                    raise ValueError(
                        f"{name} applies to the stacked layout (one stacked stage); got "
                        f"a sequence of stages"
                    )
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
            self.shared_leaves = None
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
            per_stage, _, _ = _parts(self)
            return jtu.tree_leaves(per_stage)[0].shape[0]
        return len(self.stages)

    def stage(self, k: int) -> AbstractStage:
        """Stage k (1-based, as in the paper: stage k maps X(k-1) to X(k))."""
        n = self.n_stages
        if not 1 <= k <= n:
            raise IndexError(f"stage index {k} out of range 1..{n}")
        if self.stacked:
            per_stage, shared, static = _parts(self)
            return _combine(jtu.tree_map(lambda x: x[k - 1], per_stage), shared, static)
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


def _shared_leaves(stage: AbstractStage, shared: object) -> tuple[bool, ...]:
    """Which leaves of `stage` (in `jtu.tree_leaves` order) `shared` selects."""
    if not callable(shared):
        raise TypeError(
            "shared must be a function selecting part of the stacked stage (as "
            f"eqx.tree_at's `where`, e.g. lambda s: s.cell), got {type(shared).__name__}"
        )
    flags = jtu.tree_map(lambda _: False, stage)
    try:
        flags = eqx.tree_at(
            shared, flags, replace_fn=lambda node: jtu.tree_map(lambda _: True, node)
        )
    except Exception as err:
        raise ValueError(
            f"shared must select part of the stacked {type(stage).__name__}: "
            f"{type(err).__name__}: {err}"
        ) from None
    mask = tuple(jtu.tree_leaves(flags))
    if not any(mask):
        raise ValueError(f"shared selects no leaf of the stacked {type(stage).__name__}")
    return mask


def _split_shared(system: Multistage, tree):
    """`tree` (shaped like the stacked stage, `None` allowed at leaves) split into its
    per-stage part and its shared part, each with `None` in the other's places. The
    shared part is None when the system has no shared leaves."""
    return _split_by_mask(system.stages, system.shared_leaves, tree)


def _split_by_mask(stage, mask, tree):
    if mask is None:
        return tree, None
    treedef = jtu.tree_structure(stage)
    leaves = treedef.flatten_up_to(tree)
    per_stage = treedef.unflatten([None if m else x for x, m in zip(leaves, mask)])
    shared = treedef.unflatten([x if m else None for x, m in zip(leaves, mask)])
    return per_stage, shared


def _parts(system: Multistage):
    """The stacked stage as (per-stage arrays with leading axis N, shared arrays or
    None, everything else)."""
    dynamic, static = eqx.partition(system.stages, eqx.is_array)
    per_stage, shared = _split_shared(system, dynamic)
    return per_stage, shared, static


def _combine(per_stage, shared, static):
    if shared is None:
        return eqx.combine(per_stage, static)
    return eqx.combine(per_stage, shared, static)


def _check_stacked(stage: AbstractStage, mask: tuple[bool, ...] | None) -> None:
    dynamic, static = eqx.partition(stage, eqx.is_array)
    per_stage, shared = _split_by_mask(stage, mask, dynamic)
    leaves = jtu.tree_leaves(per_stage)
    hint = " (to build a one-stage system pass a list: Multistage([stage]))"
    if not leaves or any(leaf.ndim == 0 for leaf in leaves):
        raise ValueError(
            "a stacked stage needs per-stage arrays with a leading stage axis N" + hint
        )
    lengths = {leaf.shape[0] for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(
            f"a stacked stage's per-stage arrays must share their leading axis N; got "
            f"lengths {sorted(lengths)}" + hint
        )
    one = _combine(jtu.tree_map(lambda x: x[0], per_stage), shared, static)
    shape = one.in_shape
    if shape is None:
        return
    # the probe state in the stage's floating dtype (its first leaves may be int indices)
    floating = [x.dtype for x in jtu.tree_leaves(dynamic) if jnp.issubdtype(x.dtype, jnp.inexact)]
    dtype = floating[0] if floating else jnp.zeros(()).dtype
    try:
        out = jax.eval_shape(one, jax.ShapeDtypeStruct(shape, dtype))
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


def _scan_states(parts, x0: Array, per_stage, *, store: bool, check: bool):
    """X(k) = f_k(X(k-1)) over the stages of `per_stage` (a run of the stacked layout)
    by `lax.scan`: returns (last state, the states if `store`, per-stage finiteness
    flags if `check`)."""
    _, shared, static = parts

    def step(x, d):
        x = jax.vmap(_combine(d, shared, static))(x)
        return x, (x if store else None, jnp.isfinite(x).all() if check else None)

    x_last, (xs, flags) = jax.lax.scan(step, x0, per_stage)
    return x_last, xs, flags


def _segments(tree, every: int, n: int):
    """Split the leading axis N of `tree` into q = N // every segments of `every`
    stages (leading axes (q, every)) and a tail of r = N mod every stages."""
    q, r = divmod(n, every)
    main = jtu.tree_map(lambda a: a[: q * every].reshape((q, every) + a.shape[1:]), tree)
    tail = jtu.tree_map(lambda a: a[q * every :], tree)
    return main, tail, q, r


def _forward_stacked(system: Multistage, x0: Array) -> Array:
    """X(1..N) of the stacked layout as one array (N, P, ...), by `lax.scan`."""
    if system.check_finite:
        x0 = _input_error(x0)
    _, xs, flags = _scan_states(
        _parts(system), x0, _parts(system)[0], store=True, check=system.check_finite
    )
    if system.check_finite:
        xs = _nonfinite_error(xs, flags, "state X({k})")
    return xs


class _Checkpoints(eqx.Module):
    """What a checkpointed forward pass stores: X(0), X(k), …, X((q-1)k) (`starts`,
    leading axis q) and X(qk), the start of the tail of N mod k stages."""

    starts: Array
    tail_start: Array


def _forward_checkpointed(system: Multistage, x0: Array) -> tuple[Array, _Checkpoints]:
    """X(N), storing only every `checkpoint_every`-th state."""
    check = system.check_finite
    if check:
        x0 = _input_error(x0)
    parts = _parts(system)
    main, tail, q, r = _segments(parts[0], system.checkpoint_every, system.n_stages)

    def segment(x, d_seg):
        x_end, _, flags = _scan_states(parts, x, d_seg, store=False, check=check)
        return x_end, (x, flags)

    if q:
        x_q, (starts, main_flags) = jax.lax.scan(segment, x0, main)
    else:
        x_q, starts, main_flags = x0, jnp.zeros((0,) + x0.shape, x0.dtype), None
    x_n, tail_flags = x_q, None
    if r:
        x_n, _, tail_flags = _scan_states(parts, x_q, tail, store=False, check=check)
    if check:
        flags = [f for f in (main_flags, tail_flags) if f is not None]
        flags = jnp.concatenate([f.reshape(-1) for f in flags])
        x_n = _nonfinite_error(x_n, flags, "state X({k})")
    return x_n, _Checkpoints(starts, x_q)


def _forward_remat(system: Multistage, x0: Array) -> Array:
    """X(N) by plain `lax.scan`, with `jax.checkpoint` on each segment of
    `checkpoint_every` stages (the `AutodiffAdjoint` counterpart of checkpointing)."""
    if system.check_finite:
        x0 = _input_error(x0)
    parts = _parts(system)
    main, tail, q, r = _segments(parts[0], system.checkpoint_every, system.n_stages)
    check = system.check_finite

    @jax.checkpoint
    def segment(x, d_seg):
        x_end, _, flags = _scan_states(parts, x, d_seg, store=False, check=check)
        return x_end, flags

    x, main_flags = jax.lax.scan(segment, x0, main) if q else (x0, None)
    tail_flags = None
    if r:
        x, _, tail_flags = _scan_states(parts, x, tail, store=False, check=check)
    if check:
        flags = [f.reshape(-1) for f in (main_flags, tail_flags) if f is not None]
        x = _nonfinite_error(x, jnp.concatenate(flags), "state X({k})")
    return x


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
    gradients ∂f_kᵀ/∂W(k) · λ(k) in the stages' own layout (a shared leaf's summed
    over k); λ(1..N) if `keep_costates` (a tuple, or an array with leading axis N),
    else None.
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


def _shared_zeros(shared):
    """The running sum Σ_k ∂f_kᵀ/∂W · λ(k) of the shared leaves, started at zero in
    each control's own dtype (non-differentiable leaves: None)."""
    return jtu.tree_map(lambda w: jnp.zeros_like(w) if eqx.is_inexact_array(w) else None, shared)


def _accumulate(acc, grad_shared):
    """acc + grad, each term cast to its control's dtype (as `jax.grad` sums the uses
    of a float16 weight on float32 states)."""
    return jtu.tree_map(
        lambda a, g: a if a is None or g is None else a + g.astype(a.dtype),
        acc,
        grad_shared,
        is_leaf=_is_none,
    )


def _is_none(x):
    return x is None


def _scan_costates(system, parts, x0, xs, per_stage, ct_trajectory, lam, acc, keep_costates):
    """The recursion over one run of stages as a reversed `lax.scan` over the stage
    indices i = k − 1 of `per_stage`.

    `xs` holds X(1..L) of the run and `x0` the state before it; they and the
    trajectory's cotangent (L+1, P, ...) are read by index inside the loop, so nothing
    is sliced or concatenated outside it. The carry holds λ and, for shared leaves,
    the running sum of their gradients `acc`.

    Returns (λ(0), acc, per-stage gradients, λ(1..L) if `keep_costates`, and the
    finiteness flags of λ(k) and dC/dW(k) if `system.check_finite`).
    """
    _, shared, static = parts
    n = xs.shape[0]
    check = system.check_finite

    def step(carry, inputs):
        lam, acc = carry
        d, i = inputs
        x_next = jax.lax.dynamic_index_in_dim(xs, i, keepdims=False)
        x_prev = jax.lax.dynamic_index_in_dim(xs, jnp.maximum(i - 1, 0), keepdims=False)
        x_prev = jnp.where(i == 0, x0, x_prev)
        lam_prev, grad = _combine(d, shared, static).costate(x_prev, x_next, lam)
        grad = eqx.filter(grad, eqx.is_array)
        grad_stage, grad_shared = _split_shared(system, grad)
        if grad_shared is not None:
            acc = _accumulate(acc, grad_shared)
        if ct_trajectory is not None:
            lam_prev = lam_prev + jax.lax.dynamic_index_in_dim(ct_trajectory, i, keepdims=False)
        flags = (jnp.isfinite(lam).all(), _all_finite(grad)) if check else None
        return (lam_prev, acc), (grad_stage, lam if keep_costates else None, flags)

    (lam0, acc), (grads, lams, flags) = jax.lax.scan(
        step, (lam, acc), (per_stage, jnp.arange(n)), reverse=True
    )
    return lam0, acc, grads, lams, flags


def _with_shared(system, grads_stage, acc):
    """Per-stage gradients and the shared sums in one tree shaped like the stage."""
    if system.shared_leaves is None:
        return grads_stage
    treedef = jtu.tree_structure(system.stages)
    per = treedef.flatten_up_to(grads_stage)
    shared = treedef.flatten_up_to(acc)
    return treedef.unflatten([s if m else g for g, s, m in zip(per, shared, system.shared_leaves)])


def _finish_stacked(system, lam0, grads, flags):
    if system.check_finite:
        lam_flags, grad_flags = flags
        lam0, grads = _backward_nonfinite_error(
            (lam0, grads), lam_flags, grad_flags, jnp.isfinite(lam0).all()
        )
    return lam0, grads


def _recursion_stacked(system, x0, xs, ct_trajectory, ct_final, keep_costates):
    """The recursion over all N stages, from the stored states X(1..N) (`xs`). When the
    cost reads X(N) alone (`ct_final`) no per-stage cotangent is added at all."""
    parts = _parts(system)
    n = xs.shape[0]
    if ct_final is not None:
        lam_n = ct_final
    elif ct_trajectory is not None:
        lam_n = ct_trajectory[n]
    else:
        lam_n = jnp.zeros_like(xs[-1])
    acc = None if parts[1] is None else _shared_zeros(parts[1])
    lam0, acc, grads, lams, flags = _scan_costates(
        system, parts, x0, xs, parts[0], ct_trajectory, lam_n, acc, keep_costates
    )
    lam0, grads = _finish_stacked(system, lam0, _with_shared(system, grads, acc), flags)
    return lam0, grads, lams


def _recursion_checkpointed(system, x0, checkpoints: _Checkpoints, ct_final):
    """The recursion on a checkpointed forward pass (a cost on X(N) alone): segments of
    k = `checkpoint_every` stages, newest first; each segment's states are recomputed
    from its checkpoint, then the recursion runs over them, λ and the shared sums
    carried from one segment to the next."""
    parts = _parts(system)
    every = system.checkpoint_every
    main, tail, q, r = _segments(parts[0], every, system.n_stages)
    lam = jnp.zeros_like(checkpoints.tail_start) if ct_final is None else ct_final
    acc = None if parts[1] is None else _shared_zeros(parts[1])
    grads, flags = [], []

    def run(x_start, d_run, lam, acc):
        _, xs, _ = _scan_states(parts, x_start, d_run, store=True, check=False)
        lam, acc, g, _, f = _scan_costates(system, parts, x_start, xs, d_run, None, lam, acc, False)
        return lam, acc, g, f

    if r:  # the tail, recomputed from the last checkpoint
        lam, acc, g_tail, f_tail = run(checkpoints.tail_start, tail, lam, acc)
        grads.append(g_tail)
        flags.append(f_tail)
    if q:

        def segment(carry, inputs):
            lam, acc = carry
            x_start, d_seg = inputs
            lam, acc, g, f = run(x_start, d_seg, lam, acc)
            return (lam, acc), (g, f)

        (lam, acc), (g_main, f_main) = jax.lax.scan(
            segment, (lam, acc), (checkpoints.starts, main), reverse=True
        )
        merge = lambda a: a.reshape((q * every,) + a.shape[2:])  # noqa: E731
        grads.insert(0, jtu.tree_map(merge, g_main))
        flags.insert(0, jtu.tree_map(merge, f_main))
    concat = lambda *a: jnp.concatenate(a)  # noqa: E731
    grads = jtu.tree_map(concat, *grads) if len(grads) > 1 else grads[0]
    flags = jtu.tree_map(concat, *flags) if len(flags) > 1 else flags[0]
    return _finish_stacked(system, lam, _with_shared(system, grads, acc), flags)


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
# The custom VJP: the forward pass keeps the states, the backward pass is the recursion
# (solved by the system's `AbstractCostateAdjoint`).
# --------------------------------------------------------------------------------------


class _Residuals(eqx.Module):
    """What the forward pass stores for the backward pass: all states (X(1..N) as one
    array when stacked, X(0..N) as a tuple otherwise), or, with `checkpoint_every` on
    a cost of X(N), only the checkpoints."""

    states: PyTree[Array] | None
    checkpoints: _Checkpoints | None


@eqx.filter_custom_vjp
def _costate_trajectory(vjp_arg, final_only: bool):
    system, x0 = vjp_arg
    if final_only and system.stacked and system.checkpoint_every is not None:
        return _forward_checkpointed(system, x0)[0]
    states = _forward(system, x0)
    return states[-1] if final_only else states


@_costate_trajectory.def_fwd
def _costate_trajectory_fwd(perturbed, vjp_arg, final_only):
    del perturbed
    system, x0 = vjp_arg
    if system.stacked:
        if final_only and system.checkpoint_every is not None:
            x_n, checkpoints = _forward_checkpointed(system, x0)
            return x_n, _Residuals(None, checkpoints)
        xs = _forward_stacked(system, x0)  # X(1..N); X(0) is x0 itself
        out = xs[-1] if final_only else jnp.concatenate([x0[None], xs])
        return out, _Residuals(xs, None)
    states = _forward_tuple(system, x0)
    return (states[-1] if final_only else states), _Residuals(states, None)


@_costate_trajectory.def_bwd
def _costate_trajectory_bwd(residuals, cotangent, perturbed, vjp_arg, final_only):
    system, x0 = vjp_arg
    ct_trajectory, ct_final = (None, cotangent) if final_only else (cotangent, None)
    lam0, stage_grads = system.adjoint.backward(system, x0, residuals, ct_trajectory, ct_final)
    grads = _system_grads(system, stage_grads)
    grads = jtu.tree_map(
        lambda p, g: g if p else None, perturbed[0], grads, is_leaf=lambda x: x is None
    )
    return grads, (lam0.astype(x0.dtype) if perturbed[1] else None)
