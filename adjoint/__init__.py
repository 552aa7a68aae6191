"""adjoint: back-propagation as the costate recursion of a Lagrangian (LeCun, 1988)."""

from ._check import GradientCheck as GradientCheck, check_gradients as check_gradients
from ._lagrangian import (
    CostateRecord as CostateRecord,
    KKTResiduals as KKTResiduals,
    costates as costates,
    hamiltonian as hamiltonian,
    kkt_residuals as kkt_residuals,
    lagrangian as lagrangian,
)
from ._multistage import (
    AbstractAdjoint as AbstractAdjoint,
    AutodiffAdjoint as AutodiffAdjoint,
    CostateAdjoint as CostateAdjoint,
    Multistage as Multistage,
)
from ._stage import AbstractStage as AbstractStage, Dense as Dense

# -- issue 4 exports (sharing, skip connections, recurrent nets) --
# -- issue 5 exports (CTRNN, continuous-time costates) --
# -- issue 7 exports (fit, checkpoints, sharding) --


__version__ = "0.1.0"

__all__ = [
    "AbstractAdjoint",
    "AbstractStage",
    "AutodiffAdjoint",
    "CostateAdjoint",
    "CostateRecord",
    "Dense",
    "GradientCheck",
    "KKTResiduals",
    "Multistage",
    "check_gradients",
    "costates",
    "hamiltonian",
    "kkt_residuals",
    "lagrangian",
]
