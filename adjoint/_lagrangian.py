"""The Lagrangian of a multistage system, its three conditions and its Hamiltonian.

With the paper's sign convention B(k) = −∂C/∂X(k) (so B(N) = 2(D − X(N)) for the
squared error C = Σ_p |D_p − X_p(N)|²):

    L(W, X, B) = C(X, W) + Σ_{k=1..N} Σ_p B_p(k)ᵀ [X_p(k) − f_k(X_p(k-1); W(k))]

    ∂L/∂B(k) = 0   forward pass      X(k) = f_k(X(k-1))
    ∂L/∂X(k) = 0   backward pass     B(k) = ∂f_{k+1}ᵀ/∂X(k) · B(k+1) − ∂C/∂X(k)
    ∂L/∂W(k)       optimality        = dC/dW(k) at the forward states and the costates

X(0) = x0 is a boundary condition, not a variable; B(0) = −dC/dX(0) is the cost's
sensitivity to the input (a shadow price).
"""

import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from ._misc import _tree_add
from ._multistage import (
    Multistage,
    _combine,
    _forward,
    _parts,
    _split_shared,
    _system_grads,
    _unbatch,
    costate_recursion,
)


def _check_scalar(cost: Callable, states) -> None:
    out = eqx.filter_eval_shape(cost, states)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"cost must return a scalar (sum it over patterns and states); got {shape}"
        )


def _rebatch(tree, stacked: bool):
    return jtu.tree_map(lambda s: s[:, None] if stacked else s[None], tree)


def _debatch(tree, stacked: bool):
    return jtu.tree_map(lambda s: _unbatch(s, stacked), tree)


