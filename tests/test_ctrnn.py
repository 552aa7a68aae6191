"""CTRNN: the Pineda–Almeida fixed point and its implicit (adjoint) gradient."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx
import pytest

import adjoint as adj

from .helpers import directional_fd, random_like, tree_max_rel_error, tree_vdot


TIGHT = dict(rtol=1e-13, atol=1e-13)
ADJOINTS = [
    adj.PinedaAdjoint(**TIGHT),
    adj.FixedPointAdjoint(optx.FixedPointIteration(**TIGHT)),
    adj.LinearSolveAdjoint(),
    adj.LinearSolveAdjoint(lx.GMRES(**TIGHT), dense=False),
]


def _net(getkey, n=5, **kwargs):
    kwargs.setdefault("forward", adj.Relaxation(**TIGHT))
    kwargs.setdefault("adjoint", adj.LinearSolveAdjoint())
    return adj.CTRNN(n, key=getkey(), **kwargs)


def _cost(net, inputs, target):
    """C = Σ_p |D_p − X*_p|² (plus a term in the inputs' gradient through X*)."""
    return jnp.sum((target - net(inputs)) ** 2)


def _unrolled_cost(net, inputs, target, steps=400):
    return jnp.sum((target - net.unrolled(inputs, steps)) ** 2)


def _grads(cost, net, inputs, target):
    return eqx.filter_grad(lambda pair: cost(pair[0], pair[1], target))((net, inputs))


@pytest.mark.parametrize(
    "activation, forward",
    [
        ("tanh", adj.Relaxation(**TIGHT)),
        (jax.nn.soft_sign, adj.FixedPointSolve(optx.FixedPointIteration(**TIGHT))),
    ],
)
def test_fixed_point_equation(getkey, activation, forward):
    net = _net(getkey, activation=activation, forward=forward, tau=jnp.linspace(0.5, 2.0, 5))
    inputs = jax.random.normal(getkey(), (4, 5))
    x = net(inputs)
    a = x @ net.weight.T + net.bias + inputs
    f = jnp.tanh(a) if activation == "tanh" else jax.nn.soft_sign(a)
    assert jnp.max(jnp.abs(x - f)) < 1e-11
    sol = net.solve(inputs)
    assert bool(sol.converged) and float(sol.residual) < 1e-11 and int(sol.num_steps) > 0
    assert jnp.allclose(sol.fixed_point, x, atol=1e-11)


@pytest.mark.parametrize("adjoint", ADJOINTS, ids=lambda a: type(a).__name__)
def test_implicit_gradient_matches_unrolled(getkey, adjoint):
    net = _net(getkey, adjoint=adjoint)
    inputs = jax.random.normal(getkey(), (3, 5))
    target = 0.5 * jax.random.normal(getkey(), (3, 5))
    g = eqx.filter_jit(_grads)(_cost, net, inputs, target)
    g_unrolled = _grads(_unrolled_cost, net, inputs, target)
    (gn, gi), (un, ui) = g, g_unrolled
    for ours, ref in ((gn.weight, un.weight), (gn.bias, un.bias), (gi, ui)):
        assert tree_max_rel_error(ours, ref) < 1e-7
    assert float(jnp.abs(un.weight).max()) > 1e-3  # a nontrivial gradient
    assert jnp.all(gn.tau == 0) and jnp.allclose(un.tau, 0)  # X* does not depend on τ


def test_optimistix_forward_and_finite_differences(getkey):
    net = _net(
        getkey,
        activation="sigmoid",
        forward=adj.FixedPointSolve(optx.FixedPointIteration(**TIGHT), max_steps=512),
        adjoint=adj.FixedPointAdjoint(optx.FixedPointIteration(**TIGHT), max_steps=512),
    )
    inputs = jax.random.normal(getkey(), (3, 5))
    target = jax.random.uniform(getkey(), (3, 5))
    params = eqx.filter(net, eqx.is_inexact_array)
    f = jax.jit(lambda p: _cost(eqx.combine(p, net), inputs, target))
    grads = jax.grad(f)(params)
    direction = random_like(getkey(), params)
    fd = directional_fd(f, params, direction, eps=1e-6)
    assert abs(float(tree_vdot(grads, direction)) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))
    g_unrolled = _grads(_unrolled_cost, net, inputs, target)[0]
    assert tree_max_rel_error(grads.weight, g_unrolled.weight) < 1e-7


