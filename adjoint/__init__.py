"""adjoint: back-propagation as the costate recursion of a Lagrangian (LeCun, 1988)."""

from . import datasets as datasets
from ._check import GradientCheck as GradientCheck, check_gradients as check_gradients
from ._checkpoint import (
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
    latest_checkpoint as latest_checkpoint,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._continuous import (
    CostateComparison as CostateComparison,
    CostateODESolution as CostateODESolution,
    compare_costate_gradients as compare_costate_gradients,
    costate_ode as costate_ode,
    diffrax_gradient as diffrax_gradient,
    trajectory_cost as trajectory_cost,
)
from ._ctrnn import (
    CTRNN as CTRNN,
    AbstractCTRNNAdjoint as AbstractCTRNNAdjoint,
    AbstractRelaxation as AbstractRelaxation,
    AdjointSolution as AdjointSolution,
    CTRNNSolution as CTRNNSolution,
    FixedPointAdjoint as FixedPointAdjoint,
    FixedPointSolve as FixedPointSolve,
    LearningSolution as LearningSolution,
    LinearSolveAdjoint as LinearSolveAdjoint,
    PinedaAdjoint as PinedaAdjoint,
    Relaxation as Relaxation,
    continuous_learning as continuous_learning,
)
from ._data_parallel import DataParallel as DataParallel
from ._fit import FitResult as FitResult, NonFiniteLossError as NonFiniteLossError, fit as fit
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
    AbstractCostateAdjoint as AbstractCostateAdjoint,
    AutodiffAdjoint as AutodiffAdjoint,
    CostateAdjoint as CostateAdjoint,
    Multistage as Multistage,
)
from ._parallel_costates import ParallelCostates as ParallelCostates
from ._recurrent import (
    AbstractCell as AbstractCell,
    CellStep as CellStep,
    ElmanCell as ElmanCell,
    RecurrentNet as RecurrentNet,
    UnfoldedStep as UnfoldedStep,
)
from ._results import RESULTS as RESULTS
from ._reversible import Reversible as Reversible, ReversibleAdjoint as ReversibleAdjoint
from ._sharing import (
    AbstractTransformedDense as AbstractTransformedDense,
    Conv as Conv,
    IndexMap as IndexMap,
    SharedDense as SharedDense,
    TieMultipliers as TieMultipliers,
    Transformed as Transformed,
    conv_index as conv_index,
    count_controls as count_controls,
    symmetric_index as symmetric_index,
    tie_index as tie_index,
    tie_multipliers as tie_multipliers,
)
from ._skip import (
    Residual as Residual,
    Skip as Skip,
    skip_network as skip_network,
    skip_states as skip_states,
)
from ._stage import AbstractStage as AbstractStage, Dense as Dense


__version__ = "0.1.0"

__all__ = [
    "datasets",
    "AbstractAdjoint",
    "AbstractCTRNNAdjoint",
    "AbstractCostateAdjoint",
    "AbstractCell",
    "AbstractRelaxation",
    "AbstractStage",
    "AbstractTransformedDense",
    "AdjointSolution",
    "AutodiffAdjoint",
    "CTRNN",
    "CTRNNSolution",
    "CellStep",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "Conv",
    "CostateAdjoint",
    "CostateComparison",
    "CostateODESolution",
    "CostateRecord",
    "DataParallel",
    "Dense",
    "ElmanCell",
    "FitResult",
    "FixedPointAdjoint",
    "FixedPointSolve",
    "GradientCheck",
    "IndexMap",
    "KKTResiduals",
    "LearningSolution",
    "LinearSolveAdjoint",
    "Multistage",
    "NonFiniteLossError",
    "ParallelCostates",
    "PinedaAdjoint",
    "RESULTS",
    "RecurrentNet",
    "Relaxation",
    "Residual",
    "Reversible",
    "ReversibleAdjoint",
    "SharedDense",
    "Skip",
    "TieMultipliers",
    "Transformed",
    "UnfoldedStep",
    "check_gradients",
    "compare_costate_gradients",
    "continuous_learning",
    "conv_index",
    "costate_ode",
    "costates",
    "count_controls",
    "diffrax_gradient",
    "fit",
    "hamiltonian",
    "kkt_residuals",
    "lagrangian",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "skip_network",
    "skip_states",
    "symmetric_index",
    "tie_index",
    "tie_multipliers",
    "trajectory_cost",
]
