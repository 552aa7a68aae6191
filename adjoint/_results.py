"""One vocabulary for how a solve ended, shared by every solver record.

Every record the package returns (`control.Solution`, `FixedPoint`, `Costates` of the
CTRNN, ...) says how its solve ended with the same three fields:

- `result`: an item of `adjoint.RESULTS` (an `equinox.Enumeration`, as
  `optimistix.RESULTS`): compare with `sol.result == adjoint.RESULTS.successful`; print it
  or index `adjoint.RESULTS[sol.result]` for the message. It is a pytree, so it survives
  `jit` and `vmap` (then the comparison is elementwise).
- `converged`: a boolean that is True only when `result` is `successful` *and* the
  solver's own checks on the answer passed (e.g. the KKT residuals of an optimal control,
  the stability of a fixed point). A derivative through the solve is trusted only then.
- `num_steps`: the iterations the solver took.

Solvers take `throw=True` by default: an unsuccessful result raises (inside `jit`,
through `equinox.error_if`) with the message below; with `throw=False` the record is
returned and the caller reads `result`.
"""

import equinox as eqx


class RESULTS(eqx.Enumeration):
    """How a solve ended (the message of each outcome is its value)."""

    successful = ""
    max_steps_reached = "the maximum number of steps was reached before the tolerance"
    nonfinite = "the iterate, its cost or its gradient became non-finite (NaN or inf)"
    stalled = "the line search / regularisation could not decrease the cost further"
    target_reached = "the cost reached cost_target"
    infeasible = (
        "the constraints could not be satisfied: the violation stopped falling at the "
        "maximum penalty (the problem may be infeasible)"
    )
    unbounded = (
        "the cost fell without bound (by more than (1 + |C(u_init)|)/sqrt(eps) below its "
        "start): the problem may be unbounded below; add bounds or a control cost"
    )
    unstable = (
        "the fixed point is no attractor of its relaxation (an eigenvalue of its Jacobian "
        "has Re λ ≥ 0, or 1 − W F′ is singular): the implicit derivative is not trusted"
    )
