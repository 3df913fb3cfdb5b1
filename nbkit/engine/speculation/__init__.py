"""Medusa speculation: which tree each step verifies, from measured costs and measured acceptance.

`Speculation` (component.py) is the one object the engine talks to: `plan(running) -> StepPlan`,
`record(StepResult)`. It owns the acceptance statistics (estimates.py), the cost model and its
calibration (calibration.py: before serving, or in idle time while serving), and the policy (policy.py)
with the guard that checks it (guard.py).
"""

from .calibration import Calibrate, Calibration, calibrate
from .component import Speculation, StepPlan, StepResult
from .costs import CostModel, DeclaredCostModel
from .estimates import AcceptanceStats, Probe, RequestAcceptance

__all__ = ["AcceptanceStats", "Calibrate", "Calibration", "CostModel", "DeclaredCostModel", "Probe",
           "RequestAcceptance", "Speculation", "StepPlan", "StepResult", "calibrate"]
