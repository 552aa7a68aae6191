"""Continuous-time recurrent networks (Pineda 1987; Almeida 1987), section 3.2 of the paper.

The network relaxes under

    τ dX/dt = F(W X + b + I) − X                       (forward dynamics)

to a fixed point X* = F(W X* + b + I). With A = W X + b + I, F' = ∂F/∂A (diagonal for an
elementwise F) and the Lagrangian L = C(X) + Bᵀ[X − F(W X + b + I)], the coefficient of
δX vanishes when

    ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0                          (the adjoint, a linear system)
    τ_B dB/dt = −B + Wᵀ F'ᵀ B − ∂Cᵀ/∂X                 (Pineda's backward network)
    Y = F'ᵀ B,   dC/dW = −Y X*ᵀ,  dC/db = −Y,  dC/dI = −Y.

B is the paper's multiplier, B = −∂C/∂X (so B = 2(D − X*) for a squared error on X*).
Internally the solves carry the cotangent λ = −B, which is what `jax.grad` hands to a
custom VJP: λ − Wᵀ F' λ = ∂Cᵀ/∂X. Nothing of the forward relaxation is stored: the
backward pass needs X* alone (F' is recomputed from X*), so memory does not depend on
how many steps the relaxation took.

Defaults: `CTRNN()` takes the fastest correct path, the optimistix iterations
`FixedPointSolve()` + `FixedPointAdjoint()` (one matrix product per sweep on the whole
batch); the diffrax relaxation `Relaxation()` and Pineda's backward network
`PinedaAdjoint()` converge wherever the fixed point is an attractor, also where W F' is
not a contraction. Every tolerance left unset follows the dtype of the solve
(`CTRNN.default_tol`).
"""

import abc
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, PyTree, Scalar

from ._results import RESULTS
from ._stage import _ACTIVATIONS, _activation_name, apply_activation


def default_tol(dtype) -> float:
    """The tolerance of every CTRNN solve whose tolerance is left unset, from the dtype
    the solve runs in (that of the inputs and W):

        tol = max(1e-10, min(100 eps, √eps))

    that is 1e-10 in float64, 1.2e-5 in float32, 3.1e-2 in float16 and 8.8e-2 in
    bfloat16. A fixed point cannot be computed to better than about eps · cond: in float32
    the residual ‖X − F(W X + b + I)‖∞ of the plain iteration stalls at 1–17 eps
    (measured: tanh, batch 64, n = 16 … 1024, ‖W‖₂ = 0.5 … 2), so 100 eps stays several
    times above that floor; √eps caps it for 8- and 11-bit mantissas (floor about 1 eps);
    in float64 1e-10 is some five orders above the rounding floor, so that every
    strategy reaches it (each further digit costs the iterations 1/log₁₀(1/ρ) sweeps).
    """
    eps = float(jnp.finfo(dtype).eps)
    return max(1e-10, min(100 * eps, eps**0.5))


def _tolerances(rtol: float | None, atol: float | None, dtype) -> tuple[float, float]:
    """(rtol, atol), each `default_tol(dtype)` where left unset."""
    tol = default_tol(dtype)
    return (tol if rtol is None else rtol), (tol if atol is None else atol)


def _max_norm(x: Array) -> Scalar:
    return jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)


def _spectral_norm_estimate(weight: Array, iterations: int = 16) -> Scalar:
    """‖W‖₂ by power iteration on WᵀW (a few matrix-vector products, no SVD)."""
    v = jnp.ones(weight.shape[-1:], weight.dtype) / weight.shape[-1] ** 0.5

    def step(_, v):
        u = weight.T @ (weight @ v)
        return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(weight.dtype).tiny)

    v = jax.lax.fori_loop(0, iterations, step, v)
    return jnp.linalg.norm(weight @ v)


def _controller(controller, tau, weight, slope, dtype):
    """The default step-size controller for a relaxation to rest: PIDController with its
    step capped at 2.5 τ / (1 + 1.2 ‖W‖₂ max|F'|), so that λ dt stays inside the
    solver's stability region for every eigenvalue λ of (W F' − 1)/τ. Without the cap an
    adaptive solver sits on its stability boundary near rest, where its error estimate
    holds the residual at the controller's tolerance instead of letting it decay.

    Its tolerance, max(1e-5, `default_tol(dtype)`), governs the transient only: where the
    solve stops is set by the steady-state test, not by the controller."""
    if controller is not None:
        return controller
    bound = 1 + 1.2 * slope * _spectral_norm_estimate(jax.lax.stop_gradient(weight))
    tol = max(1e-5, default_tol(dtype))
    return diffrax.PIDController(rtol=tol, atol=tol, dtmax=2.5 * tau / bound)


# --------------------------------------------------------------------------------------
# Forward strategies: how the fixed point X* = F(W X* + b + I) is found.
# --------------------------------------------------------------------------------------


def _max_norm_default_float(x: PyTree) -> Scalar:
    """optimistix's max norm, in JAX's default float dtype: the dtype in which
    `optx.FixedPointIteration` starts its error estimate, so that a float32 solve with
    `jax_enable_x64` on keeps the dtype of its loop carry (float64 else float32)."""
    return optx.max_norm(x).astype(jnp.zeros(()).dtype)


def _iteration(solver, dtype):
    """`solver`, or the plain iteration at the dtype's default tolerance."""
    if solver is not None:
        return solver
    tol = default_tol(dtype)
    return optx.FixedPointIteration(rtol=tol, atol=tol, norm=_max_norm_default_float)


class AbstractRelaxation(eqx.Module):
    """How a `CTRNN` finds its fixed point X* = F(W X* + b + I)."""

    @abc.abstractmethod
    def fixed_point(
        self, ctrnn: "CTRNN", inputs: Array, x0: Array
    ) -> tuple[Array, Int[Array, ""], Bool[Array, ""]]:
        """Return `(X*, number of steps, whether the solver reported success)` for a batch."""


# Module-level maps (not closures), so that diffrax's and optimistix's compiled solves
# are cached across calls with the same shapes.
def _relaxation_map(x, args):
    net, inputs = args[:2]
    return net._map(x, inputs)


def _relaxation_vector_field(t, x, args):
    """dX/dt = (F(W X + b + I) − X) / τ."""
    net, inputs = args[:2]
    return (net._map(x, inputs) - x) / net.tau


def _relaxation_at_rest(t, x, args, **kwargs):
    net, inputs, rtol, atol = args
    return _max_norm(net._map(x, inputs) - x) <= atol + rtol * _max_norm(x)


