"""Algebraically reversible Runge–Kutta schemes and their exact O(1)-memory adjoint.

McCallum & Foster (2024), "Efficient, Accurate and Stable Gradients for Neural ODEs".
Given any base one-step method with increment Ψ_h(t, y) = (base step of y over
[t, t + h]) − y, the reversible scheme carries a pair (y_n, z_n), z_0 = y_0:

    y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_{h_n}(t_n, z_n),
    z_{n+1} = z_n − Ψ_{−h_n}(t_{n+1}, y_{n+1}),

with a coupling 0 < λ ≤ 1. The step inverts in closed form,

    z_n = z_{n+1} + Ψ_{−h_n}(t_{n+1}, y_{n+1}),
    y_n = (y_{n+1} − (1 − λ) z_n − Ψ_{h_n}(t_n, z_n)) / λ,

so the backward pass reconstructs every (y_n, z_n) from (y_N, z_N) without storing the
trajectory, and runs the discrete costate recursion of the scheme (the VJP of each step,
discretise-then-optimise). With ȳ_n = ∂C/∂y_n = −B_n (B the paper's costate), z̄_n and
θ̄ the adjoints of z_n and of the parameters θ (`args` and the arrays of `terms`):

    ŷ     = ȳ_{n+1} − (∂Ψ_{−h}/∂y)ᵀ(t_{n+1}, y_{n+1}) z̄_{n+1},
    θ̄    −= (∂Ψ_{−h}/∂θ)ᵀ(t_{n+1}, y_{n+1}) z̄_{n+1},
    ȳ_n   = λ ŷ,
    z̄_n   = z̄_{n+1} + (1 − λ) ŷ + (∂Ψ_h/∂z)ᵀ(t_n, z_n) ŷ,
    θ̄    += (∂Ψ_h/∂θ)ᵀ(t_n, z_n) ŷ,

and finally ∂C/∂y_0 = ȳ_0 + z̄_0 (as z_0 = y_0). Each of the two increments is
evaluated once per backward step, by one `jax.vjp` that returns both the primal (for
the reconstruction) and the pullback. Memory is that of one step and one scalar time
per step; the gradient equals `jax.grad` through the same reversible solve with
`diffrax.RecursiveCheckpointAdjoint` up to round-off.

Anchors. The inverse step divides y by λ, so a round-off error in y_n grows as λ^{−m}
over m reconstructed steps (the linearised inverse map has the eigenvalue 1/λ along y):
e^{10} ≈ 2·10⁴ over 10,000 steps at λ = 0.999, which in float32 is a 10⁻³ gradient
error. The forward pass therefore stores (y_n, z_n) at a fixed number S of evenly
spaced accepted steps (every K-th, K = ⌈N / (S + 1)⌉ by default), and the
backward pass replaces its reconstruction by the stored pair there: the growth is
bounded by λ^{−K}, the memory is 2S states whatever the number of steps. The distance
between the reconstruction and each anchor (and y_0) is the measured reconstruction
error; the backward pass raises when it exceeds a tolerance, so an unstable
reconstruction (stiff or strongly dissipative dynamics) never returns a gradient
silently.
"""

import functools as ft
import math
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from diffrax._adjoint import _only_transpose_ys
from diffrax._integrate import SaveState
from diffrax._saveat import save_y


def _is_subsaveat(x) -> bool:
    return isinstance(x, diffrax.SubSaveAt)


