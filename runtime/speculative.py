"""Speculative decoding: draft sources, the per-step window planner and the verify loop.

A decode step of an offloaded MoE costs moving weights, not arithmetic. Speculation guesses the next few tokens
cheaply (a draft), then evaluates the last sampled token and the n drafted ones as one window of 1 + n rows: the
dense weights are read once for all rows, and each expert the window routes to is read from disk and run once for
all the rows that chose it (the prefill path: csrc/ffn_moe.cpp groups a ubatch's (row, expert) pairs expert-major).
Row j's logits decide token j + 1: drafts are accepted while they equal the target's own choice, the first
mismatch is replaced by the target's token, and a window whose drafts all pass adds the token after the last
one. The cached context is then rolled back to the last accepted token: attention layers truncate their KV cache;
recurrent layers (Mamba2, Gated DeltaNet, short conv) restore the state saved before the window and re-run the
accepted rows.

Draft sources (`speculative=`): "ngram" looks the last few tokens up in the prompt and the generated text and
proposes what followed their latest earlier occurrence (no model; no match: no draft); "draft" runs a separate
small GGUF with the same vocabulary (`draft_model=`), greedily; "mtp" runs the model's own MTP block (csrc/mtp.cpp),
loaded with speculative="mtp" at load time.

Exactness. Greedy: every emitted token is the argmax of the target's logits for the same context, so the output
equals non-speculative greedy whenever a window row's logits equal a one-row step's (docs/SPECULATIVE.md: bit for
bit on Q8_0; F32 weights differ in the last bits, tinyBLAS's GEMM for >= 2 rows; K-quants (Q4_K_M) differ more, so
there greedy with speculation can pick other tokens where logits nearly tie).
Sampling: drafts are point proposals (q = 1 on the drafted token), so the standard rejection scheme reads: accept
draft d with probability p(d), else draw from p with d removed, renormalized; p is the sampler's final
distribution (penalty, top-k, top-p, min-p, temperature). The emitted tokens are distributed exactly as without
speculation (the random stream differs, so a seeded run gives other, equally likely, text).

The window planner (`WindowPlanner`, docs/SPECULATIVE.md states the rule): the draft length n maximizes expected
tokens per second, E[tokens](n) / cost(n), against the plain step 1 / cost(0); n = 0 (no window) when no n wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BudgetError, UsageError
from .args import int_in

if TYPE_CHECKING:
    from .model import GenerationStats, Model
    from .sampling import Sampler

MODES = ("off", "ngram", "draft", "mtp")
RULES = ("cost", "always")  # cost: the planner decides per step; always: every available draft is verified
DEFAULT_DRAFT_MAX = 8
DEFAULT_DRAFT_MIN = 0
NGRAM_SIZES = (4, 3, 2)  # longest key first: a longer match predicts better
MAX_DRAFT = 64  # a window is one ubatch (n_ubatch >= 64 by default): more drafts would split it
PROBE_EVERY = 16  # a costly draft source declined this many steps in a row drafts one token (a fresh sample)


@dataclass(frozen=True)
class SpecConfig:
    """One generation's speculation settings, checked."""

    mode: str = "off"
    draft_max: int = DEFAULT_DRAFT_MAX
    draft_min: int = DEFAULT_DRAFT_MIN  # a window with fewer drafts than this is not verified
    rule: str = "cost"

    @property
    def on(self) -> bool:
        return self.mode != "off"


def spec_config(
    mode: Any = "off", draft_max: Any = DEFAULT_DRAFT_MAX, draft_min: Any = DEFAULT_DRAFT_MIN, rule: Any = "cost"
) -> SpecConfig:
    """Checked settings; a UsageError names the bad argument and the expected values."""
    if mode is None or mode is False:
        mode = "off"
    if not isinstance(mode, str) or mode not in MODES:
        raise UsageError(f"speculative={mode!r}: expected one of {', '.join(MODES)}")
    draft_max = int_in("draft_max", draft_max, 1, MAX_DRAFT)
    draft_min = int_in("draft_min", draft_min, 0, MAX_DRAFT)
    if draft_min > draft_max:
        raise UsageError(f"draft_min={draft_min} is above draft_max={draft_max}")
    if not isinstance(rule, str) or rule not in RULES:
        raise UsageError(f"draft_rule={rule!r}: expected one of {', '.join(RULES)}")
    return SpecConfig(mode, draft_max, draft_min, rule)


