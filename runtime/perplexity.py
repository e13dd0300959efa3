"""Log-probabilities of a model's own logits, perplexity and KL divergence as llama.cpp's `llama-perplexity` computes
them (tools/perplexity/perplexity.cpp of the pinned llama.cpp; method only, no code).

Log-probabilities are `log_softmax` of the logits in float64 (the logits themselves are the core's float32), for the
server's `logprobs` / `echo` and for the scoring below.

Perplexity (llama-perplexity's default mode): the text is tokenized once (BOS added when the model asks for it), cut
into `n_chunk = n_tokens // n_ctx` chunks of n_ctx tokens (a shorter tail is dropped; fewer than 2 chunks is an
error, as there); each chunk is evaluated in a fresh context, its first token replaced by BOS when the vocabulary
adds one, and only the second half is scored: the logits at positions first = n_ctx // 2 .. n_ctx - 2 predict the
tokens first + 1 .. n_ctx - 1 (n_ctx - 1 - first tokens per chunk). PPL = exp(mean NLL) with the uncertainty
PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

KL divergence: a base model's scored log-probabilities are saved (`KLBaseWriter`: the chunks' tokens and, per scored
position, the float32 log_softmax over the vocabulary) and another model (a quantization of it) is compared to them
on the same tokens (`KLBaseReader`): mean KL(base || model) with its uncertainty, the share of positions whose most
likely token agrees, the PPL of both and per-chunk values. Unlike llama.cpp's file (16-bit log-probs, tokens with
p < e^-16 skipped) the base is kept in float32 and the sum runs over the whole vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ..errors import ModelFormatError, UsageError

KL_MAGIC = b"MOELKLD1"  # a KL base file: magic, u64 header length, JSON header, then float32 rows
ROW_BLOCK = 64  # rows converted to float64 at once (bounds the scratch for large vocabularies)


# --- log-probabilities -------------------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float64 (logits [..., n_vocab] of any float type)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_n(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of one row of log-probabilities [n_vocab], most likely first (ties: lower id)."""
    if n <= 0:
        return []
    n = min(n, logprobs.shape[-1])
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.lexsort((idx, -logprobs[idx]))]
    return [(int(i), float(logprobs[i])) for i in idx]


@dataclass
class TokenLogprob:
    """One token as the API reports it: its id, its log-probability and the top alternatives (id, logprob)."""

    id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def step_logprob(logits: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The generated `token`'s log-probability under one step's logits [n_vocab], with the n most likely."""
    lp = log_softmax(logits)
    return TokenLogprob(int(token), float(lp[token]), top_n(lp, n))


def prompt_logprobs(model, ids: Sequence[int], n: int) -> list[TokenLogprob]:
    """Log-probabilities of ids[1:] given their prefixes (a fresh context; ids[0] has none), block by block."""
    out: list[TokenLogprob] = []
    if len(ids) < 2:
        return out
    for pos, logits in model.logits_blocks(ids):
        for r0 in range(0, len(logits), ROW_BLOCK):
            lp = log_softmax(logits[r0 : r0 + ROW_BLOCK])
            for r, row in enumerate(lp):
                t = pos + r0 + r + 1  # the token this row predicts
                if t < len(ids):
                    out.append(TokenLogprob(int(ids[t]), float(row[ids[t]]), top_n(row, n)))
    return out


# --- perplexity ----------------------------------------------------------------------------------------------
def mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    """Mean of a sample from its sum and sum of squares, and the standard error of that mean (as llama.cpp)."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


@dataclass
class ChunkResult:
    index: int
    nll: float  # summed over the chunk's scored tokens
    count: int
    ppl: float  # running PPL after this chunk (as llama-perplexity prints it)
    kld: float | None = None  # mean KL(base || model) over the chunk
    same_top: float | None = None  # share of the chunk's positions whose argmax agrees with the base's


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunk: int
    n_tokens: int  # of the whole text
    count: int = 0  # scored tokens
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    chunks: list[ChunkResult] = field(default_factory=list)
    # KL divergence against a base (kl_base given)
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    n_same_top: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)[0])

    @property
    def ppl_uncertainty(self) -> float:
        return self.ppl * mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)[1]

    @property
    def ppl_base(self) -> float:
        return math.exp(mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, self.count)[0])

    @property
    def kld(self) -> tuple[float, float]:
        """Mean KL(base || model) in nats and its uncertainty."""
        return mean_and_uncertainty(self.sum_kld, self.sum_kld2, self.count)

    @property
    def same_top(self) -> tuple[float, float]:
        """Share of positions whose most likely token is the base's, and its uncertainty."""
        p = self.n_same_top / self.count if self.count else 0.0
        return p, (math.sqrt(p * (1 - p) / (self.count - 1)) if self.count > 1 else 0.0)

    def to_json(self) -> dict:
        out = {
            "n_ctx": self.n_ctx,
            "n_chunk": self.n_chunk,
            "n_tokens": self.n_tokens,
            "scored_tokens": self.count,
            "ppl": self.ppl,
            "ppl_uncertainty": self.ppl_uncertainty,
            "mean_nll": self.sum_nll / self.count if self.count else None,
            "chunks": [c.__dict__ for c in self.chunks],
        }
        if self.chunks and self.chunks[0].kld is not None:
            out.update(
                ppl_base=self.ppl_base,
                kld=self.kld[0],
                kld_uncertainty=self.kld[1],
                same_top=self.same_top[0],
                same_top_uncertainty=self.same_top[1],
            )
        return out


