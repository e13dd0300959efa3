"""Trace-driven expert-cache simulator: the runtime's policies, Belady and the SCH oracle.

Cache model (what the C++ core does; C++ must match this text):
- Keys are (layer, expert). Per-layer slot pools: layer l holds at most caps[l] experts of layer l, caps
  from `registry.layer_capacities(total, L, shares)`; with pooled=True one pool of `total` slots holds
  experts of all layers. The cache starts empty at every sequence; counters add up over sequences.
- Steps run token by token, layer by layer (t, l). At step (t, l) the k ids of row ids[t, l] are looked
  up in row order. The whole row is pinned (all k experts are in use at once): a row's expert is never
  a victim while its row runs. A hit refreshes the entry; a miss loads the expert, first evicting a
  victim chosen among the unpinned entries of the pool when the pool is full.
- Every entry has a recency (time of its last access or load); "ties LRU" means the least recent wins.
- Policies (runtime ids in registry.py; oracles are simulation-only):
  lru (0)         victim = least recently used.
  lfu (1)         victim = lowest count; count = accesses since the entry was loaded (a miss loads with
                  count 1, a hit adds 1, eviction forgets it; a prefetch loads with count 0); ties LRU.
  lfuda (2)       priority K = count + age, computed when the entry is loaded or hit, where age (one per
                  pool, starting at 0) = K of the last victim evicted from that pool; victim = lowest K,
                  ties LRU.
  consistency (3) victim = the entry used by the fewest of the last m tokens that completed the layer
                  (the running token excluded: it is pinned anyway), ties LRU: the past-window twin of
                  the sch oracle, sized by m from SRP/SCH. (A first version protected "any use in the
                  window" and evicted LRU among the rest: on demand loads that is exactly LRU, since
                  protection is then a recency test; the window-frequency order is what differs.)
  window_lfu      the same rule as consistency (kept as a name for older reports).
  belady          victim = the entry whose next use is furthest in the future (never used again first);
                  ties LRU.
  sch             the SCH oracle's rule on this cache model: victim = fewest uses in the look-ahead
                  window (the next m tokens of its layer: rows after the running one, up to m-1 tokens
                  ahead for demand loads, m tokens counting the coming row for prefetches), ties LRU.
                  Unlike metrics.sch, cold misses are misses and the running row is pinned.
- Prefetch (prefetch=True): after step (t, l), for l + 1 < L, the k predicted ids of layer l+1 are loaded
  into layer l+1's pool (no prefetch across tokens). Already cached: nothing happens. Otherwise the
  victim is chosen as for a miss, with the predicted ids (and the running row) pinned; a prefetched
  entry gets recency "now" and count 0. Predictions come from `trace.lookahead_ids[t, l]` (the runtime
  applies router l+1 to the hidden state leaving layer l); with `precision` given instead, from the true
  ids of layer l+1: each kept with probability `precision`, else replaced by a random expert that is not
  in the true row (seeded, so runs repeat).
- Counters per layer (of the expert): hits, misses, prefetch loads, prefetch useful (a prefetched entry
  hit before its eviction), prefetch wasted (evicted or still unused when its sequence ends). Hits on
  prefetched entries are hits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moelite.errors import UsageError

from ..runtime.args import finite_float, int_in
from .metrics import model_rows
from .registry import POLICY_IDS, check_m, check_shares, layer_capacities
from .trace import Trace, as_trace

SIM_POLICIES = (*POLICY_IDS, "window_lfu", "belady", "sch")


@dataclass
class SimResult:
    """Counters of one simulation, per layer (int64 [L]), plus the configuration that produced them."""

    policy: str
    total_slots: int
    caps: list[int]
    m: int | None
    pooled: bool
    prefetch: bool
    hits: np.ndarray
    misses: np.ndarray
    prefetch_loads: np.ndarray
    prefetch_useful: np.ndarray
    prefetch_wasted: np.ndarray
    shares: list[float] | None = field(default=None)

    @property
    def hit_rate(self) -> float:
        """Pooled over layers: hits / accesses."""
        return float(self.hits.sum() / (self.hits.sum() + self.misses.sum()))

    @property
    def layer_hit_rate(self) -> np.ndarray:
        """[L] hits / accesses of each layer."""
        return self.hits / (self.hits + self.misses)

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        out = {
            "policy": self.policy,
            "total_slots": self.total_slots,
            "caps": list(self.caps),
            "m": self.m,
            "pooled": self.pooled,
            "prefetch": self.prefetch,
            "shares": self.shares,
            "hit_rate": self.hit_rate,
            "layer_hit_rate": self.layer_hit_rate.tolist(),
        }
        for name in ("hits", "misses", "prefetch_loads", "prefetch_useful", "prefetch_wasted"):
            out[name] = getattr(self, name).tolist()
        return out


def simulate(
    trace: Trace,
    policy: str,
    total_slots: int,
    *,
    m: int = 16,
    shares: Sequence[float] | None = None,
    pooled: bool = False,
    prefetch: bool = False,
    precision: float | None = None,
    seed: int = 0,
) -> SimResult:
    """Simulate one policy at one cache size (in expert slots) over every sequence of the trace.

    m is used by "consistency", "window_lfu" and "sch" only; shares by per-layer pools only (pooled=True: one pool of
    total_slots). precision: None -> predictions from trace.lookahead_ids;
    a float in [0, 1] -> degraded true ids (see module docstring), drawn from numpy's generator seeded by `seed` >= 0.
    total_slots: an int >= k (pooled) or >= L * k (per-layer pools); m: an int in [1, 2^31 - 1] as in the runtime.
    """
    trace = as_trace(trace)
    if not isinstance(policy, str) or policy not in SIM_POLICIES:
        raise UsageError(f"unknown simulated policy {policy!r}; valid: {', '.join(SIM_POLICIES)}")
    m = check_m(m)
    shares = check_shares(shares, trace.n_layers)
    n_layers, k, n_expert = trace.n_layers, trace.k, trace.n_expert
    why = f"{'the pool' if pooled else f'each of the {n_layers} layer pools'} needs at least {k} slots, a row of k"
    total_slots = int_in("total_slots", total_slots, k if pooled else n_layers * k, why=why)
    precision = finite_float("precision", precision, 0.0, 1.0, optional=True)
    seed = int_in("seed", seed, 0)
    if pooled:
        caps = [total_slots]
    else:
        caps = layer_capacities(total_slots, n_layers, shares, min_per_layer=k)
    predictions = _predictions(trace, precision, seed) if prefetch else None
    counters = np.zeros((5, n_layers), dtype=np.int64)
    for s in range(trace.n_sequences):
        sl = trace.seq_slice(s)
        keys = model_rows(trace.ids[sl], n_expert).reshape(-1, k)  # [T*L, k], key = l*E + e
        pred = None
        if predictions is not None:  # row g predicts layer l+1: key = (l+1)*E + e, -1 = none
            raw = predictions[sl]
            pred = np.where(raw < 0, -1, model_rows(raw, n_expert).reshape(raw.shape) + n_expert)
            pred = pred.reshape(-1, k)
        _Run(policy, keys, pred, n_layers, n_expert, caps, pooled, m, counters).run()
    return SimResult(
        policy,
        int(total_slots),
        caps,
        m if policy in ("consistency", "window_lfu", "sch") else None,
        pooled,
        prefetch,
        *counters,
        shares=None if shares is None else list(shares),
    )


def sweep(trace: Trace, policies: Iterable[str], sizes: Iterable[int], **kwargs) -> list[SimResult]:
    """`simulate` for every (policy, total_slots) pair; kwargs as for simulate."""
    return [simulate(trace, p, n, **kwargs) for p in policies for n in sizes]


def _predictions(trace: Trace, precision: float | None, seed: int) -> np.ndarray:
    """int32 [N, L, k]: row [t, l] = predicted ids of layer l+1 (-1 = no prediction; last layer unused)."""
    if precision is None:
        if trace.lookahead_ids is None:
            raise UsageError("trace has no lookahead_ids: pass precision=... to prefetch from degraded true ids")
        return trace.lookahead_ids
    rng = np.random.default_rng(seed)
    n, n_layers, k = trace.ids.shape
    true = np.concatenate([trace.ids[:, 1:], np.full((n, 1, k), -1, np.int32)], axis=1)  # [N, L, k]
    pred = true.copy()
    rows = min(4096, max(1, (1 << 22) // (n_layers * trace.n_expert)))  # noise blocks of at most 16 MiB
    for lo in range(0, n, rows):  # a random wrong expert per slot: the k lowest random keys of non-true ids
        tr = trace.ids[lo : lo + rows, 1:]
        noise = rng.random((*tr.shape[:2], trace.n_expert), dtype=np.float32)
        np.put_along_axis(noise, tr, 2.0, axis=-1)
        wrong = np.argpartition(noise, min(k, trace.n_expert - 1), axis=-1)[..., :k].astype(np.int32)
        wrong = np.where(np.take_along_axis(noise, wrong, axis=-1) < 2.0, wrong, -1)  # E < 2k: too few
        keep = rng.random(tr.shape) < precision
        pred[lo : lo + rows, :-1] = np.where(keep, tr, wrong)
    return pred


class _Run:
    """One sequence through the cache. Keys are l*E + e; rows are indexed by step g = t*L + l."""

    def __init__(self, policy, keys, pred, n_layers, n_expert, caps, pooled, m, counters):
        self.policy, self.n_layers, self.n_expert, self.m = policy, n_layers, n_expert, m
        self.rows = keys.tolist()
        self.pred = None if pred is None else pred.tolist()
        self.caps, self.pooled = caps, pooled
        self.hits, self.misses, self.pf_loads, self.pf_useful, self.pf_wasted = counters
        # per-key state only for the keys this sequence touches (memory follows the trace, not E)
        self.pools: list[dict[int, None]] = [{} for _ in caps]  # key -> None, least recent first
        self.age = [0] * len(caps)  # lfuda, per pool
        self.score: dict[int, int] = defaultdict(int)  # lfu: count; lfuda: K; belady: -next use; sch: look-ahead uses
        self.count: dict[int, int] = defaultdict(int)
        self.win: dict[int, int] = defaultdict(
            int
        )  # consistency, window_lfu: tokens among the last m that used the key
        self.prefetched: set[int] = set()
        if policy == "belady":
            self.next_use, first = _next_uses(keys)
            self.score = defaultdict(lambda: -len(self.rows), {y: -g for y, g in first.items()})
        if policy == "sch":
            for g in range(min(len(self.rows), m * n_layers - 1)):  # window: steps 0 .. m*L-2
                for y in self.rows[g]:
                    self.score[y] += 1

    def pool(self, key: int) -> int:
        return 0 if self.pooled else key // self.n_expert

    def run(self) -> None:
        n_steps, n_layers = len(self.rows), self.n_layers
        for g in range(n_steps):
            row = self.rows[g]
            self._slide(g)
            pinned = set(row)
            for j, x in enumerate(row):
                self._access(x, pinned)
                if self.policy == "belady":
                    self.score[x] = -self.next_use[g][j]
            if self.pred is not None and g % n_layers + 1 < n_layers:
                want = [y for y in self.pred[g] if y >= 0]
                held = pinned.union(want)
                for y in want:
                    self._prefetch(y, held)
            self._remember(g)
        for y in self.prefetched:
            self.pf_wasted[y // self.n_expert] += 1

    def _remember(self, g: int) -> None:
        """Step g is done: the consistency / window_lfu window now holds steps g-m*L+1 .. g (for each
        layer, its last m completed tokens)."""
        if self.policy in ("consistency", "window_lfu"):
            for y in self.rows[g]:
                self.win[y] += 1
            if g - self.m * self.n_layers >= 0:
                for y in self.rows[g - self.m * self.n_layers]:
                    self.win[y] -= 1

    def _slide(self, g: int) -> None:
        """Move the sch look-ahead window to steps g+1 .. g+m*L-1."""
        if self.policy == "sch":
            for y in self.rows[g]:
                self.score[y] -= 1
            ahead = g + self.m * self.n_layers - 1
            if ahead < len(self.rows):
                for y in self.rows[ahead]:
                    self.score[y] += 1

    def _access(self, x: int, pinned: set[int]) -> None:
        p, layer = self.pool(x), x // self.n_expert
        pool = self.pools[p]
        if x in pool:
            self.hits[layer] += 1
            del pool[x]
            pool[x] = None
            if x in self.prefetched:
                self.prefetched.discard(x)
                self.pf_useful[layer] += 1
            self.count[x] += 1
        else:
            self.misses[layer] += 1
            if len(pool) >= self.caps[p]:
                self._evict(p, self._victim(pool, pinned))
            pool[x] = None
            self.count[x] = 1
        self._rescore(x, p)

    def _prefetch(self, x: int, pinned: set[int]) -> None:
        p = self.pool(x)
        pool = self.pools[p]
        if x in pool:
            return
        if len(pool) >= self.caps[p]:
            victim = self._victim(pool, pinned)
            if victim is None:  # everything cached is pinned: drop the prefetch
                return
            self._evict(p, victim)
        pool[x] = None
        self.count[x] = 0
        self._rescore(x, p)
        self.prefetched.add(x)
        self.pf_loads[x // self.n_expert] += 1

    def _rescore(self, x: int, p: int) -> None:
        if self.policy == "lfu":
            self.score[x] = self.count[x]
        elif self.policy == "lfuda":
            self.score[x] = self.count[x] + self.age[p]

    def _evict(self, p: int, y: int) -> None:
        del self.pools[p][y]
        if self.policy == "lfuda":
            self.age[p] = self.score[y]
        if y in self.prefetched:
            self.prefetched.discard(y)
            self.pf_wasted[y // self.n_expert] += 1

    def _victim(self, pool: dict[int, None], pinned: set[int]) -> int | None:
        """The policy's victim among unpinned entries (pool iterates least recent first: ties LRU)."""
        free = (y for y in pool if y not in pinned)
        if self.policy == "lru":
            return next(free, None)
        if self.policy in ("consistency", "window_lfu"):
            return min(free, key=self.win.__getitem__, default=None)
        return min(free, key=self.score.__getitem__, default=None)


def _next_uses(keys: np.ndarray) -> tuple[list[list[int]], dict[int, int]]:
    """For rows keys [S, k] of distinct keys: next[g][j] = next step > g using keys[g, j] (S if none),
    and first[y] = first step using key y (for the keys used)."""
    n_steps, k = keys.shape
    flat = keys.ravel()
    step = np.repeat(np.arange(n_steps), k)
    order = np.lexsort((step, flat))  # by key, then step
    nxt = np.full(flat.size, n_steps, dtype=np.int64)
    same = flat[order[1:]] == flat[order[:-1]]
    nxt[order[:-1][same]] = step[order[1:]][same]
    used, at = np.unique(flat, return_index=True)  # first occurrence in step order
    return nxt.reshape(n_steps, k).tolist(), dict(zip(used.tolist(), step[at].tolist()))
