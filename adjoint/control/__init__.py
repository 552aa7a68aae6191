"""Discrete-time optimal control on the costate recursion of `adjoint`.

    X(k+1) = f(X(k), u(k), k),  C = Σ_p [Σ_k ℓ(X_p(k), u(k), k) + φ(X_p(N))],
    lower ≤ u(k) ≤ upper.

`ControlProblem` is a stacked `Multistage` whose controls are u(0..N-1); `solve` runs
`ILQR` (box-DDP), `ProjectedGradient` or `GradientDescent` (any optax optimiser) and
returns a `Solution` with costates in the paper's sign B = −∂C/∂X and KKT / Pontryagin
residuals. The solution is differentiable with respect to every array in the problem
(implicit function theorem at the KKT point: one LQ solve, whatever the method), and
`MPC` runs `solve` in a receding horizon as one `lax.scan`.
"""

from ._base import AbstractMethod as AbstractMethod
from ._constraints import (
    AugmentedLagrangian as AugmentedLagrangian,
    Multipliers as Multipliers,
    constraint_values as constraint_values,
)
from ._ilqr import ILQR as ILQR, SequentialRiccati as SequentialRiccati, box_qp as box_qp
from ._kkt import ControlKKT as ControlKKT, analyse as analyse
from ._mpc import MPC as MPC, MPCTrajectory as MPCTrajectory
from ._parallel import (
    AbstractCostates as AbstractCostates,
    ParallelCostates as ParallelCostates,
    SequentialCostates as SequentialCostates,
    parallel_costates as parallel_costates,
)
from ._parallel_riccati import (
    AbstractRiccati as AbstractRiccati,
    ParallelRiccati as ParallelRiccati,
    parallel_riccati as parallel_riccati,
)
from ._problem import ControlProblem as ControlProblem, ControlStage as ControlStage
from ._solve import (
    GradientDescent as GradientDescent,
    ProjectedGradient as ProjectedGradient,
    Solution as Solution,
    solve as solve,
)


__all__ = [
    "AbstractCostates",
    "AbstractMethod",
    "AbstractRiccati",
    "AugmentedLagrangian",
    "ControlKKT",
    "ControlProblem",
    "ControlStage",
    "GradientDescent",
    "ILQR",
    "MPC",
    "MPCTrajectory",
    "Multipliers",
    "ParallelCostates",
    "ParallelRiccati",
    "ProjectedGradient",
    "SequentialCostates",
    "SequentialRiccati",
    "Solution",
    "analyse",
    "box_qp",
    "constraint_values",
    "parallel_costates",
    "parallel_riccati",
    "solve",
]
