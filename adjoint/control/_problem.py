"""A discrete-time optimal-control problem as a stacked `Multistage`.

Bryson & Ho's multistage problem, the one the paper maps back-propagation onto, with
controls u(k) in the place of the weights W(k):

    X(k+1) = f(X(k), u(k), k),   k = 0..N-1,   X(0) = x0            (dynamics)
    C = Σ_p [ Σ_k ℓ(X_p(k), u(k), k) + φ(X_p(N)) ]                   (performance index)
    lower ≤ u(k) ≤ upper                                             (box bounds)
    g(X(k), u(k), k) = 0,  h(X(k), u(k), k) ≤ 0,  g_T(X(N)) = 0,  h_T(X(N)) ≤ 0
                                                                     (general constraints)

The sum over p runs over a batch of initial states served by one control sequence.
The running cost is carried as an extra state: stage k+1 maps the augmented state
Z = (X, c) to (f(X, u(k), k), c + ℓ(X, u(k), k)), so that C = Σ_p c_p(N) + φ(X_p(N)) is a
terminal cost and its gradient is the core's costate recursion (the custom VJP of
`Multistage.trajectory`), not a second implementation. The costate of c is −1 at
every stage in the paper's sign, and that of X is B(k) = −∂C/∂X(k).
"""

import types
from collections.abc import Callable
from typing import Any, no_type_check

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Scalar

from .._lagrangian import costates as _core_costates
from .._multistage import AbstractAdjoint, CostateAdjoint, Multistage
from .._stage import AbstractStage


class ControlStage(AbstractStage):
    """Stage k+1 of a control problem: (X, c) ↦ (f(X, u(k), k), c + ℓ(X, u(k), k)).

    Its controls are `u`; `k` is the time index (an integer leaf, not differentiated).
    The backward step is the default `jax.vjp` of this stage:
    B_X(k) = ∂fᵀ/∂X · B_X(k+1) − ∂ℓ/∂X (with B_c = −1), and the control part
    ∂fᵀ/∂u · B_X(k+1) − ∂ℓ/∂u = −∂C/∂u(k), summed over the batch of initial states.
    """

    u: Float[Array, "*stage m"]
    k: Int[Array, "*stage"]
    dynamics: Callable
    running_cost: Callable
    state_size: int = eqx.field(static=True)

    @property
    def in_shape(self):
        return (self.state_size + 1,)

    @property
    def out_shape(self):
        return (self.state_size + 1,)

    def __call__(self, z: Float[Array, " n_aug"]) -> Float[Array, " n_aug"]:
        n = self.state_size
        x, c = z[:n], z[n]
        x_next = jnp.asarray(self.dynamics(x, self.u, self.k), z.dtype)
        c_next = c + jnp.asarray(self.running_cost(x, self.u, self.k), z.dtype)
        return jnp.concatenate([x_next, jnp.reshape(c_next, (1,))])


def _as_bound(value, name: str, horizon: int, m: int | None, dtype, default: float) -> Array:
    """A bound as an (N, m) array, or as a scalar while the control size m is unknown."""
    if value is None:
        return jnp.full(() if m is None else (horizon, m), default, dtype)
    arr = jnp.asarray(value, dtype)
    if m is None and arr.ndim == 0:
        return arr
    if m is not None and (arr.ndim == 0 or arr.shape == (m,) or arr.shape == (horizon, m)):
        return jnp.broadcast_to(arr, (horizon, m))
    raise ValueError(
        f"ControlProblem: {name} must be a scalar, shape (m,) = ({m},) or "
        f"(horizon, m) = ({horizon}, {m}); got shape {arr.shape}"
    )


