"""Run the pinned llama.cpp converter on a tiny test fixture: `run_llama_convert.py SRC_DIR HF_DIR ARGS...`.

SRC_DIR holds convert_hf_to_gguf.py, conversion/ and gguf-py/ extracted from the sdist (tests/llama_cpp_ref.py).
Only the vocabulary is patched: the fixtures' tokenizer is a 320-token GPT-2 BPE,
whose pre-tokenizer hash llama.cpp does not know and which some families' set_vocab refuses (they want the
real Gemma / GLM / ERNIE / Hunyuan tokenizer files). Tensors and hyperparameters go through llama.cpp's code
unchanged; MTP layers are left out (--no-mtp) where the family supports MTP export, unless this script is given
--keep-mtp (its own switch, not passed on: the converter's default then keeps them). --raw-config (its own switch
too) makes the converter read config.json verbatim instead of through transformers' AutoConfig, as it does when
AutoConfig fails: transformers 5.25 rewrites MiMo-V2's rope keys, which its converter then misses.
"""

import json
import sys
from pathlib import Path

src = Path(sys.argv[1])
sys.path[:0] = [str(src / "gguf-py"), str(src)]
keep_mtp, raw_config = "--keep-mtp" in sys.argv, "--raw-config" in sys.argv
sys.argv = [str(src / "convert_hf_to_gguf.py")] + [a for a in sys.argv[2:] if a not in ("--keep-mtp", "--raw-config")]

import convert_hf_to_gguf as conv  # noqa: E402
from conversion import base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
if raw_config:
    base.ModelBase.load_hparams = staticmethod(
        lambda dir_model, is_mistral_format: json.loads((Path(dir_model) / "config.json").read_text())
    )
_get_model_class = conv.get_model_class


def get_model_class(*args, **kwargs):
    cls = _get_model_class(*args, **kwargs)
    cls.set_vocab = lambda self: self._set_vocab_gpt2()  # this process converts one model: patch its class
    if getattr(cls, "supports_mtp_export", False) and not keep_mtp:
        cls.no_mtp = True
    return cls


conv.get_model_class = get_model_class
conv.main()
