"""KKT and Pontryagin checks of a candidate solution of a `ControlProblem`.

With bounds lower ≤ u ≤ upper, the Lagrangian of the control problem is the core's

    L = C + Σ_k Σ_p B_p(k+1)ᵀ [X_p(k+1) − f(X_p(k), u(k), k)]
          + Σ_k μ_lower(k)ᵀ (lower − u(k)) + μ_upper(k)ᵀ (u(k) − upper)

and a local minimum satisfies (first-order KKT):

- primal feasibility   lower ≤ u(k) ≤ upper;
- stationarity         ∂L/∂u(k) − μ_lower(k) + μ_upper(k) = 0, where ∂L/∂u(k) = −∂H(k)/∂u
                       (the core's `kkt_residuals`, i.e. `jax.grad` of `lagrangian`);
- dual feasibility     μ_lower, μ_upper ≥ 0;
- complementarity      μ_lower ⊙ (u − lower) = 0,  μ_upper ⊙ (upper − u) = 0;
- the forward and backward passes ∂L/∂B = 0, ∂L/∂X = 0 (checked by the same call).

The multipliers are read off the gradient on the active set (μ_lower = max(∂L/∂u, 0)
where u sits on its lower bound, μ_upper = max(−∂L/∂u, 0) on its upper bound), so
dual feasibility holds by construction and a wrong sign shows in `stationarity`.

Pontryagin's minimum principle (discrete time: necessary where H(k) is concave in u in
the paper's sign, e.g. control-affine dynamics with a convex running cost): u(k)
maximises the paper's H(k) = Σ_p [B_p(k+1)ᵀ f − ℓ] over the box. Checked numerically on
a grid of candidate controls (the box if it is finite, else a neighbourhood of u(k)).
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Scalar

from .._lagrangian import costates as _core_costates, kkt_residuals as _core_kkt
from ._constraints import constraint_values, lagrangian_problem, plain_cost
from ._problem import ControlProblem


class ControlKKT(eqx.Module):
    """Named KKT and Pontryagin residuals at a candidate solution.

    - `gradient`: ∂L/∂u(k) = dC/du(k), (N, m), from `jax.grad` of the core Lagrangian.
    - `multipliers_lower`, `multipliers_upper`: μ ≥ 0, (N, m).
    - `stationarity`: max_i |∂L/∂u_i(k) − μ_lower + μ_upper|, per k (N,).
    - `complementarity`: max |μ ⊙ slack|.
    - `primal_infeasibility`: max bound violation (0 for a feasible u).
    - `forward_residual`, `backward_residual`: max |∂L/∂B|, max |∂L/∂X| (forward and
      backward passes; rounding-level at the recursion's states and costates).
    - `hamiltonian`: the paper's H(k) at u(k), per k (N,).
    - `pontryagin_gap`: max over candidate controls v of H(k)(v) − H(k)(u(k)), per k; ≤ 0
      when u(k) maximises H(k) (up to the grid).
    - `tolerance`: the absolute tolerance on stationarity and complementarity (`solve`
      passes its stopping tolerance: tol relative to the projected gradient at u_init).
    - `residual_tolerance`: on the forward and backward residuals, tol (1 + max|X|, |B|).
    - `pontryagin_tolerance`: on the Pontryagin gap, relative to 1 + |H(k)|.
    - For a problem with general constraints (`AugmentedLagrangian`), the gradient,
      stationarity and costates are those of the full Lagrangian L = C + νᵀg + μᵀh + …,
      and: `equality_violation` max |g|, `inequality_violation` max(h, 0) (primal
      feasibility, ≤ `feasibility_tolerance`), `dual_infeasibility` max(−μ, 0),
      `constraint_complementarity` max |μ ⊙ h| (both ≤ `tolerance`). Zero otherwise.
    """

    gradient: Float[Array, "N m"]
    multipliers_lower: Float[Array, "N m"]
    multipliers_upper: Float[Array, "N m"]
    stationarity: Float[Array, " N"]
    complementarity: Scalar
    primal_infeasibility: Scalar
    forward_residual: Scalar
    backward_residual: Scalar
    hamiltonian: Float[Array, " N"]
    pontryagin_gap: Float[Array, " N"]
    tolerance: Scalar
    equality_violation: Scalar = 0.0
    inequality_violation: Scalar = 0.0
    dual_infeasibility: Scalar = 0.0
    constraint_complementarity: Scalar = 0.0
    feasibility_tolerance: Scalar = 0.0
    residual_tolerance: Scalar = 0.0
    pontryagin_tolerance: Scalar = 0.0

    @property
    def kkt_ok(self) -> Bool[Array, ""]:
        """First-order KKT conditions within `tolerance`."""
        tol = self.tolerance
        return (
            (jnp.max(self.stationarity) <= tol)
            & (self.complementarity <= tol)
            & (self.primal_infeasibility <= 0)
            & (self.forward_residual <= self.residual_tolerance)
            & (self.backward_residual <= self.residual_tolerance)
            & (self.equality_violation <= self.feasibility_tolerance)
            & (self.inequality_violation <= self.feasibility_tolerance)
            & (self.dual_infeasibility <= tol)
            & (self.constraint_complementarity <= tol)
        )

    @property
    def pontryagin_ok(self) -> Bool[Array, ""]:
        """u(k) maximises H(k) over the candidates, relative to 1 + |H(k)|."""
        scale = 1 + jnp.abs(self.hamiltonian)
        return jnp.all(self.pontryagin_gap <= self.pontryagin_tolerance * scale)

    @property
    def ok(self) -> Bool[Array, ""]:
        return self.kkt_ok & self.pontryagin_ok

    def summary(self) -> str:
        constraints = (
            f"equality violation {float(self.equality_violation):.2e}, "
            f"inequality violation {float(self.inequality_violation):.2e}, "
            f"dual infeasibility {float(self.dual_infeasibility):.2e}, "
            f"constraint complementarity {float(self.constraint_complementarity):.2e}, "
        )
        return constraints + (
            f"stationarity {float(jnp.max(self.stationarity)):.2e}, "
            f"complementarity {float(self.complementarity):.2e}, "
            f"primal infeasibility {float(self.primal_infeasibility):.2e}, "
            f"|dL/dB| {float(self.forward_residual):.2e}, "
            f"|dL/dX| {float(self.backward_residual):.2e}, "
            f"Pontryagin gap {float(jnp.max(self.pontryagin_gap)):.2e} "
            f"(tolerance {float(self.tolerance):.2e})"
        )


def _grid(m: int, dtype) -> Array:
    """Points t in [0, 1]^m at which candidate controls are placed."""
    if m <= 3:
        g = {1: 201, 2: 31, 3: 11}[m]
        axis = np.linspace(0.0, 1.0, g)
        pts = np.array(list(itertools.product(axis, repeat=m)))
    else:
        rng = np.random.default_rng(0)
        corners = np.array(list(itertools.product([0.0, 1.0], repeat=min(m, 8))))
        corners = np.pad(corners, ((0, 0), (0, m - corners.shape[1])), constant_values=0.5)
        pts = np.concatenate([rng.uniform(size=(1024, m)), corners])
    return jnp.asarray(pts, dtype)


def _candidates(u, lower, upper, t):
    """Candidate controls for one k: in the box if finite, else around u."""
    finite = jnp.isfinite(lower) & jnp.isfinite(upper)
    span = 1 + jnp.abs(u)
    in_box = jnp.where(finite, lower, 0) + t * jnp.where(finite, upper - lower, 0)
    local = jnp.clip(u + span * (2 * t - 1), lower, upper)
    return jnp.where(finite, in_box, local)


def analyse(problem: ControlProblem, u: Float[Array, "N m"], tol, gtol=None):
    """Costates and KKT/Pontryagin residuals at `u`, with `tol` the relative tolerance
    and `gtol` the absolute one on stationarity (None: `tol`); see `ControlKKT`.

    **Returns:** `(C, X(0..N), B(0..N), ControlKKT)` with X and B of shape (N+1, P, n)
    and B in the paper's sign, from the core's `costates` and `kkt_residuals`.
    """
    system = problem.system(u)
    z0 = problem.initial_augmented()
    record = _core_costates(system, z0, problem._trajectory_cost)
    res = _core_kkt(system, z0, record.states, record.costates, problem._trajectory_cost)
    n = problem.state_size
    value = record.value
    states = record.states[..., :n]
    b = jnp.concatenate([record.initial_costate[None], record.costates])[..., :n]
    grad = res.optimality.stages.u
    tolerance = jnp.asarray(tol if gtol is None else gtol, value.dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(states)), jnp.max(jnp.abs(b)))
    residual_tolerance = tol * (1 + scale)

    active_lower = u - problem.lower <= tolerance
    active_upper = problem.upper - u <= tolerance
    mu_lower = jnp.where(active_lower, jnp.maximum(grad, 0), 0)
    mu_upper = jnp.where(active_upper, jnp.maximum(-grad, 0), 0)
    stationarity = jnp.max(jnp.abs(grad - mu_lower + mu_upper), axis=1)
    slack_lower = jnp.where(jnp.isfinite(problem.lower), u - problem.lower, 0)
    slack_upper = jnp.where(jnp.isfinite(problem.upper), problem.upper - u, 0)
    complementarity = jnp.max(jnp.maximum(mu_lower * slack_lower, mu_upper * slack_upper))
    primal = jnp.max(jnp.maximum(jnp.maximum(problem.lower - u, u - problem.upper), 0))

    ks = jnp.arange(problem.horizon, dtype=jnp.int32)
    t = _grid(problem.control_size, u.dtype)

    def stage_check(k, x, uk, b_next, lo, hi):
        h_u = problem.hamiltonian(k, x, uk, b_next)
        cands = jax.vmap(lambda tt: _candidates(uk, lo, hi, tt))(t)
        h_c = jax.vmap(lambda v: problem.hamiltonian(k, x, v, b_next))(cands)
        return h_u, jnp.max(h_c) - h_u

    # stage by stage (a loop, not a vmap over N): memory O(candidates), not O(N·candidates)
    h, gap = jax.lax.map(
        lambda args: stage_check(*args), (ks, states[:-1], u, b[1:], problem.lower, problem.upper)
    )
    kkt = ControlKKT(
        gradient=grad,
        multipliers_lower=mu_lower,
        multipliers_upper=mu_upper,
        stationarity=stationarity,
        complementarity=complementarity,
        primal_infeasibility=primal,
        forward_residual=jnp.max(res.forward_norms),
        backward_residual=jnp.max(res.backward_norms),
        hamiltonian=h,
        pontryagin_gap=gap,
        tolerance=tolerance,
        residual_tolerance=residual_tolerance,
        pontryagin_tolerance=jnp.asarray(tol, value.dtype),
    )
    return value, states, b, kkt


def analyse_constrained(problem: ControlProblem, u, multipliers, tol, gtol=None):
    """`analyse` for a problem with general constraints at (u, multipliers): the
    stationarity, costates and Pontryagin gap of the full Lagrangian (the core's
    recursion on the cost ℓ + νᵀg + μᵀh, φ + ν_Tᵀg_T + μ_Tᵀh_T), and the constraint
    rows' feasibility, dual feasibility and complementarity.

    **Returns:** `(C, X(0..N), B(0..N), ControlKKT)` as `analyse`, C the cost itself.
    """
    lagr = lagrangian_problem(problem, multipliers)
    _, states, b, kkt = analyse(lagr, u, tol, gtol)
    X = states[:, 0]
    cost = plain_cost(problem, u, X)
    values = constraint_values(problem, u, X)
    eq = jnp.concatenate([values.equality.reshape(-1), values.terminal_equality])
    ineq = jnp.concatenate([values.inequality.reshape(-1), values.terminal_inequality])
    mu = jnp.concatenate([multipliers.inequality.reshape(-1), multipliers.terminal_inequality])
    kkt = eqx.tree_at(
        lambda k: (
            k.equality_violation,
            k.inequality_violation,
            k.dual_infeasibility,
            k.constraint_complementarity,
            k.feasibility_tolerance,
        ),
        kkt,
        (
            jnp.max(jnp.abs(eq), initial=0.0),
            jnp.max(jnp.maximum(ineq, 0), initial=0.0),
            jnp.max(jnp.maximum(-mu, 0), initial=0.0),
            jnp.max(jnp.abs(mu * ineq), initial=0.0),
            jnp.asarray(tol, cost.dtype),
        ),
    )
    return cost, states, b, kkt
