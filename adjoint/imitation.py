"""Learning a planner's model and cost from expert controls (inverse optimal control).

The imitation experiment of Amos, Rodriguez, Sacks, Boots & Kolter, "Differentiable MPC
for End-to-end Planning and Control" (NeurIPS 2018). An expert plans with the true
pendulum (θ = π upright, symplectic Euler with step Δt):

    ω(k+1) = ω + Δt (−a sin θ − b ω + c u),   θ(k+1) = θ + Δt ω(k+1),
    ℓ = Δt ((θ − π)² + 0.1 ω² + r u²),   φ = 10 (θ − π)² + ω²,

with the gravity/length ratio a = g/l, damping b, actuator gain c = 1/(m l²) and control
weight r. A learner with the same planner but unknown θ = (a, b, c, r) sees only the
expert's optimal controls u*_p(0..N-1) from P initial states and fits

    L(θ) = Σ_p |u_p(θ) − u*_p|² / Σ_p |u*_p|²,    u_p(θ) = argmin_u C(u; x0_p, θ),

by Adam on log θ. dL/dθ runs through `control.solve`: the implicit derivative at each
plan's KKT point (one LQ solve per expert, `adjoint.control._implicit`), never through
the solver's iterations. The whole training step (vmap over the experts, gradients,
Adam) is one `jax.jit`.

Identifiability: scaling the whole cost leaves its minimiser unchanged, so every weight
but r is fixed. The actuator gain and r are separable: v = c u solves a problem that
depends on r / c² only, and u = v / c then fixes c. There is no torque limit, so the
derivative is two-sided everywhere.

A plan whose solve did not converge (`Solution.derivative_ok` False) is left out of
that step's loss and gradient and counted (`ImitationResult.solves_ok`).
"""

import functools
import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from . import control


HORIZON = 20
DT = 0.05
NAMES = ("gravity", "damping", "gain", "control_weight")


class Pendulum(eqx.Module):
    """The learnable parameters of the planner: `gravity` a = g/l (s⁻²), `damping` b
    (s⁻¹), actuator `gain` c = 1/(m l²) and the cost's `control_weight` r (scalars)."""

    gravity: Float[Array, ""]
    damping: Float[Array, ""]
    gain: Float[Array, ""]
    control_weight: Float[Array, ""]

    def __init__(self, gravity, damping, gain, control_weight, *, dtype=None):
        dtype = dtype or jnp.zeros(()).dtype
        self.gravity = jnp.asarray(gravity, dtype)
        self.damping = jnp.asarray(damping, dtype)
        self.gain = jnp.asarray(gain, dtype)
        self.control_weight = jnp.asarray(control_weight, dtype)

    def dynamics(self, x: Float[Array, "2"], u: Float[Array, "1"], dt: float = DT) -> Array:
        """One symplectic-Euler step of the state x = (θ, ω) under the torque u."""
        theta, omega = x[0], x[1]
        accel = -self.gravity * jnp.sin(theta) - self.damping * omega + self.gain * u[0]
        omega = omega + dt * accel
        return jnp.stack([theta + dt * omega, omega])

    def problem(self, x0, horizon: int = HORIZON, dt: float = DT) -> control.ControlProblem:
        """The planner's swing-to-upright problem from `x0` (one state or a batch)."""

        def running_cost(x, u, k):
            return dt * ((x[0] - jnp.pi) ** 2 + 0.1 * x[1] ** 2 + self.control_weight * u[0] ** 2)

        def terminal_cost(x):
            return 10.0 * (x[0] - jnp.pi) ** 2 + x[1] ** 2

        return control.ControlProblem(
            lambda x, u, k: self.dynamics(x, u, dt),
            running_cost,
            terminal_cost,
            x0,
            horizon,
            control_size=1,
        )


def true_pendulum(dtype=None) -> Pendulum:
    """The expert's parameters: a = 10, b = 1, c = 2, r = 0.5."""
    return Pendulum(10.0, 1.0, 2.0, 0.5, dtype=dtype)


def initial_guess(key: PRNGKeyArray, true: Pendulum, spread: float = 0.7) -> Pendulum:
    """Each parameter of `true` times exp(U(−spread, spread)): off by up to e^spread."""
    leaves, treedef = jax.tree.flatten(true)
    factors = jnp.exp(jax.random.uniform(key, (len(leaves),), leaves[0].dtype, -spread, spread))
    return jax.tree.unflatten(treedef, [x * f for x, f in zip(leaves, factors)])


def initial_states(key: PRNGKeyArray, n: int, dtype=None) -> Float[Array, "n 2"]:
    """`n` initial states around upright: θ ∈ π ± 1, ω ∈ ±1 (uniform)."""
    dtype = dtype or jnp.zeros(()).dtype
    offsets = jax.random.uniform(key, (n, 2), dtype, -1.0, 1.0)
    return offsets + jnp.asarray([jnp.pi, 0.0], dtype)


