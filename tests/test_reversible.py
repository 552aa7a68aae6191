"""`ReversibleAdjoint`: exact gradients of reversible solves in O(1) memory, checked
against `jax.grad` through the same solve with `diffrax.RecursiveCheckpointAdjoint`."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import adjoint as adj

from .helpers import directional_fd, random_like, tree_max_rel_error, tree_vdot


def _nonlinear(t, y, p):
    # pytree state (position, velocity) and pytree parameters
    x, v = y["x"], y["v"]
    return {"x": v, "v": -p["k"] * jnp.sin(x) - p["c"][0] * v + 0.1 * jnp.cos(t)}


def _cost(p, y0, adjoint, controller, solver=adj.Reversible(diffrax.Tsit5())):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_nonlinear),
        solver,
        0.0,
        2.0,
        0.1,
        y0,
        args=p,
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=controller,
        adjoint=adjoint,
        max_steps=256,
    )
    return jnp.sum(sol.ys["x"][-1] ** 2) + jnp.sum(jnp.cos(sol.ys["v"][-1]))


# One compilation per (adjoint, controller), reused across cases with traced inputs.
_grad = eqx.filter_jit(jax.grad(_cost, argnums=(0, 1)))


@pytest.fixture
def nonlinear(getkey):
    p = {"k": jnp.array([1.3, 0.7]), "c": [jnp.array(0.2)]}
    y0 = {"x": jax.random.normal(getkey(), (2,)), "v": jnp.array([0.1, -0.4])}
    return p, y0


@pytest.mark.parametrize(
    "controller, solver",
    [
        (diffrax.ConstantStepSize(), adj.Reversible(diffrax.Tsit5())),
        # a two-stage base keeps the compilation cheap; its embedded Euler error
        # estimate drives the adaptive steps
        (diffrax.PIDController(rtol=1e-4, atol=1e-6), adj.Reversible(diffrax.Heun())),
    ],
    ids=["constant", "adaptive"],
)
def test_nonlinear_pytree_equals_recursive_checkpoint(nonlinear, controller, solver, getkey):
    p, y0 = nonlinear
    ours = _grad(p, y0, adj.ReversibleAdjoint(), controller, solver)
    ref = _grad(p, y0, diffrax.RecursiveCheckpointAdjoint(), controller, solver)
    assert tree_max_rel_error(ours, ref) < 1e-10
    assert float(jnp.abs(ours[0]["k"]).max()) > 1e-2
    if isinstance(controller, diffrax.ConstantStepSize):
        # finite differences of the forward alone (float64); with adaptive steps the
        # step sizes move with the parameters, which the discrete gradient leaves out
        direction = random_like(getkey(), p)
        forward = eqx.filter_jit(_cost)
        fd = directional_fd(
            lambda q: forward(q, y0, diffrax.RecursiveCheckpointAdjoint(), controller),
            p,
            direction,
        )
        g = float(tree_vdot(ours[0], direction))
        assert abs(g - float(fd)) < 1e-7 * max(1, abs(float(fd)))


@pytest.mark.parametrize("base", [diffrax.Midpoint(), diffrax.Euler()], ids=["tableau", "step"])
def test_linear_and_saveat_t0(base):
    """dy/dt = A y, C = |y(T)|² + y(0)·y(0) saved at t0 too: exact for the scheme, with
    a base stepped from its Butcher tableau (Midpoint) or by its own `step` (Euler)."""
    a = jnp.array([[-0.5, 1.0], [-1.0, -0.2]])

    def cost(a, y0, adjoint):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, a: a @ y),
            adj.Reversible(base, coupling=0.9),
            0.0,
            3.0,
            0.05,
            y0,
            args=a,
            saveat=diffrax.SaveAt(t0=True, t1=True),
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys[-1] ** 2) + jnp.sum(sol.ys[0] ** 2)

    y0 = jnp.array([1.0, 0.5])
    grad = eqx.filter_jit(jax.grad(cost, argnums=(0, 1)))
    ours = grad(a, y0, adj.ReversibleAdjoint())
    ref = grad(a, y0, diffrax.RecursiveCheckpointAdjoint())
    assert tree_max_rel_error(ours, ref) < 1e-10


def test_mlp_parameters_vmap_and_costate_ode():
    """An `eqx.nn.MLP` (non-array leaves) as parameters, through `costate_ode` (reversible by
    default) and under `jax.vmap` over initial states."""
    mlp = eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
    vf = lambda t, x, w: w(x)
    kw = dict(t0=0.0, t1=1.0, dt0=0.05, terminal_cost=lambda x: jnp.sum(x**2))
    kw["solver"] = diffrax.Midpoint()  # any base; a cheap one keeps compilation short
    x0s = jnp.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.0]])

    def reference(m, x0):
        ys = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, m: m(x)),
            adj.Reversible(diffrax.Midpoint()),
            0.0,
            1.0,
            0.05,
            x0,
            args=m,
        ).ys
        return jnp.sum(ys[-1] ** 2)

    batched = eqx.filter_jit(
        jax.vmap(lambda x0: eqx.filter_grad(lambda m: adj.trajectory_cost(vf, m, x0, **kw))(mlp))
    )(x0s)
    refs = eqx.filter_jit(jax.vmap(lambda x0: eqx.filter_grad(reference)(mlp, x0)))(x0s)
    assert tree_max_rel_error(eqx.filter(batched, eqx.is_array), refs) < 1e-10
    sol = adj.costate_ode(vf, mlp, x0s[0], **kw)
    first = jax.tree.map(lambda g: g[0], refs)
    assert tree_max_rel_error(eqx.filter(sol.grads, eqx.is_array), first) < 1e-10


def test_second_order_and_unsupported_uses_raise(nonlinear):
    p, y0 = nonlinear
    constant = diffrax.ConstantStepSize()
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.hessian(lambda k: _cost(dict(p, k=k), y0, adj.ReversibleAdjoint(), constant))(p["k"])
    # the docstring's way to second derivatives: `DirectAdjoint` on the same solver
    midpoint = adj.Reversible(diffrax.Midpoint())
    hessian = jax.hessian(
        lambda k: _cost(dict(p, k=k), y0, diffrax.DirectAdjoint(), constant, midpoint)
    )
    grad = jax.jit(
        jax.grad(lambda k: _cost(dict(p, k=k), y0, adj.ReversibleAdjoint(), constant, midpoint))
    )
    h, e = 1e-5, jnp.array([1.0, -0.5])
    fd = (grad(p["k"] + h * e) - grad(p["k"] - h * e)) / (2 * h)
    assert jnp.allclose(hessian(p["k"]) @ e, fd, rtol=1e-6, atol=1e-8)

    def solve(solver=adj.Reversible(diffrax.Tsit5()), **kw):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_nonlinear),
            solver,
            0.0,
            1.0,
            0.1,
            y0,
            args=p,
            adjoint=adj.ReversibleAdjoint(),
            **kw,
        )

    with pytest.raises(ValueError, match="needs a reversible solver"):
        solve(solver=diffrax.Tsit5())
    with pytest.raises(NotImplementedError, match="SaveAt"):
        solve(saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, 1.0, 3)))
    with pytest.raises(NotImplementedError, match="SaveAt"):
        solve(saveat=diffrax.SaveAt(steps=True))
    with pytest.raises(ValueError, match="finite max_steps"):
        solve(max_steps=None)
    with pytest.raises(ValueError, match="coupling"):
        adj.Reversible(diffrax.Tsit5(), coupling=0.0)
    growth = dict(t0=0.0, t1=1.0, dt0=0.1, terminal_cost=jnp.sum)  # dX/dt = a X
    with pytest.raises(ValueError, match="backward_solver"):
        adj.costate_ode(
            lambda t, x, a: a * x,
            jnp.asarray(0.3),
            jnp.ones(1),
            **growth,
            backward_solver=diffrax.Bosh3(),
        )
    with pytest.raises(ValueError, match="mode must be one of"):
        adj.costate_ode(
            lambda t, x, a: a * x, jnp.asarray(0.3), jnp.ones(1), **growth, mode="backsolve"
        )


def _rotation_cost(a, y0, adjoint, steps=200, coupling=0.9):
    """dy/dt = A y on [0, 1] with a strong coupling λ = 0.9: the inverse step amplifies
    round-off by 1/λ a step, 0.9⁻²⁰⁰ ≈ 10⁹ over the whole solve."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, a: a @ y),
        adj.Reversible(diffrax.Midpoint(), coupling=coupling),
        0.0,
        1.0,
        1.0 / steps,
        y0,
        args=a,
        saveat=diffrax.SaveAt(t1=True),
        adjoint=adjoint,
        max_steps=steps,
    )
    return jnp.sum(sol.ys[-1] ** 2)