def test_adjoint_solution_is_paper_costate(getkey):
    net = _net(getkey)
    inputs = jax.random.normal(getkey(), (3, 5))
    target = jax.random.normal(getkey(), (3, 5))
    x = net.solve(inputs).fixed_point
    dc_dx = -2 * (target - x)
    sol = net.solve_adjoint(x, inputs, dc_dx)
    b, y, d = sol.costate, sol.y, 1 - x**2
    # ∂Cᵀ/∂X + B − Wᵀ F'ᵀ B = 0, B(rest) = 2(D − X*) for the squared error.
    assert jnp.max(jnp.abs(dc_dx + b - (d * b) @ net.weight)) < 1e-12
    assert jnp.allclose(y, d * b) and bool(sol.converged) and float(sol.residual) < 1e-12
    # dC/dW = −Σ_p Y_p X*_pᵀ, the gradient jax.grad sees.
    assert jnp.allclose(sol.grads.weight, -y.T @ x)
    g = _grads(_cost, net, inputs, target)
    assert tree_max_rel_error(sol.grads.weight, g[0].weight) < 1e-10
    assert tree_max_rel_error(sol.input_grad, g[1]) < 1e-10


def test_spectral_radius_certificate(getkey):
    net = _net(getkey, n=6, spectral_norm=0.9)
    inputs = jax.random.normal(getkey(), (4, 6))
    sol = net.solve(inputs)
    d = 1 - sol.fixed_point**2
    exact = max(np.max(np.abs(np.linalg.eigvals(np.asarray(dp[:, None] * net.weight)))) for dp in d)
    assert abs(float(sol.spectral_radius) - exact) < 0.05 * exact
    assert float(sol.spectral_radius) < 1


def test_vmap_jit_and_float32(getkey):
    net = _net(getkey, forward=adj.FixedPointSolve(optx.FixedPointIteration(**TIGHT)))
    inputs = jax.random.normal(getkey(), (3, 5))
    target = jnp.full((3, 5), 0.2)
    assert jnp.allclose(net(inputs), jax.jit(jax.vmap(net))(inputs), atol=1e-12)
    # vmap of the gradient over two batches, and the gradient of a vmapped call.
    g = _grads(_cost, net, inputs, target)[0].weight
    gv = jax.vmap(lambda i: _grads(_cost, net, i, target)[0].weight)(jnp.stack([inputs, -inputs]))
    assert jnp.allclose(gv[0], g, atol=1e-12)
    g_of_vmap = eqx.filter_grad(lambda n: jnp.sum((target - jax.vmap(n)(inputs)) ** 2))(net).weight
    assert jnp.allclose(g_of_vmap, g, atol=1e-12)
    # float32 with the diffrax strategies (Relaxation, PinedaAdjoint; the defaults until
    # the fixed-point iterations became the default), at float32's default tolerances.
    net32 = adj.CTRNN(
        weight=net.weight.astype(jnp.float32),
        bias=net.bias.astype(jnp.float32),
        forward=adj.Relaxation(),
        adjoint=adj.PinedaAdjoint(),
    )
    assert net32.weight.dtype == jnp.float32 and net32.tau.dtype == jnp.float32
    g32 = eqx.filter_jit(_grads)(_cost, net32, inputs.astype("f4"), target.astype("f4"))
    assert g32[0].weight.dtype == jnp.float32 and g32[1].dtype == jnp.float32
    assert tree_max_rel_error(g32[0].weight, g) < 1e-4


def _limit_cycle_net(**kwargs):
    # Origin unstable (eigenvalues 1 ± 2i of W − 1): the relaxation settles on a limit cycle.
    w = 2.0 * jnp.array([[1.0, -1.0], [1.0, 1.0]])
    return adj.CTRNN(weight=w, bias=jnp.zeros(2), **kwargs)


