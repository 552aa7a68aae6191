"""Classic discrete-time optimal-control problems, each with its known answer.

Every constructor returns an `adjoint.control.ControlProblem`; `make(name)` builds one
by name (the `adjoint control NAME` command uses it). Known answers:

- `lqr`: linear dynamics, quadratic cost; the optimum is the Riccati feedback
  u(k) = −K(k) X(k) and the costates are B(k) = −2 P(k) X(k) (`riccati`).
- `pendulum`, `cartpole`: swing-up from hanging down (θ = 0) to upright (θ = π) with a
  torque / force limit; the answer is qualitative (the final state is upright).
- `acrobot`: Spong's acrobot (two links, torque at the elbow only) swung up from hanging
  down; its vector field conserves `acrobot_energy` without torque (checked).
- `double_integrator`: p'' = u with |u| ≤ 1 and a terminal cost only; H is linear in u,
  so the optimum is bang-bang: u(k) = −sign σ(k) with the switching function
  σ(k) = −B(k+1)ᵀ ∂f/∂u, affine in k, hence at most one switch (`switching_function`).
- `zermelo`: a boat of speed V in the shear current (s·y, 0), heading θ(k), maximising
  the downstream distance x(N); Zermelo's navigation law gives
  tan θ(k) = (N − 1 − k) s Δt exactly in discrete time (`zermelo_heading`).

With general constraints (`control.AugmentedLagrangian`, the multipliers on the
`Solution`):

- `goal_double_integrator`: minimum energy to stop exactly at a goal (terminal
  equality); the answer is closed form: u(k) = (A^{N−1−k}B)ᵀ W⁻¹ (goal − A^N x0) with
  the controllability Gramian W = Σ_k A^{N−1−k}B Bᵀ(A^{N−1−k})ᵀ, the goal's multiplier
  ν_T = −r W⁻¹ (goal − A^N x0) (`goal_double_integrator_solution`).
- `car_obstacle`: a kinematic car (it turns only while moving: at rest the linearisation
  cannot move it sideways) that must reach a goal at rest around a circular obstacle
  (a stage inequality); where the path touches the obstacle its multiplier is positive.
- `cartpole_track`: the cart-pole swing-up with the cart confined to |p| ≤ a track
  half-length (two stage inequalities) and the upright goal as a terminal equality.
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from .control import ControlProblem


def _dtype(dtype):
    return jnp.zeros(()).dtype if dtype is None else jnp.dtype(dtype)


# --------------------------------------------------------------------------- LQR


def lqr(
    A=((1.0, 0.1), (0.0, 1.0)),
    B=((0.0,), (0.1,)),
    Q=((1.0, 0.0), (0.0, 1.0)),
    R=((0.5,),),
    P=((3.0, 0.0), (0.0, 3.0)),
    x0=(1.0, -0.5),
    horizon: int = 50,
    *,
    dtype=None,
) -> ControlProblem:
    """X(k+1) = A X(k) + B u(k),  C = Σ_k X(k)ᵀQX(k) + u(k)ᵀRu(k) + X(N)ᵀ P X(N).

    `x0` may be one state or a batch (P, n); defaults: a discretised double integrator.
    """
    dtype = _dtype(dtype)
    A, B, Q, R, P = (np.asarray(M, dtype) for M in (A, B, Q, R, P))
    if A.ndim != 2 or A.shape[0] != A.shape[1] or B.ndim != 2 or B.shape[0] != A.shape[0]:
        raise ValueError(f"lqr: A must be (n, n) and B (n, m); got {A.shape} and {B.shape}")
    m = B.shape[1]
    return ControlProblem(
        lambda x, u, k: A @ x + B @ u,
        lambda x, u, k: x @ Q @ x + u @ R @ u,
        lambda x: x @ P @ x,
        jnp.asarray(x0, dtype),
        horizon,
        control_size=m,
    )


def riccati(A, B, Q, R, P, horizon: int):
    """The discrete Riccati recursion (NumPy, float64), for the cost of `lqr`:

        P(N) = P,  K(k) = (R + BᵀP(k+1)B)⁻¹ BᵀP(k+1)A,  P(k) = Q + AᵀP(k+1)(A − B K(k)).

    **Returns:** `(P(0..N), K(0..N-1))`; the optimum is u(k) = −K(k)X(k) and the
    paper's costate is B(k) = −2 P(k) X(k).
    """
    A, B, Q, R, P = (np.asarray(M, np.float64) for M in (A, B, Q, R, P))
    Ps = [None] * (horizon + 1)
    Ks = [None] * horizon
    Ps[horizon] = P
    for k in range(horizon - 1, -1, -1):
        Pn = Ps[k + 1]
        Ks[k] = np.linalg.solve(R + B.T @ Pn @ B, B.T @ Pn @ A)
        Ps[k] = Q + A.T @ Pn @ (A - B @ Ks[k])
    return np.stack(Ps), np.stack(Ks)


# --------------------------------------------------------------------------- swing-ups


def _symmetric_box(dynamics, running_cost, terminal_cost, x0, horizon, u_max, dtype):
    """A one-control problem with |u| ≤ u_max (no bound when u_max is None)."""
    bound = None if u_max is None else float(u_max)
    return ControlProblem(
        dynamics,
        running_cost,
        terminal_cost,
        jnp.asarray(x0, dtype),
        horizon,
        None if bound is None else -bound,
        bound,
        control_size=1,
    )


def pendulum(
    horizon: int = 100,
    duration: float = 5.0,
    u_max: float | None = 5.0,
    x0=(0.0, 0.0),
    *,
    dtype=None,
) -> ControlProblem:
    """Pendulum swing-up, θ = 0 hanging down, θ = π upright (m = l = 1, g = 9.81,
    damping 0.1), symplectic Euler with Δt = duration / N:

        ω(k+1) = ω + Δt (−g sin θ − 0.1 ω + u),   θ(k+1) = θ + Δt ω(k+1)
        ℓ = Δt (0.1 (θ − π)² + 0.01 ω² + 0.05 u²),   φ = 50 (θ − π)² + 5 ω²

    With |u| ≤ 5 < m g l the pendulum must pump energy: the optimum swings back and
    forth before reaching the top.
    """
    dtype = _dtype(dtype)
    g, b = 9.81, 0.1
    dt = duration / horizon

    def dynamics(x, u, k):
        theta, omega = x[0], x[1]
        omega = omega + dt * (-g * jnp.sin(theta) - b * omega + u[0])
        return jnp.stack([theta + dt * omega, omega])

    def running_cost(x, u, k):
        return dt * (0.1 * (x[0] - jnp.pi) ** 2 + 0.01 * x[1] ** 2 + 0.05 * u[0] ** 2)

    def terminal_cost(x):
        return 50.0 * (x[0] - jnp.pi) ** 2 + 5.0 * x[1] ** 2

    return _symmetric_box(dynamics, running_cost, terminal_cost, x0, horizon, u_max, dtype)


def cartpole(
    horizon: int = 100,
    duration: float = 3.0,
    u_max: float | None = 10.0,
    x0=(0.0, 0.0, 0.0, 0.0),
    *,
    dtype=None,
) -> ControlProblem:
    """Cart-pole swing-up (Tedrake's equations, θ = 0 hanging down; cart 1 kg, pole
    0.3 kg, length 0.5 m), state (p, θ, ṗ, θ̇), semi-implicit Euler, Δt = duration / N:

        p̈ = [u + m_p sin θ (l θ̇² + g cos θ)] / (m_c + m_p sin² θ)
        θ̈ = [−u cos θ − m_p l θ̇² cos θ sin θ − (m_c + m_p) g sin θ] / (l (m_c + m_p sin² θ))
        ℓ = 0.01 Δt u²,   φ = 50 (p² + (θ − π)²) + 5 (ṗ² + θ̇²),   |u| ≤ 10
    """
    dtype = _dtype(dtype)
    mc, mp, ell_, g = 1.0, 0.3, 0.5, 9.81
    dt = duration / horizon

    def dynamics(x, u, k):
        p, th, pd, thd = x[0], x[1], x[2], x[3]
        f = u[0]
        s, c = jnp.sin(th), jnp.cos(th)
        den = mc + mp * s**2
        pdd = (f + mp * s * (ell_ * thd**2 + g * c)) / den
        thdd = (-f * c - mp * ell_ * thd**2 * c * s - (mc + mp) * g * s) / (ell_ * den)
        pd, thd = pd + dt * pdd, thd + dt * thdd
        return jnp.stack([p + dt * pd, th + dt * thd, pd, thd])

    def running_cost(x, u, k):
        return 0.01 * dt * u[0] ** 2

    def terminal_cost(x):
        return 50.0 * (x[0] ** 2 + (x[1] - jnp.pi) ** 2) + 5.0 * (x[2] ** 2 + x[3] ** 2)

    return _symmetric_box(dynamics, running_cost, terminal_cost, x0, horizon, u_max, dtype)


# Spong's acrobot, Tedrake's parameters: two 1 kg links of length l1 = 1 m, l2 = 2 m,
# centres of mass at lc1 = 0.5 m, lc2 = 1 m, inertias about them I1 = 1/12, I2 = 1/3 kg m².
_ACROBOT = dict(m1=1.0, m2=1.0, l1=1.0, lc1=0.5, lc2=1.0, I1=1.0 / 12, I2=1.0 / 3, g=9.81)


def _acrobot_mass_matrix(q2):
    p = _ACROBOT
    a = p["m2"] * p["l1"] * p["lc2"] * jnp.cos(q2)
    I1 = p["I1"] + p["m1"] * p["lc1"] ** 2  # about the shoulder
    I2 = p["I2"] + p["m2"] * p["lc2"] ** 2  # about the elbow
    m11 = I1 + I2 + p["m2"] * p["l1"] ** 2 + 2 * a
    return (m11, I2 + a), (I2 + a, I2 + jnp.zeros_like(a))


def acrobot_vector_field(x, u):
    """Spong's acrobot, q = (q1, q2): q1 the shoulder angle from hanging down, q2 the
    elbow angle relative to the first link, the torque u at the elbow only:

        M(q) q̈ + C(q, q̇) q̇ = τ_g(q) + (0, 1)ᵀ u,
        M = [[I₁ + I₂ + m₂l₁² + 2m₂l₁l_c₂ cos q₂,  I₂ + m₂l₁l_c₂ cos q₂],
             [I₂ + m₂l₁l_c₂ cos q₂,                I₂]]            (I about the joints)
        C q̇ = m₂l₁l_c₂ sin q₂ (−2q̇₁q̇₂ − q̇₂², q̇₁²),
        τ_g = −g (m₁l_c₁ sin q₁ + m₂(l₁ sin q₁ + l_c₂ sin(q₁+q₂)),  m₂l_c₂ sin(q₁+q₂)).

    **Returns:** ẋ = (q̇, q̈) for x = (q1, q2, q̇1, q̇2).
    """
    p = _ACROBOT
    q1, q2, dq1, dq2 = x[0], x[1], x[2], x[3]
    h = p["m2"] * p["l1"] * p["lc2"] * jnp.sin(q2)
    coriolis = jnp.stack([-2 * h * dq1 * dq2 - h * dq2**2, h * dq1**2])
    s12 = jnp.sin(q1 + q2)
    gravity = -p["g"] * jnp.stack(
        [
            p["m1"] * p["lc1"] * jnp.sin(q1) + p["m2"] * (p["l1"] * jnp.sin(q1) + p["lc2"] * s12),
            p["m2"] * p["lc2"] * s12,
        ]
    )
    torque = jnp.stack([jnp.zeros_like(u[0]), u[0]])
    (m11, m12), (_, m22) = _acrobot_mass_matrix(q2)
    rhs = gravity - coriolis + torque
    det = m11 * m22 - m12**2  # M is symmetric positive definite: Cramer's rule
    ddq = jnp.stack([m22 * rhs[0] - m12 * rhs[1], m11 * rhs[1] - m12 * rhs[0]]) / det
    return jnp.concatenate([jnp.stack([dq1, dq2]), ddq])


def acrobot_energy(x):
    """E = ½ q̇ᵀ M(q) q̇ − g (m₁l_c₁ cos q₁ + m₂(l₁ cos q₁ + l_c₂ cos(q₁+q₂))): constant
    along `acrobot_vector_field` without torque, dE/dt = q̇₂ u with it."""
    p = _ACROBOT
    q1, q2, dq = x[0], x[1], x[2:]
    M = jnp.stack([jnp.stack(row) for row in _acrobot_mass_matrix(q2)])
    kinetic = 0.5 * dq @ M @ dq
    height = p["m1"] * p["lc1"] * jnp.cos(q1) + p["m2"] * (
        p["l1"] * jnp.cos(q1) + p["lc2"] * jnp.cos(q1 + q2)
    )
    return kinetic - p["g"] * height


def acrobot(
    horizon: int = 50,
    duration: float = 3.0,
    u_max: float | None = None,
    x0=(0.0, 0.0, 0.0, 0.0),
    *,
    dtype=None,
) -> ControlProblem:
    """Acrobot swing-up from hanging down (q = 0) to upright (q1 = π, q2 = 0), torque at
    the elbow only (`acrobot_vector_field`), semi-implicit Euler with Δt = duration / N:

        q̇(k+1) = q̇ + Δt q̈(q, q̇, u),   q(k+1) = q + Δt q̇(k+1)
        ℓ = 0.01 Δt u²,   φ = 100 ((q1 − π)² + q2²) + 10 |q̇|²

    4 states, 1 control, underactuated; |u| ≤ u_max when it is given.
    """
    dtype = _dtype(dtype)
    dt = duration / horizon

    def dynamics(x, u, k):
        dq = x[2:] + dt * acrobot_vector_field(x, u)[2:]
        return jnp.concatenate([x[:2] + dt * dq, dq])

    def running_cost(x, u, k):
        return 0.01 * dt * u[0] ** 2

    def terminal_cost(x):
        return 100.0 * ((x[0] - jnp.pi) ** 2 + x[1] ** 2) + 10.0 * (x[2] ** 2 + x[3] ** 2)

    return _symmetric_box(dynamics, running_cost, terminal_cost, x0, horizon, u_max, dtype)


# --------------------------------------------------------------------------- bang-bang


def double_integrator(
    horizon: int = 30, dt: float = 0.1, x0=(3.0, 0.0), *, dtype=None
) -> ControlProblem:
    """p'' = u, |u| ≤ 1, exact zero-order-hold discretisation

        p(k+1) = p + Δt v + ½Δt² u,   v(k+1) = v + Δt u,   C = p(N)² + v(N)²

    (no running cost). From (3, 0) the origin needs 2√3 ≈ 3.46 s; with N Δt = 3 s it is
    out of reach, and the optimum is bang-bang with at most one switch.
    """
    dtype = _dtype(dtype)

    def dynamics(x, u, k):
        return jnp.stack([x[0] + dt * x[1] + 0.5 * dt**2 * u[0], x[1] + dt * u[0]])

    return ControlProblem(
        dynamics,
        lambda x, u, k: jnp.zeros((), x.dtype),
        lambda x: x[0] ** 2 + x[1] ** 2,
        jnp.asarray(x0, dtype),
        horizon,
        -1.0,
        1.0,
        control_size=1,
    )


def switching_function(problem: ControlProblem, states, costates):
    """σ(k) = Σ_p −B_p(k+1)ᵀ ∂f/∂u(X_p(k), u, k) for a control-affine problem without
    running cost in u: H(k) = −σ(k) u + …, so the minimum principle gives
    u(k) = lower where σ(k) > 0 and upper where σ(k) < 0. Shape (N, m)."""
    import jax

    s = jnp.asarray(states)
    b = jnp.asarray(costates)
    if not problem.batched:
        s, b = s[:, None], b[:, None]
    u0 = jnp.zeros((problem.control_size,), problem.dtype)
    ks = jnp.arange(problem.horizon)

    def sigma(x, bn, k):
        fu = jax.jacfwd(problem.f, argnums=1)(x, u0, k)
        return -bn @ fu

    per_k = jax.vmap(jax.vmap(sigma, (0, 0, None)), (0, 0, 0))(s[:-1], b[1:], ks)
    return jnp.sum(per_k, axis=1)


# --------------------------------------------------------------------------- Zermelo


def zermelo(
    horizon: int = 50,
    dt: float = 0.05,
    speed: float = 1.0,
    shear: float = 1.0,
    x0=(0.0, 0.0),
    *,
    dtype=None,
) -> ControlProblem:
    """Zermelo's navigation problem: a boat of speed V with heading θ(k) in the current
    (s·y, 0), maximising the downstream distance:

        x(k+1) = x + Δt (V cos θ + s y),   y(k+1) = y + Δt V sin θ,   C = −x(N).

    Bounds −π/2 ≤ θ ≤ π/2. Known answer (`zermelo_heading`): tan θ(k) = (N − 1 − k) s Δt.
    """
    dtype = _dtype(dtype)

    def dynamics(x, u, k):
        th = u[0]
        return jnp.stack(
            [x[0] + dt * (speed * jnp.cos(th) + shear * x[1]), x[1] + dt * speed * jnp.sin(th)]
        )

    return ControlProblem(
        dynamics,
        lambda x, u, k: jnp.zeros((), x.dtype),
        lambda x: -x[0],
        jnp.asarray(x0, dtype),
        horizon,
        -np.pi / 2,
        np.pi / 2,
        control_size=1,
    )


def zermelo_heading(horizon: int = 50, dt: float = 0.05, shear: float = 1.0) -> np.ndarray:
    """The optimal headings θ(k) = arctan((N − 1 − k) s Δt) of `zermelo` (Zermelo's law:
    λ_x = −1 is constant, λ_y(k) = λ_y(k+1) − s Δt, and θ(k) points along −λ(k+1))."""
    k = np.arange(horizon)
    return np.arctan((horizon - 1 - k) * shear * dt)


# --------------------------------------------------------------------------- constraints


def _double_integrator_matrices(dt: float):
    A = np.array([[1.0, dt], [0.0, 1.0]])
    B = np.array([[0.5 * dt**2], [dt]])
    return A, B


def goal_double_integrator(
    horizon: int = 20,
    dt: float = 0.1,
    x0=(0.0, 0.0),
    goal=(1.0, 0.0),
    r: float = 1.0,
    *,
    dtype=None,
) -> ControlProblem:
    """p'' = u (exact zero-order hold), C = Σ_k ½ r u(k)², and the terminal equality
    X(N) = goal: stop exactly at the goal with the least control energy. See
    `goal_double_integrator_solution` for the closed form."""
    dtype = _dtype(dtype)
    A, B = (np.asarray(M, dtype) for M in _double_integrator_matrices(dt))
    goal = jnp.asarray(goal, dtype)
    return ControlProblem(
        lambda x, u, k: A @ x + B @ u,
        lambda x, u, k: 0.5 * r * (u @ u),
        lambda x: jnp.zeros((), x.dtype),
        jnp.asarray(x0, dtype),
        horizon,
        control_size=1,
        terminal_equality=lambda x: x - goal,
    )


def goal_double_integrator_solution(
    horizon: int = 20, dt: float = 0.1, x0=(0.0, 0.0), goal=(1.0, 0.0), r: float = 1.0
):
    """The closed form of `goal_double_integrator` (NumPy, float64): with
    G(k) = A^{N−1−k} B and W = Σ_k G(k)G(k)ᵀ, d = goal − A^N x0,

        u(k) = G(k)ᵀ W⁻¹ d,   ν_T = −r W⁻¹ d,   B(k) = −(A^{N−k})ᵀ ν_T  (paper's sign).

    **Returns:** `(u (N, 1), X (N+1, 2), B (N+1, 2), ν_T (2,))`.
    """
    A, B = _double_integrator_matrices(dt)
    N = horizon
    G = [np.linalg.matrix_power(A, N - 1 - k) @ B for k in range(N)]
    W = sum(g @ g.T for g in G)
    d = np.asarray(goal, float) - np.linalg.matrix_power(A, N) @ np.asarray(x0, float)
    u = np.stack([g.T @ np.linalg.solve(W, d) for g in G])
    X = [np.asarray(x0, float)]
    for k in range(N):
        X.append(A @ X[-1] + B @ u[k])
    nu = -r * np.linalg.solve(W, d)
    costates = np.stack([-np.linalg.matrix_power(A, N - k).T @ nu for k in range(N + 1)])
    return u, np.stack(X), costates, nu


def car_obstacle(
    horizon: int = 25,
    duration: float = 5.0,
    goal=(3.0, 0.0),
    obstacle=(1.5, 0.1),
    radius=0.6,  # a float or a (traced) scalar array
    u_max=(2.0, 2.0),
    *,
    dtype=None,
) -> ControlProblem:
    """A kinematic car, state (p_x, p_y, heading ψ, speed v), controls (curvature κ,
    acceleration a), explicit Euler with Δt = duration / N:

        p_x += Δt v cos ψ,  p_y += Δt v sin ψ,  ψ += Δt v κ,  v += Δt a,

    from rest at the origin to rest at `goal` (terminal equality on (p_x, p_y, v)),
    around the disc |p − obstacle| ≥ radius (stage inequality
    h = radius² − |p − obstacle|² ≤ 0), with |κ|, |a| ≤ `u_max` and C = Σ ½ Δt |u|².
    At rest (v = 0) the car cannot turn or move sideways: the linearisation at zero
    controls is degenerate, as the issue's car is.
    """
    dtype = _dtype(dtype)
    dt = duration / horizon
    goal_ = jnp.asarray(goal, dtype)  # jnp: goal, obstacle and radius may be traced
    centre = jnp.asarray(obstacle, dtype)

    def dynamics(x, u, k):
        px, py, psi, v = x[0], x[1], x[2], x[3]
        return jnp.stack(
            [
                px + dt * v * jnp.cos(psi),
                py + dt * v * jnp.sin(psi),
                psi + dt * v * u[0],
                v + dt * u[1],
            ]
        )

    bound = np.asarray(u_max, dtype)
    return ControlProblem(
        dynamics,
        lambda x, u, k: 0.5 * dt * (u @ u),
        lambda x: jnp.zeros((), x.dtype),
        jnp.zeros(4, dtype),
        horizon,
        -bound,
        bound,
        terminal_equality=lambda x: jnp.stack([x[0] - goal_[0], x[1] - goal_[1], x[3]]),
        inequality=lambda x, u, k: jnp.reshape(radius**2 - jnp.sum((x[:2] - centre) ** 2), (1,)),
    )


def cartpole_track(
    horizon: int = 50,
    duration: float = 2.5,
    track: float = 0.5,
    u_max: float | None = 20.0,
    *,
    dtype=None,
) -> ControlProblem:
    """The `cartpole` swing-up (same dynamics) with the upright rest state as a terminal
    equality X(N) = (0, π, 0, 0), the cart confined to the track −track ≤ p ≤ track
    (two stage inequalities), |u| ≤ u_max and C = Σ 0.01 Δt u²."""
    base = cartpole(horizon, duration, u_max, dtype=dtype)
    upright = np.asarray([0.0, np.pi, 0.0, 0.0], base.dtype)
    return ControlProblem(
        base.dynamics,
        base.running_cost,
        lambda x: jnp.zeros((), x.dtype),
        base.x0[0],
        horizon,
        base.lower,
        base.upper,
        terminal_equality=lambda x: x - upright,
        inequality=lambda x, u, k: jnp.stack([x[0] - track, -x[0] - track]),
    )


# --------------------------------------------------------------------------- registry

PROBLEMS: dict[str, Callable[..., ControlProblem]] = {
    "lqr": lqr,
    "pendulum": pendulum,
    "cartpole": cartpole,
    "acrobot": acrobot,
    "double_integrator": double_integrator,
    "zermelo": zermelo,
    "goal_double_integrator": goal_double_integrator,
    "car_obstacle": car_obstacle,
    "cartpole_track": cartpole_track,
}


def make(name: str, horizon: int | None = None, *, dtype=None) -> ControlProblem:
    """Build a classic problem by name (one of `PROBLEMS`), optionally with another
    horizon N."""
    key = name.replace("-", "_").lower()
    if key not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {sorted(PROBLEMS)}")
    kwargs = {"dtype": dtype}
    if horizon is not None:
        kwargs["horizon"] = horizon
    return PROBLEMS[key](**kwargs)