class Relaxation(AbstractRelaxation):
    """Integrate τ dX/dt = F(W X + b + I) − X with diffrax until it is at rest.

    The solve stops (a `diffrax.Event`) once the fixed-point residual satisfies
    ‖X − F(W X + b + I)‖∞ ≤ atol + rtol ‖X‖∞ over the whole batch; reaching `max_steps`
    first counts as not converged.

    **Arguments:**

    - `solver`: a diffrax ODE solver (default `diffrax.Tsit5()`).
    - `stepsize_controller`: default `diffrax.PIDController` (tolerance
      max(1e-5, `default_tol`)) with its step capped at 2.5 min τ / (1 + 1.2 ‖W‖₂ max|F'|)
      (estimated by power iteration). Only the residual at rest matters, not the
      transient; the cap keeps an adaptive solver off its stability boundary, where its
      error estimate would otherwise hold the residual at the controller's tolerance.
    - `rtol`, `atol`: the steady-state tolerances above (default `CTRNN.default_tol` of
      the solve's dtype: 1e-10 in float64, 1.2e-5 in float32).
    - `dt0`: initial step (required by a constant step size; default None).
    - `max_steps`: the most ODE steps (default 4096).
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    rtol: float | None = None
    atol: float | None = None
    dt0: float | None = None
    max_steps: int = 4096

    def fixed_point(self, ctrnn, inputs, x0):
        rtol, atol = _tolerances(self.rtol, self.atol, x0.dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_relaxation_vector_field),
            self.solver,
            t0=jnp.zeros((), x0.dtype),  # time in the state's dtype, so float32 stays float32
            t1=jnp.asarray(jnp.inf, x0.dtype),
            dt0=self.dt0,
            y0=x0,
            args=(ctrnn, inputs, rtol, atol),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=_controller(
                self.stepsize_controller,
                jnp.min(ctrnn.tau),
                ctrnn.weight,
                ctrnn._max_slope,
                x0.dtype,
            ),
            event=diffrax.Event(_relaxation_at_rest),
            max_steps=self.max_steps,
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.event_occurred
        return sol.ys[-1].astype(x0.dtype), sol.stats["num_steps"], ok


class FixedPointSolve(AbstractRelaxation):
    """Solve X = F(W X + b + I) directly with an optimistix fixed-point (or root) solver.

    With the default `optx.FixedPointIteration` this is X ← F(W X + b + I), an Euler step
    of the relaxation with dt = τ; it converges when W F' is a contraction (as for the
    random initialisation, ‖W‖₂ = 0.5 and |F'| ≤ 1). It stops once every unit moves by
    at most atol + rtol |X| in a sweep. The default forward strategy of `CTRNN`.

    **Arguments:**

    - `solver`: an optimistix fixed-point or root-find solver (default
      `optx.FixedPointIteration` with rtol = atol = `CTRNN.default_tol` of the solve's
      dtype: 1e-10 in float64, 1.2e-5 in float32).
    - `max_steps`: the most iterations (default 1024).
    """

    solver: optx.AbstractFixedPointSolver | optx.AbstractRootFinder | None = None
    max_steps: int = 1024

    def fixed_point(self, ctrnn, inputs, x0):
        sol = optx.fixed_point(
            _relaxation_map,
            _iteration(self.solver, x0.dtype),
            x0,
            (ctrnn, inputs),
            max_steps=self.max_steps,
            throw=False,
        )
        return sol.value, sol.stats["num_steps"], sol.result == optx.RESULTS.successful


# --------------------------------------------------------------------------------------
# Adjoint strategies: how ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0 is solved.
# --------------------------------------------------------------------------------------


def _product(a: Array, b: Array) -> Array:
    """a @ b at full precision: on GPUs, float32 products default to TF32 (10-bit
    mantissas), with which the fixed point and its adjoint cannot reach the default
    tolerances (the relaxation stalls above them); on CPUs this is the plain product.
    Mixed dtypes (float16 weights on a float32 state) meet in the wider one, explicitly."""
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(a, b)
    return jnp.matmul(a.astype(dtype), b.astype(dtype), precision=jax.lax.Precision.HIGHEST)


def _adjoint_map(weight: Array, derivative: Array, lam: Array) -> Array:
    """λ ↦ Wᵀ F' λ for a batch of row vectors (leading pattern axis)."""
    return _product(derivative * lam, weight)


def _adjoint_iteration_map(lam, args):
    """λ ↦ Wᵀ F' λ + ∂Cᵀ/∂X  (B ↦ Wᵀ F'ᵀ B − ∂Cᵀ/∂X with B = −λ)."""
    weight, derivative, cotangent = args[:3]
    return _adjoint_map(weight, derivative, lam) + cotangent


def _pineda_vector_field(t, lam, args):
    """In λ = −B:  τ_B dλ/dt = −λ + Wᵀ F' λ + ∂Cᵀ/∂X."""
    tau = args[3]
    return (_adjoint_iteration_map(lam, args) - lam) / tau


def _pineda_at_rest(t, lam, args, **kwargs):
    rtol, atol = args[4:]
    return _max_norm(_adjoint_iteration_map(lam, args) - lam) <= atol + rtol * _max_norm(lam)


class AbstractCTRNNAdjoint(eqx.Module):
    """How a `CTRNN` solves its adjoint system B − Wᵀ F'ᵀ B = −∂Cᵀ/∂X.

    Implementations solve, in the cotangent convention λ = −B that `jax.grad` uses,
    λ − Wᵀ F' λ = g with g = ∂Cᵀ/∂X* (a batch with a leading pattern axis).
    """

    @abc.abstractmethod
    def solve(
        self, weight: Array, derivative: Array, cotangent: Array
    ) -> tuple[Array, Int[Array, ""], Bool[Array, ""]]:
        """Return `(λ, number of steps, whether the solver reported success)`."""


