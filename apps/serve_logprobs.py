"""What `moelite serve` adds to a plain answer for evaluators and reasoning models (issue 32): OpenAI's `logprobs` in
both shapes (chat: `content` entries with `top_logprobs` lists; completions: parallel `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset` lists, prompt tokens first with `echo`), the reasoning split (`reasoning_content`, as
llama-server's `--reasoning-format deepseek`), and the bodies of `/tokenize`, `/detokenize` and `/tokenizer_info`.

Log-probabilities are the model's own (runtime/perplexity.py: float64 log_softmax of the logits, before temperature,
penalties or truncation), so an echoed prompt's token_logprobs are exactly what `Model.logits` and `moelite
perplexity` give for the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..runtime.perplexity import TokenLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat top_logprobs (completions: 5; moelite allows 20 for both)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# gpt-oss (harmony): thoughts are the analysis channel's messages, the answer the final channel's
HARMONY_START, HARMONY_CHANNEL, HARMONY_MESSAGE = "<|start|>assistant", "<|channel|>", "<|message|>"
HARMONY_ANALYSIS = "<|channel|>analysis<|message|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
HARMONY_HEAD_MAX = 256  # characters of a message header (channel, recipient, constraint) at most
REASONING_FORMATS = ("auto", "none", "deepseek")


# --- token text ------------------------------------------------------------------------------------------
def _piece_map(tokenizer, lps: Sequence[TokenLogprob | None], ids: Sequence[int] = ()) -> dict[int, str]:
    """id -> its text as the answer shows it (a token ending inside a UTF-8 character decodes to U+FFFD), for every
    token and alternative named, decoded in one batch."""
    wanted = set(ids) | {t.id for t in lps if t is not None} | {i for t in lps if t is not None for i, _ in t.top}
    order = sorted(wanted)
    return dict(zip(order, tokenizer.pieces(order)))


def _entry(piece: str, logprob: float) -> dict[str, Any]:
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}


def chat_logprobs(tokenizer, lps: Sequence[TokenLogprob]) -> dict[str, Any]:
    """The chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
    "refusal": None}."""
    text = _piece_map(tokenizer, lps)
    content = []
    for t in lps:
        e = _entry(text[t.id], t.logprob)
        e["top_logprobs"] = [_entry(text[i], lp) for i, lp in t.top]
        content.append(e)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer, lps: Sequence[TokenLogprob | None], ids: Sequence[int], offset: int = 0) -> dict:
    """The completions shape for tokens `ids` (their TokenLogprob, or None for an echoed prompt's first token, which
    has no context): {"tokens", "token_logprobs", "top_logprobs" (piece -> logprob), "text_offset"}."""
    text = _piece_map(tokenizer, lps, ids)
    tokens, values, tops, offsets = [], [], [], []
    for token_id, t in zip(ids, lps):
        piece = text[token_id]
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        values.append(None if t is None else t.logprob)
        top = None
        if t is not None:
            top = {}
            for i, lp in t.top:  # two ids may decode to one piece: keep the likelier
                p = text[i]
                top[p] = max(lp, top.get(p, lp))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# --- reasoning -------------------------------------------------------------------------------------------
def reasoning_enabled(model, fmt: str) -> bool:
    """Whether a chat answer is split into reasoning_content and content: --reasoning-format deepseek always,
    auto when the model's chat template knows the </think> tag, none never."""
    if fmt == "none":
        return False
    if fmt == "deepseek":
        return True
    try:
        source = model.chat_template.source
    except Exception:  # noqa: BLE001 - no template at all: nothing to split
        return False
    return THINK_CLOSE in source or HARMONY_ANALYSIS in source