def _increment(solver: diffrax.AbstractSolver, terms, t0, t1, y0, args):
    """Ψ_{t1 − t0}(t0, y0), its error estimate and result: one step of the base solver
    from a fresh solver state.

    An explicit Runge–Kutta base is stepped here from its Butcher tableau, its stages
    written out (k_i = f(t0 + c_i h, y0 + Σ_j a_ij k_j) h, Ψ = Σ_i b_i k_i, zero
    coefficients skipped): the formulas of `solver.step`, whose stages run in a loop
    (`eqxi.while_loop`) whose VJP costs 1.7× (Midpoint) to 2× (Tsit5) that of the
    written-out stages (n = 128, batch 64, float32, CPU). The backward pass takes two
    such VJPs a step. Any other base is stepped by `solver.step`."""
    tableau = getattr(solver, "tableau", None)
    if not isinstance(solver, diffrax.AbstractERK) or not isinstance(
        tableau, diffrax.ButcherTableau
    ):
        state = solver.init(terms, t0, t1, y0, args)
        y1, y_error, _, _, result = solver.step(terms, t0, t1, y0, args, state, False)
        return jtu.tree_map(jnp.subtract, y1, y0), y_error, result

    control = terms.contr(t0, t1)
    h = t1 - t0

    def combine(coefficients, ks):  # Σ_i c_i k_i over the nonzero c_i
        nonzero = [(float(c), k) for c, k in zip(coefficients, ks, strict=False) if c != 0]
        if not nonzero:
            return jtu.tree_map(jnp.zeros_like, y0)
        cs, kept = zip(*nonzero, strict=True)
        return jtu.tree_map(lambda *xs: sum(c * x for c, x in zip(cs, xs, strict=True)), *kept)

    ks = [terms.vf_prod(t0, y0, args, control)]
    for c, a in zip(tableau.c, tableau.a_lower, strict=True):
        y_stage = jtu.tree_map(jnp.add, y0, combine(a, ks))
        ks.append(terms.vf_prod(t0 + float(c) * h, y_stage, args, control))
    y_error = combine(tableau.b_error, ks)
    return combine(tableau.b_sol, ks), y_error, diffrax.RESULTS.successful


class Reversible(diffrax.AbstractAdaptiveSolver, diffrax.AbstractWrappedSolver):
    """The algebraically reversible version of a one-step diffrax solver (McCallum &
    Foster, 2024):

        y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n),
        z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1}),   z_0 = y_0,

    where Ψ_h(t, y) is the base solver's increment over [t, t + h]. It has the base's
    order of convergence and costs two base steps a step (first-same-as-last is not
    reused, as the two steps start from different states; an explicit Runge–Kutta base
    is stepped from its tableau, see `_increment`). Its error estimate (for
    adaptive steps) is the base's, of the step from z_n; dense output is linear between
    y_n and y_{n+1}. Differentiate it in O(1) memory with `ReversibleAdjoint`.

    **Arguments:**

    - `solver`: the base solver: a diffrax solver for a single ODE term (e.g.
      `diffrax.Tsit5()`, `diffrax.Midpoint()`).
    - `coupling`: λ ∈ (0, 1]. λ = 1 is the symmetric scheme, which is only linearly
      stable on the imaginary axis; λ < 1 damps the y–z decoupling (the paper uses
      0.999); the reconstruction divides by λ, so λ should not be small.
    """

    solver: diffrax.AbstractSolver
    coupling: float = 0.999

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = (
        diffrax.LocalLinearInterpolation
    )

    def __check_init__(self):
        if not isinstance(self.solver, diffrax.AbstractSolver):
            raise TypeError(f"Reversible wraps a diffrax solver, got {type(self.solver).__name__}")
        if isinstance(self.solver, Reversible):
            raise ValueError("Reversible(Reversible(...)) is not supported")
        if jtu.tree_structure(self.solver.term_structure) != jtu.tree_structure(0):
            raise ValueError(
                f"Reversible needs a base solver for a single term, got "
                f"{type(self.solver).__name__} with term structure "
                f"{self.solver.term_structure}"
            )
        if isinstance(self.coupling, (int, float)) and not 0 < self.coupling <= 1:
            raise ValueError(f"the coupling λ must lie in (0, 1], got {self.coupling}")

    @property
    def scan_kind(self):
        """The base solver's `scan_kind` (diffrax's adjoints read and set it on any solver
        that is, or wraps, a Runge–Kutta method)."""
        return self.solver.scan_kind

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return y0  # z_0 = y_0

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump  # the base solver is restarted at every step
        lam = self.coupling
        z0 = solver_state
        psi, y_error, result1 = _increment(self.solver, terms, t0, t1, z0, args)
        y1 = jtu.tree_map(lambda y, z, p: lam * y + (1 - lam) * z + p, y0, z0, psi)
        psi_back, _, result2 = _increment(self.solver, terms, t1, t0, y1, args)
        z1 = jtu.tree_map(lambda z, p: z - p, z0, psi_back)
        dense_info = dict(y0=y0, y1=y1)
        result = diffrax.RESULTS.where(result1 == diffrax.RESULTS.successful, result2, result1)
        return y1, y_error, dense_info, z1, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