def _concrete(*xs) -> bool:
    """Whether every array is a concrete value (not a tracer under jit/vmap/grad)."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_bounds(lo: Array, hi: Array) -> Array:
    """lower ≤ upper and no NaN: a ValueError naming the first control at fault when the
    bounds are concrete, an `eqx.error_if` (raised when the program runs) when traced."""
    if not _concrete(lo, hi):
        lo = eqx.error_if(lo, jnp.any(lo > hi), "ControlProblem: lower > upper")
        nan = jnp.any(jnp.isnan(lo) | jnp.isnan(hi))
        return eqx.error_if(lo, nan, "ControlProblem: bounds contain NaN")
    lo_, hi_ = np.broadcast_arrays(np.asarray(lo), np.asarray(hi))
    if np.isnan(lo_).any() or np.isnan(hi_).any():
        raise ValueError("ControlProblem: bounds contain NaN")
    bad = np.argwhere(lo_ > hi_)
    if len(bad):
        at = tuple(int(i) for i in bad[0])
        where = f"u({at[0]})[{at[1]}]" if len(at) == 2 else "every u(k)"
        raise ValueError(
            f"ControlProblem: lower > upper at {where}: {float(lo_[at])} > {float(hi_[at])}"
        )
    return lo


class _Hoisted(eqx.Module):
    """A closure whose closed-over JAX arrays (tracers included) are pytree leaves, so
    that they are inputs of whatever transform sees the problem (`eqx.filter_closure_convert`).
    Arguments are cast to the dtypes it was traced with (k to int32)."""

    fn: Callable
    dtype: Any = eqx.field(static=True)

    def __call__(self, x, *rest):
        x = jnp.asarray(x, self.dtype)
        if not rest:
            return self.fn(x)
        u, k = rest
        return self.fn(x, jnp.asarray(u, self.dtype), jnp.asarray(k, jnp.int32))


def _hoist(fn: Callable, args) -> Callable:
    """`fn` as data: a plain function without a closure and an Equinox module are data
    already; a closure (or `functools.partial`, …) is traced once at `args` and its
    closed-over arrays become leaves."""
    if isinstance(fn, eqx.Module) or (
        isinstance(fn, types.FunctionType) and fn.__closure__ is None
    ):
        return fn
    return _Hoisted(eqx.filter_closure_convert(fn, *args), args[0].dtype)


def _broadcast_over_stages(tree, n: int):
    """Copy every array leaf of `tree` n times along a new leading axis, so that a stacked
    `Multistage` (which scans over the leading axis of all its array leaves) sees the same
    parameters at every stage; the transpose of the broadcast sums their gradients."""
    dynamic, static = eqx.partition(tree, eqx.is_array)
    dynamic = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), dynamic)
    return eqx.combine(dynamic, static)


class ControlProblem(eqx.Module):
    """min over u(0..N-1) of C = Σ_p [Σ_k ℓ(X_p(k), u(k), k) + φ(X_p(N))]
    subject to X_p(k+1) = f(X_p(k), u(k), k), X_p(0) = x0_p and lower ≤ u(k) ≤ upper.

    **Arguments:**

    - `dynamics`: f(x, u, k) -> x_next, x of shape (n,), u of shape (m,), k an int.
    - `running_cost`: ℓ(x, u, k) -> scalar.
    - `terminal_cost`: φ(x) -> scalar.
    - `x0`: one initial state (n,) or a batch (P, n); the cost sums over the batch (a
      controller that must serve all of them).
    - `horizon`: N, the number of controls.
    - `lower`, `upper`: box bounds on u (scalar, (m,) or (N, m); ±inf for one-sided).
    - `control_size`: m. When neither it nor a bound of shape (m,) or (N, m) gives m, it
      is taken from `u_init` by `solve` (`with_control_size`).
    - `equality`, `inequality`: g(x, u, k) -> (p,) with g = 0, and h(x, u, k) -> (q,)
      with h ≤ 0, for k = 0..N−1 (stage constraints on states and controls).
    - `terminal_equality`, `terminal_inequality`: g_T(x) -> (p_T,) = 0 and
      h_T(x) -> (q_T,) ≤ 0 on X(N). A problem with any of the four is solved by
      `AugmentedLagrangian` (the default then) and its `Solution` carries their
      multipliers (`control.Multipliers`). One initial state only (x0 of shape (n,)).
    - `adjoint`: how the underlying `Multistage` is differentiated (the core's
      `CostateAdjoint()` by default; `AutodiffAdjoint()` for the jax.grad baseline).

    **A problem is data.** The callables may be Equinox modules with array fields or
    closures over JAX arrays (also tracers); every inexact array in the problem, inside
    the callables, `x0`, `lower` and `upper`, is a differentiable input of `solve`. A
    problem can be built under `jit`, `vmap` and `grad`: shapes are checked at
    construction (the callables are traced with `jax.eval_shape`), values (lower ≤ upper,
    no NaN) with a ValueError when they are concrete and with `eqx.error_if` when traced.
    """

    dynamics: Callable
    running_cost: Callable
    terminal_cost: Callable
    x0: Float[Array, "P n"]
    lower: Float[Array, "N m"]
    upper: Float[Array, "N m"]
    horizon: int = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    control_size: int | None = eqx.field(static=True)
    adjoint: AbstractAdjoint
    equality: Callable | None = None
    inequality: Callable | None = None
    terminal_equality: Callable | None = None
    terminal_inequality: Callable | None = None
    constraint_sizes: tuple[int, int, int, int] | None = eqx.field(static=True, default=None)

    @no_type_check  # checks its own arguments, naming the one at fault
    def __init__(
        self,
        dynamics: Callable,
        running_cost: Callable,
        terminal_cost: Callable,
        x0,
        horizon: int,
        lower=None,
        upper=None,
        *,
        control_size: int | None = None,
        adjoint: AbstractAdjoint = CostateAdjoint(),
        equality: Callable | None = None,
        inequality: Callable | None = None,
        terminal_equality: Callable | None = None,
        terminal_inequality: Callable | None = None,
        _size_from: str | None = None,
    ):
        for name, fn in (
            ("dynamics", dynamics),
            ("running_cost", running_cost),
            ("terminal_cost", terminal_cost),
        ):
            if not callable(fn):
                raise TypeError(f"ControlProblem: {name} must be callable, got {type(fn).__name__}")
        constraints = {
            "equality": equality,
            "inequality": inequality,
            "terminal_equality": terminal_equality,
            "terminal_inequality": terminal_inequality,
        }
        for name, fn in constraints.items():
            if fn is not None and not callable(fn):
                raise TypeError(
                    f"ControlProblem: {name} must be callable or None, got {type(fn).__name__}"
                )
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
            raise ValueError(f"ControlProblem: horizon must be a positive int, got {horizon!r}")
        if not isinstance(adjoint, AbstractAdjoint):
            raise TypeError(f"adjoint must be an AbstractAdjoint, got {type(adjoint).__name__}")
        x0 = jnp.asarray(x0)
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            x0 = x0.astype(jnp.zeros(()).dtype)
        if x0.ndim not in (1, 2) or x0.shape[-1] == 0:
            raise ValueError(
                f"ControlProblem: x0 must be one state (n,) or a batch (P, n); got shape {x0.shape}"
            )
        dtype = x0.dtype
        m = control_size
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            raise ValueError(f"ControlProblem: control_size must be a positive int, got {m!r}")
        for value in (lower, upper):
            if m is None and value is not None and np.ndim(value) >= 1:
                m = int(np.shape(value)[-1])
        lo = _as_bound(lower, "lower", horizon, m, dtype, -jnp.inf)
        hi = _as_bound(upper, "upper", horizon, m, dtype, jnp.inf)
        self.dynamics = dynamics
        self.running_cost = running_cost
        self.terminal_cost = terminal_cost
        self.batched = x0.ndim == 2
        self.x0 = x0 if self.batched else x0[None]
        self.lower = _check_bounds(lo, hi)
        self.upper = hi
        self.horizon = horizon
        self.control_size = m
        self.adjoint = adjoint
        self.equality = equality
        self.inequality = inequality
        self.terminal_equality = terminal_equality
        self.terminal_inequality = terminal_inequality
        self.constraint_sizes = None
        if any(fn is not None for fn in constraints.values()) and self.batched:
            raise ValueError(
                "ControlProblem: constraints need one initial state x0 of shape (n,); got a "
                f"batch of shape {x0.shape}"
            )
        if m is not None:
            source = _size_from or ("control_size" if control_size is not None else "the bounds")
            self._check_shapes(m, source)

    def with_control_size(self, m: int, source: str = "u_init") -> "ControlProblem":
        """This problem with the control size m (bounds broadcast to (N, m), the callables'
        shapes checked). A problem whose size is already known must have the same m."""
        if self.control_size is not None:
            if m != self.control_size:
                raise ValueError(
                    f"ControlProblem: {source} has {m} controls per stage, the problem "
                    f"{self.control_size} (control_size or bounds)"
                )
            return self
        return ControlProblem(
            self.dynamics,
            self.running_cost,
            self.terminal_cost,
            self.x0 if self.batched else self.x0[0],
            self.horizon,
            self.lower,
            self.upper,
            control_size=m,
            adjoint=self.adjoint,
            equality=self.equality,
            inequality=self.inequality,
            terminal_equality=self.terminal_equality,
            terminal_inequality=self.terminal_inequality,
            _size_from=source,
        )

    def _check_shapes(self, m: int, source: str) -> None:
        n = self.state_size
        x = jax.ShapeDtypeStruct((n,), self.dtype)
        u = jax.ShapeDtypeStruct((m,), self.dtype)
        k = jax.ShapeDtypeStruct((), jnp.int32)

        def output_shape(name, fn, args):
            """The shape `fn` returns on abstract arguments (None if not one array)."""
            try:
                out = jax.eval_shape(fn, *args)
            except Exception as err:
                raise ValueError(
                    f"ControlProblem: {name} failed on x of shape ({n},) (from x0) and u of "
                    f"shape ({m},) (m = {m} from {source}): {type(err).__name__}: {err}"
                ) from None
            return out.shape if isinstance(out, jax.ShapeDtypeStruct) else None, out

        for name, fn, args, want in (
            ("dynamics", self.dynamics, (x, u, k), (n,)),
            ("running_cost", self.running_cost, (x, u, k), ()),
            ("terminal_cost", self.terminal_cost, (x,), ()),
        ):
            shape, out = output_shape(name, fn, args)
            if shape != want:
                what = "a scalar" if want == () else f"a state of shape {want}"
                raise ValueError(
                    f"ControlProblem: {name} must return {what}; got "
                    f"{shape if shape is not None else type(out).__name__}"
                )
            object.__setattr__(self, name, _hoist(fn, args))
        sizes = []
        for name, args in (
            ("equality", (x, u, k)),
            ("inequality", (x, u, k)),
            ("terminal_equality", (x,)),
            ("terminal_inequality", (x,)),
        ):
            fn = getattr(self, name)
            if fn is None:
                sizes.append(0)
                continue
            shape, out = output_shape(name, fn, args)
            if shape is None or len(shape) != 1:
                got = shape if shape is not None else type(out).__name__
                raise ValueError(
                    f"ControlProblem: {name} must return a vector of constraint values of "
                    f"shape (rows,); got {got}"
                )
            if shape[0] == 0:
                raise ValueError(f"ControlProblem: {name} returns no rows; pass None instead")
            sizes.append(shape[0])
            object.__setattr__(self, name, _hoist(fn, args))
        p, q, p_T, q_T = sizes
        N = self.horizon
        if N * p + p_T > N * m:
            raise ValueError(
                f"ControlProblem: {N * p + p_T} equality rows (horizon {N} × {p} stage + "
                f"{p_T} terminal) exceed the {N * m} controls (horizon {N} × m = {m}): the "
                "equalities over-determine the controls and cannot all hold in general"
            )
        if p_T > self.state_size:
            raise ValueError(
                f"ControlProblem: terminal_equality has {p_T} rows for a state of size "
                f"{self.state_size}: at most n independent conditions on X(N)"
            )
        object.__setattr__(self, "constraint_sizes", tuple(sizes))

    # ---------------------------------------------------------------- sizes
    @property
    def state_size(self) -> int:
        return self.x0.shape[-1]

    @property
    def n_initial_states(self) -> int:
        return self.x0.shape[0]

    @property
    def dtype(self):
        return self.x0.dtype

    @property
    def constrained(self) -> bool:
        """Whether the problem has general (equality or inequality) constraints."""
        return any(
            fn is not None
            for fn in (
                self.equality,
                self.inequality,
                self.terminal_equality,
                self.terminal_inequality,
            )
        )

    @property
    def bounded(self) -> bool:
        """Whether any bound may be finite: exact for concrete bounds, True when traced."""
        if not _concrete(self.lower, self.upper):
            return True
        return bool(
            np.isfinite(np.asarray(self.lower)).any() or np.isfinite(np.asarray(self.upper)).any()
        )

    # ---------------------------------------------------------------- pieces
    def check_controls(self, u) -> Array:
        """Check a control sequence's shape (N, m) and dtype and return it as an array."""
        u = jnp.asarray(u)
        if self.control_size is None:
            raise ValueError(
                "ControlProblem: the control size is unknown; pass control_size=, a bound of "
                "shape (m,), or call problem.with_control_size(m)"
            )
        want = (self.horizon, self.control_size)
        if u.shape != want:
            raise ValueError(f"controls must have shape (horizon, m) = {want}; got {u.shape}")
        if not jnp.issubdtype(u.dtype, jnp.floating):
            raise TypeError(f"controls must be floating, got dtype {u.dtype}")
        return u.astype(self.dtype)

    def project(self, u: Array) -> Array:
        """Euclidean projection on the box: clip(u, lower, upper)."""
        return jnp.clip(u, self.lower, self.upper)

    def system(self, u: Float[Array, "N m"]) -> Multistage:
        """The stacked `Multistage` whose controls are u(0..N-1) (stage k+1 uses u(k))."""
        N = self.horizon
        stage = ControlStage(
            u,
            jnp.arange(N, dtype=jnp.int32),
            _broadcast_over_stages(self.dynamics, N),
            _broadcast_over_stages(self.running_cost, N),
            self.state_size,
        )
        return Multistage(stage, adjoint=self.adjoint)

    def initial_augmented(self) -> Float[Array, "P n_aug"]:
        """Z(0) = (x0, 0) for each initial state."""
        return jnp.concatenate([self.x0, jnp.zeros(self.x0.shape[:1] + (1,), self.dtype)], 1)

    def f(self, x, u, k):
        """f(x, u, k) in the problem's dtype."""
        return jnp.asarray(self.dynamics(x, u, k), self.dtype)

    def ell(self, x, u, k):
        """ℓ(x, u, k) in the problem's dtype."""
        return jnp.asarray(self.running_cost(x, u, k), self.dtype)

    def phi(self, x):
        """φ(x) in the problem's dtype."""
        return jnp.asarray(self.terminal_cost(x), self.dtype)

    def stacked(self):
        """(F, L, Φ): f, ℓ summed and φ summed over the batch of initial states, on the
        stacked state X = (X_1, …, X_P) of size P·n (one system with a block-diagonal
        f_X, whose controls serve every initial state), as `ILQR` and the implicit
        derivative see the problem."""
        P, n = self.x0.shape

        def F(X, u, k):
            return jax.vmap(self.f, (0, None, None))(X.reshape(P, n), u, k).reshape(-1)

        def L(X, u, k):
            return jnp.sum(jax.vmap(self.ell, (0, None, None))(X.reshape(P, n), u, k))

        def Phi(X):
            return jnp.sum(jax.vmap(self.phi)(X.reshape(P, n)))

        return F, L, Phi

    def _terminal(self, z_final: Float[Array, "P n_aug"]) -> Scalar:
        n = self.state_size
        return jnp.sum(z_final[:, n]) + jnp.sum(jax.vmap(self.phi)(z_final[:, :n]))

    def _trajectory_cost(self, zs: Float[Array, "steps P n_aug"]) -> Scalar:
        return self._terminal(zs[-1])

    def cost(self, u: Float[Array, "N m"]) -> Scalar:
        """C(u): the forward pass; `jax.grad` of it runs the core's costate recursion."""
        return self._terminal(self.system(u)(self.initial_augmented()))

    def rollout(self, u: Float[Array, "N m"]) -> Float[Array, "N+1 P n"]:
        """X(0..N) for each initial state (leading axis N+1, then the batch axis P)."""
        zs = self.system(u).trajectory(self.initial_augmented())
        return zs[..., : self.state_size]

    def costates(self, u: Float[Array, "N m"]):
        """Forward pass and the core's costate recursion (`adjoint.costates`).

        **Returns:** `(C, X(0..N), B(0..N), dC/du)` with X and B of shape (N+1, P, n) and
        B(k) = −∂C/∂X(k) in the paper's sign (B(0) is the input costate).
        """
        system = self.system(u)
        record = _core_costates(system, self.initial_augmented(), self._trajectory_cost)
        n = self.state_size
        b = jnp.concatenate([record.initial_costate[None], record.costates])[..., :n]
        return record.value, record.states[..., :n], b, record.grads.stages.u

    def hamiltonian(
        self,
        k: Int[Array, ""],
        x: Float[Array, "P n"],
        u: Float[Array, " m"],
        b_next: Float[Array, "P n"],
    ) -> Scalar:
        """The paper's stage Hamiltonian for the augmented stage (B_c = −1):

            H(k) = Σ_p [ B_p(k+1)ᵀ f(X_p(k), u, k) − ℓ(X_p(k), u, k) ]

        (= `adjoint.hamiltonian` of stage k+1). Pontryagin: the optimal u(k) maximises
        it over the box, i.e. minimises the classical ℓ + λᵀf with λ = −B.
        """
        f = jax.vmap(self.f, (0, None, None))(x, u, k)
        ell = jax.vmap(self.ell, (0, None, None))(x, u, k)
        return jnp.sum(b_next * f) - jnp.sum(ell)