def prompt_opens_thinking(tokenizer, ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside an open <think> block (DeepSeek-R1's and some Qwen3 templates write
    it into the generation prompt, so the answer starts with the thoughts and no opening tag)."""
    tail = tokenizer.decode(list(ids[-8:])).rstrip()
    return tail.endswith(THINK_OPEN)


class ThinkSplitter:
    """Splits streamed text into (reasoning, content): an answer that opens with <think> (or whose prompt opened it)
    has its text up to </think> as reasoning, the rest as content; a tag split across pieces is held back until it is
    whole. `push(piece)` and `flush()` return the (reasoning, content) text completed so far."""

    def __init__(self, thinking: bool) -> None:
        self.state = "thinking" if thinking else "start"  # start: leading whitespace, maybe <think>; then content
        self._held = ""
        self._harmony: HarmonySplitter | None = None  # an answer in gpt-oss's channel markup

    def push(self, piece: str) -> tuple[str, str]:
        text, self._held = self._held + piece, ""
        reasoning = content = ""
        if self.state == "start":
            head = text.lstrip()
            if head.startswith((HARMONY_CHANNEL, HARMONY_START)):
                self.state, self._harmony = "harmony", HarmonySplitter()
            elif head and any(m.startswith(head) for m in (HARMONY_START, HARMONY_CHANNEL)):  # maybe markup: wait
                self._held = text
                return "", ""
        if self.state == "harmony":
            return self._harmony.push(text)
        if self.state == "start":
            head = text.lstrip()
            if head.startswith(THINK_OPEN):
                self.state, text = "thinking", head[len(THINK_OPEN) :]
            elif THINK_OPEN.startswith(head):  # only whitespace, or a part of the tag: wait for more
                self._held = text
                return "", ""
            else:
                self.state = "content"
        if self.state == "thinking":
            at = text.find(THINK_CLOSE)
            if at < 0:
                keep = _partial_tag(text, THINK_CLOSE)
                self._held = text[len(text) - keep :]
                return text[: len(text) - keep], ""
            reasoning, text = text[:at], text[at + len(THINK_CLOSE) :].lstrip("\n")
            self.state = "after"
        if self.state == "after":  # newlines right after </think> belong to neither
            text = text.lstrip("\n")
            if not text:
                return reasoning, ""
            self.state = "content"
        return reasoning, content + text

    def flush(self) -> tuple[str, str]:
        if self.state == "harmony":
            return self._harmony.flush()
        held, self._held = self._held, ""
        return (held, "") if self.state == "thinking" else ("", held if self.state != "after" else "")


class HarmonySplitter:
    """gpt-oss's channel markup -> (reasoning, content): an analysis message's text is reasoning, a final message's
    text is content (its markup dropped), any other message (a commentary channel's tool call) passes into the
    content with its markup, for the harmony tool-call parser (runtime/tool_calls.py) to read."""

    def __init__(self) -> None:
        self.state = "head"  # head: before a message's <|message|>; then analysis | final | other: its body
        self._held = ""

    def push(self, piece: str) -> tuple[str, str]:
        text, self._held = self._held + piece, ""
        reasoning = content = ""
        while text:
            if self.state == "head":
                at = text.find(HARMONY_MESSAGE)
                if at < 0:
                    if len(text) <= HARMONY_HEAD_MAX and text.lstrip()[:2] == "<|"[: len(text.lstrip())]:
                        self._held = text  # the header is still arriving
                        break
                    self.state = "other"  # not markup after all: content as it is
                    continue
                head, text = text[:at], text[at + len(HARMONY_MESSAGE) :]
                channel = head.removeprefix(HARMONY_START).strip()
                if channel == HARMONY_CHANNEL + "analysis":
                    self.state = "analysis"
                elif channel == HARMONY_CHANNEL + "final":
                    self.state = "final"
                else:
                    self.state, content = "other", content + head + HARMONY_MESSAGE
                continue
            hits = [(i, e) for e in HARMONY_ENDS if (i := text.find(e)) >= 0]
            if not hits:
                keep = max(_partial_tag(text, e) for e in HARMONY_ENDS)
                body, self._held = text[: len(text) - keep], text[len(text) - keep :]
                end = ""
            else:
                at, end = min(hits)
                body, text = text[:at], text[at + len(end) :]
            if self.state == "analysis":
                reasoning += body
            else:
                content += body + (end if self.state == "other" else "")
            if not hits:
                break
            self.state = "head"
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.state == "analysis" else ("", held)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """A whole answer -> (reasoning_content, or None when it has no thoughts; content)."""
    s = ThinkSplitter(thinking)
    r1, c1 = s.push(text)
    r2, c2 = s.flush()
    return (r1 + r2).strip() or None, c1 + c2


# --- tokenizer endpoints (llama-server's and vLLM's field names) -----------------------------------------
def tokenize_body(model, body: dict) -> dict[str, Any]:
    """POST /tokenize: {"content" (llama-server) or "prompt" (vLLM): text, "add_special" / "add_special_tokens": bool
    (default false / true as each server), "with_pieces": bool} -> {"tokens": [ids] or [{"id", "piece"}], "count",
    "max_model_len"}."""
    text = body.get("content", body.get("prompt"))
    if not isinstance(text, str):
        raise ValueError("content: expected a string (the text to tokenize)")
    if "add_special" in body:
        add = body["add_special"]
    else:
        add = body.get("add_special_tokens", "prompt" in body and "content" not in body)
    pieces = body.get("with_pieces", False)
    if not isinstance(add, bool) or not isinstance(pieces, bool):
        raise ValueError("add_special, add_special_tokens and with_pieces: expected true or false")
    ids = model.tokenizer.encode(text, add_special=add)
    tokens: list = [{"id": i, "piece": p} for i, p in zip(ids, model.tokenizer.pieces(ids))] if pieces else ids
    return {"tokens": tokens, "count": len(ids), "max_model_len": model.n_ctx}


def detokenize_body(model, body: dict) -> dict[str, Any]:
    """POST /detokenize: {"tokens": [ids]} -> {"content": text, "prompt": text} (llama-server's and vLLM's keys)."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("tokens: expected a list of token ids")
    bad = [t for t in ids if not 0 <= t < model.n_vocab]
    if bad:
        raise ValueError(f"tokens: id {bad[0]} out of range [0, {model.n_vocab})")
    text = model.tokenizer.decode(ids)
    return {"content": text, "prompt": text}


def tokenizer_info(model) -> dict[str, Any]:
    """GET /tokenizer_info (vLLM's, which lm-evaluation-harness's remote tokenizer reads)."""
    tok = model.tokenizer
    try:
        template = model.chat_template.source
    except Exception:  # noqa: BLE001 - a model without a usable template
        template = None
    return {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": None,
        "add_bos_token": tok.add_bos,
        "chat_template": template,
        "model_max_length": model.n_ctx,
        "vocab_size": model.n_vocab,
    }
