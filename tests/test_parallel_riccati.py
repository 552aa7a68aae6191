"""ILQR(backward=ParallelRiccati()): the associative-scan backward pass equals the
sequential Riccati pass (and the LQR Riccati reference), solves to the same controls,
refuses bounds and DDP, and runs under jit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjoint import control, problems


@eqx.filter_jit
def _linearise(problem, u):
    """(lin, Xs, VxN, VxxN) of the LQ subproblem around (X(u), u), one initial state."""
    Xs = problem.rollout(u)[:, 0]
    ks = jnp.arange(problem.horizon, dtype=jnp.int32)

    def one(x, uk, k):
        fx, fu = jax.jacfwd(problem.f, argnums=(0, 1))(x, uk, k)
        lx, lu = jax.grad(problem.ell, argnums=(0, 1))(x, uk, k)
        (lxx, _), (lux, luu) = jax.hessian(problem.ell, argnums=(0, 1))(x, uk, k)
        return fx, fu, lx, lu, lxx, luu, lux

    lin = jax.vmap(one)(Xs[:-1], u, ks)
    return lin, Xs, ks, jax.grad(problem.phi)(Xs[-1]), jax.hessian(problem.phi)(Xs[-1])


def _both(problem, u, mu=0.0):
    lin, Xs, ks, VxN, VxxN = _linearise(problem, u)
    seq = eqx.filter_jit(control.SequentialRiccati())(
        control.ILQR(), problem.f, lin, Xs, u, ks, problem.lower, problem.upper, mu, VxN, VxxN
    )
    par = jax.jit(control.parallel_riccati)(lin, VxN, VxxN, mu)
    return seq, par, Xs


def _assert_same(seq, par, tol=1e-9):
    names = ("feedforward δu", "K", "dV", "ok", "V_X", "V_XX")
    assert bool(seq[3]) == bool(par[3]), "positive-definiteness flags differ"
    for name, a, b in zip(names, seq, par):
        if name == "ok":
            continue
        scale = 1 + float(jnp.max(jnp.abs(a)))
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= tol * scale, f"{name}: max |seq − par| = {err:.2e} (scale {scale:.2e})"


def test_lqr_equals_sequential_and_riccati_reference():
    A, B = ((1.0, 0.1), (0.0, 1.0)), ((0.0,), (0.1,))
    Q, R, P = ((1.0, 0.2), (0.2, 0.5)), ((0.5,),), ((3.0, 0.0), (0.0, 2.0))
    N = 40
    prob = problems.lqr(A, B, Q, R, P, x0=(1.0, -0.5), horizon=N, dtype=jnp.float64)
    u = 0.3 * jnp.sin(jnp.arange(N, dtype=jnp.float64))[:, None]  # any trajectory: LQ is exact
    seq, par, Xs = _both(prob, u)
    _assert_same(seq, par)
    du, K, _, ok, Vx, Vxx = par
    assert bool(ok)
    Ps, Ks = problems.riccati(A, B, Q, R, P, N)
    # cost XᵀQX (Hessian 2Q): V_XX(k) = 2P(k), V_X(k) = 2P(k)X(k), u* = −K_ref X
    np.testing.assert_allclose(Vxx, 2 * Ps, rtol=0, atol=1e-9 * np.abs(Ps).max())
    np.testing.assert_allclose(Vx, 2 * np.einsum("kij,kj->ki", Ps, Xs), atol=1e-9)
    np.testing.assert_allclose(K, -Ks, atol=1e-9)
    u_star = -np.einsum("kij,kj->ki", Ks, Xs[:-1])
    np.testing.assert_allclose(u + du, u_star, atol=1e-9)


# one unconstrained pendulum (Δt = 0.05) shared by the tests below, so that compiled
# solves are reused; other initial states / bounds are swapped in with eqx.tree_at
_PEND = problems.pendulum(horizon=40, duration=2.0, u_max=None, dtype=jnp.float64)
_N = _PEND.horizon


def _with(x0=None, upper=None):
    prob = _PEND
    if x0 is not None:
        prob = eqx.tree_at(lambda p: p.x0, prob, jnp.asarray(x0, jnp.float64).reshape(1, 2))
    if upper is not None:
        prob = eqx.tree_at(lambda p: p.upper, prob, jnp.full((_N, 1), upper, jnp.float64))
    return prob


def test_pendulum_linearisation_equals_sequential():
    prob = _with(x0=(0.4, -0.3))
    u = 2.0 * jnp.cos(0.2 * jnp.arange(_N, dtype=jnp.float64))[:, None]
    seq, par, _ = _both(prob, u)
    assert bool(seq[3]) and bool(par[3])
    _assert_same(seq, par)


def test_random_lq_with_cross_terms_and_regularisation():
    """m = 2, ℓ_uX ≠ 0. μ = 0: equal to the sequential pass. μ > 0: the exact DP of the
    LQ problem with ℓ_uu + μI (NumPy), with K = −(Q_uu + μI)⁻¹Q_uX as in the sequential
    pass given the same V_XX(k+1)."""
    rng = np.random.default_rng(0)
    N, n, m = 23, 3, 2
    fx, fu = 0.5 * rng.normal(size=(N, n, n)), rng.normal(size=(N, n, m))
    lx, lu = rng.normal(size=(N, n)), rng.normal(size=(N, m))
    H = rng.normal(size=(N, n + m, n + m))
    H = H @ H.transpose(0, 2, 1) + 0.1 * np.eye(n + m)
    lin = (fx, fu, lx, lu, H[:, :n, :n], H[:, n:, n:], H[:, n:, :n])
    S = rng.normal(size=(n, n))
    VxN, VxxN = rng.normal(size=n), S @ S.T
    for mu in (0.0, 0.3):
        Vx, Vxx = VxN, VxxN
        ref = {"du": [], "K": [], "Vx": [VxN], "Vxx": [VxxN]}
        for k in range(N - 1, -1, -1):
            f_x, f_u, l_x, l_u, l_xx, l_uu, l_ux = (a[k] for a in lin)
            Qx, Qu = l_x + f_x.T @ Vx, l_u + f_u.T @ Vx
            Qxx, Qux = l_xx + f_x.T @ Vxx @ f_x, l_ux + f_u.T @ Vxx @ f_x
            Quu_r = l_uu + f_u.T @ Vxx @ f_u + mu * np.eye(m)
            K, du = -np.linalg.solve(Quu_r, Qux), -np.linalg.solve(Quu_r, Qu)
            Vx, Vxx = Qx + Qux.T @ du, Qxx + Qux.T @ K
            for key, v in zip(ref, (du, K, Vx, Vxx)):
                ref[key].append(v)
        ref = {key: np.stack(v[::-1]) for key, v in ref.items()}
        du, K, _, ok, Vx_p, Vxx_p = jax.jit(control.parallel_riccati)(
            tuple(map(jnp.asarray, lin)), jnp.asarray(VxN), jnp.asarray(VxxN), mu
        )
        assert bool(ok)
        for key, got in zip(ref, (du, K, Vx_p, Vxx_p)):
            np.testing.assert_allclose(got, ref[key], rtol=1e-9, atol=1e-9, err_msg=key)


def test_solve_pendulum_parallel_equals_sequential():
    prob = _PEND
    u0 = jnp.zeros((_N, 1))
    seq = control.solve(prob, u0, control.ILQR())
    par = control.solve(prob, u0, control.ILQR(backward=control.ParallelRiccati()))
    assert bool(seq.converged) and bool(par.converged), (seq.message, par.message)
    assert float(par.cost) < 0.5 * float(prob.cost(u0))
    # the two backward passes agree to rounding, and so do the solves (measured 2.5e-14
    # and 1.1e-12, both after 52 iterations)
    np.testing.assert_allclose(par.controls, seq.controls, rtol=0, atol=1e-11)
    np.testing.assert_allclose(par.costates, seq.costates, rtol=0, atol=1e-10)


def test_solve_batch_of_initial_states():
    x0 = jnp.array([[0.0, 0.0], [0.3, -0.2]])
    prob = problems.pendulum(horizon=30, duration=2.0, u_max=None, x0=x0, dtype=jnp.float64)
    u0 = jnp.zeros((30, 1))
    seq = control.solve(prob, u0, control.ILQR())
    par = control.solve(prob, u0, control.ILQR(backward=control.ParallelRiccati()))
    assert bool(seq.converged) and bool(par.converged)
    np.testing.assert_allclose(par.controls, seq.controls, rtol=0, atol=1e-11)  # measured 1.1e-13


def test_float32():
    prob = problems.pendulum(horizon=20, duration=2.0, u_max=None, dtype=jnp.float32)
    u = jnp.full((20, 1), 0.5, jnp.float32)
    seq, par, _ = _both(prob, u)
    assert par[0].dtype == jnp.float32 and par[5].dtype == jnp.float32
    _assert_same(seq, par, tol=1e-4)


def test_bounds_with_parallel_raise():
    boxed = problems.pendulum(horizon=20, u_max=5.0, dtype=jnp.float64)
    method = control.ILQR(backward=control.ParallelRiccati())
    with pytest.raises(ValueError, match="unconstrained problem"):
        method.check_problem(boxed)
    control.ILQR().check_problem(boxed)  # the sequential pass takes bounds
    method.check_problem(_PEND)
    # solve checks before tracing: a ValueError
    one_sided = _with(upper=3.0)  # upper only, lower = −inf
    with pytest.raises(ValueError, match="unconstrained problem"):
        control.solve(one_sided, jnp.zeros((_N, 1)), method)
    # under the user's own jit the bounds are traced: the same message at run time
    with pytest.raises(Exception, match="unconstrained problem"):
        eqx.filter_jit(lambda p: control.solve(p, jnp.zeros((_N, 1)), method).controls)(one_sided)


def test_bad_backward_arguments():
    with pytest.raises(ValueError, match="second_order"):
        control.ILQR(second_order=True, backward=control.ParallelRiccati())
    with pytest.raises(TypeError, match="backward"):
        control.ILQR(backward="parallel")


def test_jit_and_vmap_over_initial_states():
    method = control.ILQR(backward=control.ParallelRiccati())

    @jax.jit
    def solved(x0):
        return control.solve(_with(x0=x0), jnp.zeros((_N, 1)), method).controls

    x0s = jnp.array([[0.0, 0.0], [0.2, 0.1]])
    batched = jax.vmap(solved)(x0s)
    for i in range(2):
        ref = control.solve(_with(x0=x0s[i]), jnp.zeros((_N, 1)), control.ILQR())
        np.testing.assert_allclose(batched[i], ref.controls, rtol=0, atol=1e-11)  # measured 4e-14


def test_sequential_reports_the_curvature_past_which_the_failing_stage_is_definite():
    """A concave control cost (R < 0): Q_uu = 2R + Bᵀ V_XX B < 0 at the last stage, so the
    pass fails there and `shift` = −Q_uu(N−1) (Gershgorin is exact for one control),
    which `ILQR` jumps μ past; at a definite problem `shift` is 0."""
    A, B = ((1.0, 0.1), (0.0, 1.0)), ((0.0,), (0.1,))
    Q, P = ((1.0, 0.0), (0.0, 1.0)), ((3.0, 0.0), (0.0, 2.0))
    N = 5
    for R, ok_expected in ((((-0.5,),), False), (((0.5,),), True)):
        prob = problems.lqr(A, B, Q, R, P, x0=(1.0, -0.5), horizon=N, dtype=jnp.float64)
        seq, _, _ = _both(prob, jnp.zeros((N, 1)))
        ok, shift = bool(seq[3]), float(seq[6])
        assert ok == ok_expected
        last = 2 * R[0][0] + 2 * (np.asarray(B).T @ np.asarray(P) @ np.asarray(B)).item()
        assert shift == (pytest.approx(-last, rel=1e-12) if not ok else 0.0)