def test_forward_non_convergence_raises():
    inputs = jnp.array([[0.1, 0.0]])
    for forward in (adj.Relaxation(max_steps=300), adj.FixedPointSolve(max_steps=300)):
        net = _limit_cycle_net(forward=forward)
        sol = net.solve(inputs, throw=False)
        assert not bool(sol.converged) and float(sol.residual) > 1e-2
        assert sol.result == adj.RESULTS.max_steps_reached
        with pytest.raises(eqx.EquinoxRuntimeError, match="did not reach a fixed point"):
            eqx.filter_jit(net)(inputs).block_until_ready()
    # and through jax.grad: the forward of the custom VJP raises, no gradient is returned
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not reach a fixed point"):
        eqx.filter_jit(jax.grad(lambda i: net(i).sum()))(inputs).block_until_ready()


def test_too_few_steps_raises(getkey):
    net = _net(getkey, forward=adj.Relaxation(**TIGHT, max_steps=3))
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not reach a fixed point"):
        net(jnp.ones((2, 5))).block_until_ready()


def test_adjoint_non_convergence_raises_and_pineda_does_not():
    # A stable spiral (eigenvalues of W F' − 1 ≈ −1 ± 2i) where W F' has spectral radius ≈ 2:
    # the relaxation and Pineda's backward ODE converge, the plain iteration does not.
    w = jnp.array([[0.0, 2.0], [-2.0, 0.0]])
    inputs = jnp.array([[0.1, 0.05], [-0.05, 0.1]])
    target = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    base = adj.CTRNN(weight=w, forward=adj.Relaxation(**TIGHT))
    assert float(base.solve(inputs).spectral_radius) > 1.5
    nets = {
        name: eqx.tree_at(lambda s: s.adjoint, base, a)
        for name, a in [
            ("pineda", adj.PinedaAdjoint(**TIGHT)),
            ("lineax", adj.LinearSolveAdjoint()),
            ("iteration", adj.FixedPointAdjoint(max_steps=200)),
        ]
    }
    grads = {
        k: eqx.filter_jit(eqx.filter_grad(lambda n: _cost(n, inputs, target)))(v)
        for k, v in list(nets.items())[:2]
    }
    assert tree_max_rel_error(grads["pineda"].weight, grads["lineax"].weight) < 1e-9
    with pytest.raises(eqx.EquinoxRuntimeError, match="adjoint"):
        eqx.filter_jit(eqx.filter_grad(lambda n: _cost(n, inputs, target)))(
            nets["iteration"]
        ).weight.block_until_ready()
    x = base.solve(inputs).fixed_point
    sol = nets["iteration"].solve_adjoint(x, inputs, -2 * (target - x), throw=False)
    assert not bool(sol.converged)
    with pytest.raises(eqx.EquinoxRuntimeError, match="adjoint"):
        nets["iteration"].solve_adjoint(x, inputs, -2 * (target - x)).costate.block_until_ready()
    # The forward iteration itself does not converge here either.
    fp = eqx.tree_at(lambda s: s.forward, base, adj.FixedPointSolve(max_steps=200))
    assert not bool(fp.solve(inputs, throw=False).converged)


def test_construction_errors(getkey):
    with pytest.raises(ValueError, match="square"):
        adj.CTRNN(weight=jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="bias"):
        adj.CTRNN(weight=jnp.zeros((2, 2)), bias=jnp.zeros(3))
    with pytest.raises(ValueError, match="tau must be positive"):
        adj.CTRNN(weight=jnp.zeros((2, 2)), tau=jnp.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="tau must be a scalar"):
        adj.CTRNN(weight=jnp.zeros((2, 2)), tau=jnp.ones(3))
    with pytest.raises(ValueError, match="size"):
        adj.CTRNN(0, key=getkey())
    with pytest.raises(ValueError, match="key"):
        adj.CTRNN(3)
    with pytest.raises(TypeError, match="forward"):
        adj.CTRNN(3, key=getkey(), forward=diffrax.Tsit5())
    with pytest.raises(TypeError, match="adjoint"):
        adj.CTRNN(3, key=getkey(), adjoint=lx.LU())
    with pytest.raises(ValueError, match="activation"):
        adj.CTRNN(3, "nope", key=getkey())
    net = adj.CTRNN(3, key=getkey())
    with pytest.raises(ValueError, match=r"inputs must have shape \(3,\) or \(P, 3\)"):
        net(jnp.ones((2, 4)))