class _Anchoring(Reversible):
    """`Reversible`, handing z_{n+1} to the step-size controller beside the error
    estimate (`_AnchoringController` stores it). Internal to `ReversibleAdjoint`."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_error, dense_info, z1, result = super().step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        return y1, (y_error, z1), dense_info, z1, result


class _AnchoringController(diffrax.AbstractStepSizeController):
    """Wraps the user's step-size controller and, on every `every`-th accepted step,
    writes (y_n, z_n) into slot n / every − 1 of the anchor buffers: an in-place
    dynamic update of one slot, no copy of the buffers. Internal to `ReversibleAdjoint`;
    its state is (the wrapped controller's state, accepted steps, anchors)."""

    controller: diffrax.AbstractStepSizeController
    every: int = eqx.field(static=True)

    def wrap(self, direction):
        return _AnchoringController(self.controller.wrap(direction), self.every)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        raise AssertionError("ReversibleAdjoint builds the anchoring state itself")

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        y_error, z1 = y_error
        inner, count, (y_anchors, z_anchors) = state
        keep, t_next0, t_next1, made_jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner
        )
        count = count + jnp.asarray(keep, count.dtype)
        num_slots = jtu.tree_leaves(y_anchors)[0].shape[0]
        slot = count // self.every - 1
        write = keep & (count % self.every == 0) & (slot < num_slots)
        slot = jnp.clip(slot, 0, num_slots - 1)

        def store(buffer, x):
            return buffer.at[slot].set(jnp.where(write, x, buffer[slot]))

        anchors = (
            jtu.tree_map(store, y_anchors, y1_candidate),
            jtu.tree_map(store, z_anchors, z1),
        )
        return keep, t_next0, t_next1, made_jump, (inner, count, anchors), result


def _max_abs(tree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jtu.tree_leaves(tree)]))


def _distance(x, anchor) -> jax.Array:
    """max |x − anchor| over the leaves of a pytree."""
    return _max_abs(jtu.tree_map(jnp.subtract, x, anchor))


def _known_steps(controller, t0, t1, dt0) -> int | None:
    """The number of steps when it is known before the solve: len(ts) − 1 for `StepTo`,
    ⌈(t1 − t0)/dt0⌉ for a constant step with concrete times; else None."""
    if isinstance(controller, diffrax.StepTo):
        return len(controller.ts) - 1
    if isinstance(controller, diffrax.ConstantStepSize) and dt0 is not None:
        try:
            return max(1, math.ceil((float(t1) - float(t0)) / float(dt0)))
        except (TypeError, jax.errors.ConcretizationTypeError):
            return None  # traced times
    return None


def _save_nothing(t, y, args):
    return jnp.zeros((0,), jnp.result_type(t))  # the step's time is saved beside it


@eqx.filter_custom_vjp
def _loop_reversible(y__args__terms, *, self, throw, init_state, **kwargs):
    del throw  # diffeqsolve raises after the loop
    y, args, terms = y__args__terms
    init_state = eqx.tree_at(lambda s: s.y, init_state, y)
    return self._loop(
        args=args,
        terms=terms,
        init_state=init_state,
        inner_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        outer_while_loop=ft.partial(eqxi.while_loop, kind="lax"),
        **kwargs,
    )


@_loop_reversible.def_fwd
def _loop_reversible_fwd(perturbed, y__args__terms, **kwargs):
    del perturbed
    final_state, aux_stats = _loop_reversible(y__args__terms, **kwargs)
    _, step_saves = final_state.save_state
    # Residuals: the step times t_1, …, t_N, N, (y_N, z_N) and the anchors.
    _, _, anchors = final_state.controller_state
    residuals = (
        step_saves.ts,
        final_state.num_accepted_steps,
        final_state.y,
        final_state.solver_state,
        anchors,
    )
    return (final_state, aux_stats), residuals


