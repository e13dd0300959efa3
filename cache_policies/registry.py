"""The runtime's expert-cache policies, as the Python side names, numbers and configures them.

Names -> integer ids shared with the C++ core (csrc/): lru = 0, lfu = 1, lfuda = 2, consistency = 3.
The exact eviction semantics are written down in cache_policies/simulator.py, which implements them.

Knobs (validated by `make_policy`; an unknown knob or a bad value raises moelite.errors.UsageError):
- every policy: `shares`: per-layer fractions of the slot budget (>= 0, summing to 1 within 1e-6), or
  None for a uniform split. Slots per layer = largest-remainder rounding of share * total slots.
- consistency: `m`: int >= 1, the number of most recent tokens whose experts of a layer are protected
  (default 16, the paper's headline segment length).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moelite.errors import UsageError

from ..runtime.args import INT32_MAX, finite_float, int_in

POLICY_IDS: dict[str, int] = {"lru": 0, "lfu": 1, "lfuda": 2, "consistency": 3}
# The policy a load uses when neither the caller nor a calibration names one. LFUDA: on every model measured in
# bench/OFFLOAD.md (the trained demo, the trained bench MoE, the random-weight Qwen-shaped model) it holds at least
# LRU's hit rate at 25 % and 50 % of the experts, and on trained routing reads 20-25 % fewer bytes per token at 25 %
# (bench MoE: 1.5 vs 1.9 MB); LFU is as good on the learned models but never forgets (an expert popular early keeps
# its slot after the topic changes); LFUDA ages those counts.
DEFAULT_POLICY = "lfuda"
DEFAULT_M = 16
_KNOBS: dict[str, tuple[str, ...]] = {
    "lru": ("shares",),
    "lfu": ("shares",),
    "lfuda": ("shares",),
    "consistency": ("m", "shares"),
}


@dataclass(frozen=True)
class PolicyConfig:
    """A validated policy choice: name, its C++ id and its knobs (m is None except for consistency)."""

    name: str
    id: int
    m: int | None = None
    shares: tuple[float, ...] | None = field(default=None)

    def knobs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shares": None if self.shares is None else list(self.shares)}
        if self.m is not None:
            out["m"] = self.m
        return out


def policy_id(name: str) -> int:
    """Integer id of a runtime policy name; UsageError naming the valid names otherwise."""
    if not isinstance(name, str) or name not in POLICY_IDS:
        raise UsageError(f"unknown cache policy {name!r:.80}; valid policies: {', '.join(POLICY_IDS)}")
    return POLICY_IDS[name]


def policy_name(pid: int) -> str:
    """Inverse of `policy_id`."""
    for name, i in POLICY_IDS.items():
        if i == pid:
            return name
    raise UsageError(f"unknown cache policy id {pid!r}; valid ids: {sorted(POLICY_IDS.values())}")


def make_policy(name: str, *, n_layers: int | None = None, **knobs: Any) -> PolicyConfig:
    """Validate `name` and its knobs. With n_layers given, shares must have exactly that many entries."""
    pid = policy_id(name)
    unknown = sorted(set(knobs) - set(_KNOBS[name]))
    if unknown:
        raise UsageError(f"policy {name!r} has no knob {unknown[0]!r}; its knobs: {', '.join(_KNOBS[name])}")
    m = check_m(knobs.get("m", DEFAULT_M)) if name == "consistency" else None
    shares = check_shares(knobs.get("shares"), n_layers)
    return PolicyConfig(name=name, id=pid, m=m, shares=shares)


def check_m(m: Any, name: str = "m") -> int:
    """The consistency window: an int in [1, 2^31 - 1] (bool and float refused; the C++ core keeps it in an int32)."""
    return int_in(name, m, 1, INT32_MAX, why="the consistency window in tokens")


def check_shares(shares: Sequence[float] | None, n_layers: int | None = None) -> tuple[float, ...] | None:
    """Per-layer fractions: finite, >= 0, summing to 1 (within 1e-6); None means uniform."""
    if shares is None:
        return None
    flat = not isinstance(shares, np.ndarray) or shares.ndim == 1
    if isinstance(shares, (str, bytes, dict)) or not isinstance(shares, Iterable) or not flat:
        raise UsageError(f"shares must be a list of numbers, got {shares!r:.80}")
    vals = tuple(finite_float(f"shares[{i}]", v, 0.0) for i, v in enumerate(shares))
    if not vals:
        raise UsageError("shares must not be empty (use None for a uniform split)")
    if n_layers is not None and len(vals) != n_layers:
        raise UsageError(f"shares has {len(vals)} entries for {n_layers} routed layers")
    if abs(math.fsum(vals) - 1.0) > 1e-6:
        raise UsageError(f"shares must sum to 1, got a sum of {math.fsum(vals):.6g}")
    return vals


def layer_capacities(
    total: int, n_layers: int, shares: Sequence[float] | None = None, min_per_layer: int = 1
) -> list[int]:
    """Slots per layer: largest-remainder rounding of share * total (ties to the lower layer index).

    Raises UsageError if a layer gets fewer than min_per_layer slots (the runtime needs k per layer: a
    token's k experts are all in use at once).
    """
    shares = check_shares(shares, n_layers) or (1.0 / n_layers,) * n_layers
    norm = math.fsum(shares)
    exact = [s / norm * total for s in shares]
    caps = [int(math.floor(x + 1e-9)) for x in exact]
    left = total - sum(caps)
    order = sorted(range(n_layers), key=lambda l: (-(exact[l] - caps[l]), l))
    for l in order[: max(left, 0)]:
        caps[l] += 1
    if min(caps) < min_per_layer:
        l = caps.index(min(caps))
        raise UsageError(
            f"{total} slots with these shares give layer {l} only {caps[l]} slots; "
            f"each layer needs at least {min_per_layer}"
        )
    return caps