def test_continuous_learning(getkey):
    net = _net(getkey, n=4)
    inputs = jax.random.normal(getkey(), (3, 4))
    target = jax.random.uniform(getkey(), (3, 4), minval=-0.5, maxval=0.5)  # reachable by tanh

    def cost(x):
        return jnp.sum((target - x) ** 2)

    # Started at X*, B*, a short run moves W by −(t1/τ_w) dC/dW (the gradient flow).
    x = net.solve(inputs).fixed_point
    adjoint_sol = net.solve_adjoint(x, inputs, -2 * (target - x))
    short = adj.continuous_learning(
        net, inputs, cost, t1=1e-3, tau_w=1.0, x0=x, b0=adjoint_sol.costate, num_saves=7
    )
    dw = short.ctrnn.weight - net.weight
    assert tree_max_rel_error(dw, -1e-3 * adjoint_sol.grads.weight) < 3e-5  # measured 2.6e-7
    # A long run from rest lowers the cost at the fixed point of the trained network.
    long = adj.continuous_learning(net, inputs, cost, t1=60.0, tau_w=5.0, num_saves=7)
    before = float(cost(net(inputs)))
    after = float(cost(long.ctrnn(inputs)))
    assert after < 0.7 * before and long.costs[-1] < long.costs[1]
    assert long.weights.shape == (7, 4, 4) and long.costates.shape == (7, 3, 4)


@pytest.mark.parametrize(
    "forward", [adj.Relaxation(**TIGHT), adj.FixedPointSolve()], ids=["diffrax", "optimistix"]
)
def test_unstable_fixed_point_is_refused(forward):
    """W = 2·1, b = I = 0, x0 = 0: X* = 0 solves X = tanh(W X) and the solver stops there
    at once, but the relaxation runs away from it (W F' − 1 = 1): a nudge lands on
    X ≈ ±0.96, so the implicit gradient at 0 is not the network's. Not converged."""
    net = adj.CTRNN(weight=2 * jnp.eye(2), forward=forward, adjoint=adj.LinearSolveAdjoint())
    inputs = jnp.zeros((1, 2))
    sol = net.solve(inputs, throw=False)
    assert float(sol.residual) == 0 and float(sol.spectral_radius) == pytest.approx(2, rel=1e-6)
    assert not bool(sol.stable) and not bool(sol.converged)
    with pytest.raises(eqx.EquinoxRuntimeError, match="not an attractor of the relaxation"):
        net.solve(inputs).fixed_point.block_until_ready()
    with pytest.raises(eqx.EquinoxRuntimeError, match="not an attractor of the relaxation"):
        eqx.filter_jit(eqx.filter_grad(lambda n: jnp.sum((n(inputs) - 0.3) ** 2)))(
            net
        ).weight.block_until_ready()
    a = net.solve_adjoint(sol.fixed_point, inputs, jnp.ones((1, 2)), throw=False)
    assert not bool(a.stable) and not bool(a.converged)
    with pytest.raises(eqx.EquinoxRuntimeError, match="not an attractor"):
        net.solve_adjoint(sol.fixed_point, inputs, jnp.ones((1, 2))).costate.block_until_ready()
    if isinstance(forward, adj.Relaxation):  # where the network does settle: stable
        nudged = net.solve(inputs + 1e-4)
        assert bool(nudged.stable) and bool(jnp.all(jnp.abs(nudged.fixed_point) > 0.9))


