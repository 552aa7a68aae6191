"""The backward pass of iLQR in parallel over time (Särkkä & García-Fernández, "Temporal
Parallelization of Dynamic Programming and Linear Quadratic Control", IEEE TAC 2023).

Around the current trajectory, Gauss–Newton iLQR solves the LQ subproblem in the
deviations (δX, δu), with ℓ_uu regularised to R = ℓ_uu + μI:

    min Σ_k ½[δX; δu]ᵀ[ℓ_XX ℓ_Xu; ℓ_uX R][δX; δu] + ℓ_Xᵀ δX + ℓ_uᵀ δu
        + ½ δX(N)ᵀ φ_XX δX(N) + φ_Xᵀ δX(N)
    s.t. δX(k+1) = f_X δX(k) + f_u δu(k).

Substituting δu = w − R⁻¹(ℓ_uX δX + ℓ_u) removes the cross term: stage k becomes
½ δXᵀ Q̃ δX + q̃ᵀ δX + ½ wᵀRw with δX(k+1) = F δX + c + f_u w, where
F = f_X − f_u R⁻¹ℓ_uX, c = −f_u R⁻¹ℓ_u, Q̃ = ℓ_XX − ℓ_XuR⁻¹ℓ_uX, q̃ = ℓ_X − ℓ_XuR⁻¹ℓ_u.

The conditional value function of stages i..j−1, the least cost of going from δX(i) = x
to δX(j) = y, has the form

    V_{i→j}(x, y) = ½ xᵀJx − ηᵀx + max_λ [λᵀ(y − Ax − b) − ½ λᵀCλ]   (+ a constant),

one stage giving the element (A, b, C, η, J) = (F, c, f_u R⁻¹ f_uᵀ, −q̃, Q̃) and the
terminal cost (0, 0, 0, −φ_X, φ_XX). Minimising over the middle state combines two
elements associatively (i before j; M = I + C_i J_j):

    A_ij = A_j M⁻¹ A_i                  b_ij = A_j M⁻¹ (b_i + C_i η_j) + b_j
    C_ij = A_j M⁻¹ C_i A_jᵀ + C_j       η_ij = A_iᵀ M⁻ᵀ (η_j − J_j b_i) + η_i
    J_ij = A_iᵀ M⁻ᵀ J_j A_i + J_i

so `jax.lax.associative_scan` (reverse) gives every suffix k..N, i.e. the value function
V(k)(δX) = ½ δXᵀ V_XX(k) δX + V_X(k)ᵀ δX with V_XX(k) = J, V_X(k) = −η, in O(log N)
depth (O(N n³) work instead of the sequential O(N n²·…)). The gains then follow stage by
stage, all at once:

    Q_u = ℓ_u + f_uᵀV_X(k+1),  Q_uu = ℓ_uu + f_uᵀV_XX(k+1)f_u,  Q_uX = ℓ_uX + f_uᵀV_XX(k+1)f_X
    δu(k) = −(Q_uu + μI)⁻¹ Q_u,  K(k) = −(Q_uu + μI)⁻¹ Q_uX

— the same formulas as the sequential pass, so for μ = 0 the two agree to rounding.
For μ > 0 the gains use the same Q_uu + μI, but V_X, V_XX are those of the regularised
LQ problem, whereas the sequential pass re-evaluates them with the unregularised Q_uu
(Tassa et al. 2014); both are descent directions and the line search accepts either.

Limits: no box bounds (the box QP at each stage is not an LQ step; `ILQR` refuses the
combination) and no DDP second-order terms (V_X(k+1)·f_XX makes the stage depend on
the value function: not an LQ element). ℓ_uu + μI must be positive definite (a cost
strictly convex in u, or μ > 0); otherwise the pass reports failure and μ grows.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp


class AbstractRiccati(eqx.Module):
    """Strategy: how `ILQR` runs its backward (Riccati) pass."""

    @abc.abstractmethod
    def __call__(self, method, F, lin, Xs, u, ks, lower, upper, mu, VxN, VxxN):
        """The backward pass around (Xs, u).

        **Returns:** `(δu, K, dV, ok, V_X(0..N), V_XX(0..N), shift)`, with dV =
        (Σ δuᵀQ_u, Σ ½ δuᵀQ_uuδu) the expected decrease, `ok` whether Q_uu + μI was
        positive definite at every stage and, when it was not, `shift` a μ past which it
        would be at the first stage that failed (0 when `ok`, or when not known).
        """


def _mv(M, v):
    return jnp.einsum("...ij,...j->...i", M, v)


def _mT(M):
    return jnp.swapaxes(M, -1, -2)


def _combine(earlier, later):
    """(A, b, C, η, J) of stages i..j from those of i (earlier) and j (later)."""
    Ai, bi, Ci, etai, Ji = earlier
    Aj, bj, Cj, etaj, Jj = later
    eye = jnp.eye(Ai.shape[-1], dtype=Ai.dtype)
    M = eye + Ci @ Jj
    Mt = _mT(M)  # = I + J_j C_i, C and J symmetric
    A = Aj @ jnp.linalg.solve(M, Ai)
    b = _mv(Aj, jnp.linalg.solve(M, (bi + _mv(Ci, etaj))[..., None])[..., 0]) + bj
    C = Aj @ jnp.linalg.solve(M, Ci) @ _mT(Aj) + Cj
    eta = _mv(_mT(Ai), jnp.linalg.solve(Mt, (etaj - _mv(Jj, bi))[..., None])[..., 0]) + etai
    J = _mT(Ai) @ jnp.linalg.solve(Mt, Jj) @ Ai + Ji
    return A, b, 0.5 * (C + _mT(C)), eta, 0.5 * (J + _mT(J))


def value_elements(lin, VxN, VxxN, mu):
    """The N + 1 elements (A, b, C, η, J) of the stages and of the terminal cost."""
    fx, fu, lx, lu, lxx, luu, lux = lin
    m = luu.shape[-1]
    R = luu + mu * jnp.eye(m, dtype=luu.dtype)
    R = 0.5 * (R + _mT(R))
    cholR = jnp.linalg.cholesky(R)
    solveR = lambda c, rhs: jax.scipy.linalg.cho_solve((c, True), rhs)
    Rinv_lux = jax.vmap(solveR)(cholR, lux)
    Rinv_lu = jax.vmap(solveR)(cholR, lu)
    Rinv_fuT = jax.vmap(solveR)(cholR, _mT(fu))
    A = fx - fu @ Rinv_lux
    b = -_mv(fu, Rinv_lu)
    C = fu @ Rinv_fuT
    J = lxx - _mT(lux) @ Rinv_lux
    eta = -(lx - _mv(_mT(lux), Rinv_lu))
    n = fx.shape[-1]
    zero = jnp.zeros((1, n, n), fx.dtype)
    elements = (
        jnp.concatenate([A, zero]),
        jnp.concatenate([b, jnp.zeros((1, n), fx.dtype)]),
        jnp.concatenate([0.5 * (C + _mT(C)), zero]),
        jnp.concatenate([eta, -VxN[None]]),
        jnp.concatenate([0.5 * (J + _mT(J)), 0.5 * (VxxN + VxxN.T)[None]]),
    )
    return elements, jnp.all(jnp.isfinite(cholR))


def parallel_value_function(lin, VxN, VxxN, mu):
    """V_X(0..N), V_XX(0..N) of the (regularised) LQ subproblem by one associative scan.

    `lin = (f_X, f_u, ℓ_X, ℓ_u, ℓ_XX, ℓ_uu, ℓ_uX)` stacked over k = 0..N−1.
    **Returns:** `(V_X, V_XX, ok)`, `ok` whether ℓ_uu + μI was positive definite.
    """
    elements, ok = value_elements(lin, VxN, VxxN, mu)
    # reverse=True hands fn(accumulated later stages, earlier stage)
    _, _, _, eta, J = jax.lax.associative_scan(
        lambda later, earlier: _combine(earlier, later), elements, reverse=True
    )
    return -eta, J, ok


def parallel_riccati(lin, VxN, VxxN, mu):
    """The unconstrained Gauss–Newton backward pass in O(log N) depth.

    **Returns:** `(δu, K, dV, ok, V_X(0..N), V_XX(0..N))` as the sequential pass, without `shift`.
    """
    fx, fu, lx, lu, lxx, luu, lux = lin
    Vx, Vxx, ok_R = parallel_value_function(lin, VxN, VxxN, mu)
    eye = jnp.eye(luu.shape[-1], dtype=luu.dtype)

    def gains(fx, fu, lu, luu, lux, Vx_next, Vxx_next):
        Qu = lu + fu.T @ Vx_next
        Quu = luu + fu.T @ Vxx_next @ fu
        Qux = lux + fu.T @ Vxx_next @ fx
        Quu = 0.5 * (Quu + Quu.T)
        chol = jnp.linalg.cholesky(Quu + mu * eye)
        pd = jnp.all(jnp.isfinite(chol))
        solve = lambda rhs: jax.scipy.linalg.cho_solve((chol, True), rhs)
        du = -solve(Qu)
        K = -solve(Qux)
        return du, K, jnp.stack([du @ Qu, 0.5 * du @ Quu @ du]), pd

    du, K, dV, pd = jax.vmap(gains)(fx, fu, lu, luu, lux, Vx[1:], Vxx[1:])
    ok = ok_R & jnp.all(pd) & jnp.all(jnp.isfinite(Vxx)) & jnp.all(jnp.isfinite(Vx))
    return du, K, jnp.sum(dV, axis=0), ok, Vx, Vxx


class ParallelRiccati(AbstractRiccati):
    """The Gauss–Newton backward pass as a `jax.lax.associative_scan` over conditional
    value functions (Särkkä & García-Fernández 2023): O(log N) depth, O(N n³) work.

    Unconstrained problems only (`ILQR` raises for finite bounds) and `second_order=False`
    only; with μ = 0 it returns the sequential pass's δu, K, V_X, V_XX to rounding. See
    the module docstring for the element, its combination and the μ > 0 semantics.
    """

    def __call__(self, method, F, lin, Xs, u, ks, lower, upper, mu, VxN, VxxN):
        return parallel_riccati(lin, VxN, VxxN, mu) + (jnp.zeros((), VxN.dtype),)
