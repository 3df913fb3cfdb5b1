"""Medusa speculation: which tree each step verifies, from measured costs and measured acceptance.

`Speculation` (component.py) is the one object the engine talks to: `plan(running) -> StepPlan`,
`record(StepResult)`. It owns the acceptance statistics (estimates.py), the cost model and its start-up
calibration (costs.py), and the policy (policy.py) with the guard that checks it (guard.py).
"""

from .component import Speculation, StepPlan, StepResult
from .costs import CostModel, DeclaredCostModel, calibrate
from .estimates import AcceptanceStats, Probe, RequestAcceptance

__all__ = ["AcceptanceStats", "CostModel", "DeclaredCostModel", "Probe", "RequestAcceptance", "Speculation",
           "StepPlan", "StepResult", "calibrate"]