def test_stability_depends_on_tau():
    """F = identity, W with eigenvalues 0 and 0.5: the iteration X ← W X + I converges,
    but with τ = (0.01, 100) the relaxation's Jacobian diag(1/τ)(W − 1) has trace > 0."""
    w = jnp.array([[1.5, 1.0], [-1.5, -1.0]])
    inputs = jnp.array([[0.3, -0.2]])
    fast = adj.CTRNN(activation="identity", weight=w, forward=adj.FixedPointSolve(max_steps=512))
    assert bool(fast.solve(inputs).converged)
    skewed = eqx.tree_at(lambda s: s.tau, fast, jnp.array([0.01, 100.0]))
    sol = skewed.solve(inputs, throw=False)
    assert float(sol.residual) < 1e-5 and not bool(sol.stable) and not bool(sol.converged)


def test_activation_that_mixes_units_is_refused():
    w = 0.3 * jnp.eye(3)
    with pytest.raises(ValueError, match="not elementwise"):
        adj.CTRNN(weight=w, activation=lambda a: a / jnp.linalg.norm(a))
    with pytest.raises(ValueError, match="not elementwise"):  # mixes the patterns
        adj.CTRNN(weight=w, activation=lambda a: a - jnp.mean(a, axis=0))
    adj.CTRNN(weight=w, activation=jax.nn.soft_sign)


def test_mixed_dtypes_gradients_in_each_control_dtype(getkey):
    """float16 controls, float32 inputs: the relaxation and the adjoint run in float32,
    and the custom VJP returns each gradient in its control's dtype, as jax.grad does."""
    wide = adj.CTRNN(3, key=getkey(), dtype=jnp.float32, adjoint=adj.LinearSolveAdjoint())
    net = eqx.tree_at(
        lambda n: (n.weight, n.bias, n.tau),
        wide,
        tuple(a.astype(jnp.float16) for a in (wide.weight, wide.bias, wide.tau)),
    )
    inputs = jax.random.normal(getkey(), (2, 3), jnp.float32)
    g, gi = eqx.filter_grad(lambda args: jnp.sum(jnp.sin(args[0](args[1]))))((net, inputs))
    assert g.weight.dtype == g.bias.dtype == g.tau.dtype == jnp.float16
    assert gi.dtype == jnp.float32
    ref = eqx.filter_grad(lambda n: jnp.sum(jnp.sin(n(inputs))))(wide)
    assert tree_max_rel_error(g.weight.astype("f4"), ref.weight) < 1e-2
    # and the random initialisation works in float16 (its spectral norm is taken wider)
    assert adj.CTRNN(3, key=getkey(), dtype=jnp.float16).weight.dtype == jnp.float16


def _numpy_fixed_point(weight, bias, inputs):
    """X* = tanh(W X* + b + I) by the plain iteration in NumPy float64, to rounding: an
    independent reference."""
    weight, bias, inputs = (np.asarray(a, np.float64) for a in (weight, bias, inputs))
    x = np.zeros_like(inputs)
    for _ in range(2000):
        x, previous = np.tanh(x @ weight.T + bias + inputs), x
        if np.max(np.abs(x - previous)) == 0:
            break
    return x


