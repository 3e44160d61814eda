"""Every CUDA kernel against the CPU reference ops (pagedgpt2._core.ops) on fresh random data.

Inputs are rounded to the kernel's dtype first, so the CPU reference (float32) and the GPU see the
same numbers; what is left is the kernel's arithmetic and the rounding of its output:
  float32   tight  (accumulation order only)
  float16   ~1e-2 relative / absolute (10-bit mantissa outputs)
  bfloat16  ~5e-2 relative / absolute (7-bit mantissa outputs)
The GPU ops fill their outputs with NaN first (see cpp/cuda/ops.cu), so an element a kernel
forgets to write fails the comparison.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

pytestmark = pytest.mark.cuda

_cuda = pytest.importorskip("pagedgpt2._cuda")
from pagedgpt2 import _core  # noqa: E402

cpu = _core.ops
gpu = _cuda.ops

DTYPES = ["float32", "float16", "bfloat16"]
BLOCK_SIZES = [1, 8, 16, 32]
DECODE_HEAD_SIZES = [64, 32, 80, 128]  # all have a decode template
GENERIC_HEAD_SIZES = [20, 40]          # no decode template: the prefill kernel serves them

TOL = {
    "float32": dict(rtol=1e-5, atol=1e-5),
    "float16": dict(rtol=1e-2, atol=1e-2),
    "bfloat16": dict(rtol=5e-2, atol=5e-2),
}
ATTN_TOL = {
    "float32": dict(rtol=1e-5, atol=1e-5),
    "float16": dict(rtol=5e-3, atol=5e-3),
    "bfloat16": dict(rtol=3e-2, atol=3e-2),
}


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """x (float32) rounded to dtype and back, round-to-nearest-even like the device casts."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def randn(rng, shape, dtype, scale=1.0):
    return rounded(rng.standard_normal(shape).astype(np.float32) * scale, dtype)


@pytest.fixture
def rng(request):
    # A different stream per test (and per parametrization), reproducible from its id.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------------------
# Paged batches
# ---------------------------------------------------------------------------------------------


