"""A discrete-time optimal-control problem as a stacked `Multistage`.

Bryson & Ho's multistage problem, the one the paper maps back-propagation onto, with
controls u(k) in the place of the weights W(k):

    X(k+1) = f(X(k), u(k), k),   k = 0..N-1,   X(0) = x0            (dynamics)
    C = Σ_p [ Σ_k ℓ(X_p(k), u(k), k) + φ(X_p(N)) ]                   (performance index)
    lower ≤ u(k) ≤ upper                                             (box bounds)

The sum over p runs over a batch of initial states served by one control sequence.
The running cost is carried as an extra state: stage k+1 maps the augmented state
Z = (X, c) to (f(X, u(k), k), c + ℓ(X, u(k), k)), so that C = Σ_p c_p(N) + φ(X_p(N)) is a
terminal cost and its gradient is the core's costate recursion (the custom VJP of
`Multistage.trajectory`), not a second implementation. The costate of c is −1 at
every stage in the paper's sign, and that of X is B(k) = −∂C/∂X(k).
"""

from collections.abc import Callable

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

    u: Float[Array, " m"]
    k: Int[Array, ""]
    dynamics: Callable
    running_cost: Callable
    state_size: int = eqx.field(static=True)

    @property
    def in_shape(self):
        return (self.state_size + 1,)

    @property
    def out_shape(self):
        return (self.state_size + 1,)

    def __call__(self, z: Float[Array, " n+1"]) -> Float[Array, " n+1"]:
        n = self.state_size
        x, c = z[:n], z[n]
        x_next = jnp.asarray(self.dynamics(x, self.u, self.k), z.dtype)
        c_next = c + jnp.asarray(self.running_cost(x, self.u, self.k), z.dtype)
        return jnp.concatenate([x_next, jnp.reshape(c_next, (1,))])


def _as_bound(value, name: str, horizon: int, m: int, dtype, default: float) -> Array:
    if value is None:
        return jnp.full((horizon, m), default, dtype)
    arr = jnp.asarray(value, dtype)
    if arr.ndim == 0 or arr.shape == (m,) or arr.shape == (horizon, m):
        return jnp.broadcast_to(arr, (horizon, m))
    raise ValueError(
        f"ControlProblem: {name} must be a scalar, shape (m,) = ({m},) or "
        f"(horizon, m) = ({horizon}, {m}); got shape {arr.shape}"
    )


def _has_arrays(fn) -> bool:
    return bool(jax.tree_util.tree_leaves(eqx.filter(fn, eqx.is_array)))


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
    - `control_size`: m; needed only when no bound reveals it (default 1 then).
    - `adjoint`: how the underlying `Multistage` is differentiated (the core's
      `CostateAdjoint()` by default; `AutodiffAdjoint()` for the jax.grad baseline).

    The callables must not hold JAX arrays (close over Python floats or NumPy arrays,
    or write them as functions); bounds are checked (lower ≤ upper) and the callables'
    output shapes are traced at construction.
    """

    dynamics: Callable
    running_cost: Callable
    terminal_cost: Callable
    x0: Float[Array, "P n"]
    lower: Float[Array, "N m"]
    upper: Float[Array, "N m"]
    horizon: int = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    adjoint: AbstractAdjoint

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
    ):
        for name, fn in (
            ("dynamics", dynamics),
            ("running_cost", running_cost),
            ("terminal_cost", terminal_cost),
        ):
            if not callable(fn):
                raise TypeError(f"ControlProblem: {name} must be callable, got {type(fn).__name__}")
            if _has_arrays(fn):
                raise TypeError(
                    f"ControlProblem: {name} holds JAX arrays; close over Python floats or "
                    "NumPy arrays instead (the callables are static parts of the stages)"
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
        for value in (lower, upper):
            if m is None and value is not None and np.ndim(value) >= 1:
                m = int(np.shape(value)[-1])
        if m is None:
            m = 1
        if not isinstance(m, int) or m < 1:
            raise ValueError(f"ControlProblem: control_size must be a positive int, got {m!r}")
        lo = _as_bound(lower, "lower", horizon, m, dtype, -jnp.inf)
        hi = _as_bound(upper, "upper", horizon, m, dtype, jnp.inf)
        bad = lo > hi
        if bool(bad.any()):
            k, i = (int(v[0]) for v in jnp.nonzero(bad))
            raise ValueError(
                f"ControlProblem: lower > upper at u({k})[{i}]: "
                f"{float(lo[k, i])} > {float(hi[k, i])}"
            )
        if bool(jnp.isnan(lo).any() | jnp.isnan(hi).any()):
            raise ValueError("ControlProblem: bounds contain NaN")
        self.dynamics = dynamics
        self.running_cost = running_cost
        self.terminal_cost = terminal_cost
        self.batched = x0.ndim == 2
        self.x0 = x0 if self.batched else x0[None]
        self.lower = lo
        self.upper = hi
        self.horizon = horizon
        self.adjoint = adjoint
        self._check_shapes(m)

    def _check_shapes(self, m: int) -> None:
        n = self.state_size
        x = jax.ShapeDtypeStruct((n,), self.dtype)
        u = jax.ShapeDtypeStruct((m,), self.dtype)
        k = jax.ShapeDtypeStruct((), jnp.int32)
        for name, fn, args, want in (
            ("dynamics", self.dynamics, (x, u, k), (n,)),
            ("running_cost", self.running_cost, (x, u, k), ()),
            ("terminal_cost", self.terminal_cost, (x,), ()),
        ):
            try:
                out = jax.eval_shape(fn, *args)
            except Exception as err:
                raise ValueError(
                    f"ControlProblem: {name} failed on x of shape ({n},), u of shape ({m},): "
                    f"{type(err).__name__}: {err}"
                ) from None
            shape = getattr(out, "shape", None)
            if not isinstance(out, jax.ShapeDtypeStruct) or shape != want:
                what = "a scalar" if want == () else f"a state of shape {want}"
                raise ValueError(
                    f"ControlProblem: {name} must return {what}; got "
                    f"{shape if shape is not None else type(out).__name__}"
                )

    # ---------------------------------------------------------------- sizes
    @property
    def state_size(self) -> int:
        return self.x0.shape[-1]

    @property
    def control_size(self) -> int:
        return self.lower.shape[-1]

    @property
    def n_initial_states(self) -> int:
        return self.x0.shape[0]

    @property
    def dtype(self):
        return self.x0.dtype

    @property
    def bounded(self) -> bool:
        """Whether any bound is finite (decided at construction, so static)."""
        return bool(jnp.isfinite(self.lower).any() | jnp.isfinite(self.upper).any())

    # ---------------------------------------------------------------- pieces
    def check_controls(self, u) -> Array:
        """Check a control sequence's shape (N, m) and dtype and return it as an array."""
        u = jnp.asarray(u)
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
        stage = ControlStage(
            u,
            jnp.arange(self.horizon, dtype=jnp.int32),
            self.dynamics,
            self.running_cost,
            self.state_size,
        )
        return Multistage(stage, adjoint=self.adjoint)

    def initial_augmented(self) -> Float[Array, "P n+1"]:
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

    def _terminal(self, z_final: Float[Array, "P n+1"]) -> Scalar:
        n = self.state_size
        return jnp.sum(z_final[:, n]) + jnp.sum(jax.vmap(self.phi)(z_final[:, :n]))

    def _trajectory_cost(self, zs: Float[Array, "N+1 P n+1"]) -> Scalar:
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
        b = jnp.concatenate([record.input_costate[None], record.costates])[..., :n]
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
