"""The real chat templates of the families that define tool calls (llama.cpp's models/templates/, read from the
pinned llama-cpp-python sdist at test time: nothing of llama.cpp is committed), and fixture GGUFs carrying them.

    real_template("Qwen3.5-4B")         -> the template's source
    FAMILY_TEMPLATES                     -> runtime family -> (template file, tool-call format it defines)
    with_template(gguf, source, out)     -> a copy of a fixture GGUF whose tokenizer.chat_template is `source`
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
from llama_cpp_ref import REQUIRED, SDIST_DIR

CACHE = Path(__file__).resolve().parent / ".fixtures" / "templates"

# runtime family (tests/fixture_models.py) -> the release template llama.cpp keeps for it, and its format
FAMILY_TEMPLATES = {
    "qwen3_moe": ("Qwen-Qwen3-0.6B", "hermes"),
    "qwen3_5_moe_text": ("Qwen3.5-4B", "qwen3_coder"),
    "glm4_moe": ("GLM-4.6", "glm4"),
    "glm4_moe_lite": ("GLM-4.7-Flash", "glm4"),
    "gpt_oss": ("openai-gpt-oss-120b", "harmony"),
    "deepseek_v3": ("deepseek-ai-DeepSeek-V3.1", "deepseek_v3_1"),
    "mistral4": ("mistralai-Ministral-3-14B-Reasoning-2512", "mistral"),
    "gemma4_text": ("google-gemma-4-31B-it", "gemma4"),
    "minimax_m2": ("MiniMax-M2", "minimax_m2"),
    "nemotron_h": ("NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "qwen3_coder"),
    "deepseek_v32": ("deepseek-ai-DeepSeek-V3.2", "deepseek_v3_2"),
    "cohere2_moe": ("Cohere2MoE", "cohere"),
    "hy_v3": ("tencent-Hy3", "hy3"),
    "lfm2_moe": ("LFM2.5-8B-A1B", "lfm2"),
    "laguna": ("poolside-Laguna-XS.2", "glm4"),
    "step3p5": ("StepFun3.5-Flash", "qwen3_coder"),
    "granitemoehybrid": ("ibm-granite-granite-4.0", "hermes"),
}
# more real templates whose format the parser registry must recognise (no runtime fixture of their own needed)
MORE_TEMPLATES = {
    "llama-cpp-deepseek-r1": "deepseek_v3",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral_json",
    "Qwen3-Coder": "qwen3_coder",
    "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3_json",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3_json",
    "moonshotai-Kimi-K2": "kimi_k2",
}
# templates whose format is detected but that render no calls of an assistant turn here (LFM2-8B-A1B's template
# leaves them to the content; Kimi-K2-Instruct / -Thinking call list.append, which the sandbox refuses)
DETECT_ONLY = {"LFM2-8B-A1B": "lfm2", "Kimi-K2-Instruct": "kimi_k2", "Kimi-K2-Thinking": "kimi_k2"}


def real_template(name: str) -> str:
    """models/templates/{name}.jinja of the pinned llama.cpp (extracted once under tests/.fixtures/templates)."""
    out = CACHE / f"{name}.jinja"
    if not out.exists():
        sdists = sorted(SDIST_DIR.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            if REQUIRED:
                raise FileNotFoundError(f"no llama-cpp-python sdist under {SDIST_DIR} (the build fetches it)")
            pytest.skip(f"no llama-cpp-python sdist under {SDIST_DIR} (fetched by the build)")
        with tarfile.open(sdists[-1]) as tar:
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/models/templates/"
            member = tar.getmember(prefix + f"{name}.jinja")
            data = tar.extractfile(member).read()
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(out)
    return out.read_text()


def with_template(gguf: Path, source: str, out: Path) -> Path:
    """A copy of `gguf` whose chat template is `source` (gguf-py rewrites every key and tensor unchanged)."""
    import gguf as gguf_py

    r = gguf_py.GGUFReader(str(gguf))
    w = gguf_py.GGUFWriter(out, str(r.get_field("general.architecture").contents()))
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.alignment"):
            continue
        if f.name == "tokenizer.chat_template":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    w.add_chat_template(source)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