def relative_errors(params: Pendulum, true: Pendulum) -> dict[str, float]:
    """|θ_i / θ_true,i − 1| per parameter."""
    return {name: float(abs(getattr(params, name) / getattr(true, name) - 1)) for name in NAMES}


def solver(dtype) -> control.ILQR:
    """The planner's method: `control.ILQR()` at its default tolerance (1e-8 in float64,
    1e-4 in float32)."""
    return control.ILQR()


def _squared_error(log_params, x0, u_star, horizon, dt):
    """|u(θ) − u*|² for one expert, θ = exp(log θ). The plan starts from u* itself, so
    that it finds the optimum (of a non-convex problem) that the expert found; a solve
    that does not converge is flagged (`derivative_ok`), not raised."""
    problem = jax.tree.map(jnp.exp, log_params).problem(x0, horizon, dt)
    sol = control.solve(problem, u_star, solver(problem.dtype), throw=False)
    error = jnp.sum((sol.controls - u_star) ** 2)
    return error, (sol.controls, sol.states, sol.derivative_ok)


@functools.partial(jax.jit, static_argnames=("horizon", "dt"))
def train_step(log_params, opt_state, learning_rate, x0s, expert_controls, horizon, dt):
    """One Adam step on log θ: the loss L of the module docstring and its gradient, per
    expert (vmap) so that a plan without a valid derivative can be left out.

    **Returns:** `(log_params, opt_state, loss, (controls, states, derivative_ok))`, the
    loss and plans at the parameters *before* the step.
    """
    per_expert = jax.value_and_grad(_squared_error, has_aux=True)
    (errors, (u, x, ok)), grads = jax.vmap(
        lambda x0, u_star: per_expert(log_params, x0, u_star, horizon, dt)
    )(x0s, expert_controls)
    scale = jnp.sum(jnp.where(ok, jnp.sum(expert_controls**2, axis=(1, 2)), 0))
    scale = jnp.maximum(scale, jnp.finfo(scale.dtype).tiny)
    loss = jnp.sum(jnp.where(ok, errors, 0)) / scale
    grads = jax.tree.map(lambda g: jnp.sum(jnp.where(ok, g, 0)) / scale, grads)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion clean
        updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, log_params)
    return optax.apply_updates(log_params, updates), opt_state, loss, (u, x, ok)


def expert_plans(true: Pendulum, x0s, horizon: int = HORIZON, dt: float = DT):
    """The expert's optimal plans from each initial state, solved from zero controls.

    This is `train_step` at θ = true with zero targets (so every plan starts from zero
    controls) and a zero learning rate: one compiled function serves the expert and
    the learner (compilation is most of the run time).

    **Returns:** `(controls (P, N, 1), states (P, N+1, 2), derivative_ok (P,))`.
    """
    log_true = jax.tree.map(jnp.log, true)
    dtype = true.gravity.dtype
    zeros = jnp.zeros((x0s.shape[0], horizon, 1), dtype)
    state = optax.adam(0.0).init(log_true)
    *_, plans = train_step(log_true, state, jnp.zeros((), dtype), x0s, zeros, horizon, dt)
    return plans


class ImitationResult(NamedTuple):
    """What `learn` returns (NumPy arrays; histories have `steps + 1` entries, entry i
    at the parameters after i Adam steps).

    - `true`, `init`, `learned`: the parameters.
    - `x0s` (P, 2); `expert_controls` (P, N, 1), `expert_states` (P, N+1, 2); the
      learner's plans at the initial guess (`initial_controls`, `initial_states`) and
      after learning (`learned_controls`, `learned_states`).
    - `loss`: L per step; `errors`: relative error per parameter and step;
      `solves_ok`: the learner's plans with a valid derivative per step (of P).
    - `seconds`: wall time of the training loop, compilation included.
    """

    true: Pendulum
    init: Pendulum
    learned: Pendulum
    x0s: np.ndarray
    expert_controls: np.ndarray
    expert_states: np.ndarray
    initial_controls: np.ndarray
    initial_states: np.ndarray
    learned_controls: np.ndarray
    learned_states: np.ndarray
    loss: np.ndarray
    errors: dict[str, np.ndarray]
    solves_ok: np.ndarray
    seconds: float

    @property
    def final_errors(self) -> dict[str, float]:
        return {name: float(e[-1]) for name, e in self.errors.items()}