def cache_slots(tables, seqs, positions, block_size):
    """The cache slot of the token at positions[i] of sequence seqs[i]."""
    return (tables[seqs, positions // block_size] * block_size + positions % block_size).astype(np.int32)


def paged_batch(rng, context_lens, query_lens, num_heads, head_size, block_size, dtype):
    """Random caches, shuffled non-contiguous block tables, and queries at the end of each
    sequence's context (query_lens[s] new tokens at positions [ctx - q, ctx)). The query tokens'
    K/V (their qkv rows) are in their cache slots, as after write_kv: the decode kernel reads a
    sequence's newest K/V from qkv, the prefill kernel and the CPU from the cache."""
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 5  # free blocks left in the pool
    ids = rng.permutation(num_blocks).astype(np.int32)
    max_blocks = max(blocks_per_seq) + 1  # a wider table than needed, like the runner's
    tables = np.full((len(context_lens), max_blocks), 0, dtype=np.int32)
    at = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = ids[at:at + n]
        at += n
    C = num_heads * head_size
    k_cache = randn(rng, (num_blocks, block_size, num_heads, head_size), dtype)
    v_cache = randn(rng, (num_blocks, block_size, num_heads, head_size), dtype)
    positions = np.concatenate([np.arange(c - q, c) for c, q in zip(context_lens, query_lens)])
    qsl = np.zeros(len(context_lens) + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    qkv = randn(rng, (int(qsl[-1]), 3 * C), dtype)
    positions = positions.astype(np.int32)
    slots = cache_slots(tables, np.repeat(np.arange(len(context_lens)), query_lens), positions, block_size)
    k_cache, v_cache = cpu.write_kv(k_cache, v_cache, qkv, slots, num_heads)
    return qkv, k_cache, v_cache, positions, qsl, tables


# ---------------------------------------------------------------------------------------------
# Elementwise and row ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 768), (33, 100), (1, 1600)])
def test_layernorm(rng, dtype, shape):
    x = randn(rng, shape, dtype, 3.0) + 1.5
    w = rng.standard_normal(shape[1]).astype(np.float32)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    want = cpu.layernorm(x, w, b, 1e-5)
    got = gpu.layernorm(x, w, b, 1e-5, dtype=dtype)
    np.testing.assert_allclose(got, want, **TOL[dtype])


# C > 2048 takes the warp-per-row kernel; 100 leaves most lanes of the last vector idle.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [768, 100, 1600, 2500])
@pytest.mark.parametrize("case", ["add_norm", "add_only", "gather_norm", "gather_add_norm"])
def test_add_layernorm(rng, dtype, C, case):
    """The model's add+LayerNorm: between sublayers (add, norm), after the last layer (add only),
    before the LM head (gather rows, norm). The residual stays float32: its sum is exact."""
    T = 13
    residual = rng.standard_normal((T, C)).astype(np.float32) * 3.0
    delta = randn(rng, (T, C), dtype) if "add" in case else None
    w, b = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
    rows = rng.permutation(T)[:5].astype(np.int32) if "gather" in case else None
    norm = "norm" in case
    got_res, got = gpu.add_layernorm(residual, delta, w if norm else None, b if norm else None, rows,
                                     1e-5, dtype=dtype)
    want_res = residual.copy()
    picked = rows if rows is not None else np.arange(T)
    if delta is not None:
        want_res[picked] += delta[picked]
    np.testing.assert_array_equal(got_res, want_res)  # rows not picked are left alone
    if norm:
        np.testing.assert_allclose(got, cpu.layernorm(want_res[picked], w, b, 1e-5), **TOL[dtype])
    else:
        assert got is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [768, 1600, 2500])
@pytest.mark.parametrize("normalize", [True, False])
def test_embedding(rng, dtype, C, normalize):
    """Token + position rows (rounded to dtype) summed in float32, and ln_1 of layer 0 fused in
    (the wide path's; the skinny path normalizes in its GEMV and asks for none)."""
    V, P, T = 300, 64, 37
    wte, wpe = randn(rng, (V, C), dtype), randn(rng, (P, C), dtype)
    ids = rng.integers(0, V, T).astype(np.int32)
    ids[:2] = [0, V - 1]  # the table's first and last rows
    positions = rng.integers(0, P, T).astype(np.int32)
    w, b = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
    got_res, got_ln = gpu.embedding(ids, positions, wte, wpe, w if normalize else None,
                                    b if normalize else None, 1e-5, dtype=dtype)
    want = wte[ids] + wpe[positions]
    np.testing.assert_array_equal(got_res, want)
    if normalize:
        np.testing.assert_allclose(got_ln, cpu.layernorm(want, w, b, 1e-5), **TOL[dtype])
    else:
        assert got_ln is None


def test_embedding_rejects_ids_out_of_range(rng):
    wte, wpe = randn(rng, (10, 8), "float32"), randn(rng, (4, 8), "float32")
    ok = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="out of range"):
        gpu.embedding(np.array([0, 10, 1], np.int32), ok, wte, wpe)
    with pytest.raises(ValueError, match="out of range"):
        gpu.embedding(ok, np.array([0, 4, 1], np.int32), wte, wpe)


def test_step_ops_reject_bad_arguments(rng):
    x = randn(rng, (3, 8), "float32")
    with pytest.raises(ValueError, match="rows must be in"):
        gpu.add_layernorm(x, rows=np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="go together"):
        gpu.add_layernorm(x, None, np.ones(8, np.float32), None)
    z, table = np.zeros(2, np.int32), np.zeros((4, 2), np.int32)
    with pytest.raises(ValueError, match="run_step must be in"):
        gpu.advance_decode_step(z, z, z, z, None, table, z, table, run_step=4)


def greedy_keys_of(rng, tokens: np.ndarray) -> np.ndarray:
    """Keys as the LM head's argmax leaves them (make_key in sampling.cuh): a logit's order bits
    above, 0xFFFFFFFF - token below."""
    high = rng.integers(1, 2**32, size=len(tokens), dtype=np.uint64)
    return (high << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - tokens.astype(np.uint64))


@pytest.mark.parametrize("num_rows", [1, 37, 300])  # 300: more rows than the block's threads
@pytest.mark.parametrize("with_counters", [True, False])
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("embed_dtype", [None, "float32", "bfloat16"])
def test_advance_decode_step(rng, num_rows, with_counters, greedy, embed_dtype):
    """A decode run's step advance: sampled tokens become the inputs and the history's row
    run_step, every sequence moves on a position and takes its next slot; a bucket's padding rows
    (context 0) are left alone. greedy: the tokens come from the LM head's greedy keys, which
    come back zeroed (padding rows' too) for the next step's LM head. embed_dtype: the advance
    also writes the next step's x, wte[token] + wpe[position] of every row (padding rows too),
    as the embedding kernel would (C = 200: a last partial batch of elements)."""
    S, steps, run_step = num_rows, 6, int(rng.integers(0, 6))
    V, P, C = 1000, 1024, 200
    lens = rng.integers(1, 900, S).astype(np.int32)
    lens[rng.random(S) < 0.2] = 0  # padding rows
    a = dict(token_ids=rng.integers(0, V, S).astype(np.int32),
             positions=(lens - 1).clip(0).astype(np.int32),
             slot_mapping=rng.integers(0, 10**6, S).astype(np.int32), context_lens=lens,
             counters=rng.integers(0, 10**9, S).astype(np.int64) if with_counters else None,
             history=rng.integers(0, 50257, (steps, S)).astype(np.int32),
             next_tokens=rng.integers(0, V, S).astype(np.int32),
             next_slots=rng.integers(0, 10**6, (steps, S)).astype(np.int32))
    sampled = a["next_tokens"]
    keys = None
    if greedy:
        sampled = rng.integers(0, V, S).astype(np.int32)
        keys = greedy_keys_of(rng, sampled)
    tables = {}
    if embed_dtype:
        tables = dict(wte=randn(rng, (V, C), embed_dtype), wpe=randn(rng, (P, C), embed_dtype),
                      dtype=embed_dtype)
    got = gpu.advance_decode_step(**a, run_step=run_step, greedy_keys=keys, **tables)
    live = lens > 0
    want = {k: (v.copy() if v is not None else None) for k, v in a.items()}
    want["token_ids"][live] = sampled[live]
    want["history"][run_step, live] = sampled[live]
    want["slot_mapping"][live] = a["next_slots"][run_step, live]
    for name in ("positions", "context_lens") + (("counters",) if with_counters else ()):
        want[name][live] += 1
    assert got["run_step"] == run_step + 1
    for name in ("token_ids", "positions", "slot_mapping", "context_lens", "history"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if with_counters:
        np.testing.assert_array_equal(got["counters"], want["counters"])
    else:
        assert got["counters"] is None
    if greedy:
        np.testing.assert_array_equal(got["next_tokens"], sampled)
        np.testing.assert_array_equal(got["greedy_keys"], np.zeros(S, np.uint64))
    else:
        np.testing.assert_array_equal(got["next_tokens"], a["next_tokens"])
        assert got["greedy_keys"] is None
    if embed_dtype:
        x = tables["wte"][want["token_ids"]] + tables["wpe"][want["positions"]]
        np.testing.assert_array_equal(got["residual"], x)
    else:
        assert got["residual"] is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(rng, dtype):
    x = randn(rng, (1000,), dtype, 3.0)
    np.testing.assert_allclose(gpu.gelu(x, dtype=dtype), cpu.gelu(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2304, 768), (37, 200, 64), (130, 768, 3072)])
@pytest.mark.parametrize("epilogue", ["none", "bias", "bias_gelu"])
def test_matmul(rng, dtype, shape, epilogue):
    T, N, K = shape
    x = randn(rng, (T, K), dtype)
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype) if epilogue != "none" else None
    want = cpu.matmul(x, w, b)
    if epilogue == "bias_gelu":
        want = cpu.gelu(want)
    got = gpu.matmul(x, w, b, gelu=epilogue == "bias_gelu", dtype=dtype)
    tol = dict(TOL[dtype])
    if dtype == "float32":
        tol = dict(rtol=1e-4, atol=1e-4)  # K up to 3072: summation order
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("variant", ["bias", "gelu", "residual", "logits", "ln_bias", "ln_logits"])
def test_skinny_matmul(rng, dtype, rows, variant):
    K, N = (768, 2304) if variant != "residual" else (3072, 768)
    check_skinny_matmul(rng, dtype, rows, N, K, variant)