def test_anchors_bound_the_reconstruction_and_drift_raises():
    """Without anchors the reconstruction drifts by ~1e-7 (float64) and the backward pass
    raises rather than return that gradient; the default anchors (every 12th of 200
    steps, growth 0.9⁻¹² ≈ 3.5) keep it exact."""
    a = jnp.array([[0.0, 3.0], [-3.0, 0.0]])
    y0 = jnp.array([1.0, 0.5])
    grad = eqx.filter_jit(jax.grad(_rotation_cost, argnums=(0, 1)))
    ref = grad(a, y0, diffrax.RecursiveCheckpointAdjoint())
    assert tree_max_rel_error(grad(a, y0, adj.ReversibleAdjoint()), ref) < 1e-12
    with pytest.raises(Exception, match="reconstruction"):
        jax.block_until_ready(grad(a, y0, adj.ReversibleAdjoint(anchors=0)))
    with pytest.raises(ValueError, match="anchors"):
        adj.ReversibleAdjoint(anchors=-1)
    with pytest.raises(ValueError, match="anchor_every"):
        adj.ReversibleAdjoint(anchor_every=0)


def test_float32_anchored_as_accurate_as_recursive_checkpoint_over_long_solves():
    """float32, 2,000 steps at λ = 0.995: unanchored, round-off grows by e^10 in the
    reconstruction (a 1e-3 gradient error; the default check would raise); anchored, the gradient
    is as close to the float64 one (on the same float32 time grid) as diffrax's
    `RecursiveCheckpointAdjoint` in float32."""
    n, batch, steps = 16, 4, 2_000
    k1, k2 = jax.random.split(jax.random.key(3))
    w = 1.5 * jax.random.normal(k1, (n, n)) / n**0.5
    x0 = jax.random.normal(k2, (batch, n))
    ts = jnp.linspace(0.0, 1.0, steps + 1).astype(jnp.float32)

    def cost(w, x0, adjoint):
        t = ts.astype(x0.dtype)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, x, w: jnp.tanh(x @ w.T)),
            adj.Reversible(diffrax.Midpoint(), coupling=0.995),
            t[0],
            t[-1],
            None,
            x0,
            args=w,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.StepTo(ts=t),
            adjoint=adjoint,
            max_steps=steps,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    grad = eqx.filter_jit(jax.grad(cost))
    exact = grad(w, x0, diffrax.RecursiveCheckpointAdjoint())
    w32, x32 = w.astype(jnp.float32), x0.astype(jnp.float32)

    def error(adjoint):
        g = grad(w32, x32, adjoint)
        assert g.dtype == jnp.float32
        return float(jnp.max(jnp.abs(g.astype(jnp.float64) - exact)) / jnp.max(jnp.abs(exact)))

    ours, reference = error(adj.ReversibleAdjoint()), error(diffrax.RecursiveCheckpointAdjoint())
    assert ours < 1e-4
    assert ours < 1.5 * reference
    assert error(adj.ReversibleAdjoint(anchors=0, reconstruction_rtol=1.0)) > 30 * ours
