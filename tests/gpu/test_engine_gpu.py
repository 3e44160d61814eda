"""The CUDA engine end to end: against HF transformers on the same GPU, against the CPU engine,
and paged against contiguous. Skipped where there is no GPU or no CUDA build."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pagedgpt2 import Engine, SamplingParams

pytestmark = pytest.mark.cuda

# Stated tolerances: max |logit difference| against HF fp32, for logits of order 1-10.
LOGIT_ATOL = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.5}
TOP1_AGREEMENT = 0.99


def hf_on_gpu(model):
    return model.to("cuda")


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids], device="cuda"), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.mark.parametrize("shape", ["d16", "d48", "d64"])
def test_fp32_logits_and_greedy_match_hf(hf_model_dirs, shape):
    model, _, engine_dir = hf_model_dirs[shape]
    model = hf_on_gpu(model)
    eng = Engine(engine_dir, device="cuda", dtype="float32", num_blocks=256)
    rng = np.random.default_rng(11)
    for length in (1, 9, model.config.n_positions):
        ids = rng.integers(0, model.config.vocab_size, size=length).tolist()
        np.testing.assert_allclose(eng.logits(ids), hf_logits(model, ids), rtol=0, atol=LOGIT_ATOL["float32"])
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (1, 6, 19, 33, 16)]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, prompt, 20)
    assert eng.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_and_top1_agreement(hf_model_dirs, dtype):
    """Random weights have many near-ties, where rounding the weights alone flips the top token:
    agreement must be >= 99% wherever HF fp32 has a clear winner (top-1 margin >= 0.1), and
    overall no worse than HF itself at the same dtype."""
    model, _, engine_dir = hf_model_dirs["d64"]
    model = hf_on_gpu(model)
    hf_half = copy.deepcopy(model).to(getattr(torch, dtype))
    eng = Engine(engine_dir, device="cuda", dtype=dtype, num_blocks=256)
    rng = np.random.default_rng(12)
    ours_top, ref_top, half_top, margins = [], [], [], []
    worst = 0.0
    for _ in range(4):
        ids = rng.integers(0, model.config.vocab_size, size=256).tolist()
        ours, ref = eng.logits(ids), hf_logits(model, ids)
        worst = max(worst, float(np.abs(ours - ref).max()))
        top2 = np.sort(ref, axis=-1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
        ours_top.append(ours.argmax(-1))
        ref_top.append(ref.argmax(-1))
        half_top.append(hf_logits(hf_half, ids).argmax(-1))
    ours_top, ref_top, half_top, margins = map(np.concatenate, (ours_top, ref_top, half_top, margins))
    clear = margins >= 0.1
    agree_clear = float((ours_top == ref_top)[clear].mean())
    agree_all, hf_agree_all = float((ours_top == ref_top).mean()), float((half_top == ref_top).mean())
    print(f"{dtype}: max |logit diff| {worst:.4f}; top-1 agreement with HF fp32: {agree_all:.4f} "
          f"(HF {dtype}: {hf_agree_all:.4f}), {agree_clear:.4f} on {clear.mean():.0%} of positions with margin >= 0.1")
    assert worst <= LOGIT_ATOL[dtype]
    assert agree_clear >= TOP1_AGREEMENT
    assert agree_all >= hf_agree_all - 0.01


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_wide_lm_head_samples_the_top_logit(hf_model_dirs, dtype):
    """Past the skinny GEMV (2 rows) the LM head is a cuBLASLt GEMM writing half-precision logits
    into rows padded to 16 bytes (vocabulary 50,257 is odd), which the sampler reads as they are:
    the greedy first tokens of a 32-prompt batch must be the argmax of each prompt's own
    float32-output logits."""
    _, _, engine_dir = hf_model_dirs["d16"]
    eng = Engine(engine_dir, device="cuda", dtype=dtype, num_blocks=512)
    rng = np.random.default_rng(15)
    prompts = [rng.integers(0, 50257, size=int(n)).tolist() for n in rng.integers(1, 60, size=32)]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True))
    exact = [int(eng.logits(p)[-1].argmax()) for p in prompts]
    agree = np.mean([o.token_ids[0] == e for o, e in zip(outs, exact)])
    assert agree >= 0.9, agree  # only near-ties, rounded to the dtype, may differ


@pytest.mark.parametrize("shape", ["d16", "d64"])
def test_mixed_prefill_and_decode_steps_match_hf(hf_model_dirs, shape):
    """Steps that mix decodes (the decode kernel) with prompt chunks (the prefill kernel): a small
    token budget chunks the prompts, one-token prompts sit beside long ones, and requests join
    while others decode. Every request's greedy tokens must be HF's."""
    model, _, engine_dir = hf_model_dirs[shape]
    model = hf_on_gpu(model)
    eng = Engine(engine_dir, device="cuda", dtype="float32", block_size=16, num_blocks=256,
                 max_num_batched_tokens=24, decode_steps=1)
    rng = np.random.default_rng(16)
    lengths = [[70, 1, 9], [1, 33, 2, 50]]  # the second group joins once the first decodes
    prompts = [[rng.integers(0, model.config.vocab_size, size=n).tolist() for n in group] for group in lengths]
    seen = []
    backend_call = eng.runner.backend.forward_and_sample

    def record(**arrays):
        seen.append(np.diff(arrays["query_start_loc"]).tolist())
        return backend_call(**arrays)

    eng.runner.backend = type("Recording", (), {"__getattr__": lambda _, name: getattr(eng.backend, name),
                                                "forward_and_sample": staticmethod(record)})()
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in prompts[0]]
    got = {}
    step = 0
    while eng.has_unfinished_requests():
        if step == 5:
            rids += [eng.add_request(p, params) for p in prompts[1]]
        for out in eng.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    assert any(1 in rows and max(rows) > 1 for rows in seen), seen
    for rid, prompt in zip(rids, prompts[0] + prompts[1]):
        assert got[rid] == hf_greedy(model, prompt, 12), len(prompt)


def _decode_teacher_forced(backend, seqs, prefix, block_size, rng):
    """Prefills the first `prefix` tokens of every sequence, then feeds the rest one token per
    step (all sequences that still have one in the batch), through shuffled block tables.
    Returns, per sequence, the logits of every fed position [len - prefix, V]."""
    need = [-(-len(s) // block_size) for s in seqs]
    blocks = rng.permutation(backend.num_blocks)[:sum(need)].astype(np.int32)
    width = max(need)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, start in enumerate(np.cumsum([0] + need[:-1])):
        tables[i, :need[i]] = blocks[start:start + need[i]]

    def slot(i, t):
        return tables[i, t // block_size] * block_size + t % block_size

    n = len(seqs)
    ids = np.concatenate([s[:prefix] for s in seqs]).astype(np.int32)
    backend.forward(token_ids=ids, positions=np.tile(np.arange(prefix, dtype=np.int32), n),
                    slot_mapping=np.array([slot(i, t) for i in range(n) for t in range(prefix)], dtype=np.int32),
                    query_start_loc=np.arange(n + 1, dtype=np.int32) * prefix,
                    context_lens=np.full(n, prefix, dtype=np.int32), block_tables=tables,
                    logits_indices=np.zeros(0, dtype=np.int32))
    out = [[] for _ in seqs]
    for t in range(prefix, max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        m = len(live)
        logits = backend.forward(
            token_ids=np.array([seqs[i][t] for i in live], dtype=np.int32),
            positions=np.full(m, t, dtype=np.int32),
            slot_mapping=np.array([slot(i, t) for i in live], dtype=np.int32),
            query_start_loc=np.arange(m + 1, dtype=np.int32), context_lens=np.full(m, t + 1, dtype=np.int32),
            block_tables=tables[live], logits_indices=np.arange(m, dtype=np.int32))
        for row, i in enumerate(live):
            out[i].append(logits[row])
    return [np.stack(o) for o in out]


@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_small_batch_decode_logits_match_hf(hf_model_dirs, dtype, block_size):
    """Decode steps of 2 then 1 sequences, through the skinny GEMVs. Teacher-forced, one token a
    step through shuffled block tables; contexts of up to 300 tokens cross ten 32-token attention
    partitions. Every step's logits against HF fp32 at that position."""
    model, _, engine_dir = hf_model_dirs["d64"]
    model = hf_on_gpu(model)
    eng = Engine(engine_dir, device="cuda", dtype=dtype, block_size=block_size, num_blocks=640 // block_size)
    rng = np.random.default_rng(21 + block_size)
    seqs = [rng.integers(0, 50257, size=n).tolist() for n in (300, 77)]
    prefix = 20
    got = _decode_teacher_forced(eng.backend, seqs, prefix, block_size, rng)
    for seq, logits in zip(seqs, got):
        ref = hf_logits(model, seq)[prefix:]
        np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_ATOL[dtype])
        if dtype != "float32":  # where HF fp32 has a clear winner (as in the test above)
            top2 = np.sort(ref, axis=-1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] >= 0.1
            assert np.mean((logits.argmax(-1) == ref.argmax(-1))[clear]) >= TOP1_AGREEMENT
    if dtype == "float32":  # generate: multi-step decode graphs at batch 2, then 1
        greedy = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        prompts = [seqs[0][:90], seqs[1][:5]]
        outs = Engine(engine_dir, device="cuda", dtype=dtype, block_size=block_size,
                      num_blocks=640 // block_size).generate(prompts, [greedy, SamplingParams(
                          max_new_tokens=12, temperature=0.0, ignore_eos=True)])
        assert outs[0].token_ids == hf_greedy(model, prompts[0], 40)
        assert outs[1].token_ids == hf_greedy(model, prompts[1], 12)


