"""moelite.load / Model: the embeddable API.

    with moelite.load("model.gguf", memory_budget="2GiB", policy="lfuda") as m:
        text = m.generate("Once upon a time", max_tokens=64)
        for piece in m.stream("The capital of France is", max_tokens=16):
            print(piece, end="", flush=True)
        m.chat([{"role": "user", "content": "Hi"}])
        m.stats()

A Model is safe to share between threads: generation calls are serialized by a lock, and `cancel()` (from
any thread, e.g. a GUI's) stops the running generation after the current token (or prompt chunk). An open
`stream()` iterator holds the model until it is exhausted, closed or garbage-collected; starting another
generation from the same thread meanwhile is a UsageError (it would corrupt the open stream).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _core
from .._cpu import cpu_backend
from ..errors import BudgetError, ExpertIOError, ModelFormatError, UsageError
from .args import INT32_MAX, MAX_LOOKAHEAD, MAX_THREADS, finite_float, int_in, ints_in, is_int
from .hparams import planned, with_mtp
from .planner import DEFAULT_SNAPSHOTS, Plan, expert_slots_of, parse_size, plan_host_tier, plan_memory, plan_standins
from .sampling import GenerationOptions, generation_options
from .speculative import (
    DEFAULT_DRAFT_MAX,
    DEFAULT_DRAFT_MIN,
    Speculator,
    draft_budget,
    prepare_speculation,
    spec_config,
)
from .validate import STANDINS_SUFFIX, check_standins, load_hparams

KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml types; q8_0 needs flash attention (V stored untransposed)
KV_ELSIZE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # bytes per cached element
# who runs an expert that misses the VRAM arena but sits in the RAM tier (csrc/tiering.h)
CPU_COMPUTE = {"never": 0, "auto": 1, "always": 2}
MAX_UBATCH = 1 << 16  # prompt tokens per graph at most: the plan's scratch grows with it (llama.cpp's default: 512)
MAX_IO_THREADS = 64  # expert-read threads (csrc/expert_cache.h), 4 by default
SNAPSHOT_INTERVAL = 1024  # recurrent models: prefill keeps a state snapshot at least every this many tokens
DEFAULT_MODEL = Path(__file__).parent.parent / "data" / "demo.gguf"  # no resolve(): dev trees use symlinks


@contextlib.contextmanager
def _core_errors(path: str):
    """Map the C++ core's exceptions to moelite.errors."""
    try:
        yield
    except _core.FormatError as e:
        msg = str(e)
        raise ModelFormatError(msg if path in msg else f"{path}: {msg}") from None
    except _core.IOError as e:
        raise ExpertIOError(str(e)) from None
    except _core.BudgetError as e:
        raise BudgetError(str(e)) from None


@dataclass
class GGUFTable:
    """A model file as the C++ reader indexes it: one GGUF, or a split set (NAME-00001-of-0000N.gguf ...) read
    whole from any of its shards."""

    path: str  # the file, or the set's first shard (the one holding the metadata)
    kv: dict[str, Any]
    tensors: dict[str, tuple]  # name -> (ggml type, shape in ggml order, offset in its file, nbytes)
    files: list[tuple[str, int]]  # (path, size) of the file, or of every shard in order
    tensor_file: dict[str, int]  # name -> index into files
    alignment: int

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def limits(self) -> dict[str, int]:
        """name -> size of the file its bytes lie in (runtime/validate.py checks each range against it)."""
        return {name: self.files[f][1] for name, f in self.tensor_file.items()}

    def describe(self) -> str:
        """The file, or 'FIRST (split set of N files, SIZE)' for a status line."""
        if len(self.files) == 1:
            return self.path
        return f"{self.path} (split set of {len(self.files)} files, {self.size / 2**30:.2f} GiB)"


def read_table(path: str) -> GGUFTable:
    """The GGUF (or split set) at path, indexed and range-checked by the C++ reader; errors as moelite.errors."""
    with _core_errors(path):
        meta = _core.read_gguf(path)
    names = [t[0] for t in meta["tensors"]]
    return GGUFTable(
        path=meta["path"],
        kv=meta["kv"],
        tensors={name: (typ, shape, off, nb) for name, typ, shape, off, nb in meta["tensors"]},
        files=[(str(p), int(n)) for p, n in meta["files"]],
        tensor_file=dict(zip(names, meta["tensor_files"])),
        alignment=int(meta["alignment"]),
    )


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when this build has CUDA and a device is visible, else 'cpu'."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"device {device!r}: expected auto, cpu or cuda")
    has_cuda = bool(_core.has_cuda) and _core.cuda_device_count() > 0
    if device == "cuda" and not has_cuda:
        raise UsageError(
            "device='cuda' but "
            + (
                "no CUDA device is visible"
                if _core.has_cuda
                else "this build has no CUDA support (reinstall with CMAKE_ARGS=-DMOELITE_CUDA=ON)"
            )
        )
    return "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"


