"""ngsd_kernels: the guarded decode step (divergence, LIF gate, mixture, token choice) as one op.

Standalone: depends on torch (and Triton for the fused kernels), never on ``ngsd``.
"""

from .contrastive import ContrastiveParams, contrastive_select, contrastive_select_reference
from .params import CandidateMode, Divergence, GateMode, StepParams
from .philox import philox_uniform
from .reference import guarded_select_reference
from .select import guarded_select, guarded_select_from_hidden
from .selector import GuardedSelector
from .step_graph import StepGraph

__all__ = [
    "CandidateMode",
    "ContrastiveParams",
    "Divergence",
    "GateMode",
    "GuardedSelector",
    "StepGraph",
    "StepParams",
    "contrastive_select",
    "contrastive_select_reference",
    "guarded_select",
    "guarded_select_from_hidden",
    "guarded_select_reference",
    "philox_uniform",
]