def test_defaults_are_the_iterations_at_the_dtypes_tolerance(getkey):
    """`CTRNN()` iterates X ← F(W X + b + I) and B ← Wᵀ F'ᵀ B − ∂Cᵀ/∂X to
    `default_tol(dtype)`: the float64 fixed point to 1e-10 (the old default, 1e-6 in
    every dtype, left it ~1e-7 off), its gradient that of the unrolled relaxation and of
    finite differences, and float32 to its own tolerance."""
    assert adj.CTRNN.default_tol(jnp.float64) == 1e-10
    assert adj.CTRNN.default_tol(jnp.float32) == pytest.approx(100 * np.finfo(np.float32).eps)
    net = adj.CTRNN(6, key=getkey(), spectral_norm=0.9)
    assert isinstance(net.forward, adj.FixedPointSolve)
    assert isinstance(net.adjoint, adj.FixedPointAdjoint)
    inputs = jax.random.normal(getkey(), (4, 6))
    target = 0.5 * jax.random.normal(getkey(), (4, 6))
    reference = _numpy_fixed_point(net.weight, net.bias, inputs)
    solve = eqx.filter_jit(lambda n, i: n.solve(i, throw=False))
    for dtype, tol in ((jnp.float64, 1e-10), (jnp.float32, 3e-5)):
        cast = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, net)
        sol = solve(cast, inputs.astype(dtype))
        x = sol.fixed_point
        assert x.dtype == dtype and sol.result == adj.RESULTS.successful and bool(sol.converged)
        assert (
            float(
                jnp.max(jnp.abs(jnp.tanh(x @ cast.weight.T + cast.bias + inputs.astype(dtype)) - x))
            )
            < tol
        )
        assert float(np.max(np.abs(np.asarray(x, np.float64) - reference))) < tol
    assert int(sol.num_steps) < int(solve(net, inputs).num_steps)  # float32 stops sooner
    grads = eqx.filter_jit(_grads)(_cost, net, inputs, target)[0]
    unrolled = _grads(_unrolled_cost, net, inputs, target)[0]
    assert tree_max_rel_error(grads.weight, unrolled.weight) < 1e-8
    assert tree_max_rel_error(grads.bias, unrolled.bias) < 1e-8
    # central differences of C = Σ_p |D_p − X*_p|² along a random (δW, δb), in NumPy
    dw, db = jax.random.normal(getkey(), (6, 6)), jax.random.normal(getkey(), (6,))
    eps = 1e-6

    def cost(sign):
        x = _numpy_fixed_point(net.weight + sign * eps * dw, net.bias + sign * eps * db, inputs)
        return np.sum((np.asarray(target) - x) ** 2)

    fd = (cost(1) - cost(-1)) / (2 * eps)
    ours = float(jnp.vdot(grads.weight, dw) + jnp.vdot(grads.bias, db))
    assert abs(ours - fd) < 1e-7 * max(1.0, abs(fd))


def test_singular_or_unconverged_fixed_point_gives_no_gradient():
    """With the defaults, F = identity (F' = 1), so the Jacobian of the relaxation is
    J = W − 1. No record says `converged` and no gradient comes out when J is singular
    (also to within rounding), the iteration does not converge, or X* is not finite."""
    solve = eqx.filter_jit(lambda n, i: n.solve(i, throw=False))
    grad = eqx.filter_jit(eqx.filter_grad(lambda n, i: jnp.sum((n(i) - 0.3) ** 2)))
    inputs = jnp.array([[0.0, 0.3]])
    cases = [
        # X* = (0, 0.6) exactly; J = diag(0, −0.5) singular: 1 − W F' has no inverse
        (jnp.diag(jnp.array([1.0, 0.5])), inputs, adj.RESULTS.unstable, "not an attractor"),
        # J = diag(−1e-12, −0.5): stable on paper, singular to rounding (dC/dX* ~ 1e12)
        (jnp.diag(jnp.array([1 - 1e-12, 0.5])), inputs, adj.RESULTS.unstable, "not an attractor"),
        # W a rotation by 90°: X* = (1 − W)⁻¹ I is an attractor (J = W − 1 has eigenvalues
        # −1 ± i) but X ← W X + I cycles with period 4 (ρ(W) = 1): max_steps
        (jnp.array([[0.0, 1.0], [-1.0, 0.0]]), inputs, adj.RESULTS.max_steps_reached, "did not"),
        (0.5 * jnp.eye(2), inputs.at[0, 0].set(jnp.nan), adj.RESULTS.nonfinite, "did not"),
    ]
    for w, i, result, message in cases:
        net = adj.CTRNN(activation="identity", weight=w)
        sol = solve(net, i)
        assert sol.result == result and not bool(sol.converged)
        assert bool(sol.stable) == (result != adj.RESULTS.unstable)
        with pytest.raises(eqx.EquinoxRuntimeError, match=message):
            grad(net, i).weight.block_until_ready()