# --- draft sources ---------------------------------------------------------------------------------------------


class NgramDraft:
    """Prompt lookup: the last n tokens (n in NGRAM_SIZES, longest first) looked up in everything before them;
    the draft is what followed their latest earlier occurrence (when that runs into the end of the text, the
    text from the occurrence on, repeated: a loop continues). An index per n maps each n-gram to the position
    after its latest occurrence, extended as the history grows (O(new tokens) per step)."""

    name = "ngram"
    free = True  # drafting costs no model step: draft first, then let the rule size the window

    def __init__(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        self._history: list[int] = []
        self._done = 0  # n-gram ends indexed so far: every e < _done (e = position after the n-gram)

    def propose(self, history: Sequence[int], n_max: int) -> list[int]:
        self._sync(history)
        h = self._history
        for n in NGRAM_SIZES:
            if len(h) <= n:
                continue
            pos = self._index[n].get(tuple(h[-n:]))
            if pos is not None:  # what followed; a match near the end repeats with period len(h) - pos
                draft = h[pos : pos + n_max]
                while len(draft) < n_max:
                    draft.append(draft[len(draft) - (len(h) - pos)])
                return draft
        return []

    def _sync(self, history: Sequence[int]) -> None:
        """Index the n-grams ending before the last token (the current suffix is the key, never a value)."""
        k = len(self._history)
        if len(history) < k or list(history[:k]) != self._history:  # another context: start over
            self.__init__()
            k = 0
        self._history.extend(int(t) for t in history[k:])
        h = self._history
        for e in range(max(self._done, 1), len(h)):  # continuation h[e] exists for e < len(h)
            for n in NGRAM_SIZES:
                if e >= n:
                    self._index[n][tuple(h[e - n : e])] = e
        self._done = len(h)


class DraftModelDraft:
    """A separate small model with the target's vocabulary, run greedily: its own cached context follows the
    history (prefix reuse, as a prompt), then n_max single-token steps."""

    name = "draft"
    free = False  # each drafted token is a step of the draft model: the rule sizes the draft before it runs

    def __init__(self, model: Model) -> None:
        self.model = model

    def propose(self, history: Sequence[int], n_max: int) -> list[int]:
        m = self.model
        ids = list(history)
        n_max = min(n_max, m.n_ctx - len(ids))
        if n_max <= 0:
            return []
        with m._exclusive("draft"):
            logits = m._prefill(ids)
            out: list[int] = []
            for i in range(n_max):
                tok = int(np.argmax(logits))
                out.append(tok)
                if i == n_max - 1:
                    break
                logits = m._eval([tok], 1)[-1]
                m._ctx_ids.append(tok)
        return out


class MtpDraft:
    """The model's own MTP block (csrc/mtp.cpp), greedy: its first row pairs the hidden state of the context's
    last token with the token after it (the core ran the rows before, one behind the trunk, as the context grew);
    each next draft chains on the block's own output. Loaded only with speculative='mtp' at load time."""

    name = "mtp"
    free = False  # each drafted token is a step of the MTP block: the rule sizes the draft before it runs

    def __init__(self, model: Model) -> None:
        self.core = model._core()

    def propose(self, history: Sequence[int], n_max: int) -> list[int]:
        ids, _ = self.core.mtp_draft(int(history[-1]), n_max)
        return [int(t) for t in ids]


def check_draft_vocab(target: Model, draft: Model) -> None:
    """The draft model must speak the target's tokens: same vocabulary size and token strings."""
    if draft.n_vocab != target.n_vocab:
        raise UsageError(
            f"draft_model {draft.path}: vocabulary of {draft.n_vocab} tokens, the target {target.path} has "
            f"{target.n_vocab}; a draft model must share the target's tokenizer"
        )
    a, b = target.kv.get("tokenizer.ggml.tokens"), draft.kv.get("tokenizer.ggml.tokens")
    if a is not None and b is not None and list(a) != list(b):
        raise UsageError(
            f"draft_model {draft.path}: its token strings differ from the target's ({target.path}); a draft model "
            "must share the target's tokenizer"
        )


def prepare_speculation(target: Model, path: Any, config: SpecConfig, *, kv_type: str) -> tuple[Model | None, int]:
    """At load: the draft model of `draft_model=` (None when not given) and the bytes it holds (taken from the
    target's budget: the pair stays under it), loaded resident with the target's context size and threads; a
    source this model cannot use is refused here."""
    if config.mode == "mtp" and path is not None:
        raise UsageError(
            "draft_model is the draft source of speculative='draft'; speculative='mtp' drafts with the "
            "model's own MTP block"
        )
    if path is None:
        if config.mode == "draft":
            raise UsageError("speculative='draft' needs a draft model: load with draft_model='small.gguf' (-md)")
        return None, 0
    # the target's own class: runtime/model.py imports this module, so importing it back here would close a loop
    draft = type(target)(path, n_ctx=target.n_ctx, n_threads=target.n_threads, kv_type=kv_type, use_calibration=False)
    try:
        check_draft_vocab(target, draft)
    except BaseException:
        draft.close()
        raise
    info = draft.info()
    held = info["dense_bytes"] + info["kv_bytes"] + info["arena_bytes"] + info["scratch_bytes"]
    return draft, int(held)


def draft_budget(budget: int | None, draft_bytes: int) -> int | None:
    """The target's budget once the draft model has taken its share (None: no budget)."""
    if budget is None or not draft_bytes:
        return budget
    if budget <= draft_bytes:
        raise BudgetError(
            f"memory budget {budget} bytes: the draft model alone holds {draft_bytes} bytes; give a larger budget "
            "or a smaller draft model"
        )
    return budget - draft_bytes


# --- the per-step decision -------------------------------------------------------------------------------------


@dataclass
class WindowPlanner:
    """Chooses the draft length n of each step from the expected cost of the window (docs/SPECULATIVE.md):

        E[tokens](n) = 1 + a + a^2 + ... + a^n                     a: running acceptance probability of a draft
        cost(n)      = t_step + n * c_row * t_cmp + n * t_draft + s_byte * n * b_scale * b_row  (+ recurrent re-run)
        b_row        = sum over MoE layers l of  K * (1 - srp_l) * (E - R_l) / (E - K) * expert_bytes_l

    t_step: seconds of a plain one-row step (running mean), t_cmp its compute part (the rest waits on reads);
    c_row: the compute of one more window row relative to t_cmp;
    t_draft: seconds per drafted token (0 for n-grams); s_byte: seconds per byte read from the file;
    srp_l: the share of a row's experts that the previous row also chose (consecutive-token routing overlap);
    R_l: experts of layer l resident now (the cache's table); K of E experts per token; b_row: expected bytes a
    verify row reads that the step would not read without it, as if its new experts were drawn at random; b_scale:
    what the windows so far read over what b_row predicted for them (running mean; a draft that copies earlier text
    routes to experts the cache holds, and b_row alone would decline its windows). n maximizes E[tokens](n) /
    cost(n); a window is drafted only when that beats the plain step's 1 / cost(0)."""

    expert_bytes: list[int]  # [n_layer] bytes of one expert (0: no routed experts)
    n_expert: int
    n_expert_used: int
    recurrent: bool = False
    acceptance: float = 0.5  # prior; running estimate (EMA) of P(a draft token is accepted)
    t_step: float = 0.0  # s per one-row step; 0: not measured yet
    t_cmp: float = 0.0  # of which computing (not waiting on expert reads)
    # prior: a verify row costs this fraction of a step in compute (then measured on windows). Measured: 0.45-0.67
    # (demo), 0.63 (bench-mtp), 0.83 (Qwen3-30B-shaped Q4_K_M, 1 thread): a row routes to other experts
    c_row: float = 0.5
    t_draft: float = 0.0  # s per drafted token
    s_byte: float = 1.0 / 1.5e9  # prior: 1.5 GB/s; measured from the cache's stall time per byte read
    srp: np.ndarray | None = None  # [n_layer] consecutive-row routing overlap (EMA)
    b_row: float = 0.0  # the last estimate of bytes per verify row
    b_scale: float = 1.0  # windows' bytes read / b_row's prediction for them (EMA, in [0, 2])
    alpha: float = 0.1  # EMA weight of a new observation

    def choose(self, n_avail: int, n_min: int, resident: np.ndarray | None) -> int:
        """Draft length for this step, 0..n_avail (0: no window)."""
        self.b_row = self._bytes_per_row(resident)
        if self.t_step <= 0.0:  # nothing measured yet: one plain step first
            return 0
        base = 1.0 / self._cost(0)
        best_n, best = 0, base
        for n in range(max(1, n_min), n_avail + 1):
            rate = self.expected_tokens(n) / self._cost(n)
            if rate > best:
                best_n, best = n, rate
        return best_n

    def expected_tokens(self, n: int) -> float:
        a = self.acceptance
        return float(n + 1) if a >= 1.0 else (1.0 - a ** (n + 1)) / (1.0 - a)

    def _cost(self, n: int) -> float:
        c = self.t_step + n * self.c_row * self.t_cmp + n * self.t_draft + self.s_byte * n * self.b_scale * self.b_row
        if self.recurrent and n:  # a partial acceptance re-runs the accepted rows from the saved state
            c += (1.0 - self.acceptance**n) * self.t_cmp * (1.0 + self.c_row * n * self.acceptance)
        return c

    def _bytes_per_row(self, resident: np.ndarray | None) -> float:
        if resident is None:
            return 0.0
        E, K = self.n_expert, self.n_expert_used
        missing = E - resident.sum(axis=1)  # [n_layer] experts not held
        srp = self.srp if self.srp is not None else np.full(len(self.expert_bytes), 0.5)
        per = K * (1.0 - srp) * missing / max(E - K, 1) * np.asarray(self.expert_bytes, dtype=np.float64)
        return float(per.sum())

    def observe_acceptance(self, accepted: int, verified: int) -> None:
        """A window whose first `accepted` of `verified` drafts passed: accepted 1-observations, then one 0
        where a draft failed (drafts after the first failure are not observed)."""
        for i in range(verified):
            ok = i < accepted
            self.acceptance += self.alpha * (float(ok) - self.acceptance)
            if not ok:
                break
        self.acceptance = min(max(self.acceptance, 0.01), 0.99)

    def observe_step(self, n: int, seconds: float, io_seconds: float) -> None:
        """A step of 1 + n rows took `seconds`, `io_seconds` of them waiting on expert reads."""
        compute = max(seconds - io_seconds, 0.0)
        if n == 0:
            first = self.t_step <= 0
            self.t_step = seconds if first else self.t_step + self.alpha * (seconds - self.t_step)
            self.t_cmp = compute if first else self.t_cmp + self.alpha * (compute - self.t_cmp)
        elif self.t_cmp > 0:
            c = max((compute - self.t_cmp) / (n * self.t_cmp), 0.0)
            self.c_row += self.alpha * (min(c, 1.0) - self.c_row)

    def observe_window_bytes(self, n: int, extra_bytes: int) -> None:
        """A window of n draft rows read extra_bytes of experts only its draft rows chose: calibrates b_scale against
        b_row as predicted for it (before the window ran)."""
        if n > 0 and self.b_row > 0:
            ratio = min(extra_bytes / (n * self.b_row), 2.0)
            self.b_scale += self.alpha * (ratio - self.b_scale)

    def observe_reads(self, bytes_read: int, stall_s: float) -> None:
        if bytes_read > 0 and stall_s > 0:
            self.s_byte += self.alpha * (stall_s / bytes_read - self.s_byte)

    def observe_routes(self, routes: list[np.ndarray | None], prev: list[np.ndarray | None] | None = None) -> None:
        """Routing of a step's rows (per layer [rows, K]) and of the row before them (the previous step's last kept
        row, per layer [K]): the overlap of each row's experts with the previous row's, averaged (EMA) per layer."""
        if self.srp is None:
            self.srp = np.full(len(routes), 0.5)
        for il, r in enumerate(routes):
            if r is None:
                continue
            rows = ([prev[il]] if prev is not None and prev[il] is not None else []) + list(r)
            if len(rows) < 2:
                continue
            share = np.mean([len(set(rows[i]) & set(rows[i - 1])) / r.shape[1] for i in range(1, len(rows))])
            self.srp[il] += self.alpha * (share - self.srp[il])

    def observe_draft_time(self, n: int, seconds: float) -> None:
        if n > 0:
            self.t_draft += self.alpha * (seconds / n - self.t_draft)

    def inputs(self) -> dict[str, Any]:
        return {
            "acceptance_estimate": self.acceptance,
            "t_step_s": self.t_step,
            "t_compute_s": self.t_cmp,
            "c_row": self.c_row,
            "t_draft_s": self.t_draft,
            "s_per_byte": self.s_byte,
            "srp_mean": float(np.mean(self.srp)) if self.srp is not None else None,
            "bytes_per_row_estimate": self.b_row,
            "bytes_scale": self.b_scale,
        }


# --- the verify loop -------------------------------------------------------------------------------------------


@dataclass
class SpecStats:
    """Counters of one generation (Model.stats()['speculative'])."""

    mode: str = "off"
    steps: int = 0  # forward passes of the decode loop (plain steps + windows)
    windows: int = 0  # steps that verified drafts
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, accepted
    declined: int = 0  # steps with a draft the planner did not verify
    no_draft: int = 0  # steps where the source had nothing to propose
    rollbacks: int = 0  # windows that rolled the context back (a draft failed)
    extra_bytes_read: int = 0  # bytes of experts only draft rows chose that were not resident before the window
    recent_draft_lengths: list[int] = field(default_factory=list)  # draft lengths of the last windows (<= 32)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0}


def _reads(core: Any) -> tuple[int, float]:
    """(bytes read from the file, seconds stalled on reads) so far, all layers."""
    b, s = 0, 0.0
    for d in core.cache_stats():
        if d is not None:
            b += d["bytes_read"]
            s += d["stall_s"]
    return b, s


def _window_extra_bytes(routes: list[np.ndarray | None], resident: np.ndarray | None, expert_bytes: list[int]) -> int:
    """Bytes of the experts that only draft rows (rows 1..) chose and that were not resident before the window."""
    if resident is None:
        return 0
    total = 0
    for il, r in enumerate(routes):
        if r is None or len(r) < 2:
            continue
        extra = set(r[1:].ravel().tolist()) - set(r[0].tolist())
        total += sum(expert_bytes[il] for e in extra if not resident[il, e])
    return total


def accept_token(sampler: Sampler, logits: np.ndarray, history: Sequence[int], draft: int | None) -> tuple[bool, int]:
    """The target's token for this row given a drafted one: (draft accepted, token emitted). Greedy: the argmax,
    accepted when equal. Sampling: accept with probability p(draft), else draw from p without it (exact)."""
    if sampler.config.temperature == 0.0 or draft is None:
        tok = sampler.sample(logits, history)
        return tok == draft, tok
    ids, p = sampler.distribution(logits, history)
    p = p / p.sum()
    hit = ids == draft
    pd = float(p[hit].sum())
    if sampler.rng.random() < pd:
        return True, int(draft)
    rest = np.where(hit, 0.0, p)
    cdf = np.cumsum(rest)
    i = int(np.searchsorted(cdf, sampler.rng.random() * cdf[-1], side="right"))
    return False, int(ids[min(i, ids.size - 1)])


class Speculator:
    """The draft source, the planner and the counters of one model; `run` is the decode loop with windows."""

    def __init__(
        self, model: Model, config: SpecConfig, draft_model: Model | None = None, planner: WindowPlanner | None = None
    ) -> None:
        """planner: the estimates of an earlier Speculator of the same model and draft source (other draft lengths
        or rule), which describe the same model, cache and source: kept instead of starting from the priors."""
        self.model, self.config = model, config
        if config.mode == "ngram":
            self.source: Any = NgramDraft()
        elif config.mode == "mtp":
            if not model.core_hparams.get("n_mtp"):
                raise UsageError(
                    "speculative='mtp' needs the MTP block loaded: load the model with speculative='mtp' "
                    "(--speculative mtp)"
                )
            self.source = MtpDraft(model)
        elif config.mode == "draft":
            if draft_model is None:
                raise UsageError("speculative='draft' needs a draft model: load with draft_model='small.gguf'")
            self.source = DraftModelDraft(draft_model)
        else:
            raise UsageError(f"speculative={config.mode!r}: no such draft source in this runtime")
        hp = model.hparams
        core = model._core()
        self.offloaded = model.plan.slots is not None
        self.planner = planner or WindowPlanner(
            expert_bytes=[int(b) for b in model.plan.expert_slot_bytes[: hp["n_layer"]]],  # the trunk's
            n_expert=int(hp["n_expert"]),
            n_expert_used=int(hp["n_expert_used"]),
            recurrent=bool(core.recurrent),
        )
        self.stats = SpecStats(mode=config.mode)
        self._declined = 0  # steps in a row the rule declined a costly draft source

    def report(self) -> dict[str, Any]:
        """Model.stats()['speculative']: the last generation's counters and the planner's current inputs."""
        return {**self.stats.as_dict(), "planner": self.planner.inputs()}

    def _resident(self) -> np.ndarray | None:
        return self.model._core().resident_mask() if self.offloaded else None

    def run(
        self,
        history: list[int],
        logits: np.ndarray,
        max_tokens: int,
        sampler: Sampler,
        stops: set[int],
        st: GenerationStats,
        on_token: Callable[[int, np.ndarray], None] | None = None,
    ) -> Iterator[int]:
        """The decode loop of Model._tokens_loop with verify windows, from the prompt's last logits: yields the
        generated ids (at most max_tokens, stopping at a stop id, on cancel() or at n_ctx; history grows with
        them), keeping Model._ctx_ids equal to the core's context after every step. on_token(id, logits) as in
        Model.stream_tokens: the target's own logits row of each emitted token."""
        m, cfg, P = self.model, self.config, self.planner
        S = self.stats = SpecStats(mode=cfg.mode)
        core = m._core()
        tok = sampler.sample(logits, history)
        row = logits
        emitted = 0
        pending_draft: int | None = None  # the first draft token of a declined step: a free acceptance sample
        prev_route: list[np.ndarray | None] | None = None  # per layer: the experts of the last kept row
        while True:
            if pending_draft is not None:
                P.observe_acceptance(int(tok == pending_draft), 1)
                pending_draft = None
            if tok in stops:
                st.finish_reason = "stop"
                return
            history.append(tok)
            emitted += 1
            st.generated_tokens += 1
            if on_token is not None:
                on_token(tok, row)
            yield tok
            left = max_tokens - emitted
            if left <= 0:
                return
            if m._cancel.is_set():
                st.finish_reason = "cancelled"
                return
            room = m.n_ctx - len(m._ctx_ids)
            if room <= 0:
                st.finish_reason = "length"
                return
            # the draft: tokens after tok; at most what the budget of tokens and context lets us keep
            n_cap = min(cfg.draft_max, left - 1, room - 1, m.plan.n_ubatch - 1)  # the window is one ubatch
            resident = self._resident()
            declined = False
            if not self.source.free and cfg.rule == "cost" and n_cap >= max(cfg.draft_min, 1):
                # a draft that costs a model's steps: draft only as many tokens as the rule would verify (a probe
                # of one every PROBE_EVERY declined steps keeps the acceptance estimate alive)
                n_cap = P.choose(n_cap, cfg.draft_min, resident) or (1 if self._declined >= PROBE_EVERY else 0)
                if n_cap == 0:
                    S.declined += 1
                    self._declined += 1
                    declined = True
            t0 = time.perf_counter()
            draft = self.source.propose(history, n_cap) if n_cap >= max(cfg.draft_min, 1) else []
            P.observe_draft_time(len(draft), time.perf_counter() - t0)
            if not draft:
                n = 0
                S.no_draft += int(not declined)
            elif cfg.rule == "always":
                n = len(draft) if len(draft) >= cfg.draft_min else 0
                P.b_row = P._bytes_per_row(resident)
            elif not self.source.free:
                n = len(draft)  # already sized by the rule above
                self._declined = 0
            else:
                n = P.choose(len(draft), cfg.draft_min, resident)
                if n == 0:
                    S.declined += 1
            if n == 0 and draft:
                pending_draft = draft[0]
            window = [tok] + draft[:n]
            state = core.save_state() if core.recurrent and n else None
            pos0 = len(m._ctx_ids)
            b0, s0 = _reads(core) if self.offloaded else (0, 0.0)
            t0 = time.perf_counter()
            out = m._eval(window, len(window))  # [1 + n, n_vocab]
            m._ctx_ids.extend(window)
            dt = time.perf_counter() - t0
            b1, s1 = _reads(core) if self.offloaded else (0, 0.0)
            S.steps += 1
            P.observe_step(n, dt, s1 - s0)
            P.observe_reads(b1 - b0, s1 - s0)
            routes = core.step_routes()  # [1 + n, K] per MoE layer: consecutive-row overlap, every step
            P.observe_routes(routes, prev_route)
            if n == 0:
                prev_route = [r[-1] if r is not None else None for r in routes]
                row = out[0]
                tok = sampler.sample(row, history)
                continue
            extra = _window_extra_bytes(routes, resident, P.expert_bytes)
            P.observe_window_bytes(n, extra)
            S.extra_bytes_read += extra
            S.windows += 1
            S.drafted += n
            S.recent_draft_lengths = (S.recent_draft_lengths + [n])[-32:]
            # row j decides the token after window[j]: accept drafts while they match
            accepted = 0
            emit: list[int] = []
            for j in range(n):
                ok, t = accept_token(sampler, out[j], history + emit, draft[j])
                emit.append(t)
                if not ok:
                    break
                accepted += 1
            else:
                emit.append(sampler.sample(out[n], history + emit))  # every draft passed: the bonus token
            S.accepted += accepted
            P.observe_acceptance(accepted, n)
            prev_route = [r[accepted] if r is not None else None for r in routes]  # the last kept row
            if accepted < n:  # keep tok + the accepted drafts; the rows after them are dropped
                S.rollbacks += 1
                self._roll_back(pos0, window[: 1 + accepted], state)
            # emit the accepted drafts (they are in the context); the last token of emit is the next pending one
            for j, t in enumerate(emit[:-1]):
                if t in stops:  # a plain loop never evaluates a stop token: drop it from the context
                    self._roll_back(pos0, window[: 1 + j], state)
                    st.finish_reason = "stop"
                    return
                history.append(t)
                emitted += 1
                st.generated_tokens += 1
                if on_token is not None:
                    on_token(t, out[j])
                yield t
                if emitted >= max_tokens:
                    return
                if m._cancel.is_set():
                    st.finish_reason = "cancelled"
                    return
            tok, row = emit[-1], out[len(emit) - 1]

    def _roll_back(self, pos0: int, keep: list[int], state: bytes | None) -> None:
        """Make the context end with `keep` at position pos0 (the window's first rows): attention truncates its KV
        cache; a recurrent state is restored to pos0 (saved before the window) and the kept rows re-run."""
        m = self.model
        core = m._core()
        if not core.recurrent:
            core.truncate(pos0 + len(keep))
            del m._ctx_ids[pos0 + len(keep) :]
            return
        core.load_state(state, pos0)
        del m._ctx_ids[pos0:]
        m._eval(keep, 1)
        m._ctx_ids.extend(keep)
