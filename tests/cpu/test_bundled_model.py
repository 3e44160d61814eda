"""The bundled Shakespeare model (the default of Engine() and the CLI): it loads, its perplexity
on a committed held-out excerpt is the figure recorded in the docs, greedy generation is
deterministic, and Hugging Face transformers agrees with the engine on it token for token."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import hf_greedy, hf_logits

from pagedgpt2 import Engine, SamplingParams
from pagedgpt2.convert import export_hf_checkpoint
from pagedgpt2.tokenizer import get_tokenizer
from pagedgpt2.weights import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import eval_perplexity as ep  # noqa: E402  (the one definition of the metric)

EXCERPT = ROOT / "tests" / "data" / "bundled_model_excerpt.txt"  # opening of Julius Caesar (held out)
RESULTS = ROOT / "docs" / "results" / "bundled_model.json"
REPORT = ROOT / "docs" / "bundled_model.md"
PROMPTS = ["ROMEO:", "JULIET:\nO", "Of Man's first disobedience", "To be, or not to be"]
MAX_BYTES = 16_000_000


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from transformers import GPT2LMHeadModel

    hf_dir = export_hf_checkpoint(BUNDLED_MODEL, tmp_path_factory.mktemp("bundled") / "hf")
    return GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").float().eval()


def excerpt_ids() -> np.ndarray:
    return np.array(get_tokenizer().encode(EXCERPT.read_text(encoding="utf-8")), dtype=np.uint16)


def test_engine_without_a_path_loads_the_bundled_model(engine):
    assert engine.model_path == BUNDLED_MODEL
    c = engine.config
    assert (c["vocab_size"], c["n_layer"], c["n_embd"], c["n_head"]) == (50257, 4, 128, 4)
    assert c["dtype"] == "float16"
    on_disk = sum(f.stat().st_size for f in BUNDLED_MODEL.iterdir())
    assert on_disk <= MAX_BYTES, f"bundled model is {on_disk:,} bytes, over the {MAX_BYTES:,} limit"


def test_excerpt_perplexity_is_the_documented_figure(engine, hf_model):
    ids = excerpt_ids()
    assert ids.size > 256  # more than one window
    recorded = json.loads(RESULTS.read_text())["excerpt"]["perplexity"]
    assert f"{recorded:.4g}" in REPORT.read_text(), "docs/bundled_model.md does not show the recorded figure"
    ours, n = ep.engine_loss(BUNDLED_MODEL, ids, ep.DEFAULT_CONTEXT)
    ref, n_ref = ep.hf_loss(hf_model, ids, ep.DEFAULT_CONTEXT)
    assert n == n_ref == ids.size - len(ep.windows(ids.size, ep.DEFAULT_CONTEXT))
    assert ep.agree(math.exp(ours), recorded), (math.exp(ours), recorded)
    assert ep.agree(math.exp(ref), recorded), (math.exp(ref), recorded)
    assert 1 < recorded < 200  # a trained model: far below the vocabulary's 50,257


def test_greedy_generation_is_deterministic(engine):
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    first = [o.token_ids for o in engine.generate(PROMPTS, params)]
    again = [o.token_ids for o in Engine(device="cpu").generate(PROMPTS[::-1], params)][::-1]
    alone = [engine.generate(p, params)[0].token_ids for p in PROMPTS]
    assert first == again == alone
    assert len({tuple(t) for t in first}) == len(PROMPTS)


def test_hf_and_engine_agree_token_for_token(engine, hf_model):
    tok = get_tokenizer()
    params = SamplingParams(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf_model, tok.encode(prompt), 48), prompt
    ids = excerpt_ids()[:200].tolist()
    ref = hf_logits(hf_model, ids)
    np.testing.assert_allclose(engine.logits(ids), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_sampled_text_is_early_modern_english(engine):
    """A seeded sample reads as verse or drama: mostly known English words, some of them old."""
    text = engine.generate("ROMEO:", SamplingParams(max_new_tokens=120, temperature=0.8, seed=3))[0].text
    words = [w.strip(".,;:!?'\"()[]-").lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) > 40
    common = {"the", "and", "i", "to", "of", "my", "you", "a", "that", "in", "is", "me", "it", "not",
              "with", "be", "your", "his", "for", "this", "he", "but", "have", "so", "what", "will"}
    old = {"thou", "thee", "thy", "thine", "hath", "doth", "art", "lord", "sir", "tis", "o", "ay",
           "shall", "good", "king", "madam", "enter", "exeunt", "exit"}
    assert sum(w in common for w in words) / len(words) > 0.2, text
    assert any(w in old for w in words), text


def test_cli_without_model_uses_the_bundled_model():
    out = subprocess.run([sys.executable, "-m", "pagedgpt2", "generate", "ROMEO:", "--device", "cpu",
                          "--max-new-tokens", "24", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and len(out.stdout.split()) > 5
