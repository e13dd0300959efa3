"""Routing consistency and expert-cache policies (issue 5).

    from moelite.cache_policies import load_trace, srp, sch, simulate, calibrate
    trace = load_trace("trace.npz")
    srp(trace, 16)                       # SRPResult(value, alpha, rho_hat), model level
    sch(trace, 16, 2.0)                  # segment-cache oracle hit rate
    simulate(trace, "lru", 256).hit_rate
    calibrate(trace, 256)                # {"moelite.calibration.*": ...}

Modules: trace (format + validation), metrics (SRP, SCH, static SCH), registry (runtime policy ids and
knobs), simulator (cache model and policy semantics), calibration, report (JSON, PNG, rich).
"""

from __future__ import annotations

from .calibration import calibrate, evaluate_candidates, expert_frequency
from .metrics import SRPResult, sch, srp, srp_many, static_sch
from .registry import POLICY_IDS, PolicyConfig, layer_capacities, make_policy, policy_id, policy_name
from .simulator import SIM_POLICIES, SimResult, simulate, sweep
from .trace import Trace, load_trace, save_trace

__all__ = [
    "Trace",
    "load_trace",
    "save_trace",
    "SRPResult",
    "srp",
    "srp_many",
    "sch",
    "static_sch",
    "POLICY_IDS",
    "PolicyConfig",
    "make_policy",
    "policy_id",
    "policy_name",
    "layer_capacities",
    "SIM_POLICIES",
    "SimResult",
    "simulate",
    "sweep",
    "calibrate",
    "evaluate_candidates",
    "expert_frequency",
]