def check_skinny_matmul(rng, dtype, rows, N, K, variant):
    """The skinny GEMV of `rows` rows against the CPU reference; variant: its prologue and
    epilogue (bias, gelu, residual, logits, ln_bias, ln_gelu, ln_logits)."""
    ln = variant.startswith("ln_")
    x = rng.standard_normal((rows, K)).astype(np.float32) * 2 + 0.5
    if not ln:
        x = rounded(x, dtype)
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype) if not variant.endswith("logits") else None
    ln_w = rng.standard_normal(K).astype(np.float32) if ln else None
    ln_b = rng.standard_normal(K).astype(np.float32) if ln else None
    residual = rng.standard_normal((rows, N)).astype(np.float32) if variant == "residual" else None

    xin = rounded(cpu.layernorm(x, ln_w, ln_b, 1e-5), dtype) if ln else x
    want = cpu.matmul(xin, w, b)
    gelu = variant.endswith("gelu")
    if gelu:
        want = cpu.gelu(want)
    if residual is not None:
        want = want + residual
    got = gpu.skinny_matmul(x, w, b, ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, residual=residual,
                            gelu=gelu, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else TOL[dtype]
    if ln and dtype != "float32":
        # The reference rounds the LayerNorm's output to dtype, as the wide path does; the skinny
        # GEMV folds the LayerNorm into its epilogue and rounds nothing.
        tol = dict(rtol=2 * tol["rtol"], atol=2 * tol["atol"])
    np.testing.assert_allclose(got, want, **tol)


def warps_per_row_rule(N, K, elem_bytes, sms):
    """skinny_warps_per_row, written again: doubled from 1 while the row groups number fewer
    than 2 an SM and each warp keeps >= 64 16-byte vectors of a row."""
    w = 1
    while w < 8 and -(-N // (8 // w)) < 2 * sms and K * elem_bytes // 16 >= 64 * w:
        w *= 2
    return w


# One row of a 16-bit type runs kernels built for 1 and 2 warps a row (gpt2-xl's layer shapes)
# and, for other counts, the kernel for any (768 x 3,072: 4 warps on 100-200 SMs).
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("N,K,variant", [(4800, 1600, "ln_bias"), (1600, 1600, "residual"),
                                         (6400, 1600, "ln_gelu"), (1600, 6400, "residual"),
                                         (768, 3072, "residual"), (50257, 1600, "ln_logits"),
                                         (5120, 1280, "ln_gelu"), (1280, 5120, "residual")])
def test_skinny_matmul_of_every_warps_per_row_at_one_row(rng, dtype, N, K, variant):
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert gpu.skinny_warps_per_row(N, K, dtype) == warps_per_row_rule(N, K, 2, sms)
    check_skinny_matmul(rng, dtype, 1, N, K, variant)


def test_skinny_warps_per_row_takes_each_built_count_at_gpt2_xl():
    """gpt2-xl's QKV and fc take one warp a row, proj and fc_proj two (on 100-200 SMs), so both
    one-row kernels built for a count are the ones its decode runs."""
    got = [gpu.skinny_warps_per_row(n, k, "float16")
           for n, k in ((4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400))]
    assert got == [1, 2, 1, 2]
    assert gpu.skinny_warps_per_row(1600, 1600, "float32") == 2


# The resident batch-1 GEMV (SkinnyParams::resident): gpt2's and gpt2-medium's K, N picking 1, 3
# or 4 rows a warp (on 132 SMs: ceil(N / 8R) blocks at most one an SM); 1000, 2300 and 3000
# leave a last block with rows past N.
RESIDENT_SHAPES = [(1000, 768, "residual"), (2300, 768, "ln_gelu"), (2304, 768, "ln_bias"),
                   (1024, 1024, "bias"), (3000, 1024, "ln_bias"), (4096, 1024, "ln_gelu"),
                   (768, 3072, "residual"), (1024, 4096, "gelu")]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("N,K,variant", RESIDENT_SHAPES)
def test_skinny_resident_matmul(rng, dtype, N, K, variant):
    """One row through the resident variant against the CPU reference, and against the streaming
    kernel (the same products summed in another order: within a rounding of the output)."""
    assert gpu.skinny_resident_rows(N, K, dtype) in (1, 3, 4)
    ln = variant.startswith("ln_")
    x = rng.standard_normal((1, K)).astype(np.float32) * 2 + 0.5
    if not ln:
        x = rounded(x, dtype)
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype)
    ln_w = rng.standard_normal(K).astype(np.float32) if ln else None
    ln_b = rng.standard_normal(K).astype(np.float32) if ln else None
    residual = rng.standard_normal((1, N)).astype(np.float32) if variant == "residual" else None
    gelu = variant.endswith("gelu")
    xin = rounded(cpu.layernorm(x, ln_w, ln_b, 1e-5), dtype) if ln else x
    want = cpu.matmul(xin, w, b)
    if gelu:
        want = cpu.gelu(want)
    if residual is not None:
        want = want + residual
    args = dict(ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, residual=residual, gelu=gelu, dtype=dtype)
    got = gpu.skinny_matmul(x, w, b, **args, resident=True)
    tol = {k: 2 * v for k, v in TOL[dtype].items()} if ln else TOL[dtype]
    np.testing.assert_allclose(got, want, **tol)
    ulp = 2.0 ** -10 if dtype == "float16" else 2.0 ** -7
    np.testing.assert_allclose(got, gpu.skinny_matmul(x, w, b, **args), rtol=ulp, atol=ulp)


@pytest.mark.parametrize("N,K", [(2304, 1600), (1024, 1000), (50257, 768)])
def test_skinny_resident_rows_where_no_variant_takes_the_shape(N, K):
    """No resident variant: K not of gpt2 or gpt2-medium (gpt2-xl's 1,600), N too large for one
    block an SM at 4 rows a warp, float32."""
    assert gpu.skinny_resident_rows(N, K, "float16") == 0
    assert gpu.skinny_resident_rows(768, 768, "float32") == 0
    assert gpu.skinny_resident_rows(768, 768, "float16") == 1


def test_skinny_resident_request_falls_back_to_the_streaming_kernel(rng):
    """resident=True on shapes no variant takes (two rows; gpt2-xl's K) runs the streaming kernel:
    the same bits as without it."""
    for rows, N, K in ((2, 768, 768), (1, 2304, 1600)):
        x = rounded(rng.standard_normal((rows, K)).astype(np.float32), "float16")
        w = randn(rng, (N, K), "float16", 1.0 / np.sqrt(K))
        b = randn(rng, (N,), "float16")
        np.testing.assert_array_equal(gpu.skinny_matmul(x, w, b, dtype="float16", resident=True),
                                      gpu.skinny_matmul(x, w, b, dtype="float16"))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_skinny_matmul_with_more_row_groups_than_resident_blocks(rng, dtype, rows):
    """N = 8003 (odd) over K = 1600, as gpt2-xl's MLP: each block loops over several row groups,
    prefetching the next group's weights while it reduces the current one."""
    K, N = 1600, 8003
    x = rng.standard_normal((rows, K)).astype(np.float32) * 2 + 0.5
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype)
    ln_w, ln_b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    want = cpu.matmul(rounded(cpu.layernorm(x, ln_w, ln_b, 1e-5), dtype), w, b)
    got = gpu.skinny_matmul(x, w, b, ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else {k: 2 * v for k, v in TOL[dtype].items()}
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 2, 3])
def test_skinny_lm_head(rng, dtype, rows):
    """gpt2's LM head: LayerNorm, then 50,257 logits over K = 768. At 1-2 rows a warp reads four
    consecutive weight rows as one run; 50,257 leaves a last run of one row."""
    K, N = 768, 50257
    x = rng.standard_normal((rows, K)).astype(np.float32) * 2 + 0.5
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    ln_w, ln_b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    want = cpu.matmul(rounded(cpu.layernorm(x, ln_w, ln_b, 1e-5), dtype), w, None)
    got = gpu.skinny_matmul(x, w, None, ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else {k: 2 * v for k, v in TOL[dtype].items()}
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N", [50257, 8003])
def test_skinny_lm_head_greedy_tokens(rng, dtype, rows, N):
    """The LM head reduces each row's greedy token as it writes the logits (SkinnyParams::argmax;
    greedy decode runs take it instead of sampling). It must be the first argmax of the very
    logits it wrote, and those logits must be the plain LM head's bit for bit. Rows 7, N // 2 and
    N - 1 of W are the same multiple of one unit vector (their logits are then equal to the
    bit) and every other row is zero, so row 1 ties at its maximum: the lowest id wins."""
    K = 768
    x = rng.standard_normal((rows, K)).astype(np.float32) * 2 + 0.5
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    ln_w, ln_b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    args = dict(ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, dtype=dtype)
    plain = gpu.skinny_matmul(x, w, None, **args)
    logits, tokens = gpu.skinny_matmul(x, w, None, **args, greedy=True)
    np.testing.assert_array_equal(logits, plain)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))

    tied = np.zeros((N, K), np.float32)
    k = int(np.argmax(np.abs(ln_w)))
    tie_ids = [7, N // 2, N - 1]
    tied[tie_ids, k] = 0.5
    logits, tokens = gpu.skinny_matmul(x, tied, None, **args, greedy=True)
    for r in range(rows):
        assert logits[r, tie_ids[0]] == logits[r, tie_ids[1]] == logits[r, tie_ids[2]]
        want = tie_ids[0] if logits[r, tie_ids[0]] > 0 else 0  # else every zero row ties at 0
        assert tokens[r] == want == logits[r].argmax()


def test_skinny_greedy_tokens_need_the_layernorm_lm_head(rng):
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = rng.standard_normal((100, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="greedy keys .* LayerNorm LM head only"):
        gpu.skinny_matmul(x, w, None, greedy=True)
    with pytest.raises(ValueError, match="greedy=True takes logits"):
        gpu.skinny_matmul(x, w, np.zeros(100, np.float32), ln_weight=np.ones(64, np.float32),
                          ln_bias=np.zeros(64, np.float32), greedy=True)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_skinny_layernorm_of_rows_far_from_zero(rng, rows):
    """The skinny GEMV folds its LayerNorm into the epilogue and sums each row's variance in one
    pass, about the row's first element: a mean 1,000 times the spread (where E[x^2] - mean^2
    would lose every digit in float32) must normalize as exactly as a row about zero. The
    reference is float64 numpy: the CPU op's float32 two-pass LayerNorm is itself ~1e-3 off
    here (its mean of 768 values near 1,000 is 6e-5 off)."""
    K, N = 768, 2304
    x = rng.standard_normal((rows, K)).astype(np.float32)
    x[0] += 1000.0
    if rows > 2:
        x[2] = x[2] * 300.0 - 50.0
    w = randn(rng, (N, K), "float32", 1.0 / np.sqrt(K))
    b = randn(rng, (N,), "float32")
    ln_w, ln_b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
    xd = x.astype(np.float64)
    normed = (xd - xd.mean(1, keepdims=True)) / np.sqrt(xd.var(1, keepdims=True) + 1e-5)
    want = (normed * ln_w + ln_b) @ w.astype(np.float64).T + b
    got = gpu.skinny_matmul(x, w, b, ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, dtype="float32")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2])