def test_large_batch_decode_logits_match_hf(model_dirs_of):
    """A decode batch large enough that attention runs a warp per head (four heads of head size
    64 a block), teacher-forced through shuffled block tables, against HF fp32 at every position
    (fp32: the kernel tests cover the half types against the CPU reference)."""
    from pagedgpt2 import _cuda

    model, _, engine_dir = model_dirs_of((1, 1024, 16, 256, 1000), "h16")
    model = hf_on_gpu(model)
    n = next(b for b in range(1, 4096) if _cuda.ops.decode_heads_per_block(b, 16) == 4) + 3
    eng = Engine(engine_dir, device="cuda", dtype="float32", block_size=16, num_blocks=n * 6,
                 max_num_seqs=n)
    rng = np.random.default_rng(23)
    seqs = [rng.integers(0, 1000, size=int(k)).tolist() for k in rng.integers(8, 80, size=n)]
    got = _decode_teacher_forced(eng.backend, seqs, 4, 16, rng)
    for seq, logits in zip(seqs, got):
        np.testing.assert_allclose(logits, hf_logits(model, seq)[4:], rtol=0, atol=LOGIT_ATOL["float32"])


def test_paged_equals_contiguous_on_gpu(hf_model_dirs):
    engine_dir = hf_model_dirs["d48"][2]
    rng = np.random.default_rng(13)
    prompts = [rng.integers(0, 1000, size=n).tolist() for n in (3, 14, 30, 1, 21)]
    params = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in Engine(engine_dir, device="cuda", dtype="float32", kv_cache="contiguous",
                                       num_blocks=64).generate(prompts, params)]
    for block_size in (1, 7, 16, 32):
        eng = Engine(engine_dir, device="cuda", dtype="float32", block_size=block_size, num_blocks=4096 // block_size)
        assert [o.token_ids for o in eng.generate(prompts, params)] == ref, f"block_size={block_size}"


def test_cpu_and_gpu_engines_agree(hf_model_dirs):
    engine_dir = hf_model_dirs["d16"][2]
    cpu = Engine(engine_dir, device="cpu")
    gpu = Engine(engine_dir, device="cuda", dtype="float32", num_blocks=128)
    ids = np.random.default_rng(14).integers(0, 50257, size=100).tolist()
    np.testing.assert_allclose(gpu.logits(ids), cpu.logits(ids), rtol=0, atol=1e-3)
    prompts = ["Alan Turing", "The quick brown fox", [15496, 995]]
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in gpu.generate(prompts, greedy)] == [o.token_ids for o in cpu.generate(prompts, greedy)]
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    a = [o.token_ids for o in gpu.generate(prompts, sampled)]
    assert a == [o.token_ids for o in gpu.generate(prompts, sampled)]  # seeded: reproducible


