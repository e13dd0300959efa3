"""Test fixture: a tiktoken-backed tokenizer shaped like Hunyuan's remote-code HYTokenizer (tokenization_hy.py of
the Hunyuan checkpoints, loaded by transformers with trust_remote_code): the ranks of hy.tiktoken, then the
special tokens <|endoftext|> <|startoftext|> <|bos|> <|eos|> <|pad|> <|extra_N|>. What llama.cpp's converter
reads from it: `mergeable_ranks`, `special_tokens`, `vocab_size`. Copied next to a test checkpoint by
tests/test_tokenizer_wave2.py; not imported by moelite."""

import base64

import tiktoken
from transformers import PreTrainedTokenizer

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
NAMED = ("<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>")


class HYTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "hy.tiktoken"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, n_extra=0, **kwargs):
        with open(vocab_file, "rb") as f:
            self.mergeable_ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f if ln.strip())}
        names = NAMED + tuple(f"<|extra_{i}|>" for i in range(n_extra))
        self.special_tokens = {t: len(self.mergeable_ranks) + i for i, t in enumerate(names)}
        self.tokenizer = tiktoken.Encoding(
            "hy", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        self.decoder = {v: k for k, v in self.mergeable_ranks.items()} | {v: k for k, v in self.special_tokens.items()}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.tokenizer.n_vocab

    def get_vocab(self):
        return {**{k: v for k, v in self.mergeable_ranks.items()}, **self.special_tokens}

    def _tokenize(self, text, **kwargs):
        return [self.decoder[t] for t in self.tokenizer.encode(text, allowed_special="all")]

    def _convert_token_to_id(self, token):
        return self.special_tokens.get(token) if isinstance(token, str) else self.mergeable_ranks.get(token)

    def _convert_id_to_token(self, index):
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens):
        return b"".join(t.encode() if isinstance(t, str) else t for t in tokens).decode("utf-8", "replace")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