def test_skinny_matmul_with_long_rows(rng, rows):
    """K = 6400, N = 1600, as gpt2-xl's fc_proj: rows of 12.8 KB, split over several warps."""
    K, N = 6400, 1600
    x = rounded(rng.standard_normal((rows, K)).astype(np.float32), "float16")
    w = randn(rng, (N, K), "float16", 1.0 / np.sqrt(K))
    b = randn(rng, (N,), "float16")
    residual = rng.standard_normal((rows, N)).astype(np.float32)
    want = cpu.matmul(x, w, b) + residual
    got = gpu.skinny_matmul(x, w, b, residual=residual, dtype="float16")
    np.testing.assert_allclose(got, want, **TOL["float16"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("shape", [(6400, 1600), (1600, 1600)])
def test_skinny_matmul_with_a_last_partial_round(rng, dtype, rows, shape):
    """gpt2-xl's fc (LayerNorm, GELU) and proj (residual) shapes: more row groups than resident
    blocks, with a few left for a last round (on a 132-SM card: 800 and 400 groups on 396
    blocks)."""
    N, K = shape
    x = rng.standard_normal((rows, K)).astype(np.float32) * 2 + 0.5
    w = randn(rng, (N, K), dtype, 1.0 / np.sqrt(K))
    b = randn(rng, (N,), dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else {k: 2 * v for k, v in TOL[dtype].items()}
    if N > K:
        ln_w, ln_b = rng.standard_normal(K).astype(np.float32), rng.standard_normal(K).astype(np.float32)
        want = cpu.gelu(cpu.matmul(rounded(cpu.layernorm(x, ln_w, ln_b, 1e-5), dtype), w, b))
        got = gpu.skinny_matmul(x, w, b, ln_weight=ln_w, ln_bias=ln_b, eps=1e-5, gelu=True, dtype=dtype)
    else:
        x = rounded(x, dtype)
        residual = rng.standard_normal((rows, N)).astype(np.float32)
        want = cpu.matmul(x, w, b) + residual
        got = gpu.skinny_matmul(x, w, b, residual=residual, dtype=dtype)
    np.testing.assert_allclose(got, want, **tol)


def test_skinny_matches_cublas(rng):
    """The two GEMM paths agree (fp16), so the skinny/wide switch is invisible."""
    x = randn(rng, (6, 768), "float16")
    w = randn(rng, (2304, 768), "float16", 0.04)
    b = randn(rng, (2304,), "float16")
    np.testing.assert_allclose(gpu.skinny_matmul(x, w, b, dtype="float16"),
                               gpu.matmul(x, w, b, dtype="float16"), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_heads,head_size", [(12, 64), (3, 20)])
def test_write_kv(rng, dtype, block_size, num_heads, head_size):
    num_blocks, T = 16, 11
    C = num_heads * head_size
    k = randn(rng, (num_blocks, block_size, num_heads, head_size), dtype)
    v = randn(rng, (num_blocks, block_size, num_heads, head_size), dtype)
    qkv = randn(rng, (T, 3 * C), dtype)
    slots = rng.choice(num_blocks * block_size, size=T, replace=False).astype(np.int32)
    slots[[2, 7]] = -1  # padding rows
    want_k, want_v = cpu.write_kv(k, v, qkv, slots, num_heads)
    got_k, got_v = gpu.write_kv(k, v, qkv, slots, num_heads, dtype=dtype)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16])
def test_copy_blocks(rng, dtype, block_size):
    cache = randn(rng, (10, block_size, 4, 16), dtype)
    src = np.array([3, 0, 7], dtype=np.int32)
    dst = np.array([5, 9, 1], dtype=np.int32)
    want = cache.copy()
    want[dst] = cache[src]
    np.testing.assert_array_equal(gpu.copy_blocks(cache, src, dst, dtype=dtype), want)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def decode_contexts(block_size):
    # Lengths around block boundaries and not divisible by the block size, one long.
    return [1, block_size + 1, 3 * block_size - 1, 37, 200, 1000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", DECODE_HEAD_SIZES)
@pytest.mark.parametrize("partition_size", [0, 32])  # 32: many partitions, the merge path
@pytest.mark.parametrize("heads_per_block", [1, 4])  # a block per head; a warp per head
def test_decode_attention(rng, dtype, block_size, head_size, partition_size, heads_per_block):
    num_heads = max(1, 256 // head_size)  # head size 256: one head, three idle warps at 4
    ctx = decode_contexts(block_size)
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, [1] * len(ctx), num_heads,
                                                    head_size, block_size, dtype)
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads)
    got = gpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads, dtype=dtype,
                              kernel="decode", partition_size=partition_size,
                              heads_per_block=heads_per_block)
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partition_size", [0, 64])
def test_decode_attention_heads_not_divisible_by_four(rng, dtype, partition_size):
    """gpt2-xl's 25 heads, four a block: the last block has one head (and three idle warps)."""
    num_heads, head_size, block_size = 25, 64, 16
    ctx = [1, 17, 200, 63, 300]
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, [1] * len(ctx), num_heads,
                                                    head_size, block_size, dtype)
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads)
    got = gpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads, dtype=dtype,
                              kernel="decode", partition_size=partition_size, heads_per_block=4)
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