def learn(
    key: PRNGKeyArray,
    *,
    steps: int = 300,
    n_experts: int = 16,
    horizon: int = HORIZON,
    dt: float = DT,
    learning_rate: float = 0.1,
    true: Pendulum | None = None,
    init: Pendulum | None = None,
    log: Callable[[int, float, dict[str, float], int], None] | None = None,
    log_every: int | None = None,
) -> ImitationResult:
    """Generate the expert's plans from `n_experts` random initial states and learn θ
    from their controls with `steps` Adam steps.

    **Arguments:** `key` draws the initial states and (when `init` is None) the initial
    guess (`initial_guess`); `true` defaults to `true_pendulum()`; `log(step, loss,
    errors, solves_ok)` is called every `log_every` steps (default steps // 10) and at
    the last one.

    Raises a RuntimeError if an expert's own solve did not converge.
    """
    if steps < 0 or n_experts < 1:
        raise ValueError(f"learn: need steps ≥ 0 and n_experts ≥ 1, got {steps}, {n_experts}")
    t0 = time.perf_counter()
    data_key, init_key = jax.random.split(key)
    true = true_pendulum() if true is None else true
    init = initial_guess(init_key, true) if init is None else init
    dtype = true.gravity.dtype
    x0s = initial_states(data_key, n_experts, dtype)
    expert_u, expert_x, expert_ok = expert_plans(true, x0s, horizon, dt)
    if not bool(jnp.all(expert_ok)):
        raise RuntimeError(
            f"imitation: {int(jnp.sum(~expert_ok))} of the expert's {n_experts} solves "
            "did not converge; try a shorter horizon or other initial states"
        )

    log_params = jax.tree.map(jnp.log, init)
    opt_state = optax.adam(learning_rate).init(log_params)
    lr = jnp.asarray(learning_rate, dtype)
    every = log_every or max(1, steps // 10)
    losses, solves_ok, errors = [], [], {name: [] for name in NAMES}
    for i in range(steps + 1):
        new_params, new_state, loss, (u, x, ok) = train_step(
            log_params, opt_state, lr, x0s, expert_u, horizon, dt
        )
        params = jax.tree.map(jnp.exp, log_params)
        err = relative_errors(params, true)
        losses.append(float(loss))
        solves_ok.append(int(jnp.sum(ok)))
        for name in NAMES:
            errors[name].append(err[name])
        if i == 0:
            first = (u, x)
        if log is not None and (i % every == 0 or i == steps):
            log(i, losses[-1], err, solves_ok[-1])
        if i < steps:
            log_params, opt_state = new_params, new_state

    return ImitationResult(
        true=true,
        init=init,
        learned=params,
        x0s=np.asarray(x0s),
        expert_controls=np.asarray(expert_u),
        expert_states=np.asarray(expert_x),
        initial_controls=np.asarray(first[0]),
        initial_states=np.asarray(first[1]),
        learned_controls=np.asarray(u),
        learned_states=np.asarray(x),
        loss=np.asarray(losses),
        errors={name: np.asarray(e) for name, e in errors.items()},
        solves_ok=np.asarray(solves_ok),
        seconds=time.perf_counter() - t0,
    )


@functools.partial(jax.jit, static_argnames=("steps", "horizon", "dt"))
def closed_loop(
    model: Pendulum,
    plant: Pendulum,
    x0,
    steps: int = 40,
    horizon: int = HORIZON,
    dt: float = DT,
) -> control.MPCTrajectory:
    """MPC with `model`'s planner driving the `plant` pendulum from `x0` for `steps`
    steps (`control.MPC`, throw=False: see `MPCTrajectory.converged`)."""
    mpc = control.MPC(steps=steps, throw=False)
    return mpc(model.problem(x0, horizon, dt), plant=lambda x, u, t: plant.dynamics(x, u, dt))


def figure(result: ImitationResult, n_shown: int = 3):
    """A matplotlib figure: loss and parameter errors per step; the expert's, the
    initial guess's and the learned planner's controls and angles for a few experts."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = np.arange(len(result.loss))
    ax = axes[0]
    ax.semilogy(steps, result.loss, "k", label="loss L")
    for name, e in result.errors.items():
        ax.semilogy(steps, np.maximum(e, 1e-17), lw=0.9, label=f"rel. error {name}")
    ax.set_xlabel("Adam step")
    ax.set_title("imitation loss and parameter errors")
    ax.legend(fontsize=7)
    k = np.arange(result.expert_controls.shape[1] + 1)
    for p in range(min(n_shown, len(result.x0s))):
        color = f"C{p}"
        axes[1].step(k[:-1], result.expert_controls[p, :, 0], where="post", color=color)
        axes[1].plot(k[:-1], result.learned_controls[p, :, 0], "o", ms=3, color=color)
        axes[1].step(k[:-1], result.initial_controls[p, :, 0], ":", where="post", color=color)
        axes[2].plot(k, result.expert_states[p, :, 0], color=color)
        axes[2].plot(k, result.learned_states[p, :, 0], "o", ms=3, color=color)
        axes[2].plot(k, result.initial_states[p, :, 0], ":", color=color)
    axes[1].set_title("u(k): expert (line), learned (dots), initial guess (dotted)")
    axes[1].set_xlabel("k")
    axes[2].axhline(np.pi, color="k", lw=0.6)
    axes[2].set_title("θ(k) of the plans")
    axes[2].set_xlabel("k")
    fig.tight_layout()
    return fig
