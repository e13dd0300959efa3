"""Calibration: from a routing trace and a slot budget, recommend a policy, its m and per-layer cache shares.

Pure functions, no I/O. `calibrate` returns flat GGUF-storable keys (str / int / float / bool / lists of
numbers) named `moelite.calibration.*`; storing them in the GGUF is the caller's job.

How the recommendation is made (all by simulation on the trace, demand loads only unless prefetch=True):
1. Per-layer share candidates (every layer gets at least k slots, the rest is split):
   - "uniform": equal slots per layer;
   - "working_set": spare slots proportional to each layer's mean number of distinct experts per
     window of `ws_m` tokens beyond k (from the SRP window counts);
   - "miss_curve": greedy marginal allocation on each layer's LRU hit curve (simulated at a grid of
     capacities, linear in between): the next slot goes to the layer whose hits rise most.
2. Every runtime policy (consistency at each m of `ms`) is simulated with every share candidate at the
   budget; the highest pooled hit rate wins (ties: the earlier policy in registry order, then the
   earlier candidate above, then the smaller m).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moelite.errors import ModelFormatError, UsageError

from ..runtime.args import finite_float, int_in, is_int, is_real
from .metrics import f_histogram, srp_many
from .registry import POLICY_IDS, check_m, check_shares, layer_capacities
from .simulator import simulate
from .trace import Trace, as_trace

SHARE_METHODS = ("uniform", "working_set", "miss_curve")
CALIBRATION_VERSION = 1


def expert_frequency(trace: Trace) -> np.ndarray:
    """float64 [L, E]: fraction of tokens whose top-k at layer l holds expert e."""
    trace = as_trace(trace)
    counts = np.zeros((trace.n_layers, trace.n_expert), dtype=np.int64)
    for l in range(trace.n_layers):
        counts[l] = np.bincount(trace.ids[:, l].ravel(), minlength=trace.n_expert)
    return counts / trace.n_tokens


def working_set(trace: Trace, m: int = 16) -> np.ndarray:
    """float64 [L]: mean number of distinct experts a window of min(m, longest sequence) tokens uses."""
    m = min(check_m(m, "ws_m"), int(np.diff(trace.offsets).max()))
    hist = f_histogram(trace, m)  # [L, m+1]
    n_windows = hist.sum(axis=1) / trace.n_expert
    return (hist[:, 1:].sum(axis=1)) / n_windows


def spread(total: int, weights: Sequence[float], floor: int, ceil: int) -> list[int]:
    """Split `total` slots over layers: each gets `floor`, then slot by slot to the layer with the largest
    weight / (extra slots + 1) (D'Hondt: proportional to weights), skipping layers at `ceil` while
    any layer is below it."""
    w = np.maximum(np.asarray(weights, dtype=np.float64), 0) + 1e-9
    caps = np.full(len(w), floor, dtype=np.int64)
    for _ in range(total - floor * len(w)):
        quot = w / (caps - floor + 1)
        if (caps < ceil).any():
            quot[caps >= ceil] = -1.0
        caps[int(np.argmax(quot))] += 1
    return caps.tolist()


def miss_curve_caps(trace: Trace, total: int, grid: Iterable[int] | None = None) -> list[int]:
    """Greedy slot allocation on per-layer LRU hit curves (see module docstring)."""
    n_layers, k, n_expert = trace.n_layers, trace.k, trace.n_expert
    top = min(n_expert, total - k * (n_layers - 1))
    grid = sorted(
        {k, top, *(c for c in (grid or np.geomspace(k, max(top, k), 6).round().astype(int)) if k <= c <= top)}
    )
    hits = np.array([simulate(trace, "lru", c * n_layers).hits for c in grid], dtype=np.float64)  # [G, L]

    def gain(l: int, c: int) -> float:  # hits of layer l at c+1 slots minus at c, linear between grid points
        return float(np.interp(c + 1, grid, hits[:, l]) - np.interp(c, grid, hits[:, l])) if c < top else -1.0

    caps = [k] * n_layers
    gains = [gain(l, k) for l in range(n_layers)]
    for _ in range(total - k * n_layers):
        l = int(np.argmax(gains))
        caps[l] += 1
        gains[l] = gain(l, caps[l])
    return caps


def share_candidates(trace: Trace, budget: int, ws_m: int = 16) -> dict[str, list[int]]:
    """Slots per layer for each method of SHARE_METHODS, all summing to `budget`."""
    n_layers, k = trace.n_layers, trace.k
    return {
        "uniform": layer_capacities(budget, n_layers, None, min_per_layer=k),
        "working_set": spread(budget, working_set(trace, ws_m) - k, k, trace.n_expert),
        "miss_curve": miss_curve_caps(trace, budget),
    }


def evaluate_candidates(
    trace: Trace,
    budget: int,
    *,
    ms: Sequence[int] = (4, 16, 64),
    policies: Sequence[str] = tuple(POLICY_IDS),
    prefetch: bool = False,
    precision: float | None = None,
) -> list[dict]:
    """Simulate every (policy, m, share method) at the budget: rows of plain dicts, best first. budget: expert
    slots in [L * k, L * E]; ms: consistency windows (ints in [1, 2^31 - 1]); precision: None or in [0, 1]."""
    trace = as_trace(trace)
    budget = _check_budget(trace, budget)
    ms = [check_m(m, f"ms[{i}]") for i, m in enumerate(_as_list(ms, "ms"))]
    policies = _as_list(policies, "policies")
    precision = finite_float("precision", precision, 0.0, 1.0, optional=True)
    rows = []
    for method, caps in share_candidates(trace, budget).items():
        shares = [c / budget for c in caps]
        lru_rate = None
        for policy in policies:
            for m in ms if policy == "consistency" else (None,):
                if policy == "consistency" and not prefetch and lru_rate is not None:
                    rate = lru_rate  # without prefetch consistency is exactly lru (simulator docstring)
                else:
                    rate = simulate(
                        trace, policy, budget, m=m or 16, shares=shares, prefetch=prefetch, precision=precision
                    ).hit_rate  # m None: the policy has no window
                lru_rate = rate if policy == "lru" else lru_rate
                rows.append(
                    {
                        "policy": policy,
                        "m": m,
                        "shares_method": method,
                        "caps": caps,
                        "shares": shares,
                        "hit_rate": rate,
                    }
                )
    order = {p: i for i, p in enumerate(POLICY_IDS)}
    rows.sort(
        key=lambda r: (-r["hit_rate"], order.get(r["policy"], 99), SHARE_METHODS.index(r["shares_method"]), r["m"] or 0)
    )
    return rows


def calibrate(
    trace: Trace,
    budget: int,
    *,
    ms: Sequence[int] = (4, 16, 64),
    prefetch: bool = False,
    precision: float | None = None,
) -> dict:
    """Recommend policy, m and per-layer shares for `budget` expert slots (in [L * k, L * E]); GGUF-storable flat
    dict. Arguments as evaluate_candidates."""
    rows = evaluate_candidates(trace, budget, ms=ms, prefetch=prefetch, precision=precision)
    best = rows[0]
    uniform_lru = next(r for r in rows if r["policy"] == "lru" and r["shares_method"] == "uniform")
    belady = simulate(trace, "belady", budget, shares=best["shares"], prefetch=prefetch, precision=precision)
    srp_ms = [m for m in (4, 16, 64, 256) if m <= np.diff(trace.offsets).max()]
    key = "moelite.calibration."
    return {
        key + "version": CALIBRATION_VERSION,
        key + "model": trace.model,
        key + "n_tokens": trace.n_tokens,
        key + "n_sequences": trace.n_sequences,
        key + "layers": [int(x) for x in trace.layers],
        key + "n_expert": trace.n_expert,
        key + "budget_slots": int(budget),
        key + "prefetch": bool(prefetch),
        key + "policy": best["policy"],
        key + "policy_id": POLICY_IDS[best["policy"]],
        key + "m": int(best["m"] or 0),  # 0: the policy has no window
        key + "shares_method": best["shares_method"],
        key + "layer_slots": [int(c) for c in best["caps"]],
        key + "layer_shares": [float(s) for s in best["shares"]],
        key + "hit_rate": float(best["hit_rate"]),
        key + "hit_rate_lru_uniform": float(uniform_lru["hit_rate"]),
        key + "hit_rate_belady": belady.hit_rate,
        key + "srp_m": srp_ms,
        key + "srp": [float(r.value) for r in srp_many(trace, srp_ms).values()],
        key + "expert_freq": [float(x) for x in expert_frequency(trace).ravel()],  # [L*E], layer-major
    }


def _check_budget(trace: Trace, budget: int) -> int:
    """Expert slots in [L * k, L * E]: each layer needs its k, and more slots than experts cache nothing more (the
    share methods spread the slots one by one: a budget beyond L * E would only loop)."""
    n_layers, k, n_expert = trace.n_layers, trace.k, trace.n_expert
    why = f"{n_layers} layers: at least k = {k} slots each, at most their {n_expert} experts"
    return int_in("budget", budget, n_layers * k, n_layers * n_expert, why=why)


def _as_list(values: Any, name: str) -> list:
    if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
        raise UsageError(f"{name} must be a list, got {values!r:.80}")
    return list(values)


# reading calibration back (side file MODEL.gguf.calibration.json, or moelite.calibration.* GGUF keys) ---------
PREFIX = "moelite.calibration."
_INT, _REAL, _STR, _BOOL = "an integer", "a finite number", "a string", "a boolean"
# key (without PREFIX) -> (scalar kind, is a list); keys not listed are kept but unused
SCHEMA: dict[str, tuple[str, bool]] = {
    "version": (_INT, False),
    "model": (_STR, False),
    "n_tokens": (_INT, False),
    "n_sequences": (_INT, False),
    "layers": (_INT, True),
    "n_expert": (_INT, False),
    "budget_slots": (_INT, False),
    "prefetch": (_BOOL, False),
    "policy": (_STR, False),
    "policy_id": (_INT, False),
    "m": (_INT, False),
    "shares_method": (_STR, False),
    "layer_slots": (_INT, True),
    "layer_shares": (_REAL, True),
    "hit_rate": (_REAL, False),
    "hit_rate_lru_uniform": (_REAL, False),
    "hit_rate_belady": (_REAL, False),
    "srp_m": (_INT, True),
    "srp": (_REAL, True),
    "expert_freq": (_REAL, True),
}


def _is(kind: str, v: Any) -> bool:
    if kind == _BOOL:
        return isinstance(v, (bool, np.bool_))
    if kind == _STR:
        return isinstance(v, str)
    if kind == _INT:
        return is_int(v) and -(2**63) <= int(v) < 2**63
    if not is_real(v):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer beyond any float
        return False


def check_calibration(values: dict[str, Any], source: str) -> dict[str, Any]:
    """moelite.calibration.* values (without the prefix) of `source` typed as SCHEMA says, policy known, m a
    window, layer_shares valid shares. ModelFormatError naming source and key."""

    def bad(key: str, expected: str) -> ModelFormatError:
        v = values[key]
        text = repr(v.tolist() if isinstance(v, np.ndarray) else v)
        return ModelFormatError(f"{source}: calibration key '{PREFIX}{key}' = {text[:80]}: expected {expected}")

    for key, (kind, is_list) in SCHEMA.items():
        if key not in values:
            continue
        v = values[key]
        items = list(v) if is_list and isinstance(v, (list, tuple, np.ndarray)) else None
        if is_list and (items is None or not all(_is(kind, x) for x in items)):
            raise bad(key, f"a list of {kind.split(' ', 1)[1]}s")
        if not is_list and not _is(kind, v):
            raise bad(key, kind)
    if "policy" in values and values["policy"] not in POLICY_IDS:
        raise bad("policy", f"one of {', '.join(POLICY_IDS)}")
    lengths = {
        key: len(values[key])
        for key in ("layers", "layer_slots", "layer_shares")
        if isinstance(values.get(key), (list, tuple, np.ndarray))
    }
    if len(set(lengths.values())) > 1:
        raise ModelFormatError(
            f"{source}: calibration keys name different numbers of layers: "
            + ", ".join(f"'{PREFIX}{k}' {n}" for k, n in lengths.items())
        )
    try:
        if values.get("m"):
            check_m(int(values["m"]), f"{PREFIX}m")
        if values.get("layer_shares") is not None:
            check_shares([float(x) for x in values["layer_shares"]])
    except UsageError as e:
        raise ModelFormatError(f"{source}: calibration: {e}") from None
    return values


def load_calibration(model_path: str, kv: dict[str, Any]) -> dict[str, Any]:
    """moelite.calibration.* (prefix removed) from the side file `MODEL.gguf.calibration.json` (written by
    `moelite analyze`), overridden by GGUF keys of the same names; each source checked by check_calibration."""
    side = Path(model_path + ".calibration.json")
    merged: dict[str, Any] = {}
    if side.is_file():
        try:
            data = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ModelFormatError(
                f"{side}: unreadable calibration file ({type(e).__name__}: {e}); delete it or re-run moelite analyze"
            ) from None
        if not isinstance(data, dict):
            raise ModelFormatError(f"{side}: calibration file holds a {type(data).__name__}, expected a JSON object")
        merged.update(
            check_calibration({k[len(PREFIX) :]: v for k, v in data.items() if k.startswith(PREFIX)}, str(side))
        )
    merged.update(check_calibration({k[len(PREFIX) :]: v for k, v in kv.items() if k.startswith(PREFIX)}, model_path))
    return merged