def default_model_path() -> str:
    if not DEFAULT_MODEL.exists():
        raise ModelFormatError(f"{DEFAULT_MODEL}: the embedded demo model is missing from this install")
    return str(DEFAULT_MODEL)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = ""

    @property
    def decode_tok_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class Model:
    """A loaded MoE GGUF: dense part resident, routed experts in a slot cache fed from disk."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        memory_budget: str | int | None = None,
        policy: str | None = None,
        policy_window: int | None = None,
        cache_shares: Sequence[float] | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_ubatch: int | None = None,
        kv_type: str = "f16",
        record_trace: bool = False,
        use_calibration: bool = True,
        prefetch: bool = True,
        prefetch_depth: int = 1,
        n_io_threads: int = 4,
        device: str = "auto",
        gpu: int = 0,
        vram_budget: str | int | None = None,
        host_slots: int | Sequence[int] | None = None,
        cpu_compute: str = "auto",
        state_snapshots: int = DEFAULT_SNAPSHOTS,
        flash_attn: bool = True,
        repack: bool = True,
        swap_threshold: float = 0.0,
        fused_graph: bool = True,
        overlap_reads: bool = True,
        standins: bool | str | os.PathLike = False,
        standin_threshold: float = 0.5,
        expert_gemm: bool = True,
        decode_attn: bool = True,
        prompt_attn: bool = True,
        mlock: bool = False,
        ple_cache_bytes: int | None = None,
        speculative: str = "off",
        draft_max: int = DEFAULT_DRAFT_MAX,
        draft_min: int = DEFAULT_DRAFT_MIN,
        draft_rule: str = "cost",
        draft_model: str | os.PathLike | None = None,
    ) -> None:
        self.path = os.path.expanduser(str(path)) if path is not None else default_model_path()
        if os.path.isdir(self.path):
            raise ModelFormatError(
                f"{self.path}: is a directory (moelite.load converts a Hugging Face directory; "
                "Model() takes a .gguf file)"
            )
        if not os.path.isfile(self.path):
            raise ModelFormatError(f"{self.path}: no such model file")
        if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
            raise UsageError(f"kv_type {kv_type!r}: expected one of {', '.join(KV_TYPES)}")
        if kv_type == "q8_0" and not flash_attn:
            raise UsageError(
                "kv_type 'q8_0' needs flash_attn=True (the plain path caches V transposed, which a "
                "block-quantized cache cannot hold)"
            )
        # the numbers (runtime/args.py: a UsageError naming the option and its range), before the file is read
        swap_threshold = finite_float("swap_threshold", swap_threshold, 0.0, 1.0, hi_open=True, why="0: exact routing")
        self.swap_threshold = swap_threshold
        standin_threshold = finite_float(
            "standin_threshold",
            standin_threshold,
            0.0,
            1.0,
            lo_open=True,
            why="the share of a token's top routing weight at or below which a missing expert runs as its stand-in",
        )
        policy_window = int_in("policy_window", policy_window, 1, INT32_MAX, optional=True)
        n_ctx = int_in("n_ctx", n_ctx, 0, INT32_MAX, optional=True, why="0: the model's context, at most 4096")
        n_threads = int_in("n_threads", n_threads, 0, MAX_THREADS, optional=True, why="0: the cores, at most 8")
        n_ubatch = int_in("n_ubatch", n_ubatch, 1, MAX_UBATCH, optional=True)
        n_io_threads = int_in("n_io_threads", n_io_threads, 0, MAX_IO_THREADS, why="0: reads on the compute thread")
        prefetch_depth = int_in("prefetch_depth", prefetch_depth, 1, MAX_LOOKAHEAD, why="MoE layers ahead")
        gpu = int_in("gpu", gpu, 0, INT32_MAX)
        state_snapshots = int_in("state_snapshots", state_snapshots, 0, INT32_MAX)
        parse_size(memory_budget)  # both budgets on every device, though the CPU only uses one
        parse_size(vram_budget, "VRAM budget")
        if not isinstance(cpu_compute, str) or cpu_compute not in CPU_COMPUTE:
            raise UsageError(f"cpu_compute {cpu_compute!r}: expected one of {', '.join(CPU_COMPUTE)}")
        if not isinstance(mlock, (bool, np.bool_)):
            raise UsageError(f"mlock {mlock!r}: expected True or False")
        ple_cache_bytes = int_in(
            "ple_cache_bytes", ple_cache_bytes, 0, 1 << 62, optional=True, why="the PLE table's row cache"
        )
        self.spec_config = spec_config(speculative, draft_max, draft_min, draft_rule)  # runtime/speculative.py
        self.device = resolve_device(device)
        from ..cache_policies.registry import DEFAULT_POLICY, make_policy  # policy names and knobs live there

        # a split set is opened from any of its shards; self.path is then its first shard (side files hang off it)
        self.table = read_table(self.path)
        self.path = self.table.path
        self.kv: dict[str, Any] = self.table.kv
        self.tensors = self.table.tensors
        self.alignment = self.table.alignment
        # parse_hparams + runtime/validate.py
        self.hparams = load_hparams(self.path, self.kv, self.tensors, file_size=self.table.limits)
        if kv_type == "q8_0":  # each cached head must be whole q8_0 blocks of 32
            sizes = set(self.hparams.get("layer_head_k", [])) | set(self.hparams.get("layer_head_v", []))
            if self.hparams.get("kv_lora_rank"):
                sizes = {self.hparams["kv_lora_rank"], self.hparams["kv_lora_rank"] + self.hparams["n_rot"]}
            if any(self.hparams.get("layer_indexer", [])):  # DSA: the indexer's key cache too (KPool: 2 halves)
                sizes.add(self.hparams["indexer_head_size"])
            if any(d % 32 for d in sizes):
                raise UsageError(
                    f"kv_type 'q8_0' needs head sizes that are multiples of 32; this model has {sorted(sizes)}"
                )
        calib = self._calibration() if use_calibration else {}
        side = self.path + ".calibration.json"
        # the side file `moelite analyze` wrote, when this load uses it (the CLI says so)
        self.calibration_file = side if calib and os.path.isfile(side) else None
        if policy is None:  # calibrated choice (moelite analyze), else the default (LFUDA)
            policy = str(calib.get("policy", DEFAULT_POLICY))
            if policy_window is None and calib.get("m"):
                policy_window = int(calib["m"])
            if cache_shares is None and calib.get("layer_shares") is not None:
                cache_shares = [float(x) for x in calib["layer_shares"]]
                n_moe = sum(1 for f in self.hparams.get("layer_ffn", []) if f == 1)
                if len(cache_shares) != n_moe:  # a side file for another model: say which file, whatever the budget
                    where = self.calibration_file or f"{self.path} (moelite.calibration keys)"
                    raise ModelFormatError(
                        f"{where}: layer_shares has {len(cache_shares)} entries, the model has {n_moe} MoE layers"
                    )
        # speculative="mtp": the first MTP block is loaded and planned as one more layer (its dense weights, KV
        # cache and expert slots in the budget); the core runs it after every ubatch (csrc/mtp.cpp)
        self.core_hparams = self.hparams
        if self.spec_config.mode == "mtp":
            self.core_hparams = with_mtp(self.hparams, self.tensors, self.path)
            if host_slots is not None or standins or self.device == "cuda":
                raise UsageError("speculative='mtp' does not run with host_slots, standins or a CUDA device yet")
            if cache_shares is not None:  # the MTP block's layer gets an equal share of the arena
                n = len(cache_shares)
                cache_shares = [x * n / (n + 1) for x in cache_shares] + [1.0 / (n + 1)]
        if policy_window is None:
            policy_window = 16
        knobs: dict[str, Any] = {"m": policy_window} if policy == "consistency" else {}
        pol = make_policy(policy, shares=cache_shares, **knobs)
        ctx_len = int(self.hparams["context_length"])
        self.n_ctx = n_ctx or min(ctx_len, 4096)
        if self.n_ctx < 8:
            raise UsageError(
                f"n_ctx={self.n_ctx}"
                + ("" if n_ctx else f" (the model's context_length {ctx_len})")
                + ": expected at least 8"
            )
        if self.n_ctx > ctx_len:
            warnings.warn(
                f"n_ctx={self.n_ctx} is above the context the model was trained with ({ctx_len} tokens): "
                "text past it may degrade",
                UserWarning,
                stacklevel=3,
            )
        # ggml's compute threads spin at every step's barriers: more threads than CPUs only slow each step down
        # (64 threads on 2 CPUs took over 20 s for 2 tokens of a 300 KB model); the CPUs this process may use
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if n_threads and n_threads > cpus:
            warnings.warn(
                f"n_threads={n_threads} is more than the {cpus} CPUs this process may run on: {cpus} threads compute",
                UserWarning,
                stacklevel=3,
            )
        self.n_threads = min(n_threads, cpus) if n_threads else max(1, min(cpus, 8))
        # speculative decoding's draft model: resident, its memory taken from this model's budget
        self.draft_model, draft_bytes = prepare_speculation(self, draft_model, self.spec_config, kv_type=kv_type)

        # the expert arena: VRAM on a GPU (vram_budget), RAM on the CPU (memory_budget)
        shares = list(pol.shares) if pol.shares else None
        self.plan: Plan = plan_memory(
            planned(self.core_hparams),
            self.tensors,
            n_ctx=self.n_ctx,
            n_ubatch=n_ubatch,
            kv_elsize=KV_ELSIZE[kv_type],
            budget=draft_budget(
                parse_size(
                    vram_budget if self.device == "cuda" else memory_budget,
                    "VRAM budget" if self.device == "cuda" else "memory budget",
                ),
                draft_bytes,
            ),
            shares=shares,
            label="VRAM budget" if self.device == "cuda" else "memory budget",
            n_snapshots=state_snapshots,
            flash_attn=bool(flash_attn),
        )
        # the RAM tier between the arena and the file (csrc/tiering.h): on a GPU from memory_budget; given
        # explicitly (host_slots) on any device, where on the CPU it runs the same tiering code on host memory
        if host_slots is not None:
            per = ints_in(
                "host_slots",
                [host_slots] * self.hparams["n_layer"] if is_int(host_slots) else host_slots,
                0,
                self.plan.n_expert,
                why="RAM slots per layer, at most its experts",
            )
            if len(per) != self.hparams["n_layer"]:
                raise UsageError(f"host_slots names {len(per)} layers, the model has {self.hparams['n_layer']}")
            if any(n < 1 for n, b in zip(per, self.plan.expert_slot_bytes) if b):
                raise UsageError(f"host_slots {host_slots!r}: expected at least 1 slot per MoE layer")
            self.host_slots = [n if b else 0 for n, b in zip(per, self.plan.expert_slot_bytes)]
        elif self.device == "cuda":
            self.host_slots = plan_host_tier(self.plan, parse_size(memory_budget), shares)
        else:
            self.host_slots = None
        # low-bit stand-ins (lossy, off by default): the side file's experts take part of the expert budget
        self.standins_path, standin_slots = None, []
        if standins:
            side = self.path + STANDINS_SUFFIX if standins is True else os.path.expanduser(str(standins))
            if not os.path.isfile(side):
                raise UsageError(
                    f"{side}: no stand-in file; write one with `moelite convert {self.path} --standins q2_k`"
                )
            stable = read_table(side)
            stensors = stable.tensors
            check_standins(side, stable.kv, stensors, self.path, self.tensors, self.table.size)
            if self.plan.slots is not None and self.device == "cpu":  # resident: every full expert is in memory
                sb, _, _ = expert_slots_of(self.hparams, stensors)
                self.plan.slots, standin_slots = plan_standins(self.plan, sb, shares)
                self.standins_path = side
        self.standin_threshold = standin_threshold if self.standins_path else 0.0
        self.standin_slots = standin_slots
        options = dict(
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_ubatch=self.plan.n_ubatch,
            kv_type=KV_TYPES[kv_type],
            expert_slots=self.plan.slots or [],
            policy=pol.id,
            window_m=pol.m or policy_window,
            prefetch=bool(prefetch),
            prefetch_depth=prefetch_depth,
            n_io_threads=n_io_threads,
            device=1 if self.device == "cuda" else 0,
            gpu=gpu,
            host_slots=self.host_slots or [],
            cpu_compute=CPU_COMPUTE[cpu_compute],
            flash_attn=bool(flash_attn),
            repack=bool(repack),
            swap_threshold=swap_threshold,
            fused_graph=bool(fused_graph),
            overlap_reads=bool(overlap_reads),
            expert_gemm=bool(expert_gemm),
            scratch_reserve=int(self.plan.scratch_bytes),
            decode_attn=bool(decode_attn),
            prompt_attn=bool(prompt_attn),
            standin_path=self.standins_path or "",
            standin_slots=standin_slots,
            standin_threshold=self.standin_threshold,
            mlock=bool(mlock),
            ple_cache_bytes=int(self.plan.ple_bytes if ple_cache_bytes is None else ple_cache_bytes),
        )
        self.flash_attn = bool(flash_attn)
        self.cpu_compute = cpu_compute
        self.prefetch = bool(prefetch) and self.plan.slots is not None
        self.prefetch_depth = prefetch_depth
        with _core_errors(self.path):
            self._m = _core.Model(self.path, self.core_hparams, options)
        if mlock:
            _warn_unlocked(self._m.memory())
        self._m.record_routes = record_trace
        self.policy = pol
        self._lock = threading.Lock()  # released by any thread: an abandoned stream is closed by the GC
        self._owner: int | None = None  # thread id holding _lock
        self._cancel = threading.Event()
        # called as prefill_progress(done, total) after each prompt chunk (the CLI shows a progress line)
        self.prefill_progress: Callable[[int, int], None] | None = None
        self._ctx_ids: list[int] = []  # token ids whose K/V are in the cache, in order
        # recurrent models (Qwen3.5, LFM2): a state cannot be truncated like a KV cache, so prompt reuse restores
        # the newest snapshot (position, state blob) at or before the divergence and recomputes from there
        self.state_snapshots = state_snapshots
        self._snapshots: list[tuple[int, bytes]] = []
        self.snapshot_restores = 0  # prefills that restarted from a snapshot (not from position 0)
        self.snapshot_interval = SNAPSHOT_INTERVAL
        self._trace_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._trace_starts: list[int] = []  # token index (in the trace) where each context started
        self._trace_layers: list[int] = []
        self.last_stats = GenerationStats()
        self._speculator: Speculator | None = None  # the draft source and window planner of the last config
        self._tokenizer = None
        self._template = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        if self._owner == threading.get_ident():  # inside an open stream of this thread: it ends at its next step
            self._closed = True
            return
        with self._exclusive("close"):
            self._closed = True
            self._m = None
        if getattr(self, "draft_model", None) is not None:
            self.draft_model.close()

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        """Hold the model for one call (or one open stream); re-entry from the owning thread is a UsageError."""
        me = threading.get_ident()
        if self._owner == me:
            raise UsageError(
                f"{what}: a generation on this model is still open in this thread; exhaust or close() "
                "its iterator first"
            )
        self._lock.acquire()
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _core(self) -> Any:
        if self._closed or self._m is None:
            raise UsageError(f"{self.path}: the model is closed")
        return self._m

    # --- metadata ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_gguf_kv(self.kv, self.path)
        return self._tokenizer

    @property
    def chat_template(self):
        if self._template is None:
            from .chat_template import ChatTemplate

            self._template = ChatTemplate.from_gguf_kv(self.kv, self.tokenizer, self.path)
        return self._template

    @property
    def n_vocab(self) -> int:
        return int(self.hparams["n_vocab"])

    def _calibration(self) -> dict[str, Any]:
        """moelite.calibration.* from the side file `MODEL.gguf.calibration.json` (written by `moelite
        analyze`), overridden by GGUF keys of the same names; checked (cache_policies/calibration.py)."""
        from ..cache_policies.calibration import load_calibration

        return load_calibration(self.path, self.kv)

    def info(self) -> dict[str, Any]:
        mem = self._core().memory()
        p = self.plan
        return {
            "path": self.path,
            "name": self.kv.get("general.name", Path(self.path).stem),
            "architecture": self.hparams["arch"],
            "device": self.device,
            "n_layer": self.hparams["n_layer"],
            # MTP blocks in the file (blk.{n_layer}..; shapes checked at load, not run, not counted as resident)
            "n_layer_nextn": self.hparams.get("n_layer_nextn", 0),
            "n_expert": p.n_expert,
            "n_expert_used": p.n_expert_used,
            "n_ctx": self.n_ctx,
            # prompt tokens per graph: 512, or under a memory budget halved while its scratch exceeds 10 % of the
            # budget; a prompt's logits depend on it in the last bits (batch invariance: docs/ARCHITECTURE.md), so
            # compare a capped and a resident run at the same n_ubatch
            "n_ubatch": p.n_ubatch,
            "n_threads": self.n_threads,
            "policy": self.policy.name,
            "prefetch": self.prefetch,
            "prefetch_depth": self.prefetch_depth,
            "memory_budget": p.budget,
            "offloaded": p.slots is not None,
            "expert_slots": self._core().cache_quotas(),
            "dense_bytes": mem["dense_bytes"],
            "kv_bytes": mem["kv_bytes"],
            "state_bytes": self._core().state_bytes,
            "state_snapshots": len(self._snapshots),
            "flash_attn": self.flash_attn,
            # one ggml graph per step (CPU, every expert resident, no recurrent layer): csrc/model_fused.cpp
            "fused_graph": mem["fused_graph"],
            # low-bit stand-ins (standins=True, offloaded): side file, per-layer stand-in slots, threshold
            "standins": (
                {"path": self.standins_path, "slots": self.standin_slots, "threshold": self.standin_threshold}
                if self.standins_path
                else None
            ),
            # on the CPU, weights in ggml's repacked layouts (CPU_REPACK): dense mul_mat weights and expert arenas;
            # tiled_prompts: prompt matmuls over >= 8 tokens unpack repacked Q4_K for ggml's tiled GEMM (unrepack.cpp);
            # q4_K_packer: Q4_K experts read from disk are packed into ggml's layout by unrepack.cpp (checked against
            # ggml at load), not by ggml's slower conversion
            "repack": {
                "available": mem["repack_available"],
                "dense_tensors": mem["repacked_tensors"],
                "dense_bytes": mem["repacked_dense_bytes"],
                "arena_bytes": mem["repacked_arena_bytes"],
                "tiled_prompts": mem["repack_tiled_prompts"],
                "q4_K_packer": mem["repack_q4_K_packer"],
            },
            "arena_bytes": mem["arena_bytes"],
            "scratch_bytes": p.scratch_bytes,  # the bound the plan reserves
            "scratch_bytes_in_use": mem["scratch_bytes"],
            "expert_bytes_total": p.expert_bytes_total,
            "file_size": self.table.size,
            # the model's files: one, or every shard of a split set in order (path is then the first)
            "files": [f for f, _ in self.table.files],
            "ram_tier_slots": self._core().tier2_quotas() or None,
            "cpu_compute": self.cpu_compute,
            "tier_costs": self._core().costs() if self.host_slots else None,
            "cpu_backend": cpu_backend()["variant"],  # ggml CPU variant of a portable build, or "built-in"
            # mlock=True: page-rounded bytes of the dense weights + KV cache under mlock (0 when off or refused)
            "mlock": mem["mlock"],
            "locked_bytes": mem["locked_bytes"],
            # MOELITE_DENSE_MMAP=1 (benchmark switch): the dense weights are the model file's pages in the page cache
            "dense_mmap": mem["dense_mmap"],
        }

    # --- evaluation --------------------------------------------------------------------------------------
    def _eval(self, ids: Sequence[int], n_out: int = 1) -> np.ndarray:
        core = self._core()
        starts_context = core.n_past == 0
        try:
            with _core_errors(self.path):
                out = core.eval(np.asarray(ids, dtype=np.int32), n_out)
        except BaseException:
            # a step that failed half-way leaves the KV cache / recurrent state of some layers advanced: start over
            core.reset()
            self._ctx_ids, self._snapshots = [], []
            raise
        if core.record_routes:
            rid, rw, layers, la = core.take_routes()
            if len(rid):
                if starts_context or not self._trace_starts:
                    self._trace_starts.append(sum(len(p[0]) for p in self._trace_parts))
                self._trace_parts.append((rid, rw, la))
                self._trace_layers = list(layers)
        return out

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = ints_in("token_ids", ids, 0, self.n_vocab - 1, why=f"token ids of a vocabulary of {self.n_vocab}")
        if not ids:
            raise UsageError("empty prompt: give at least one token")
        if len(ids) > self.n_ctx:
            raise UsageError(f"prompt of {len(ids)} tokens exceeds the context size n_ctx={self.n_ctx}")
        return ids

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [n_tokens, n_vocab] (float32) of every position, in a fresh context."""
        ids = self._check_ids(token_ids)
        with self._exclusive("logits"):
            self._core().reset()
            self._ctx_ids = []
            self._snapshots = []
            out = self._eval(ids, len(ids))
            self._ctx_ids = list(ids)
            return out

    def logits_blocks(self, token_ids: Sequence[int], first: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Logits of a fresh context block by block: yields (position, logits [rows, n_vocab] float32) for the
        positions >= first, one n_ubatch chunk at a time (the core's own chunking, so every row is what
        `logits()` gives), so scoring a long text never holds [n_tokens, n_vocab] at once. Row r of a block is
        the distribution of the token at position + r + 1. The model is held until the iterator ends."""
        ids = self._check_ids(token_ids)
        first = int_in("first", first, 0, len(ids) - 1, why=f"a position of the {len(ids)} tokens")
        with self._exclusive("logits_blocks"):
            self._core().reset()
            self._ctx_ids, self._snapshots = [], []
            step = self.plan.n_ubatch
            for i in range(0, len(ids), step):
                chunk = ids[i : i + step]
                n_out = min(len(chunk), max(0, i + len(chunk) - first))
                out = self._eval(chunk, n_out) if n_out else self._eval(chunk, 1)
                self._ctx_ids.extend(chunk)
                if n_out:
                    yield i + len(chunk) - n_out, out

    def eval(self, token_ids: Sequence[int]) -> np.ndarray:
        """Evaluate token_ids after the cached context (llama.cpp's `eval`); logits [n_vocab] of the last one.
        For teacher-forced decoding and scoring: `eval(prompt)` then `eval([t])` per next token is the same
        computation as generating those tokens. A UsageError past n_ctx (nothing is evaluated then)."""
        ids = self._check_ids(token_ids)
        with self._exclusive("eval"):
            if len(self._ctx_ids) + len(ids) > self.n_ctx:
                raise UsageError(
                    f"eval(): {len(self._ctx_ids)} cached + {len(ids)} new tokens exceed the "
                    f"context size n_ctx={self.n_ctx}"
                )
            out = None
            step = self.plan.n_ubatch
            for i in range(0, len(ids), step):  # the core's chunking, as a prompt is evaluated
                out = self._eval(ids[i : i + step], 1)
                self._ctx_ids.extend(ids[i : i + step])
            self._snapshot()
            return out[-1]

    def _prefill(self, ids: list[int]) -> np.ndarray | None:
        """Evaluate ids reusing the longest cached prefix, one n_ubatch chunk at a time (the core's own chunking,
        so the result is the same); logits of the last token, or None when cancel() stopped it."""
        n = 0
        while n < min(len(ids), len(self._ctx_ids)) and ids[n] == self._ctx_ids[n]:
            n += 1
        n = min(n, len(ids) - 1)  # at least one token must be evaluated to get logits
        n = self._rewind(n)
        self._ctx_ids = self._ctx_ids[:n]
        step = self.plan.n_ubatch
        while True:
            chunk = ids[n : n + step]
            out = self._eval(chunk, 1)
            n += len(chunk)
            self._ctx_ids = list(ids[:n])
            if self.prefill_progress is not None:
                self.prefill_progress(n, len(ids))
            if n >= len(ids) or n - self._last_snapshot() >= self.snapshot_interval:
                self._snapshot()
            if n >= len(ids):
                return out[-1]
            if self._cancel.is_set():
                return None

    def _rewind(self, n: int) -> int:
        """Go back to position n of the cached context: the KV cache is truncated; a recurrent state is restored
        from the newest snapshot at or before n (or reset). Returns the position reached (<= n)."""
        core = self._core()
        if n >= core.n_past:
            return core.n_past
        if not core.recurrent:
            core.truncate(n)
            return n
        usable = [(p, blob) for p, blob in self._snapshots if p <= n]
        if usable:
            p, blob = usable[-1]
            with _core_errors(self.path):
                core.load_state(blob, p)
            self.snapshot_restores += 1
        else:
            core.reset()
            p = 0
        self._snapshots = [(q, b) for q, b in self._snapshots if q <= p]  # later ones describe a dropped context
        return p

    def _last_snapshot(self) -> int:
        return self._snapshots[-1][0] if self._snapshots else 0

    def _snapshot(self) -> None:
        """Keep the recurrent state of the current position (the newest `state_snapshots` are kept)."""
        core = self._core()
        if not core.recurrent or not self.state_snapshots or core.n_past == self._last_snapshot():
            return
        self._snapshots.append((core.n_past, core.save_state()))
        del self._snapshots[: -self.state_snapshots]

    def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._check_ids(self.tokenizer.encode(prompt, add_special=True))
        return self._check_ids(prompt)

    def stream_tokens(
        self,
        prompt: str | Sequence[int],
        *,
        on_token: Callable[[int, np.ndarray], None] | None = None,
        logits_processor: Callable[[Sequence[int], np.ndarray], np.ndarray] | None = None,
        **options: Any,
    ) -> Iterator[int]:
        """Yield generated token ids (the engine loop; text APIs build on it). Options: max_tokens (256),
        temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty, seed, stop_ids, ignore_eos; the command
        line's names (repeat_penalty, temp, n_predict) work too. Defaults: runtime/sampling.py. `on_token(id,
        logits)`, if given, is called before each token is yielded with the model's own logits [n_vocab] (float32,
        before temperature and penalties) of the step that produced it: what log-probabilities are computed from.
        `logits_processor(generated_ids, logits) -> logits`, if given, replaces the logits the sampler sees at each
        step (a grammar's mask: runtime/constrained.py); `on_token` still gets the model's own."""
        opts = generation_options(options, "stream_tokens")
        if opts.stop:
            raise UsageError("stream_tokens(): stop strings need text; use stream() or generate()")
        return self._tokens_loop(self._tokens(prompt), opts, on_token, logits_processor)

    def _tokens_loop(
        self,
        ids: list[int],
        opts: GenerationOptions,
        on_token: Callable[[int, np.ndarray], None] | None = None,
        logits_processor: Callable[[Sequence[int], np.ndarray], np.ndarray] | None = None,
    ) -> Iterator[int]:
        from .sampling import Sampler

        sampler = Sampler(opts.sampler)
        max_tokens = opts.max_tokens
        stops = (
            set(opts.stop_ids)
            if opts.stop_ids is not None
            else set(self.tokenizer.stop_ids)
            if self._has_tokenizer()
            else set()
        )
        spec = self._speculator_for(opts) if logits_processor is None else None  # grammars decode plainly
        with self._exclusive("generate"):
            self._cancel.clear()
            st = self.last_stats = GenerationStats(prompt_tokens=len(ids))
            t0 = time.perf_counter()
            logits = self._prefill(ids)
            st.prompt_s = time.perf_counter() - t0
            history = list(ids)
            t1 = time.perf_counter()
            st.finish_reason = "length" if logits is not None else "cancelled"
            if spec is not None and logits is not None and max_tokens > 0:  # decode with verify windows
                yield from spec.run(history, logits, max_tokens, sampler, stops, st, on_token)
            for i in range(max_tokens if logits is not None and spec is None else 0):
                scores = logits if logits_processor is None else logits_processor(history[len(ids) :], logits)
                tok = sampler.sample(scores, history)
                if tok in stops:
                    st.finish_reason = "stop"
                    break
                st.generated_tokens += 1
                history.append(tok)
                if on_token is not None:
                    on_token(tok, logits)
                yield tok
                if i == max_tokens - 1:  # no forward pass for a token nobody will read
                    break
                if self._cancel.is_set():
                    st.finish_reason = "cancelled"
                    break
                if len(self._ctx_ids) >= self.n_ctx:
                    st.finish_reason = "length"
                    break
                logits = self._eval([tok], 1)[-1]
                self._ctx_ids.append(tok)
            st.decode_s = time.perf_counter() - t1
            self._snapshot()  # the end of a turn: where the next prompt most likely diverges

    def _speculator_for(self, opts: GenerationOptions) -> Speculator | None:
        """The Speculator for this call's settings (the load settings, overridden per call), or None when off;
        kept between calls with the same settings, so the planner's estimates carry over (to other draft lengths
        and rules of the same draft source too)."""
        cfg = self.spec_config
        if opts.speculative:
            given = {"mode": opts.speculative.get("speculative", cfg.mode)}
            given["draft_max"] = opts.speculative.get("draft_max", cfg.draft_max)
            given["draft_min"] = opts.speculative.get("draft_min", min(cfg.draft_min, given["draft_max"]))
            given["rule"] = opts.speculative.get("draft_rule", cfg.rule)
            cfg = spec_config(given["mode"], given["draft_max"], given["draft_min"], given["rule"])
        if not cfg.on:
            return None
        old = self._speculator
        if old is None or old.config != cfg:  # the same draft source keeps its measured estimates
            keep = old.planner if old is not None and old.config.mode == cfg.mode else None
            self._speculator = Speculator(self, cfg, self.draft_model, planner=keep)
        return self._speculator

    def _has_tokenizer(self) -> bool:
        try:
            _ = self.tokenizer
            return True
        except Exception:
            return False

    def stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[str]:
        """Yield text pieces as they are generated (complete UTF-8 only; stop strings are cut). Options as
        stream_tokens, plus stop (a string or a list of them)."""
        opts = generation_options(options, "stream")
        return self._text_loop(self._tokens(prompt), opts)

    def _text_loop(self, ids: list[int], opts: GenerationOptions) -> Iterator[str]:
        from .sampling import StopChecker

        dec = self.tokenizer.stream_decoder()
        stopper = StopChecker(list(opts.stop))
        gen = self._tokens_loop(ids, opts)
        try:
            for tok in gen:
                piece = stopper.push(dec.push(tok))
                if piece:
                    yield piece
                if stopper.stopped:
                    self.last_stats.finish_reason = "stop"
                    return
            tail = stopper.push(dec.flush())
            if not stopper.stopped:
                tail += stopper.flush()
            if tail:
                yield tail
        finally:
            gen.close()

    def generate(self, prompt: str | Sequence[int], **options: Any) -> str | list[int]:
        """Text in -> text out (stop strings cut). Token ids in -> generated token ids out. Options as stream()."""
        opts = generation_options(options, "generate")
        if isinstance(prompt, str):
            return "".join(self._text_loop(self._tokens(prompt), opts))
        if opts.stop:
            raise UsageError("generate(): stop strings need a text prompt")
        return list(self._tokens_loop(self._tokens(prompt), opts))

    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **options: Any
    ) -> str | Iterator[str]:
        """Render messages with the model's chat template (add_generation_prompt) and answer. Options as stream()."""
        opts = generation_options(options, "chat")
        prompt = self.chat_template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(prompt, add_special=False)
        if (
            self.tokenizer.add_bos
            and self.tokenizer.bos_id is not None
            and (not ids or ids[0] != self.tokenizer.bos_id)
        ):
            if not prompt.startswith(self.tokenizer.bos_token or "\0"):
                ids = [self.tokenizer.bos_id] + ids
        it = self._text_loop(self._check_ids(ids), opts)
        return it if stream else "".join(it)

    def cancel(self) -> None:
        """Stop the running generation after the current token (safe from any thread)."""
        self._cancel.set()

    # --- cache introspection -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        per_layer = self._core().cache_stats()
        for s, n, u, g in zip(
            per_layer, self._core().swaps(), self._core().standin_uses(), self._core().gemm_experts()
        ):
            if s is not None:
                s["substitutions"] = n  # cache-aware routing (swap_threshold): routed experts replaced
                s["standin_uses"] = u  # stand-ins (standins=True): routed experts run as their low-bit copy
                s["gemm_experts"] = g  # expert_gemm: experts of prompt ubatches run as one 2-D matmul each
        total = _sum_layers(per_layer)
        st = self.last_stats
        tier2 = self._core().tier2_stats()
        ram = None
        if tier2 is not None:  # hits: served from RAM; misses: read from the file
            ram = _sum_layers(tier2)
            ram["cpu_experts"] = sum(self._core().cpu_experts())
        import psutil

        sc = self._core().standin_stats()  # the stand-ins' own cache: hits in memory, misses read
        return {
            "total": total,
            "ram_tier": ram,
            "standins": _sum_layers(sc) if sc is not None else None,
            "per_layer": [dict(s, layer=i) for i, s in enumerate(per_layer) if s],
            "last_generation": {
                "prompt_tokens": st.prompt_tokens,
                "generated_tokens": st.generated_tokens,
                "prompt_tok_s": st.prompt_tok_s,
                "decode_tok_s": st.decode_tok_s,
                "finish_reason": st.finish_reason,
            },
            "rss_bytes": psutil.Process().memory_info().rss,
            "memory": self._core().memory(),
            "policy": self.policy.name,
            # speculative decoding of the last generation (None: off): drafted, accepted, planner inputs
            "speculative": self._speculator.report() if self._speculator is not None else None,
            "per_token": _per_token(self._core().decode_times()),
        }

    def reset_stats(self) -> None:
        self._core().reset_stats()

    def reset(self) -> None:
        """Forget the cached context (the KV cache is reused from position 0)."""
        with self._exclusive("reset"):
            self._core().reset()
            self._ctx_ids = []
            self._snapshots = []

    def reopen(self) -> None:
        """Reopen the model file for expert reads (after it was replaced or repaired)."""
        with self._exclusive("reopen"), _core_errors(self.path):
            self._core().reopen()

    def trace(self):
        """Routing recorded so far (load with record_trace=True) as a cache_policies Trace: ids
        [n_tokens, n_moe_layers, k] in descending score order, routing weights, the gate-lookahead
        predictions, layer indices, n_expert, model name; one sequence per fresh context."""
        from ..cache_policies.trace import Trace

        if not self._trace_parts:
            raise UsageError("no routing was recorded: load the model with record_trace=True and run some tokens")
        ids = np.concatenate([p[0] for p in self._trace_parts])
        w = np.concatenate([p[1] for p in self._trace_parts]).astype(np.float32)
        # [N, L, D, k]: [t, l, d] = the prediction of layer l's experts made d + 1 MoE layers before it
        la_target = np.concatenate([p[2] for p in self._trace_parts])
        n_layers, depth = la_target.shape[1], la_target.shape[2]
        la = np.full_like(la_target, -1)  # trace convention: [t, l, d] predicts layer l + d + 1
        for d in range(depth):
            la[:, : max(n_layers - d - 1, 0), d] = la_target[:, d + 1 :, d]
        offsets = np.asarray(self._trace_starts + [len(ids)], dtype=np.int64)
        predicted = bool((la[:, :-1, 0] >= 0).all())  # every row with a next layer has its prediction
        return Trace(
            ids=ids,
            n_expert=int(self.hparams["n_expert"]),
            offsets=offsets,
            scores=w,
            lookahead_ids=la[:, :, 0] if predicted else None,
            lookahead_far=la[:, :, 1:] if predicted and depth > 1 else None,
            layers=np.asarray(self._trace_layers, dtype=np.int32),
            model=str(self.kv.get("general.name", Path(self.path).stem)),
        )

    def clear_trace(self) -> None:
        self._trace_parts = []
        self._trace_starts = []

    def __repr__(self) -> str:
        return f"<moelite.Model {self.hparams['arch']} {Path(self.path).name} policy={self.policy.name}>"


def _per_token(t: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where a decode step's time goes (steps since reset_stats(), eval() of one token each), in ms per token:
    waiting for expert reads, the expert cache's bookkeeping, and the rest (compute and graph overhead)."""
    n = t["steps"]
    if not n:
        return None
    ms = 1e3 / n
    return {
        "steps": n,
        "step_ms": t["step_s"] * ms,
        "io_wait_ms": t["wait_s"] * ms,
        "cache_ms": t["book_s"] * ms,
        "compute_ms": (t["step_s"] - t["wait_s"] - t["book_s"]) * ms,
    }


def _sum_layers(per_layer: list[dict | None]) -> dict[str, Any]:
    """One tier's per-layer cache counters summed over its MoE layers, plus the pooled hit rate."""
    keys = (
        "hits",
        "misses",
        "prefetch_issued",
        "prefetch_hits",
        "prefetch_wasted",
        "prefetch_far_issued",
        "prefetch_far_hits",
        "bytes_read",
        "loads",
        "evictions",
        "stall_s",
        "wait_s",
        "book_s",
        "promoted",
        "substitutions",
        "overlapped",
        "standin_uses",
        "gemm_experts",
    )
    total = {k: sum((s.get(k, 0) for s in per_layer if s), 0) for k in keys}
    lookups = total["hits"] + total["misses"]
    total["hit_rate"] = total["hits"] / lookups if lookups else 1.0
    return total


def _warn_unlocked(mem: Mapping[str, Any]) -> None:
    """mlock=True that the OS refused in part or whole: a warning saying why and how much, never an error."""
    if not mem["lock_failed_bytes"]:
        return
    import errno as errno_mod
    import resource

    err = int(mem["lock_errno"])
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    total = mem["lock_failed_bytes"] + mem["locked_bytes"]
    warnings.warn(
        f"mlock: {mem['lock_failed_bytes']} of {total} bytes (dense weights and KV cache) were not locked: "
        f"{errno_mod.errorcode.get(err, err)} ({os.strerror(err)}); RLIMIT_MEMLOCK is {limit} (raise it with "
        "`ulimit -l` or grant CAP_IPC_LOCK); the model runs unlocked",
        RuntimeWarning,
        stacklevel=4,
    )


def load(path: str | os.PathLike | None = None, *, convert_type: str | None = None, **options: Any) -> Model:
    """Open a MoE GGUF, a Hugging Face model directory (converted once into ~/.cache/moelite/converted, as the
    command line does; convert_type, default q8_0) or the embedded demo model when path is None. Options:
    memory_budget ('1.5GiB'), policy ('lru' | 'lfu' | 'lfuda' | 'consistency'), policy_window, cache_shares, n_ctx,
    n_threads, n_ubatch, kv_type ('f16' | 'f32'), record_trace, prefetch, prefetch_depth (offloaded: read the experts
    predicted for the next 1-3 MoE layers, default 1), device ('auto' | 'cpu' | 'cuda'),
    vram_budget, host_slots, cpu_compute ('auto' | 'never' | 'always'), swap_threshold (cache-aware routing, lossy,
    default 0 = exact: a routed expert not in memory is replaced by a resident one whose router probability is within
    this fraction of it), repack (CPU: ggml's repacked weight layouts,
    default True), fused_graph (one ggml graph per step where every expert is resident, default True; bit-identical),
    overlap_reads (offloaded: compute a step's cached experts while its misses are read, and a prompt's next group of
    experts while one group computes, default True; bit-identical),
    expert_gemm (CPU prompt ubatches: each expert's tokens in one 2-D matmul, ggml's repacked GEMM, default True;
    which way runs depends on the ubatch size alone, so offloading still changes no bit), decode_attn (CPU decode
    steps with flash attention: one pass over the KV cache per KV head for all its query heads, in F32, default True;
    off: ggml's flash attention, one query head at a time), prompt_attn (CPU prompt ubatches of 64 tokens and more with
    flash attention: 64 x 64 tiles whose rows are (token, head) pairs sharing a KV head, default True; off: ggml's
    tiled flash attention, one query head per tile), mlock (lock the dense weights and the KV cache in RAM, default
    False; refused by RLIMIT_MEMLOCK: a RuntimeWarning, the model runs unlocked; info()['locked_bytes']),
    ple_cache_bytes (Qwen4-Exp: the PLE n-gram table's row cache in bytes, at least one ubatch of rows; default: the
    plan's, 64 MiB or the table if smaller)."""
    import inspect

    valid = [p for p in inspect.signature(Model).parameters if p != "path"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(f"load(): unknown option {unknown[0]!r}; valid options: {', '.join(valid + ['convert_type'])}")
    if path is not None:
        from .files import DEFAULT_CONVERT_TYPE, is_hf_dir, resolve_model

        path = os.path.expanduser(str(path))
        if is_hf_dir(Path(path)):
            path = resolve_model(path, convert_type or DEFAULT_CONVERT_TYPE, progress=False)
    return Model(path, **options)