def newest_row_cases(test):
    """The grid of the decode tests around each sequence's newest row (applied as the stacked
    decorators dtype / block_size / head_size / partition_size / heads_per_block would be)."""
    for name, values in (("heads_per_block", [1, 4]), ("partition_size", [0, 32]),
                         ("head_size", [64, 32]), ("block_size", BLOCK_SIZES), ("dtype", DTYPES)):
        test = pytest.mark.parametrize(name, values)(test)
    return test


def newest_slots(tables, positions, block_size):
    """The cache slot of each sequence's newest token (one query per sequence)."""
    return cache_slots(tables, np.arange(len(positions)), positions, block_size)


def with_other_newest_rows(rng, cache, slots, dtype):
    """A copy of cache whose rows at slots hold other random values (so a kernel that reads
    them, or does not write them, fails)."""
    out = cache.copy()
    flat = out.reshape(-1, *cache.shape[2:])
    flat[slots] = randn(rng, (len(slots), *cache.shape[2:]), dtype)
    assert not np.array_equal(out, cache)
    return out


@newest_row_cases
def test_decode_attention_writes_kv(rng, dtype, block_size, head_size, partition_size,
                                    heads_per_block):
    """The decode kernel as a wide decode step runs it: it also writes each sequence's new K/V
    (its qkv row) to the slot of its last position, and takes that token from qkv. The caches
    (whose newest slots held other values before) must equal write_kv's exactly, the output
    attention over them."""
    num_heads = 256 // head_size
    ctx = decode_contexts(block_size)
    qkv, want_k, want_v, positions, qsl, tables = paged_batch(rng, ctx, [1] * len(ctx), num_heads,
                                                              head_size, block_size, dtype)
    slots = newest_slots(tables, positions, block_size)
    k = with_other_newest_rows(rng, want_k, slots, dtype)
    v = with_other_newest_rows(rng, want_v, slots, dtype)
    want = cpu.paged_attention(qkv, want_k, want_v, positions, qsl, tables, num_heads)
    got, got_k, got_v = gpu.decode_attention_write_kv(
        qkv, k, v, positions, slots, tables, num_heads, dtype=dtype,
        partition_size=partition_size, heads_per_block=heads_per_block)
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