class PinedaAdjoint(AbstractCTRNNAdjoint):
    """Pineda's backward network: integrate τ_B dB/dt = −B + Wᵀ F'ᵀ B − ∂Cᵀ/∂X with
    diffrax from B(0) = −∂Cᵀ/∂X until it is at rest (its fixed point is the multiplier B).

    It converges whenever the forward fixed point is stable (the eigenvalues of W F' − 1
    have negative real part), even where the plain iteration B ← Wᵀ F' B − ∂Cᵀ/∂X
    diverges. The solve stops once ‖B − Wᵀ F'ᵀ B + ∂Cᵀ/∂X‖∞ ≤ atol + rtol ‖B‖∞.

    **Arguments:** `solver` (default `diffrax.Tsit5()`), `stepsize_controller`
    (default as in `Relaxation`), `rtol`, `atol` (default `CTRNN.default_tol` of the
    solve's dtype: 1e-10 in float64, 1.2e-5 in float32), `dt0`, `max_steps` (default
    4096), `tau` τ_B (default 1.0).
    """

    solver: diffrax.AbstractSolver = diffrax.Tsit5()
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    rtol: float | None = None
    atol: float | None = None
    dt0: float | None = None
    max_steps: int = 4096
    tau: float = 1.0

    def solve(self, weight, derivative, cotangent):
        rtol, atol = _tolerances(self.rtol, self.atol, cotangent.dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_pineda_vector_field),
            self.solver,
            t0=jnp.zeros((), cotangent.dtype),
            t1=jnp.asarray(jnp.inf, cotangent.dtype),
            dt0=self.dt0,
            y0=cotangent,
            args=(weight, derivative, cotangent, self.tau, rtol, atol),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=_controller(
                self.stepsize_controller,
                self.tau,
                weight,
                jnp.max(jnp.abs(derivative)),
                cotangent.dtype,
            ),
            event=diffrax.Event(_pineda_at_rest),
            max_steps=self.max_steps,
            throw=False,
        )
        ok = sol.result == diffrax.RESULTS.event_occurred
        return sol.ys[-1].astype(cotangent.dtype), sol.stats["num_steps"], ok


class FixedPointAdjoint(AbstractCTRNNAdjoint):
    """Iterate B ← Wᵀ F'ᵀ B − ∂Cᵀ/∂X with an optimistix fixed-point solver (Pineda's
    backward network with Euler steps dt = τ_B; Almeida's recurrent back-propagation).

    The leanest adjoint, and the default of `CTRNN`: one matrix product per sweep on the
    whole batch. It converges when the spectral radius of W F' is below one (see
    `CTRNNSolution.spectral_radius`); otherwise it raises, and `PinedaAdjoint()` or
    `LinearSolveAdjoint()` solve the system whenever the fixed point is an attractor.

    **Arguments:** `solver` (default `optx.FixedPointIteration` with rtol = atol =
    `CTRNN.default_tol` of the solve's dtype), `max_steps` (default 1024).
    """

    solver: optx.AbstractFixedPointSolver | optx.AbstractRootFinder | None = None
    max_steps: int = 1024

    def solve(self, weight, derivative, cotangent):
        sol = optx.fixed_point(
            _adjoint_iteration_map,
            _iteration(self.solver, cotangent.dtype),
            cotangent,
            (weight, derivative, cotangent),
            max_steps=self.max_steps,
            throw=False,
        )
        return sol.value, sol.stats["num_steps"], sol.result == optx.RESULTS.successful


class LinearSolveAdjoint(AbstractCTRNNAdjoint):
    """Solve (1 − Wᵀ F'ᵀ) B = −∂Cᵀ/∂X with lineax.

    **Arguments:**

    - `linear_solver`: a lineax solver (default `lx.LU()`).
    - `dense`: if True (default) build one n×n matrix 1 − Wᵀ diag(F'_p) per pattern p and
      solve them under `vmap` (exact, O(P n³)); if False pass the whole batch as one
      matrix-free operator (for iterative solvers such as `lx.GMRES`, `lx.BiCGStab`).
    """

    linear_solver: lx.AbstractLinearSolver = lx.LU()
    dense: bool = True

    def solve(self, weight, derivative, cotangent):
        if self.dense:
            with jax.numpy_dtype_promotion("standard"):  # mixed precision meets explicitly
                dtype = jnp.result_type(weight, derivative, cotangent)
            weight, derivative = weight.astype(dtype), derivative.astype(dtype)
            cotangent = cotangent.astype(dtype)
            eye = jnp.eye(weight.shape[0], dtype=dtype)

            def one(d, g):
                matrix = eye - weight.T * d[None, :]  # (1 − Wᵀ diag(d)) acting on columns
                sol = lx.linear_solve(
                    lx.MatrixLinearOperator(matrix), g, self.linear_solver, throw=False
                )
                return sol.value, sol.result == lx.RESULTS.successful

            lam, ok = jax.vmap(one)(derivative, cotangent)
            return lam, jnp.zeros((), jnp.int32), ok.all()
        operator = lx.FunctionLinearOperator(
            lambda lam: lam - _adjoint_map(weight, derivative, lam),
            jax.ShapeDtypeStruct(cotangent.shape, cotangent.dtype),
        )
        sol = lx.linear_solve(operator, cotangent, self.linear_solver, throw=False)
        steps = sol.stats.get("num_steps", jnp.zeros((), jnp.int32))
        return sol.value, jnp.asarray(steps), sol.result == lx.RESULTS.successful


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


class CTRNNSolution(eqx.Module):
    """The forward relaxation and its certificate.

    - `fixed_point`: X*, shaped like the inputs.
    - `residual`: ‖X* − F(W X* + b + I)‖∞ over the batch.
    - `num_steps`: steps taken by the forward strategy.
    - `spectral_radius`: an estimate of max_p ρ(F'_p W), the local contraction rate of
      X ↦ F(W X + b + I) at X* (below 1: the fixed-point adjoint converges too).
    - `result`: an `adjoint.RESULTS` item: `successful`; `nonfinite` (X* has a NaN or
      inf); `max_steps_reached` (the forward strategy did not reach its tolerance); or
      `unstable` (a fixed point, but not `stable`).
    - `converged` (a property): `result == RESULTS.successful`; only then is X* the
      network's resting state and its implicit gradient trusted.
    - `stable`: whether X* is an attractor of the relaxation, checked independently of
      the solver: every eigenvalue of its Jacobian diag(1/τ)(F' W − 1) has a negative
      real part (by a margin of √eps ‖J‖∞, so a Jacobian singular to rounding is not
      stable). A solver started at (or passing through) an unstable fixed point may
      report success there, but the network never settles on it, and the implicit
      gradient there disagrees with finite differences.
    """

    fixed_point: Array
    residual: Scalar
    num_steps: Int[Array, ""]
    spectral_radius: Scalar
    result: RESULTS
    stable: Bool[Array, ""]

    @property
    def converged(self) -> Bool[Array, ""]:
        return self.result == RESULTS.successful