@_loop_reversible.def_bwd
def _loop_reversible_bwd(
    residuals,
    grad_final_state__aux_stats,
    perturbed,
    y__args__terms,
    *,
    self,
    solver,
    stepsize_controller,
    t0,
    **kwargs,
):
    del perturbed
    step_ts, num_steps, y_final, z_final, anchors = residuals
    every = stepsize_controller.every
    num_slots = jtu.tree_leaves(anchors)[0].shape[0]
    grad_final_state, _ = grad_final_state__aux_stats
    user_saves, _ = grad_final_state.save_state
    y0, args, terms = y__args__terms
    # ∂C/∂y_N and (if SaveAt(t0=True)) ∂C/∂y_0 from the cotangent of the saved ys.
    grad_ys = jtu.tree_map(
        lambda y, g: jnp.zeros((1,) + y.shape, y.dtype) if g is None else g,
        y0,
        user_saves.ys,
        is_leaf=lambda g: g is None,
    )
    save_t0 = kwargs["saveat"].subs[0].t0
    grad_y_final = jtu.tree_map(lambda g: g[-1], grad_ys)
    grad_y_initial = jtu.tree_map(lambda g: g[0], grad_ys) if save_t0 else None

    diff_args, static_args = eqx.partition(args, eqx.is_inexact_array)
    diff_terms, static_terms = eqx.partition(terms, eqx.is_inexact_array)
    base, lam = solver.solver, solver.coupling
    times = jnp.concatenate([jnp.asarray(t0, step_ts.dtype)[None], step_ts])

    def increment(ta, tb, x, d_args, d_terms):
        a = eqx.combine(d_args, static_args)
        tm = eqx.combine(d_terms, static_terms)
        return _increment(base, tm, ta, tb, x, a)[0]

    def step(carry):
        """One step back, n + 1 → n: the costate recursion of the module docstring."""
        n, y, z, y_bar, z_bar, params_bar, error = carry
        t_lo, t_hi = times[n - 1], times[n]
        # z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}) and its pullback, in one vjp.
        psi_back, pull_back = jax.vjp(
            lambda x, a, tm: increment(t_hi, t_lo, x, a, tm), y, diff_args, diff_terms
        )
        z = jtu.tree_map(jnp.add, z, psi_back)
        dy, *back_params_bar = pull_back(z_bar)
        y_hat = jtu.tree_map(jnp.subtract, y_bar, dy)
        # y_n = (y_{n+1} − (1 − λ) z_n − Ψ_h(t_n, z_n)) / λ and its pullback.
        psi, pull = jax.vjp(
            lambda x, a, tm: increment(t_lo, t_hi, x, a, tm), z, diff_args, diff_terms
        )
        y = jtu.tree_map(lambda y1, z0, p: (y1 - (1 - lam) * z0 - p) / lam, y, z, psi)
        dz, *step_params_bar = pull(y_hat)
        y_bar = jtu.tree_map(lambda g: lam * g, y_hat)
        z_bar = jtu.tree_map(lambda zb, g, d: zb + ((1 - lam) * g + d), z_bar, y_hat, dz)
        # the step's two parameter terms, summed before they meet the running sum
        step = jtu.tree_map(jnp.subtract, step_params_bar, back_params_bar)
        params_bar = jtu.tree_map(jnp.add, params_bar, step)
        return n - 1, y, z, y_bar, z_bar, params_bar, error

    def segment(carry):
        """Steps back to the previous multiple m of K, then replace the reconstructed
        (y_m, z_m) by its anchor (if it has one) and record their distance."""
        m = (carry[0] - 1) // every * every
        n, y, z, *rest, error = lax.while_loop(lambda c: c[0] > m, step, carry)
        slot = m // every - 1
        has = (slot >= 0) & (slot < num_slots)
        y_m, z_m = jtu.tree_map(lambda b: b[jnp.clip(slot, 0, num_slots - 1)], anchors)
        drift = jnp.maximum(_distance(y, y_m), _distance(z, z_m))
        error = jnp.where(has, jnp.maximum(error, drift), error)
        y, z = jtu.tree_map(ft.partial(jnp.where, has), (y_m, z_m), (y, z))
        return n, y, z, *rest, error

    zeros = jtu.tree_map(jnp.zeros_like, [diff_args, diff_terms])
    error = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(y0)))
    carry = (
        num_steps,
        y_final,
        z_final,
        grad_y_final,
        jtu.tree_map(jnp.zeros_like, y0),
        zeros,
        error,
    )
    _, y_rec, z_rec, y_bar, z_bar, params_bar, error = lax.while_loop(
        lambda c: c[0] > 0, segment, carry
    )
    args_bar, terms_bar = params_bar
    # The reconstruction ends at (y_0, z_0) = (y0, y0), which the caller gave. The
    # drift is relative to the largest state of the solve that we know of.
    error = jnp.maximum(error, jnp.maximum(_distance(y_rec, y0), _distance(z_rec, y0)))
    scale = jnp.maximum(_max_abs((y0, y_final, z_final, anchors)), jnp.finfo(error.dtype).tiny)
    error = error / scale
    y0_bar = jtu.tree_map(jnp.add, y_bar, z_bar)  # z_0 = y_0
    tol = self.reconstruction_rtol
    if tol is None:
        tol = jnp.sqrt(jnp.finfo(error.dtype).eps)
    y0_bar, args_bar, terms_bar = eqx.error_if(
        (y0_bar, args_bar, terms_bar),
        error > tol,
        "ReversibleAdjoint: the backward reconstruction of the reversible solve drifted "
        "from the forward states by more than reconstruction_rtol (relative); its "
        "gradient cannot be trusted. Store more anchors (ReversibleAdjoint(anchors=...)), "
        "raise the coupling, use float64, or use diffrax.RecursiveCheckpointAdjoint.",
    )
    if grad_y_initial is not None:
        y0_bar = jtu.tree_map(jnp.add, y0_bar, grad_y_initial)
    return y0_bar, args_bar, terms_bar