@newest_row_cases
def test_decode_attention_reads_newest_from_qkv(rng, dtype, block_size, head_size, partition_size,
                                                heads_per_block):
    """As the engine runs it: each sequence's newest K/V come from its qkv row and every older
    row from the cache (copied before the kernel waits, the newest row after). The cache's own
    newest slots hold other random values here, so reading them there would fail."""
    num_heads = 256 // head_size
    ctx = decode_contexts(block_size)
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, [1] * len(ctx), num_heads,
                                                    head_size, block_size, dtype)
    slots = newest_slots(tables, positions, block_size)
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads)
    got = gpu.paged_attention(qkv, with_other_newest_rows(rng, k, slots, dtype),
                              with_other_newest_rows(rng, v, slots, dtype), positions, qsl,
                              tables, num_heads, dtype=dtype, kernel="decode",
                              partition_size=partition_size, heads_per_block=heads_per_block)
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


def test_decode_attention_rejects_other_heads_per_block(rng):
    qkv, k, v, positions, qsl, tables = paged_batch(rng, [5], [1], 4, 64, 16, "float32")
    with pytest.raises(ValueError, match="heads_per_block must be 1 or 4, got 2"):
        gpu.paged_attention(qkv, k, v, positions, qsl, tables, 4, kernel="decode",
                            heads_per_block=2)


def test_kernel_timers_reject_bad_arguments():
    """The benchmark timers name the argument and its limit instead of running a bad setup."""
    with pytest.raises(ValueError, match="copies must be >= 0, got -1"):
        gpu.time_decode_attention(4, 64, 12, 64, 16, copies=-1)
    with pytest.raises(ValueError, match="warps_per_row"):
        gpu.time_skinny_gemm(1, 768, 768, 16, 5, 3, 0)
    with pytest.raises(ValueError, match="kind must be 'kernel' or 'barrier', got 'graph'"):
        gpu.time_dependency("graph", 1)
    with pytest.raises(ValueError, match=r"prefetch_mb in \[0, 64\]"):
        gpu.time_dependency("kernel", 1, prefetch_mb=65)
    with pytest.raises(ValueError, match="prefetch_mb is for kind 'kernel'"):
        gpu.time_dependency("barrier", 1, prefetch_mb=4)
    if not gpu.stage_trace_built():  # the default build: no trace to read
        with pytest.raises(RuntimeError, match="PAGEDGPT2_TRACE=ON"):
            gpu.stage_trace()
    with pytest.raises(ValueError, match="kind must be 'kernel', 'barrier' or 'tagged', got 'flag'"):
        gpu.time_handover("flag")
    with pytest.raises(ValueError, match=r"width in \[32, 8192\].*got width 9000"):
        gpu.time_handover("tagged", 9000)
    with pytest.raises(ValueError, match="blocks an SM of 1024 threads do not fit at once"):
        gpu.time_handover("tagged", 768, blocks_per_sm=3, threads=1024)
    with pytest.raises(ValueError, match="kind must be 'kernels' or 'persistent', got 'tagged'"):
        gpu.time_gemv_layers("tagged")
    with pytest.raises(ValueError, match="width a multiple of 64.*got width 100, layers 12"):
        gpu.time_gemv_layers("persistent", 100)
    with pytest.raises(ValueError, match="width 2560 needs .* KB of shared memory a block"):
        gpu.time_gemv_layers("persistent", 2560)


def handover_reference(x0, rounds):
    """time_handover's chain in float64: y_j = tanh(sum_k c(j, k) x_k / sqrt(width) + x_j / 2)."""
    width = len(x0)
    j, k = np.arange(width)[:, None], np.arange(width)[None, :]
    c = ((31 * j + 17 * k) % 13 - 6) * 0.25
    x = x0.astype(np.float64)
    for _ in range(rounds):
        x = np.tanh(c @ x / np.sqrt(width) + 0.5 * x)
    return x


