"""lm-evaluation-harness against a real `moelite serve` (issue 32's acceptance): `local-completions` runs a
multiple-choice (loglikelihood) task and a generate-until task, `local-chat-completions` the generate-until task, on
local JSON data sets (tests/data/lm_eval), through the server's remote tokenizer (/tokenizer_info, /tokenize); every
loglikelihood lm-eval reports equals float64 log_softmax of Model.logits for the token ids lm-eval itself built.

lm-eval is not in the `test` extra (it pulls datasets, pyarrow, pandas, scipy, scikit-learn, nltk ...): without it
this module is skipped, and tests/test_serve_logprobs.py still sends the exact requests lm-eval sends.
Install: pip install 'lm-eval[api]==0.4.13'. CI installs it and sets MOELITE_REQUIRE_LM_EVAL=1: there it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from logprob_ref import demo_model, log_softmax64
from test_serve import _env, running_server

if os.environ.get("MOELITE_REQUIRE_LM_EVAL") == "1":  # CI (.ci/run installs it): a missing lm-eval is a failure
    import lm_eval  # noqa: F401
    import tenacity  # noqa: F401
else:
    pytest.importorskip(
        "lm_eval",
        reason="lm-evaluation-harness is not installed (pip install 'lm-eval[api]==0.4.13'); "
        "test_serve_logprobs.py covers the requests it sends",
    )
    pytest.importorskip("tenacity", reason="lm-eval's API models need its [api] extra (pip install 'lm-eval[api]')")

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval"


@pytest.fixture(scope="module")
def demo():
    yield from demo_model()


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo):
    with running_server(tmp_path_factory.mktemp("lm-eval"), "--no-log", model=demo.path) as s:
        yield s


def _lm_eval(tmp: Path, model: str, model_args: str, tasks: str, *extra: str) -> dict[str, list[dict]]:
    """Run the lm_eval command (offline, from the task folder: its data_files are relative) -> samples per task."""
    env = dict(
        _env(tmp), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), TOKENIZERS_PARALLELISM="0"
    )
    out = tmp / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks]
    cmd += ["--include_path", str(TASKS), "--output_path", str(out), "--log_samples", *extra]
    r = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    samples: dict[str, list[dict]] = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.split("_", 1)[1].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in f.read_text().splitlines()]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(samples) == set(tasks.split(",")) == set(results), (samples.keys(), results.keys())
    return samples


def _encoder(base: str):
    """lm-eval's own context / continuation split (its _encode_pair over the server's remote tokenizer)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=base + "/completions", model="moelite", tokenizer_backend="remote")


def test_local_completions_multiple_choice_and_generate_until(server, demo, tmp_path):
    base = server[0]
    args = f"model=moelite,base_url={base}/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1"
    samples = _lm_eval(tmp_path, "local-completions", args, "moelite_mc,moelite_gen")
    lm = _encoder(base)
    n_checked = 0
    for doc in samples["moelite_mc"]:
        assert len(doc["arguments"]) == len(doc["doc"]["choices"])
        for arg, resp in zip(doc["arguments"].values(), doc["resps"]):
            context, continuation = arg["arg_0"], arg["arg_1"]
            ll, greedy = resp[0]  # logged as strings: '-11.92...', 'False'
            ctx, cont = lm._encode_pair(context, continuation)
            ref = log_softmax64(demo.logits(ctx + cont))
            rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
            want = sum(ref[i, cont[i - len(ctx) + 1]] for i in rows)
            assert float(ll) == pytest.approx(want, abs=1e-9), (context, continuation)
            assert (greedy == "True") == all(int(np.argmax(ref[i])) == cont[i - len(ctx) + 1] for i in rows)
            n_checked += 1
    assert n_checked == sum(len(d["doc"]["choices"]) for d in samples["moelite_mc"]) > 0
    gens = [d["resps"][0][0] for d in samples["moelite_gen"]]
    assert len(gens) == 4 and all(isinstance(g, str) and g and "\n" not in g for g in gens)


def test_local_chat_completions_generate_until(server, tmp_path):
    base = server[0]
    args = f"model=moelite,base_url={base}/chat/completions,num_concurrent=1,max_retries=1"
    samples = _lm_eval(tmp_path, "local-chat-completions", args, "moelite_gen", "--apply_chat_template")
    gens = [d["resps"][0][0] for d in samples["moelite_gen"]]
    assert len(gens) == 4 and all(isinstance(g, str) and g for g in gens)