class AdjointSolution(eqx.Module):
    """The adjoint (backward network) at a fixed point, in the paper's sign convention.

    - `costate`: B, solving ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0 (B = −∂C/∂X).
    - `y`: Y = F'ᵀ B.
    - `grads`: dC/dW = −Y X*ᵀ, dC/db = −Σ_p Y_p, dC/dτ = 0, shaped like the CTRNN's
      inexact arrays (other leaves zero).
    - `input_grad`: dC/dI = −Y.
    - `residual`: ‖B − Wᵀ F'ᵀ B + ∂Cᵀ/∂X‖∞.
    - `num_steps`: steps taken by the adjoint strategy (0 for a direct solve).
    - `result`: an `adjoint.RESULTS` item, as in `CTRNNSolution`: `nonfinite` (B has a
      NaN or inf), `max_steps_reached` (the adjoint strategy failed), `unstable` (X* is
      not `stable`) or `successful`.
    - `converged` (a property): `result == RESULTS.successful`.
    - `stable`: whether X* is an attractor of the relaxation (see `CTRNNSolution`).
    """

    costate: Array
    y: Array
    grads: PyTree
    input_grad: Array
    residual: Scalar
    num_steps: Int[Array, ""]
    result: RESULTS
    stable: Bool[Array, ""]

    @property
    def converged(self) -> Bool[Array, ""]:
        return self.result == RESULTS.successful