@pytest.mark.parametrize("kind", ["kernel", "barrier", "tagged"])
@pytest.mark.parametrize("width,blocks_per_sm,threads,rounds", [
    (768, 1, 256, 5), (6400, 1, 256, 4), (100, 3, 128, 6), (1600, 2, 512, 5)])
def test_handover_chain_matches_numpy(rng, kind, width, blocks_per_sm, threads, rounds):
    """Each round reads every element the round before wrote, however the kind synchronizes:
    a round that read a stale or half-written element would leave the chain off numpy's (the
    values stay near 1 in size; float32 against float64 is ~1e-5 over these few rounds, the
    chain being chaotic). Widths below the grid (100 at 3 blocks an SM) leave blocks with no
    slice."""
    x0 = rng.standard_normal(width).astype(np.float32)
    got = gpu.handover_chain(kind, x0, blocks_per_sm=blocks_per_sm, threads=threads,
                             rounds=rounds)
    np.testing.assert_allclose(got, handover_reference(x0, rounds), rtol=0, atol=2e-4)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gemv_layers_reference(x0, layers):
    """time_gemv_layers' chain in float64 on its fp16 weights (the pattern of handover_bench.cu's
    layer_weights_kernel, computed the same way in float32): per layer QKV, proj on q (the first
    C of QKV's output), fc with GELU, fc_proj."""
    C = len(x0)
    x = x0.astype(np.float64)
    for layer in range(layers):
        for q, (N, K) in enumerate([(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]):
            s = 4 * layer + q
            n = np.arange(N, dtype=np.uint32)[:, None]
            k = np.arange(K, dtype=np.uint32)[None, :]
            h = (n * np.uint32(K) + k + np.uint32(s * 0x9E3779B9 % 2**32)) * np.uint32(2654435761)
            scale = np.float32(1) / np.sqrt(np.float32(K))
            v = (2 * (h >> np.uint32(28)).astype(np.int64) - 15).astype(np.float32)
            w = (v * np.float32(0.125) * scale).astype(np.float16).astype(np.float64)
            b = (((5 * np.arange(N) + s) % 11 - 5).astype(np.float32) * np.float32(0.05))
            y = w @ x[:K] + b.astype(np.float16).astype(np.float64)
            x = gelu_tanh(y) if q == 2 else y
    return x


@pytest.mark.parametrize("kind,atol", [("kernels", 6e-3), ("persistent", 1e-4)])
@pytest.mark.parametrize("width,layers", [(768, 1), (768, 2), (256, 3), (1600, 1)])
def test_gemv_layers_chain_matches_numpy(rng, kind, atol, width, layers):
    """gpt2's layer GEMVs as the engine's kernels and as one persistent kernel (tagged words
    between stages, the weights through a ring in shared memory) compute the same chain. The
    kernels round each stage's output to fp16 (float64 numpy doing the same: 1.5-2e-4 off at
    768, 2-2.5e-3 at 1,600, where outputs reach ~1.4), the persistent kernel keeps float32. At
    1,600 (gpt2-xl's width) fc_proj's chunks are 3 rows of 6,400."""
    x0 = rng.standard_normal(width).astype(np.float32)
    got = gpu.gemv_layers_chain(kind, x0, layers=layers)
    np.testing.assert_allclose(got, gemv_layers_reference(x0, layers), rtol=0, atol=atol)


def test_handover_kinds_agree_bit_for_bit(rng):
    """The three kinds run the same arithmetic in the same order; only the waiting differs."""
    x0 = rng.standard_normal(1024).astype(np.float32)
    runs = [gpu.handover_chain(kind, x0, rounds=33) for kind in ("kernel", "barrier", "tagged")]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[0], runs[2])
    assert gpu.time_handover("tagged", 768, rounds=16, iters=3) > 0
    assert gpu.time_gemv_layers("persistent", 768, layers=2, iters=3) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_one_big_head(rng, dtype):
    """batch 1 x 1 head x 1024 tokens: the split path at its widest (auto partitioning)."""
    qkv, k, v, positions, qsl, tables = paged_batch(rng, [1024], [1], 1, 256, 16, dtype)
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, 1)
    got = gpu.paged_attention(qkv, k, v, positions, qsl, tables, 1, dtype=dtype, kernel="decode")
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
# (heads, contexts): gpt2's 12 heads at batch 1 (one, a few and 16 partitions of 64 tokens);
# 4 heads at 2 and 3 sequences (the 4th row of the GEMV's tile a padding row).
@pytest.mark.parametrize("num_heads,ctx", [(12, [1]), (12, [200]), (12, [1000]), (4, [37, 130]),
                                           (4, [1, 300, 64])])
