"""stream() and the command line give the same text as generate()."""

from __future__ import annotations

import os
import subprocess
import sys

from pagedgpt2 import Engine, SamplingParams


def test_stream_pieces_join_to_the_generated_text(hf_model_dirs):
    eng = Engine(hf_model_dirs["d16"][2], device="cpu")
    params = SamplingParams(max_new_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    pieces = list(eng.stream("Alan Turing", params))
    assert "".join(pieces) == eng.generate("Alan Turing", params)[0].text
    assert len(pieces) > 1
    assert eng.kv_stats()["blocks_used"] == 0


def test_closing_a_stream_early_frees_its_blocks(hf_model_dirs):
    eng = Engine(hf_model_dirs["d16"][2], device="cpu")
    it = eng.stream([1, 2, 3], SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True))
    next(it)
    assert eng.kv_stats()["blocks_used"] > 0
    it.close()
    assert eng.kv_stats()["blocks_used"] == 0


def test_cli_generate_prints_the_greedy_text(hf_model_dirs):
    model_dir = hf_model_dirs["d16"][2]
    expected = Engine(model_dir, device="cpu").generate(
        "Alan Turing", SamplingParams(max_new_tokens=8, temperature=0.0))[0].text
    out = subprocess.run([sys.executable, "-m", "pagedgpt2", "generate", "--model", str(model_dir),
                          "--device", "cpu", "--temperature", "0", "--max-new-tokens", "8", "Alan Turing"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "Alan Turing" + expected + "\n"


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pagedgpt2", "generate", "--model", str(tmp_path / "nope"),
                          "--device", "cpu", "hi"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2
    assert "pagedgpt2: error:" in out.stderr and "Traceback" not in out.stderr