def _spectral_radius(weight: Array, derivative: Array, iterations: int = 64) -> Scalar:
    """max_p ρ(F'_p W) by power iteration: the geometric mean of the growth of
    ‖(F'_p W)^k v‖ over the last half of the iterations (robust to complex pairs)."""
    key = jax.random.key(0)
    v = jax.random.normal(key, derivative.shape, derivative.dtype)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def step(k, carry):
        v, log_growth = carry
        v = derivative * (v @ weight.T)
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        count = k >= iterations // 2
        log_growth = log_growth + jnp.where(count, jnp.log(norm[..., 0]), 0.0)
        return v / jnp.where(norm > 0, norm, 1), log_growth

    zero = jnp.zeros(derivative.shape[:-1], derivative.dtype)
    _, log_growth = jax.lax.fori_loop(0, iterations, step, (v, zero))
    return jnp.max(jnp.exp(log_growth / (iterations - iterations // 2)))


def _host_abscissa(matrices: np.ndarray) -> np.ndarray:
    return np.linalg.eigvals(matrices).real.max(axis=-1).astype(matrices.dtype)


def _spectral_abscissa(matrices: Array) -> Array:
    """max Re λ of each (n, n) matrix of a batch: `jnp.linalg.eigvals` where JAX has a
    nonsymmetric eigensolver (CPU; CUDA, which runs LAPACK on the host), NumPy through a
    host callback elsewhere."""

    def native(m):
        return jnp.max(jnp.linalg.eigvals(m).real, axis=-1).astype(m.dtype)

    def host(m):
        out = jax.ShapeDtypeStruct(m.shape[:-2], m.dtype)
        return jax.pure_callback(_host_abscissa, out, m, vmap_method="expand_dims")

    return jax.lax.platform_dependent(matrices, cpu=native, cuda=native, default=host)


def _norm_times_slope_below(
    weight: Array, slope: Scalar, limit: float, squarings: int = 4
) -> Bool[Array, ""]:
    """Whether slope · ‖W‖₂ < limit, from upper bounds on ‖W‖₂ that cost one matrix
    product each and are independent of the batch:

        ‖W‖₂² = ρ(WᵀW) ≤ ‖(WᵀW)^(2^m)‖∞^(1/2^m),   m = 0, 1, …, squarings,

    renormalised at each squaring (so nothing overflows or underflows). They tighten
    towards ‖W‖₂ as m grows (within a few per cent at m = 4, n = 256); the loop stops at
    the first bound that settles it, so a clear contraction costs one or two products."""
    a = _product(weight.T, weight)
    scale = jnp.max(jnp.sum(jnp.abs(a), axis=1))
    b = jnp.where(scale > 0, a / jnp.where(scale > 0, scale, 1), 0)

    def unsettled(carry):
        m, _, log_bound = carry
        return (m < squarings) & (slope * jnp.exp(log_bound / 2.0 ** (m + 1)) >= limit)

    def square(carry):
        m, b, log_bound = carry
        c = _product(b, b)
        scale = jnp.max(jnp.sum(jnp.abs(c), axis=1))
        b = jnp.where(scale > 0, c / jnp.where(scale > 0, scale, 1), 0)
        return m + 1, b, 2 * log_bound + jnp.log(scale)

    m, _, log_bound = jax.lax.while_loop(unsettled, square, (jnp.array(0), b, jnp.log(scale)))
    return slope * jnp.exp(log_bound / 2.0 ** (m + 1)) < limit


def _is_attractor(weight: Array, derivative: Array, tau: Array) -> Bool[Array, ""]:
    """Whether every X*_p is an attractor of the relaxation τ dX/dt = F(W X + b + I) − X:
    all eigenvalues of its Jacobian J_p = diag(1/τ)(diag(F'_p) W − 1) have Re λ < 0.

    This is the relaxation's own criterion, not ρ(F' W) < 1 (which the plain iteration
    needs): a stable spiral with ρ(F' W) ≈ 2 is an attractor, while W = 2·1 at X* = 0
    is not (J = 1). Sufficient tests that hold for every positive τ settle the usual
    cases without an eigensolver, cheapest first:

    1. Gershgorin's rows F'_i w_ii + |F'_i| Σ_{j≠i} |w_ij| < 1, or else
       max|F'| · ‖W‖₂ < 1 (`_norm_times_slope_below`, once per batch);
    2. the symmetric part of diag(F'_p) W − 1 is negative definite (a Cholesky
       factorisation per pattern; J_p is congruent to a matrix whose field of values
       then lies in the left half-plane);
    3. otherwise the eigenvalues of each J_p are computed, and max Re λ < −√eps ‖J_p‖∞
       is asked for: a Jacobian singular to within rounding (1 − W F' singular, where
       the adjoint system has no unique solution) is not an attractor either.

    Tests 2 and 3 run one pattern at a time (`lax.map`), so the check holds n×n
    matrices only, whatever the batch (its memory is that of one n×n eigensolve).

    Each test keeps a margin of √eps against rounding, so a borderline X* is refused
    rather than trusted.
    """
    weight, derivative, tau = (jax.lax.stop_gradient(a) for a in (weight, derivative, tau))
    with jax.numpy_dtype_promotion("standard"):  # the wider of the two, at least float32
        dtype = jnp.promote_types(jnp.result_type(weight, derivative), jnp.float32)
    weight, derivative, tau = (a.astype(dtype) for a in (weight, derivative, tau))
    rounding = float(jnp.finfo(dtype).eps) ** 0.5  # the margin of every test below
    margin = 1 - rounding
    finite = jnp.isfinite(derivative).all() & jnp.isfinite(weight).all()
    derivative = jnp.where(jnp.isfinite(derivative), derivative, 0)
    weight = jnp.where(jnp.isfinite(weight), weight, 0)
    n = weight.shape[0]
    eye = jnp.eye(n, dtype=dtype)
    absw = jnp.abs(weight)
    diag = jnp.diagonal(weight)
    off = jnp.sum(absw, axis=1) - jnp.abs(diag)
    by_rows = jnp.all(derivative * diag + jnp.abs(derivative) * off < margin)

    def one_pattern(d):
        """Tests 2 and 3 for one pattern, so that only n×n matrices are live."""
        m = d[:, None] * weight

        def exact():
            jac = (m - eye) / jnp.reshape(tau, (-1, 1))  # diag(1/τ)(F' W − 1)
            scale = jnp.max(jnp.sum(jnp.abs(jac), axis=1))  # ‖J‖∞
            return _spectral_abscissa(jac) < -rounding * scale

        chol = jnp.linalg.cholesky(margin * eye - 0.5 * (m + m.T))
        return jax.lax.cond(jnp.isfinite(chol).all(), lambda: jnp.array(True), exact)

    def per_pattern():
        return jnp.all(jax.lax.map(one_pattern, derivative))

    def by_norm():
        slope = jnp.max(jnp.abs(derivative))
        return jax.lax.cond(
            _norm_times_slope_below(weight, slope, margin), lambda: jnp.array(True), per_pattern
        )

    return finite & jax.lax.cond(by_rows, lambda: jnp.array(True), by_norm)


def _check_elementwise(activation: Callable, n: int) -> None:
    """Refuse a callable F that mixes units or patterns: the CTRNN's forward map applies
    F to a (P, n) batch and its adjoint uses F' as a diagonal. Checked once, on a probe
    batch of two patterns: ∂F(A)_i/∂A_j must vanish for i ≠ j."""
    with jax.ensure_compile_time_eval():
        probe = jnp.linspace(-0.9, 0.8, 2 * n).reshape(2, n)
        try:
            jac = jax.jacfwd(activation)(probe)
        except Exception as err:
            raise ValueError(
                f"CTRNN: activation {activation!r} failed on a (2, {n}) batch of "
                f"pre-activations: {type(err).__name__}: {err}"
            ) from None
    if getattr(jac, "shape", None) != (2, n, 2, n):
        raise ValueError(
            f"CTRNN: activation {activation!r} must map pre-activations to states of the "
            f"same shape, elementwise; on shape (2, {n}) it returned another shape"
        )
    jac = np.asarray(jac).reshape(2 * n, 2 * n)
    if np.any(np.abs(jac[~np.eye(2 * n, dtype=bool)]) > 0):
        raise ValueError(
            f"CTRNN: activation {activation!r} is not elementwise (∂F_i/∂A_j ≠ 0 for "
            "i ≠ j): the CTRNN's adjoint uses F' as a diagonal; use an elementwise F (a "
            "stage such as Dense takes any callable)"
        )


_FORWARD_ERROR = (
    "CTRNN: the forward relaxation τ dX/dt = F(W X + b + I) − X did not reach a fixed "
    "point (max_steps reached, a NaN or inf, an unstable solver, or no stable fixed "
    "point). The default FixedPointSolve() iterates X ← F(W X + b + I), which needs W F' "
    "contractive; forward=Relaxation() converges wherever the fixed point is an "
    "attractor. Call ctrnn.solve(inputs, throw=False) to see the residual and the "
    "spectral radius of W F'."
)
_ADJOINT_ERROR = (
    "CTRNN: the adjoint B − Wᵀ F'ᵀ B = −∂Cᵀ/∂X was not solved (max_steps reached, or the "
    "spectral radius of W F' is not below 1 for the default FixedPointAdjoint(); "
    "adjoint=PinedaAdjoint() or adjoint=LinearSolveAdjoint() solve it whenever the fixed "
    "point is stable). Call ctrnn.solve_adjoint(...) with throw=False to see its residual."
)
_UNSTABLE_ERROR = (
    "CTRNN: X* solves X = F(W X + b + I) but is not an attractor of the relaxation "
    "τ dX/dt = F(W X + b + I) − X (an eigenvalue of J = diag(1/τ)(F' W − 1) has real part "
    "≥ −√eps ‖J‖∞: unstable, or singular to within rounding): the network never settles "
    "there, so neither X* nor its implicit gradient describes it. Start the relaxation "
    "elsewhere (x0) or make W F' stable; ctrnn.solve(inputs, throw=False) reports "
    "`stable` and the spectral radius of W F'."
)


def _outcome(finite: Array, solved: Array, stable: Array) -> RESULTS:
    """The `RESULTS` item of a solve, first failure first: `nonfinite`, then
    `max_steps_reached` (the strategy did not succeed), then `unstable`."""
    checked = RESULTS.where(stable, RESULTS.successful, RESULTS.unstable)
    return RESULTS.where(
        finite, RESULTS.where(solved, checked, RESULTS.max_steps_reached), RESULTS.nonfinite
    )


def _checked(x: Array, result: RESULTS, method_error: str) -> Array:
    """Raise (under jit too) unless `result` is successful: `method_error` if the
    strategy failed, the stability error if X* is not an attractor."""
    unstable = result == RESULTS.unstable
    return eqx.branched_error_if(
        x,
        result != RESULTS.successful,
        jnp.where(unstable, 1, 0),
        [method_error, _UNSTABLE_ERROR],
    )


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------


def _stop_gradient(tree):
    return jtu.tree_map(lambda x: jax.lax.stop_gradient(x) if eqx.is_array(x) else x, tree)


def _concrete(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


class CTRNN(eqx.Module):
    """A continuous-time recurrent network τ dX/dt = F(W X + b + I) − X (Pineda, Almeida).

    Calling `ctrnn(inputs)` returns the fixed point X* = F(W X* + b + I) for each pattern
    (external input I). It is differentiable through a custom VJP whose backward pass is
    the Pineda–Almeida adjoint: ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0, Y = F'ᵀ B, dC/dW = −Y X*ᵀ,
    dC/db = −Y, dC/dI = −Y (B = −∂C/∂X, the paper's sign). Only X* is kept for the
    backward pass. The fixed point does not depend on τ, so dC/dτ = 0.

    **Arguments:**

    - `size`: n, the number of units (or pass `weight=` and `bias=` instead).
    - `activation`: F; `"tanh"` (default), `"sigmoid"`, `"relu"`, `"identity"` or any
      elementwise callable (F' is computed from X* = F(A) for the named ones, from A
      recomputed at X* for a callable; a callable that mixes units, such as
      a / |a|, is refused at construction, since the adjoint uses F' as a diagonal).
    - `weight`, `bias`: W (n, n) and b (n,) to use instead of a random initialisation.
    - `tau`: τ, a positive scalar or a positive (n,) diagonal (default 1.0).
    - `forward`: `FixedPointSolve()` (optimistix, default: the fastest where W F' is a
      contraction) or `Relaxation()` (the diffrax relaxation: converges wherever X* is an
      attractor, at several times the cost).
    - `adjoint`: `FixedPointAdjoint()` (optimistix, default), `PinedaAdjoint()` (Pineda's
      backward network with diffrax: converges wherever X* is an attractor) or
      `LinearSolveAdjoint()` (lineax). Unset tolerances follow the dtype of the solve
      (`CTRNN.default_tol`: 1e-10 in float64, 1.2e-5 in float32).
    - `spectral_norm`: for the random initialisation, W is scaled to this largest
      singular value (default 0.5, a contraction for |F'| ≤ 1).
    - `dtype`: floating dtype for the random initialisation.
    - `key`: a `jax.random` key (required for the random initialisation).
    """

    weight: Float[Array, "n n"]
    bias: Float[Array, " n"]
    tau: Float[Array, ""] | Float[Array, " n"]
    forward: AbstractRelaxation
    adjoint: AbstractCTRNNAdjoint
    activation: str | Callable = eqx.field(static=True)

    def __init__(
        self,
        size: int | None = None,
        activation: str | Callable = "tanh",
        *,
        weight: Array | None = None,
        bias: Array | None = None,
        tau: float | Array = 1.0,
        forward: AbstractRelaxation = FixedPointSolve(),
        adjoint: AbstractCTRNNAdjoint = FixedPointAdjoint(),
        spectral_norm: float = 0.5,
        dtype=None,
        key: PRNGKeyArray | None = None,
    ):
        if not isinstance(forward, AbstractRelaxation):
            raise TypeError(
                "CTRNN: forward must be an AbstractRelaxation such as Relaxation() or "
                f"FixedPointSolve(), got {type(forward).__name__}"
            )
        if not isinstance(adjoint, AbstractCTRNNAdjoint):
            raise TypeError(
                "CTRNN: adjoint must be an AbstractCTRNNAdjoint such as PinedaAdjoint(), "
                f"FixedPointAdjoint() or LinearSolveAdjoint(), got {type(adjoint).__name__}"
            )
        if weight is None:
            if size is None or isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"CTRNN: size must be a positive int, got {size!r}")
            if key is None:
                raise ValueError("CTRNN: a key is needed for the random initialisation")
            if dtype is None:
                dtype = jnp.zeros(()).dtype
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"CTRNN: dtype must be floating, got {dtype}")
            wkey, bkey = jax.random.split(key)
            w = jax.random.normal(wkey, (size, size), dtype)
            wide = w if jnp.finfo(dtype).bits >= 32 else w.astype(jnp.float32)  # no float16 SVD
            weight = (wide * (spectral_norm / jnp.linalg.norm(wide, ord=2))).astype(dtype)
            if bias is None:
                bias = 0.1 * jax.random.normal(bkey, (size,), dtype)
        weight = jnp.asarray(weight)
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"CTRNN: weight must be square (n, n), got shape {weight.shape}")
        if not jnp.issubdtype(weight.dtype, jnp.floating):
            raise TypeError(f"CTRNN: weight must be floating, got dtype {weight.dtype}")
        n = weight.shape[0]
        if size is not None and size != n:
            raise ValueError(f"CTRNN: size={size} but weight has shape {weight.shape}")
        bias = jnp.zeros((n,), weight.dtype) if bias is None else jnp.asarray(bias, weight.dtype)
        if bias.shape != (n,):
            raise ValueError(f"CTRNN: bias must have shape ({n},), got {bias.shape}")
        tau = jnp.asarray(tau, weight.dtype)
        if tau.shape not in ((), (n,)):
            raise ValueError(
                f"CTRNN: tau must be a scalar or a diagonal of shape ({n},), got {tau.shape}"
            )
        concrete = _concrete(tau)
        if concrete is not None and not (concrete > 0).all():
            raise ValueError(f"CTRNN: tau must be positive, got {concrete}")
        self.weight, self.bias, self.tau = weight, bias, tau
        self.activation = _activation_name(activation)
        if not isinstance(self.activation, str):
            _check_elementwise(self.activation, n)
        self.forward, self.adjoint = forward, adjoint

    @staticmethod
    def default_tol(dtype) -> float:
        """The tolerance of every solve left at its default, from its dtype:
        max(1e-10, min(100 eps, √eps)), i.e. 1e-10 in float64 and 1.2e-5 in float32
        (the rule and its measurement: `adjoint._ctrnn.default_tol`)."""
        return default_tol(dtype)

    @property
    def _max_slope(self) -> float:
        """max |F'| for the named activations (1 for a user's callable, an assumption)."""
        return 0.25 if self.activation == "sigmoid" else 1.0

    @property
    def size(self) -> int:
        """n, the number of units."""
        return self.weight.shape[0]

    # ---- the maps of the paper ------------------------------------------------------

    def _map(self, x: Array, inputs: Array) -> Array:
        """X ↦ F(W X + b + I) on a batch of row vectors."""
        return apply_activation(self.activation, self._preactivation(x, inputs))

    def _preactivation(self, x: Array, inputs: Array) -> Array:
        """A = W X + b + I, its terms meeting in the widest dtype, explicitly."""
        terms = (_product(x, self.weight.T), self.bias, inputs)
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(*terms)
        return sum(t.astype(dtype) for t in terms[1:]) + terms[0].astype(dtype)

    def _derivative(self, x: Array, inputs: Array) -> Array:
        """F'(A) at the fixed point, from X* = F(A) where the activation allows."""
        if isinstance(self.activation, str):
            return _ACTIVATIONS[self.activation][1](x)
        a = self._preactivation(x, inputs)
        return jax.jvp(self.activation, (a,), (jnp.ones_like(a),))[1]

    def vector_field(self, t, x: Array, inputs: Array) -> Array:
        """dX/dt = (F(W X + b + I) − X) / τ (diffrax's `(t, y, args)` signature)."""
        del t
        return (self._map(x, inputs) - x) / self.tau

    def _as_batch(self, inputs: Array, x0: Array | None) -> tuple[Array, Array, bool]:
        inputs = jnp.asarray(inputs)
        n = self.size
        if inputs.shape == (n,):
            added = True
            inputs = inputs[None]
        elif inputs.ndim == 2 and inputs.shape[1] == n:
            added = False
        else:
            raise ValueError(
                f"CTRNN: inputs must have shape ({n},) or (P, {n}), got {inputs.shape}"
            )
        with jax.numpy_dtype_promotion("standard"):  # the wider of the two dtypes
            inputs = inputs.astype(jnp.result_type(inputs.dtype, self.weight.dtype))
        if x0 is None:
            x0 = jnp.zeros_like(inputs)
        else:
            x0 = jnp.asarray(x0, inputs.dtype)
            x0 = x0[None] if x0.shape == (n,) else x0
            x0 = jnp.broadcast_to(x0, inputs.shape)
        return inputs, x0, added

    # ---- public calls ---------------------------------------------------------------

    def __call__(self, inputs: Array, x0: Array | None = None) -> Array:
        """X*, the fixed point for each pattern (raises under jit if not converged).

        **Arguments:** `inputs` I, shape (n,) or (P, n); `x0` the initial state of the
        relaxation (default zero; the gradient with respect to it is zero).
        """
        inputs, x0, added = self._as_batch(inputs, x0)
        x = _implicit_fixed_point((self, inputs), jax.lax.stop_gradient(x0))
        return x[0] if added else x

    def unrolled(self, inputs: Array, num_steps: int, x0: Array | None = None, step=1.0):
        """T Euler steps of the relaxation, X ← X + step·(F(W X + b + I) − X), as plain
        differentiable JAX (`lax.scan`): the back-propagation-through-time baseline.
        With step = 1 this is the fixed-point iteration X ← F(W X + b + I)."""
        inputs, x0, added = self._as_batch(inputs, x0)

        def body(x, _):
            return x + step * (self._map(x, inputs) - x), None

        x, _ = jax.lax.scan(body, x0, None, length=num_steps)
        return x[0] if added else x

    def solve(self, inputs: Array, x0: Array | None = None, *, throw: bool = True) -> CTRNNSolution:
        """Relax to the fixed point and return it with its certificate (not
        differentiable; use `ctrnn(inputs)` for gradients).

        With `throw=True` a run that did not converge, or that stopped at a fixed point
        that is not an attractor of the relaxation (`stable=False`), raises (under jit
        too); with `throw=False` it is returned with `converged=False`.
        """
        inputs, x0, added = self._as_batch(inputs, x0)
        net = _stop_gradient(self)
        x, steps, result, stable, derivative = _relax(net, inputs, x0)
        if throw:
            x = _checked(x, result, _FORWARD_ERROR)
        return CTRNNSolution(
            fixed_point=x[0] if added else x,
            residual=_max_norm(net._map(x, inputs) - x),
            num_steps=steps,
            spectral_radius=_spectral_radius(net.weight, derivative),
            result=result,
            stable=stable,
        )

    def solve_adjoint(
        self, fixed_point: Array, inputs: Array, cost_gradient: Array, *, throw: bool = True
    ) -> AdjointSolution:
        """Solve ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0 at a fixed point X* for a given ∂C/∂X*.

        **Returns:** an `AdjointSolution` with B, Y = F'ᵀ B, dC/dW = −Y X*ᵀ,
        dC/db = −Σ_p Y_p, dC/dI = −Y, the residual and the step count.
        """
        inputs, x, added = self._as_batch(inputs, fixed_point)
        g = jnp.asarray(cost_gradient, x.dtype)
        g = g[None] if added else g
        if g.shape != x.shape:
            raise ValueError(f"CTRNN: cost_gradient must have shape {x.shape}, got {g.shape}")
        net = _stop_gradient(self)
        lam, steps, result, grads, input_grad = _adjoint(net, x, inputs, g)
        derivative = net._derivative(x, inputs)
        stable = _is_attractor(net.weight, derivative, net.tau)
        result = RESULTS.where((result == RESULTS.successful) & ~stable, RESULTS.unstable, result)
        if throw:
            lam = _checked(lam, result, _ADJOINT_ERROR)
        b = -lam
        y = -derivative * lam
        if added:
            b, y, input_grad = b[0], y[0], input_grad[0]
        return AdjointSolution(
            costate=b,
            y=y,
            grads=grads,
            input_grad=input_grad,
            residual=_max_norm(lam - _adjoint_map(net.weight, derivative, lam) - g),
            num_steps=steps,
            result=result,
            stable=stable,
        )


def _relax(net: CTRNN, inputs: Array, x0: Array):
    """X* by the forward strategy, then its checks: `(X*, steps, result, stable, F')`."""
    x, steps, solved = net.forward.fixed_point(net, inputs, x0)
    derivative = net._derivative(x, inputs)
    stable = _is_attractor(net.weight, derivative, net.tau)
    return x, steps, _outcome(jnp.isfinite(x).all(), solved, stable), stable, derivative


def _adjoint(net: CTRNN, x: Array, inputs: Array, g: Array):
    """λ − Wᵀ F' λ = g, then the gradients (cotangent convention λ = −B, F'λ = −Y)."""
    d = net._derivative(x, inputs)
    lam, steps, solved = net.adjoint.solve(net.weight, d, g)
    # the stability of X* is the forward pass's to check (it raised there if not)
    result = _outcome(jnp.isfinite(lam).all(), solved, jnp.array(True))
    neg_y = d * lam  # = −Y
    grads = jtu.tree_map(jnp.zeros_like, eqx.filter(net, eqx.is_inexact_array))
    # each gradient in its control's own dtype (the solve runs in X*'s, maybe wider)
    d_weight = (neg_y.T @ x).astype(net.weight.dtype)
    d_bias = neg_y.sum(axis=0).astype(net.bias.dtype)
    grads = eqx.tree_at(lambda s: (s.weight, s.bias), grads, (d_weight, d_bias))
    return lam, steps, result, grads, neg_y


# --------------------------------------------------------------------------------------
# The custom VJP: forward stores X* only; backward is the Pineda–Almeida adjoint.
# --------------------------------------------------------------------------------------


def _forward_checked(net: CTRNN, inputs: Array, x0: Array) -> Array:
    x, _, result, _, _ = _relax(net, inputs, x0)
    return _checked(x, result, _FORWARD_ERROR)


@eqx.filter_custom_vjp
def _implicit_fixed_point(vjp_arg, x0):
    net, inputs = vjp_arg
    return _forward_checked(net, inputs, x0)


@_implicit_fixed_point.def_fwd
def _implicit_fixed_point_fwd(perturbed, vjp_arg, x0):
    del perturbed
    net, inputs = vjp_arg
    x = _forward_checked(net, inputs, x0)
    return x, x  # only X* is stored


@_implicit_fixed_point.def_bwd
def _implicit_fixed_point_bwd(x, g, perturbed, vjp_arg, x0):
    del x0
    net, inputs = vjp_arg
    lam, _, result, grads, neg_y = _adjoint(net, x, inputs, g.astype(x.dtype))
    grads, neg_y = eqx.error_if((grads, neg_y), result != RESULTS.successful, _ADJOINT_ERROR)
    grads = jtu.tree_map(
        lambda p, gr: gr if p else None, perturbed[0], grads, is_leaf=lambda v: v is None
    )
    return grads, (neg_y if perturbed[1] else None)


# --------------------------------------------------------------------------------------
# Continuous learning: X, B and W integrated together.
# --------------------------------------------------------------------------------------


class LearningSolution(eqx.Module):
    """The result of `continuous_learning`.

    - `ctrnn`: the network with W(t1), b(t1).
    - `ts`: the save times.
    - `costs`: C(X(t)) at the save times.
    - `states`, `costates`: X(t) and B(t) at the save times (B in the paper's sign).
    - `weights`: W(t) at the save times.
    - `num_steps`: ODE steps taken.
    """

    ctrnn: CTRNN
    ts: Array
    costs: Array
    states: Array
    costates: Array
    weights: Array
    num_steps: Int[Array, ""]


def _learning_vector_field(t, y, args):
    """(dX/dt, dB/dt, dW/dt, db/dt) of Pineda's continuous learning."""
    x, b, w, bias = y
    net, inputs, cost, tau_w, tau_b = args
    net = eqx.tree_at(lambda s: (s.weight, s.bias), net, (w, bias))
    dx = (net._map(x, inputs) - x) / net.tau
    d = net._derivative(x, inputs)
    db = (-b + (d * b) @ w - jax.grad(cost)(x)) / tau_b
    y_ = d * b  # Y = F'ᵀ B
    return dx, db, (y_.T @ x) / tau_w, y_.sum(axis=0) / tau_w


def continuous_learning(
    ctrnn: CTRNN,
    inputs: Array,
    cost: Callable[[Array], Scalar],
    *,
    t1: float,
    tau_w: float = 10.0,
    tau_b: float = 1.0,
    x0: Array | None = None,
    b0: Array | None = None,
    num_saves: int = 101,
    solver: diffrax.AbstractSolver = diffrax.Tsit5(),
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    dt0: float | None = None,
    max_steps: int = 65536,
) -> LearningSolution:
    """Pineda's continuous learning: the network, its backward network and its weights
    evolve together (section 3.2 of the paper), integrated with diffrax:

        τ   dX/dt = F(W X + b + I) − X
        τ_B dB/dt = −B + Wᵀ F'ᵀ B − ∂Cᵀ/∂X
        τ_w dW/dt = Σ_p Y_p X_pᵀ,   τ_w db/dt = Σ_p Y_p,   Y = F'ᵀ B.

    With τ_w ≫ τ, τ_B, X and B track their fixed points and W follows the gradient flow
    τ_w dW/dt = −dC/dW, the continuous counterpart of the discrete update
    W ← W + λ Σ_p Y_p X_pᵀ (which is any optax optimiser on `jax.grad` of `ctrnn(inputs)`).
    With τ_w too close to τ the coupled system can run away (W grows, the backward network
    loses stability, B and W feed each other); the solve then fails loudly (max_steps).

    **Arguments:**

    - `ctrnn`: the initial network (its `activation` and τ are used).
    - `inputs`: I, shape (P, n) or (n,).
    - `cost`: C(X) for the batch of states, a scalar (e.g. Σ_p |D_p − X_p|²).
    - `t1`: the length of the run; `tau_w`, `tau_b`: τ_w and τ_B.
    - `x0`, `b0`: initial X and B (default zero).
    - `num_saves`: number of evenly spaced save times in [0, t1].
    - `solver`, `stepsize_controller` (default `PIDController(rtol=1e-6, atol=1e-6)`),
      `dt0`, `max_steps`: as in `diffrax.diffeqsolve` (the solve raises if it fails).
    """
    inputs, x_init, added = ctrnn._as_batch(inputs, x0)
    b_init = jnp.zeros_like(x_init) if b0 is None else jnp.broadcast_to(b0, x_init.shape)
    out = jax.eval_shape(cost, x_init)
    if getattr(out, "shape", None) != ():
        raise ValueError(f"cost must return a scalar, got shape {getattr(out, 'shape', out)}")
    if stepsize_controller is None:
        stepsize_controller = diffrax.PIDController(rtol=1e-6, atol=1e-6)
    ts = jnp.linspace(0.0, t1, num_saves, dtype=x_init.dtype)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_learning_vector_field),
        solver,
        ts[0],
        ts[-1],
        dt0,
        (x_init, b_init, ctrnn.weight, ctrnn.bias),
        args=(ctrnn, inputs, cost, jnp.asarray(tau_w, ts.dtype), jnp.asarray(tau_b, ts.dtype)),
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=stepsize_controller,
        max_steps=max_steps,
    )
    xs, bs, ws, biases = sol.ys
    costs = jax.vmap(cost)(xs)
    trained = eqx.tree_at(lambda s: (s.weight, s.bias), ctrnn, (ws[-1], biases[-1]))
    if added:
        xs, bs = xs[:, 0], bs[:, 0]
    return LearningSolution(trained, ts, costs, xs, bs, ws, sol.stats["num_steps"])