def test_gpu_pool_too_small_is_a_clear_error(hf_model_dirs):
    eng = Engine(hf_model_dirs["d48"][2], device="cuda", block_size=4, num_blocks=5)
    with pytest.raises(ValueError, match="but the pool has only 5"):
        eng.generate([1] * 10, SamplingParams(max_new_tokens=16))
    assert eng.generate([1, 2], SamplingParams(max_new_tokens=3))[0].token_ids


def test_kv_pool_is_sized_from_free_memory_and_steps_allocate_nothing(hf_model_dirs):
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    eng = Engine(hf_model_dirs["d64"][2], device="cuda", gpu_memory_fraction=0.5)
    pool = eng.kv_stats()["bytes_total"]
    assert 0.3 * free_before < pool <= 0.5 * free_before
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    eng.generate([[1, 2, 3]] * 8, params)
    free_after_first = torch.cuda.mem_get_info()[0]
    eng.generate([[4, 5, 6, 7]] * 8, params)
    assert torch.cuda.mem_get_info()[0] == free_after_first


def _decode_against_hf(model_dirs_of, dtype, shape, name, initializer_range, lengths, seed,
                       top1=False):
    """Sequences of `lengths` teacher-forced from position 20 through decode steps (of 2, then 1
    sequence) and shuffled block tables, against HF fp32 at every position; top1: also the
    greedy token wherever HF's top two are >= 0.1 apart."""
    model, _, engine_dir = model_dirs_of(shape, name, initializer_range=initializer_range)
    model = hf_on_gpu(model)
    eng = Engine(engine_dir, device="cuda", dtype=dtype, block_size=16, num_blocks=64)
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, shape[-1], size=n).tolist() for n in lengths]
    got = _decode_teacher_forced(eng.backend, seqs, 20, 16, rng)
    for seq, logits in zip(seqs, got):
        ref = hf_logits(model, seq)[20:]
        np.testing.assert_allclose(logits, ref, rtol=0, atol=LOGIT_ATOL[dtype])
        if top1:
            top2 = np.sort(ref, axis=-1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] >= 0.1
            assert np.mean((logits.argmax(-1) == ref.argmax(-1))[clear]) >= TOP1_AGREEMENT


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_resident_gemvs_match_hf(model_dirs_of, monkeypatch, dtype, resident):
    """gpt2's width, where every batch-1 layer GEMV is a resident one (QKV and fc 3 rows a warp,
    proj and fc_proj 1; PAGEDGPT2_RESIDENT_GEMV=0 runs the streaming kernels instead): decode
    steps of 2 then 1 sequences against HF fp32."""
    from pagedgpt2 import _cuda

    rows = [_cuda.ops.skinny_resident_rows(n, k, dtype) for n, k in
            ((2304, 768), (768, 768), (3072, 768), (768, 3072))]
    assert all(rows), rows
    if resident:
        monkeypatch.delenv("PAGEDGPT2_RESIDENT_GEMV", raising=False)
    else:
        monkeypatch.setenv("PAGEDGPT2_RESIDENT_GEMV", "0")
    # std 0.06: logits of the same order as the d64 model's at 0.15 (the tolerances' scale)
    _decode_against_hf(model_dirs_of, dtype, (2, 768, 12, 1024, 50257), "w768", 0.06, (160, 50),
                       37, top1=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gemvs_at_gpt2_xl_width_match_hf(model_dirs_of, dtype):
    """gpt2-xl's width (1,600; MLP 6,400), where the batch-1 layer GEMVs take the kernels built
    for one and two warps a row: decode steps of 2 then 1 sequences against HF fp32."""
    _decode_against_hf(model_dirs_of, dtype, (1, 1600, 25, 1024, 50257), "w1600", 0.04,
                       (120, 40), 41)


def _logits_under(hf_model_dirs, monkeypatch, dtype, env: dict[str, str | None]) -> list:
    """Teacher-forced logits of four sequences (decode steps of 4 and 3 rows through cuBLASLt,
    then 2 and 1 through the GEMVs) from an engine built with env set (None: unset)."""
    _, _, engine_dir = hf_model_dirs["d64"]
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    rng = np.random.default_rng(29)
    seqs = [rng.integers(0, 50257, size=n).tolist() for n in (70, 41, 30, 19)]
    eng = Engine(engine_dir, device="cuda", dtype=dtype, block_size=16, num_blocks=16)
    return _decode_teacher_forced(eng.backend, seqs, 8, 16, np.random.default_rng(31))


def _assert_same_logits(a: list, b: list) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_wide_step_fusions_change_no_result(hf_model_dirs, monkeypatch, dtype):
    """In wide decode steps decode attention writes the new K/V itself and is launched
    programmatically after the cuBLASLt QKV GEMM. Neither may change a bit: the logits equal
    those of write_kv in its own kernel (PAGEDGPT2_ATTENTION_WRITES_KV=0) and of ordinary
    launches (PAGEDGPT2_PDL=0)."""
    default = {"PAGEDGPT2_ATTENTION_WRITES_KV": None, "PAGEDGPT2_PDL": None}
    want = _logits_under(hf_model_dirs, monkeypatch, dtype, default)
    for name in default:
        _assert_same_logits(want, _logits_under(hf_model_dirs, monkeypatch, dtype,
                                                {**default, name: "0"}))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_l2_prefetch_changes_no_result(hf_model_dirs, monkeypatch, dtype):
    """Decode steps ask L2 for the weights ahead (PAGEDGPT2_L2_PREFETCH_MB, default 4): a hint
    that must change no bit of the result. In the wide steps attention and the LayerNorms ask,
    in the skinny ones the GEMVs; off, the default, and 1 GiB (clamped to the end of the
    weights, the last layer's range wrapping to the LM head) give identical logits."""
    off = _logits_under(hf_model_dirs, monkeypatch, dtype, {"PAGEDGPT2_L2_PREFETCH_MB": "0"})
    for mb in (None, "1024"):
        _assert_same_logits(off, _logits_under(hf_model_dirs, monkeypatch, dtype,
                                               {"PAGEDGPT2_L2_PREFETCH_MB": mb}))