@pytest.mark.parametrize("partition_size", [0, 32, 64])
@pytest.mark.parametrize("heads_per_block", [1, 4])
def test_skinny_proj_merges_decode_partitions(rng, dtype, num_heads, ctx, partition_size,
                                              heads_per_block):
    """A skinny decode step's attention and proj: the attention kernel leaves every partition's
    partial (a single one too) and the proj GEMV merges them as it stages x. Against the CPU's
    attention, then its matmul (no rounding between them: the GEMV stages the merge in
    float32)."""
    head_size, block_size = 64, 16
    C = num_heads * head_size
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, [1] * len(ctx), num_heads,
                                                    head_size, block_size, dtype)
    w = randn(rng, (C, C), dtype, 1.0 / np.sqrt(C))
    b = randn(rng, (C,), dtype)
    residual = rng.standard_normal((len(ctx), C)).astype(np.float32)
    attention = cpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads)
    want = residual + cpu.matmul(attention, w, b)
    got = gpu.decode_attention_proj(qkv, k, v, positions, tables, num_heads, w, b, residual,
                                    dtype=dtype, partition_size=partition_size,
                                    heads_per_block=heads_per_block)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else {k: 2 * v for k, v in ATTN_TOL[dtype].items()}
    np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("num_heads,num_seqs,match", [
    (2, 9, "1 to 8 sequences .*got 9"),
    (12, 2, "2 rows x K=768: at most 256 float4 vectors"),  # gpt2 at batch 2
    (25, 1, "1 rows x K=1600: at most 256 float4 vectors"),  # gpt2-xl at batch 1
])
def test_skinny_proj_merge_rejects_shapes_it_does_not_take(rng, num_heads, num_seqs, match):
    qkv, k, v, positions, qsl, tables = paged_batch(rng, [5] * num_seqs, [1] * num_seqs,
                                                    num_heads, 64, 16, "float32")
    C = num_heads * 64
    w, b = randn(rng, (C, C), "float32"), randn(rng, (C,), "float32")
    with pytest.raises(ValueError, match=match):
        gpu.decode_attention_proj(qkv, k, v, positions, tables, num_heads, w, b,
                                  rng.standard_normal((num_seqs, C)).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", [64, 32] + GENERIC_HEAD_SIZES)
def test_prefill_attention(rng, dtype, block_size, head_size):
    num_heads = 3
    # (context after the step, new tokens): fresh prompts, a chunk after a cached prefix,
    # single-token rows mixed in (a chunked-prefill batch), and a long chunk of several query
    # and key tiles (64 each in the tensor-core kernel, float16 / bfloat16 at head size 64).
    ctx = [5, 70, 33 + 40, 1, 129, 200, 300]
    q = [5, 70, 40, 1, 1, 64, 257]
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, q, num_heads, head_size,
                                                    block_size, dtype)
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads)
    got = gpu.paged_attention(qkv, k, v, positions, qsl, tables, num_heads, dtype=dtype,
                              kernel="prefill")
    np.testing.assert_allclose(got, want, **ATTN_TOL[dtype])


@pytest.mark.parametrize("head_size", GENERIC_HEAD_SIZES)
def test_decode_shape_with_generic_head_size(rng, head_size):
    """kernel='auto' on a decode batch whose head size has no decode template -> prefill."""
    ctx = [3, 50, 17]
    qkv, k, v, positions, qsl, tables = paged_batch(rng, ctx, [1, 1, 1], 2, head_size, 8,
                                                    "float32")
    want = cpu.paged_attention(qkv, k, v, positions, qsl, tables, 2)
    got = gpu.paged_attention(qkv, k, v, positions, qsl, tables, 2)
    np.testing.assert_allclose(got, want, **ATTN_TOL["float32"])


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sampling_params(rng, R, temperatures, top_ks, top_ps):
    """(temperature, top_k, top_p, seeds, counters), positional as both `sample` ops take them."""
    return (
        np.array([temperatures[i % len(temperatures)] for i in range(R)], np.float32),
        np.array([top_ks[i % len(top_ks)] for i in range(R)], np.int32),
        np.array([top_ps[(i // 2) % len(top_ps)] for i in range(R)], np.float32),
        rng.integers(0, 2**63, size=R, dtype=np.uint64),
        rng.integers(0, 1000, size=R).astype(np.int64),
    )


def test_uniform_from_counter_matches_cpu():
    for seed, counter in [(0, 0), (1, 1), (2**64 - 1, 5), (123456789, 2**40)]:
        assert gpu.uniform_from_counter(seed, counter) == cpu.uniform_from_counter(seed, counter)


# fp16/bf16: the sampler reads the LM head's half-precision rows (padded to a multiple of 8 with
# huge values it must not read); it must pick what the CPU picks from the same rounded logits.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [50257, 1000])
def test_greedy_exact(rng, vocab, dtype):
    logits = rng.standard_normal((9, vocab)).astype(np.float32)
    logits[3, [10, 20, 30]] = 100.0  # a tie: the lowest id wins
    logits[5, :] = 0.0               # all tied
    p = sampling_params(rng, 9, [0.0], [0], [1.0])
    np.testing.assert_array_equal(gpu.sample(logits, *p, dtype=dtype), cpu.sample(rounded(logits, dtype), *p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [50257, 777])
@pytest.mark.parametrize("scale", [1.0, 5.0])
def test_seeded_draws_match_cpu(rng, vocab, scale, dtype):
    R = 48
    logits = rng.standard_normal((R, vocab)).astype(np.float32) * scale
    p = sampling_params(rng, R, [0.7, 1.0, 1.3, 0.0], [0, 1, 5, 50, 0, vocab - 1],
                        [1.0, 0.9, 0.5, 0.05])
    want = cpu.sample(rounded(logits, dtype), *p)
    got = gpu.sample(logits, *p, dtype=dtype)
    np.testing.assert_array_equal(got, want)


def test_seeded_draws_with_ties_and_crowded_bins(rng):
    """Rounded logits (many exact ties: the id order decides), a flat row (every token in one
    histogram bin: the radix-narrowing path), and a huge temperature (a near-flat row)."""
    V, R = 50257, 24
    logits = np.round(rng.standard_normal((R, V)).astype(np.float32) * 2)
    logits[0:6, :] = 0.0
    p = sampling_params(rng, R, [1.0, 1000.0, 0.5], [0, 3, 100, 20000], [1.0, 0.3, 0.999])
    np.testing.assert_array_equal(gpu.sample(logits, *p), cpu.sample(logits, *p))


def test_draw_distribution(rng):
    """Across counters, draws follow the softmax (a check independent of the CPU code)."""
    V, n = 8, 4000
    logits = np.log(np.array([0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.03, 0.02], np.float32))
    rows = np.tile(logits, (n, 1))
    p = (np.ones(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
         np.full(n, 7, np.uint64), np.arange(n, dtype=np.int64))
    counts = np.bincount(gpu.sample(rows, *p), minlength=V) / n
    np.testing.assert_allclose(counts, np.exp(logits), atol=0.03)