class CostateRecord(eqx.Module):
    """What the costate recursion knows about one evaluation of the cost.

    - `value`: C.
    - `states`: X(0..N) (tuple, or an array with leading axis N+1 when stacked).
    - `costates`: B(1..N) = −∂C/∂X in the paper's sign, same layout without X(0).
    - `initial_costate`: B(0) = −dC/dX(0), the sensitivity of the cost to the input
      (the one name of B(0) across the package).
    - `grads`: dC/dW, shaped like `eqx.filter(system, eqx.is_inexact_array)`.
    """

    value: Scalar
    states: PyTree[Array]
    costates: PyTree[Array]
    initial_costate: Array
    grads: Multistage

    @property
    def input_costate(self) -> Array:
        """Deprecated name of `initial_costate` (removed in the next release)."""
        warnings.warn(
            "CostateRecord.input_costate is deprecated: use initial_costate",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.initial_costate


def costates(
    system: Multistage,
    x0: Array,
    cost: Callable[[PyTree[Array]], Scalar],
    *,
    control_cost: Callable[[Multistage], Scalar] | None = None,
) -> CostateRecord:
    """Run the forward pass and the costate recursion, and return everything.

    **Arguments:**

    - `system`: a `Multistage`.
    - `x0`: X(0), one pattern or a batch with a leading pattern axis.
    - `cost`: maps the trajectory X(0..N) (as `system.trajectory` returns it) to a
      scalar, summed over patterns; it may read any state.
    - `control_cost`: optional cost on the controls (e.g. weight decay), a function of
      the system; its gradient is added to `grads`.
    """
    xb, added = system.as_batch(x0)
    states_b = _forward(system, xb)
    states = _debatch(states_b, system.stacked) if added else states_b
    _check_scalar(cost, states)
    value, cts = jax.value_and_grad(cost)(states)
    if added:
        cts = _rebatch(cts, system.stacked)
    lam0, stage_grads, lams = costate_recursion(system, states_b, cts, keep_costates=True)
    grads = _system_grads(system, stage_grads)
    if control_cost is not None:
        _check_scalar(control_cost, system)
        c_value, c_grads = eqx.filter_value_and_grad(control_cost)(system)
        value = value + c_value
        grads = _tree_add(grads, c_grads)
    b = jtu.tree_map(jnp.negative, lams)
    b0 = -lam0
    if added:
        b = _debatch(b, system.stacked)
        b0 = b0[0]
    return CostateRecord(value, states, b, b0, grads)


def _check_tables(who: str, system: Multistage, x0: Array, states, costates) -> None:
    """States X(0..N) and costates B(1..N) must have the lengths and, stage by stage, the
    shapes that `costates(...)` returns: a table one stage short (or the two swapped)
    would otherwise be zipped silently against the stages and drop terms of L."""
    n = system.n_stages
    expected = jax.eval_shape(system.trajectory, x0)
    if system.stacked:
        expected = [expected.shape, (n,) + expected.shape[1:]]
    else:
        expected = [tuple(e.shape for e in expected), tuple(e.shape for e in expected[1:])]
    tables = (("states", "X", 0, states, expected[0]), ("costates", "B", 1, costates, expected[1]))
    for name, sym, first, given, want in tables:
        span = f"{sym}({first}..{n}) of a {n}-stage system"
        if system.stacked:
            shape = tuple(jnp.shape(given))
            if shape[:1] != want[:1]:
                got = shape[0] if shape else "a scalar"
                raise ValueError(
                    f"{who}: {name} must hold {span}, a leading axis of length {want[0]}; got {got}"
                )
            if shape != want:
                raise ValueError(f"{who}: {name} has shape {shape}, expected {want}")
            continue
        if not isinstance(given, (tuple, list)):
            raise ValueError(
                f"{who}: {name} must hold {span} as a tuple of {len(want)} arrays (the "
                f"tuple layout); got {type(given).__name__}"
            )
        if len(given) != len(want):
            raise ValueError(
                f"{who}: {name} must hold {span}, {len(want)} arrays; got {len(given)}"
            )
        for i, (g, w) in enumerate(zip(given, want)):
            if tuple(jnp.shape(g)) != w:
                raise ValueError(
                    f"{who}: {name}[{i}] ({sym}({first + i})) has shape {jnp.shape(g)}, "
                    f"expected {w}"
                )


def _residuals(system: Multistage, x0b: Array, states_b) -> PyTree[Array]:
    """X(k) − f_k(X(k-1)) for k = 1..N, with X(0) = x0."""
    if system.stacked:
        prev = jnp.concatenate([x0b[None], states_b[1:-1]])
        per_stage, shared, static = _parts(system)
        applied = jax.vmap(lambda d, x: jax.vmap(_combine(d, shared, static))(x), in_axes=(0, 0))(
            per_stage, prev
        )
        return states_b[1:] - applied
    prev = (x0b,) + tuple(states_b[1:-1])
    return tuple(x - jax.vmap(s)(xp) for s, xp, x in zip(system.stages, prev, states_b[1:]))


def lagrangian(
    system: Multistage,
    x0: Array,
    states: PyTree[Array],
    costates: PyTree[Array],
    cost: Callable[[PyTree[Array]], Scalar],
    *,
    control_cost: Callable[[Multistage], Scalar] | None = None,
) -> Scalar:
    """L = C + Σ_k Σ_p B_p(k)ᵀ [X_p(k) − f_k(X_p(k-1))], with X(0) = x0.

    `states` X(0..N) and `costates` B(1..N) are in the layout that `costates(...)`
    returns (X(0) is read from `x0`, not from `states`). They need not satisfy the
    forward or backward pass: L is defined for any X and B. Their lengths (N+1 states,
    N costates) and shapes are checked: a ValueError names the argument at fault.
    """
    _check_tables("lagrangian", system, x0, states, costates)
    xb, added = system.as_batch(x0)
    if system.stacked:
        states = states.at[0].set(x0)
    else:
        states = (x0,) + tuple(states[1:])
    value = cost(states)
    if jnp.shape(value) != ():
        raise ValueError(f"cost must return a scalar; got shape {jnp.shape(value)}")
    if control_cost is not None:
        value = value + control_cost(system)
    states_b, b = (
        (_rebatch(states, system.stacked), _rebatch(costates, system.stacked))
        if added
        else (states, costates)
    )
    residuals = _residuals(system, xb, states_b)
    return value + sum(
        jnp.vdot(bk, rk) for bk, rk in zip(jtu.tree_leaves(b), jtu.tree_leaves(residuals))
    )


class KKTResiduals(eqx.Module):
    """The three parts of ∇L, obtained by differentiating `lagrangian` with JAX.

    - `forward`: ∂L/∂B(k) = X(k) − f_k(X(k-1)), k = 1..N (zero on the forward pass).
    - `backward`: ∂L/∂X(k), k = 1..N (zero at the recursion's costates).
    - `optimality`: ∂L/∂W, shaped like the system's controls (equals dC/dW there).
    - `forward_norms`, `backward_norms`, `optimality_norms`: max |·| per stage k = 1..N,
      so a broken condition points at its stage.
    """

    forward: PyTree[Array]
    backward: PyTree[Array]
    optimality: Multistage
    forward_norms: Array
    backward_norms: Array
    optimality_norms: Array

    def table(self) -> str:
        """A per-stage table of the three residual norms."""
        rows = ["stage | max|dL/dB| | max|dL/dX| | max|dL/dW|", "--- | --- | --- | ---"]
        for k in range(self.forward_norms.shape[0]):
            rows.append(
                f"{k + 1} | {float(self.forward_norms[k]):.3e} | "
                f"{float(self.backward_norms[k]):.3e} | {float(self.optimality_norms[k]):.3e}"
            )
        return "\n".join(rows)


def _per_stage_max(tree, stacked: bool, n: int) -> Array:
    """max |x| over each of the N stages' entries of `tree`."""
    if stacked:
        leaves = [x.reshape(x.shape[0], -1) for x in jtu.tree_leaves(tree)]
        return jnp.max(jnp.stack([jnp.max(jnp.abs(x), axis=1) for x in leaves]), axis=0)
    per = []
    for part in tree:
        leaves = [jnp.max(jnp.abs(x)) for x in jtu.tree_leaves(part)]
        per.append(jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros(()))
    return jnp.stack(per) if per else jnp.zeros((n,))


def kkt_residuals(
    system: Multistage,
    x0: Array,
    states: PyTree[Array],
    costates: PyTree[Array],
    cost: Callable[[PyTree[Array]], Scalar],
    *,
    control_cost: Callable[[Multistage], Scalar] | None = None,
) -> KKTResiduals:
    """∂L/∂B, ∂L/∂X and ∂L/∂W by `jax.grad` of `lagrangian`: a check that is
    independent of the costate recursion.

    At the forward states and the recursion's costates the first two vanish to
    rounding and the third equals the gradient dC/dW.
    """
    _check_tables("kkt_residuals", system, x0, states, costates)

    def lag(args):
        sys, xs, bs = args
        return lagrangian(sys, x0, xs, bs, cost, control_cost=control_cost)

    d_system, d_states, d_costates = eqx.filter_grad(lag)((system, states, costates))
    backward = d_states[1:]
    n = system.n_stages
    optimality = eqx.filter(d_system.stages, eqx.is_array)
    if system.stacked:
        # A shared leaf has no stage axis: its residual ∂L/∂W is one sum over all
        # stages, reported in `optimality` but not in the per-stage norms.
        optimality, _ = _split_shared(system, optimality)
    return KKTResiduals(
        forward=d_costates,
        backward=backward,
        optimality=d_system,
        forward_norms=_per_stage_max(d_costates, system.stacked, n),
        backward_norms=_per_stage_max(backward, system.stacked, n),
        optimality_norms=_per_stage_max(optimality, system.stacked, n),
    )


def hamiltonian(system: Multistage, k: int, x_prev: Array, b: Array) -> Scalar:
    """Bryson & Ho's stage Hamiltonian H(k) = Σ_p B_p(k)ᵀ f_k(X_p(k-1); W(k)).

    Its derivatives give the recursion: ∂H(k)/∂X(k-1) = B's share of B(k-1) and
    ∂H(k)/∂W(k) = Σ_p Y_p(k) X_p(k-1)ᵀ (for `Dense`), the paper's ascent direction.
    `k` is 1-based; `x_prev` is X(k-1), one pattern or a batch.
    """
    stage = system.stage(k)
    shape = stage.in_shape
    x_prev = jnp.asarray(x_prev)
    batched = shape is None or x_prev.shape != shape
    fx = jax.vmap(stage)(x_prev) if batched else stage(x_prev)
    if jnp.shape(b) != fx.shape:
        raise ValueError(
            f"hamiltonian: B({k}) has shape {jnp.shape(b)} but stage {k} outputs {fx.shape}"
        )
    return jnp.vdot(b, fx)