class ReversibleAdjoint(diffrax.AbstractAdjoint):
    """Backpropagate through `diffrax.diffeqsolve` with a `Reversible` solver in memory
    independent of the number of steps, exactly: the backward pass reconstructs each
    (y_n, z_n) from (y_{n+1}, z_{n+1}) by the closed-form inverse of the step and runs
    the discrete costate recursion of the scheme (see the module docstring),

        ȳ_n = λ ŷ,   z̄_n = z̄_{n+1} + (1 − λ) ŷ + (∂Ψ_h/∂z)ᵀ ŷ,
        ŷ = ȳ_{n+1} − (∂Ψ_{−h}/∂y)ᵀ z̄_{n+1},

    so the gradient is that of `diffrax.RecursiveCheckpointAdjoint` on the same solver
    and steps, to round-off (not an approximation like `diffrax.BacksolveAdjoint`'s).
    It stores the final (y_N, z_N) and one time per accepted step (adaptive steps are
    replayed from those times).

    Usage: `diffrax.diffeqsolve(term, Reversible(diffrax.Tsit5()), ...,
    saveat=diffrax.SaveAt(t1=True), adjoint=ReversibleAdjoint())`.

    **Arguments:**

    - `anchors`: S, the number of (y_n, z_n) pairs stored at evenly spaced accepted
      steps to re-anchor the reconstruction (see the module docstring): memory 2S
      states, independent of the number of steps; 0 stores none.
    - `anchor_every`: K, the spacing of the anchors in accepted steps. By default
      K = ⌈N / (S + 1)⌉ when the number of steps N is known before the solve (`StepTo`,
      or a constant step with concrete t0, t1, dt0), else ⌈max_steps / (S + 1)⌉, so
      that they cover a solve of up to max_steps steps. Round-off in the
      reconstruction grows at most as λ^{−K} between anchors.
    - `reconstruction_rtol`: the largest distance between the reconstructed and the
      stored states (at the anchors and at y_0), relative to the largest stored state,
      that the backward pass accepts before it raises (default √ε of the state's
      dtype: 3.5e-4 in float32, 1.5e-8 in float64).

    Gradients flow to `y0`, `args` and the arrays of `terms`, not to `t0`, `t1`, `dt0`
    or closed-over values (JAX raises a `CustomVJPException`). Reverse mode only, once:
    forward mode (`jax.jvp`) and so second derivatives raise JAX's "can't apply
    forward-mode autodiff (jvp) to a custom_vjp function" `TypeError`; use
    `diffrax.RecursiveCheckpointAdjoint` or `diffrax.DirectAdjoint` for those.
    Supported: a single ODE term, `SaveAt(t1=True)` optionally with `t0=True`, no
    events, a finite `max_steps`, no `solver_state`/`controller_state` passed in.
    """

    anchors: int = eqx.field(default=16, static=True)
    anchor_every: int | None = eqx.field(default=None, static=True)
    reconstruction_rtol: float | None = None

    def __check_init__(self):
        if not isinstance(self.anchors, int) or self.anchors < 0:
            raise ValueError(f"anchors must be an int ≥ 0, got {self.anchors!r}")
        if self.anchor_every is not None and (
            not isinstance(self.anchor_every, int) or self.anchor_every < 1
        ):
            raise ValueError(f"anchor_every must be an int ≥ 1, got {self.anchor_every!r}")

    def loop(
        self,
        *,
        args,
        terms,
        solver,
        saveat,
        init_state,
        passed_solver_state,
        passed_controller_state,
        event,
        max_steps,
        **kwargs,
    ):
        if not isinstance(solver, Reversible):
            raise ValueError(
                "ReversibleAdjoint needs a reversible solver, e.g. "
                f"solver=adjoint.Reversible(diffrax.Tsit5()); got {type(solver).__name__}"
            )
        if jtu.tree_structure(saveat.subs, is_leaf=_is_subsaveat) != jtu.tree_structure(0):
            raise NotImplementedError("ReversibleAdjoint does not support SaveAt(subs=...)")
        sub = saveat.subs
        if saveat.dense or sub.steps or sub.ts is not None or not sub.t1:
            raise NotImplementedError(
                "ReversibleAdjoint supports SaveAt(t1=True) (optionally with t0=True) "
                f"only, got {saveat}"
            )
        if sub.fn is not save_y:
            raise NotImplementedError("ReversibleAdjoint does not support SaveAt(fn=...)")
        if event is not None:
            raise NotImplementedError("ReversibleAdjoint is not compatible with events")
        if max_steps is None:
            raise ValueError("ReversibleAdjoint needs a finite max_steps (it stores step times)")
        if passed_solver_state or passed_controller_state:
            raise NotImplementedError(
                "ReversibleAdjoint does not support passing solver_state or controller_state"
            )
        if not isinstance(terms, diffrax.AbstractTerm) or isinstance(terms, diffrax.MultiTerm):
            raise NotImplementedError("ReversibleAdjoint supports a single ODE term")

        # Record the step times beside the user's saves: one scalar per step.
        steps_sub = diffrax.SubSaveAt(steps=True, fn=_save_nothing)
        times = jnp.full(max_steps, jnp.inf, dtype=jnp.result_type(init_state.tprev))
        steps_save = SaveState(
            saveat_ts_index=0, ts=times, ys=jnp.zeros((max_steps, 0), times.dtype), save_index=0
        )
        augmented = diffrax.SaveAt(subs=(sub, steps_sub))
        y = init_state.y
        init_state = eqx.tree_at(
            lambda s: (s.y, s.save_state),
            init_state,
            (object(), (init_state.save_state, steps_save)),
        )
        init_state = eqx.tree_at(
            lambda s: (s.solver_state, s.controller_state),
            init_state,
            replace_fn=lax.stop_gradient,
            is_leaf=lambda x: x is None,
        )
        # The anchors: S slots for (y_n, z_n), written every K accepted steps by the
        # controller (S = 0: one slot that is never written).
        if self.anchors == 0:
            every, slots = max_steps + 1, 1
        else:
            steps = _known_steps(
                kwargs["stepsize_controller"], kwargs["t0"], kwargs["t1"], kwargs["dt0"]
            )
            steps = max_steps if steps is None else min(steps, max_steps)
            every = self.anchor_every or -(-steps // (self.anchors + 1))
            slots = self.anchors
        buffers = jtu.tree_map(lambda x: jnp.zeros((slots,) + jnp.shape(x), jnp.result_type(x)), y)
        controller = _AnchoringController(kwargs.pop("stepsize_controller"), every)
        init_state = eqx.tree_at(
            lambda s: s.controller_state,
            init_state,
            (init_state.controller_state, jnp.zeros((), jnp.int32), (buffers, buffers)),
            is_leaf=lambda x: x is None,
        )
        final_state, aux_stats = _loop_reversible(
            (y, args, terms),
            self=self,
            saveat=augmented,
            init_state=init_state,
            solver=_Anchoring(solver.solver, solver.coupling),
            stepsize_controller=controller,
            event=event,
            max_steps=max_steps,
            **kwargs,
        )
        final_state = eqx.tree_at(
            lambda s: (s.save_state, s.controller_state),
            final_state,
            (final_state.save_state[0], final_state.controller_state[0]),
            is_leaf=lambda x: x is None,
        )
        final_state = _only_transpose_ys(final_state)
        return final_state, aux_stats


__all__ = ["Reversible", "ReversibleAdjoint"]