def chunk_tokens(model, text: str, n_ctx: int) -> tuple[list[int], int]:
    """The text's tokens (BOS added when the vocabulary asks) and the number of whole chunks of n_ctx in them."""
    if n_ctx < 4:
        raise UsageError(f"--ctx-size {n_ctx}: expected at least 4 tokens per chunk")
    if n_ctx > model.n_ctx:
        raise UsageError(f"--ctx-size {n_ctx}: the model was loaded with n_ctx={model.n_ctx}")
    tokens = model.tokenizer.encode(text, add_special=True)
    if len(tokens) < 2 * n_ctx:
        raise UsageError(
            f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at least "
            f"{2 * n_ctx} (two chunks): give a longer text or a smaller --ctx-size"
        )
    return tokens, len(tokens) // n_ctx


def chunk_logprobs(model, chunk: Sequence[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One chunk in a fresh context: yields (log_softmax rows [r, n_vocab] float64, the tokens they predict [r])
    for the scored positions n_ctx // 2 .. n_ctx - 2, ROW_BLOCK rows at a time."""
    n_ctx = len(chunk)
    first = n_ctx // 2
    targets = np.asarray(chunk, dtype=np.int64)
    for pos, logits in model.logits_blocks(chunk, first):
        rows = logits[: max(0, n_ctx - 1 - pos)]  # the last position predicts nothing inside the chunk
        for r0 in range(0, len(rows), ROW_BLOCK):
            lp = log_softmax(rows[r0 : r0 + ROW_BLOCK])
            yield lp, targets[pos + r0 + 1 : pos + r0 + 1 + len(lp)]


def perplexity(
    model,
    text: str,
    n_ctx: int,
    n_chunks: int | None = None,
    kl_base: KLBaseWriter | KLBaseReader | None = None,
    progress: Callable[[ChunkResult], None] | None = None,
) -> PerplexityResult:
    """llama-perplexity's measurement of `model` on `text` with chunks of n_ctx tokens (see the module doc).
    kl_base: a KLBaseWriter records this model's log-probabilities as a base; a KLBaseReader compares to one."""
    tokens, n_chunk = chunk_tokens(model, text, n_ctx)
    if n_chunks is not None:
        n_chunk = min(n_chunk, n_chunks)
    tok = model.tokenizer
    add_bos = bool(tok.add_bos and tok.bos_id is not None)
    res = PerplexityResult(n_ctx=n_ctx, n_chunk=n_chunk, n_tokens=len(tokens))
    if isinstance(kl_base, KLBaseWriter):
        kl_base.begin(model, tokens[: n_chunk * n_ctx], n_ctx, n_chunk)
    elif isinstance(kl_base, KLBaseReader):
        kl_base.check(model, tokens, n_ctx, n_chunk)
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if add_bos:
            chunk[0] = tok.bos_id
        c = ChunkResult(index=i, nll=0.0, count=0, ppl=0.0)
        kld = same = 0.0
        for lp, targets in chunk_logprobs(model, chunk):
            nll = -lp[np.arange(len(targets)), targets]
            c.nll += float(nll.sum())
            c.count += len(nll)
            res.sum_nll2 += float((nll * nll).sum())
            if isinstance(kl_base, KLBaseWriter):
                kl_base.write(lp)
            elif isinstance(kl_base, KLBaseReader):
                base = kl_base.read(len(lp)).astype(np.float64)
                k = (np.exp(base) * (base - lp)).sum(axis=-1)  # KL(base || model) per position
                nll_base = -base[np.arange(len(targets)), targets]
                res.sum_nll_base += float(nll_base.sum())
                res.sum_nll_base2 += float((nll_base * nll_base).sum())
                res.sum_kld += float(k.sum())
                res.sum_kld2 += float((k * k).sum())
                agree = int((base.argmax(axis=-1) == lp.argmax(axis=-1)).sum())
                res.n_same_top += agree
                kld += float(k.sum())
                same += agree
        res.sum_nll += c.nll
        res.count += c.count
        c.ppl = res.ppl
        if isinstance(kl_base, KLBaseReader):
            c.kld, c.same_top = kld / c.count, same / c.count
        res.chunks.append(c)
        if progress is not None:
            progress(c)
    if isinstance(kl_base, KLBaseWriter):
        kl_base.finish()
    return res


# --- the KL base file ----------------------------------------------------------------------------------------
def _model_json(model) -> dict:
    return {"path": os.path.basename(model.path), "n_vocab": int(model.n_vocab)}


class KLBaseWriter:
    """Writes a base model's scored log-probabilities: KL_MAGIC, u64 header length, a JSON header (n_ctx, n_chunk,
    n_vocab, the chunked tokens, the base model's file name), then per scored position one float32 row [n_vocab].
    Written to PATH.tmp and renamed at the end, so an interrupted run leaves no half file under PATH."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._f: BinaryIO | None = None

    def begin(self, model, tokens: Sequence[int], n_ctx: int, n_chunk: int) -> None:
        head = dict(_model_json(model), n_ctx=n_ctx, n_chunk=n_chunk, tokens=[int(t) for t in tokens])
        blob = json.dumps(head).encode()
        try:
            self._f = open(self.path + ".tmp", "wb")
        except OSError as e:
            raise UsageError(f"{self.path}: cannot write the KL base file ({e.strerror or e})") from None
        self._f.write(KL_MAGIC + struct.pack("<Q", len(blob)) + blob)

    def write(self, lp: np.ndarray) -> None:
        assert self._f is not None
        self._f.write(np.ascontiguousarray(lp, dtype="<f4").tobytes())

    def finish(self) -> None:
        assert self._f is not None
        self._f.close()
        os.replace(self.path + ".tmp", self.path)

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path + ".tmp")


class KLBaseReader:
    """Reads what KLBaseWriter wrote, row block by row block; a file that is not one, or is for another vocabulary,
    context size or text, is a ModelFormatError / UsageError naming the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except OSError as e:
            raise UsageError(f"{self.path}: cannot read the KL base file ({e.strerror or e})") from None
        magic = self._f.read(len(KL_MAGIC) + 8)
        if len(magic) < len(KL_MAGIC) + 8 or magic[: len(KL_MAGIC)] != KL_MAGIC:
            raise ModelFormatError(f"{self.path}: not a moelite KL base file (write one with --kl-divergence-base)")
        (n,) = struct.unpack("<Q", magic[len(KL_MAGIC) :])
        size = os.fstat(self._f.fileno()).st_size
        if n > size:
            raise ModelFormatError(f"{self.path}: header length {n} beyond the file's {size} bytes")
        try:
            self.head = json.loads(self._f.read(n))
            self.n_ctx, self.n_chunk = int(self.head["n_ctx"]), int(self.head["n_chunk"])
            self.n_vocab, self.tokens = int(self.head["n_vocab"]), [int(t) for t in self.head["tokens"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{self.path}: a damaged header ({e})") from None
        rows = self.n_chunk * (self.n_ctx - 1 - self.n_ctx // 2)
        if size - len(KL_MAGIC) - 8 - n != rows * self.n_vocab * 4:
            raise ModelFormatError(
                f"{self.path}: {size} bytes; a base of {self.n_chunk} chunks of {self.n_ctx} tokens and "
                f"{self.n_vocab} vocabulary entries has {len(KL_MAGIC) + 8 + n + rows * self.n_vocab * 4}"
            )

    def check(self, model, tokens: Sequence[int], n_ctx: int, n_chunk: int) -> None:
        if model.n_vocab != self.n_vocab:
            raise UsageError(f"{self.path}: a base of {self.n_vocab} vocabulary entries; the model has {model.n_vocab}")
        if n_ctx != self.n_ctx:
            raise UsageError(f"{self.path}: written with --ctx-size {self.n_ctx}, this run has {n_ctx}")
        if n_chunk != self.n_chunk or list(tokens[: n_chunk * n_ctx]) != self.tokens:
            raise UsageError(
                f"{self.path}: written for another text or tokenizer ({self.n_chunk} chunks of other tokens): "
                "give the same -f and --chunks as when the base was written"
            )

    def read(self, rows: int) -> np.ndarray:
        data = self._f.read(rows * self.n_vocab * 4)
        if len(data) != rows * self.n_vocab * 4:
            raise ModelFormatError(f"{self.path}: ends early (truncated while being read?)")
        return np.frombuffer(data, dtype="<f4").reshape(rows, self.n_vocab)

    def close(self) -> None:
        self._f.close()
