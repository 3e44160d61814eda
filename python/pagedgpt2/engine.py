"""Engine: the public API. Loads a model, owns the backend and the KV cache, runs requests.

    eng = Engine("models/gpt2", device="cpu")   # Engine() loads the bundled Shakespeare model
    outs = eng.generate(["Alan Turing", [15496, 995]], SamplingParams(max_new_tokens=32))

Requests join and leave at any step: add_request() / step() / abort() are the loop that
generate() and stream() are built on. Inputs are checked here, once; below this layer
(scheduler, model runner, C++ core) they are trusted.
"""

from __future__ import annotations

import codecs
import itertools
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence as Seq

import numpy as np

from pagedgpt2 import _core
from pagedgpt2.kv_cache import KV_CACHE_MODES, KVCache
from pagedgpt2.model_runner import ModelRunner
from pagedgpt2.sampling import SamplingParams, is_int
from pagedgpt2.scheduler import ScheduledSeq, Scheduler
from pagedgpt2.sequence import Sequence
from pagedgpt2.tokenizer import get_tokenizer
from pagedgpt2.weights import BUNDLED_MODEL, load_model_dir

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
CPU_KV_CACHE_BYTES = 1 << 30  # default KV pool on the CPU; the memory is touched only when used
MAX_DECODE_STEPS = 64  # decode steps one backend call may run (the CUDA backend's graph limit)
# Tokens one step may run when max_num_batched_tokens is None, by device, as (budget of step()
# and stream(), budget of generate()); never below the context.
# NOTE: the loop's GPU budget is vLLM's serving budget on large GPUs: a decode that shares a step
# with a prompt chunk waits for it, and bigger chunks admit more prompts a step (H200, gpt2, 256
# prompts of 128 tokens: 8,192 against 2,048 gave 244k against 218k decode tok/s; sixth and
# tenth sessions). generate() has no caller waiting on single tokens, so it takes 32,768: a
# batch of prompts is admitted in fewer steps, its sequences finish together, and no tail of
# shrinking steps is left (one process: 253k / 258k / 266k tok/s at 8,192 / 16,384 / 32,768;
# docs/notes.md, eighteenth session). vLLM splits its defaults the same way on GPUs of 70 GiB
# and more (16,384 offline, 8,192 serving). The GPU's activations are sized for the larger.
DEFAULT_BATCHED_TOKENS = {"cpu": (2048, 2048), "cuda": (8192, 32768)}

Prompt = str | Seq[int]


@dataclass
class Completion:
    """One sample of a request."""
    token_ids: list[int]  # generated tokens, the stop token included when finish_reason == "stop"
    text: str  # generated text, the stop token left out
    finish_reason: str | None  # "stop" | "length" | "abort"


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    samples: list[Completion]  # SamplingParams.n of them

    # The first sample, for the common n == 1 case.
    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids

    @property
    def text(self) -> str:
        return self.samples[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason


@dataclass(slots=True)
class StepOutput:
    """What one step gave one sample of a request."""
    request_id: int
    sample_index: int
    new_token_ids: list[int]
    finish_reason: str | None  # set in the step the sample finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    samples: list[Sequence]  # grows to params.n when the prompt's prefill forks
    text_ahead: bool = False  # generate()'s: its text is decoded while the backend runs

    @property
    def is_finished(self) -> bool:
        return len(self.samples) == self.params.n and all(s.is_finished for s in self.samples)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(map(repr, choices))}")


def cuda_module():
    """The CUDA backend module, or a RuntimeError saying why it cannot be used."""
    try:
        from pagedgpt2 import _cuda
    except ImportError as e:
        raise RuntimeError(
            "device='cuda' needs pagedgpt2 built with its CUDA backend (a CUDA toolkit and cuBLAS "
            f"at install time); this build has none: {e}") from e
    if _cuda.device_count() < 1:
        raise RuntimeError("device='cuda' but no CUDA GPU is visible")
    return _cuda


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        cuda_module()
        return "cuda"
    except RuntimeError:
        return "cpu"


class Engine:
    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", dtype: str | None = None,
                 kv_cache: str = "paged", block_size: int = 16, num_blocks: int | None = None, *,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = False, gpu_memory_fraction: float = 0.9,
                 num_threads: int | None = None, decode_steps: int = 8, async_decode: bool = True):
        _check_choice("device", device, DEVICES)
        _check_choice("kv_cache", kv_cache, KV_CACHE_MODES)
        if dtype is not None:
            _check_choice("dtype", dtype, DTYPES)
        if not is_int(block_size) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        if num_blocks is not None and (not is_int(num_blocks) or num_blocks < 1):
            raise ValueError(f"num_blocks must be an integer >= 1 or None, got {num_blocks!r}")
        if not is_int(max_num_seqs) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        if max_num_batched_tokens is not None and (not is_int(max_num_batched_tokens)
                                                   or max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1 or None, "
                             f"got {max_num_batched_tokens!r}")
        if not 0.0 < gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction!r}")
        if not is_int(decode_steps) or not 1 <= decode_steps <= MAX_DECODE_STEPS:
            raise ValueError(f"decode_steps must be an integer in [1, {MAX_DECODE_STEPS}], got {decode_steps!r}")
        self.decode_steps = int(decode_steps)
        if not isinstance(async_decode, bool):
            raise ValueError(f"async_decode must be True or False, got {async_decode!r}")
        self.async_decode = async_decode

        self.device = _resolve_device(device)
        self.dtype = dtype or ("float16" if self.device == "cuda" else "float32")
        if self.device == "cpu" and self.dtype != "float32":
            raise ValueError(f"the CPU backend computes in float32; dtype {self.dtype!r} needs device='cuda'")
        self.model_path = Path(model) if model is not None else BUNDLED_MODEL
        self.config, tensors = load_model_dir(self.model_path)
        n_positions = self.config["n_positions"]
        # NOTE: long prompts are chunked, so a given token budget may be below the context length.
        loop_tokens, generate_tokens = ((max_num_batched_tokens,) * 2 if max_num_batched_tokens else
                                        (max(d, n_positions) for d in DEFAULT_BATCHED_TOKENS[self.device]))
        self.max_num_batched_tokens = loop_tokens  # step() and stream()
        self.generate_batched_tokens = generate_tokens  # generate()
        self.tokenizer = get_tokenizer()

        # contiguous: one n_positions-long buffer per sequence, carved from the same budget.
        backend_block_size = block_size if kv_cache == "paged" else n_positions
        backend_num_blocks = self._backend_num_blocks(kv_cache, block_size, num_blocks)
        self.backend = self._make_backend(tensors, backend_num_blocks, backend_block_size,
                                          gpu_memory_fraction, max_num_seqs, num_threads)
        del tensors
        self.kv = KVCache(kv_cache, self.backend.num_blocks, self.backend.block_size,
                          self.backend.kv_bytes_per_block, enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs, self.max_num_batched_tokens)
        self.runner = ModelRunner(self.backend, self.kv)
        self._seq_ids = itertools.count()
        self._requests: dict[int, Request] = {}  # live requests by id
        # A decode run launched ahead and not yet read: its batch and steps.
        self._running_ahead: tuple[list[ScheduledSeq], int] | None = None

    # -- construction -------------------------------------------------------------------------

    def _kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c["n_layer"] * c["n_embd"] * np.dtype(np.float32 if self.dtype == "float32" else np.float16).itemsize

    def _backend_num_blocks(self, kv_cache: str, block_size: int, num_blocks: int | None) -> int:
        """Blocks of the backend's pool (-1: the GPU backend sizes it from free memory)."""
        n_positions = self.config["n_positions"]
        if num_blocks is None:
            if self.device == "cuda":
                return -1
            tokens = max(CPU_KV_CACHE_BYTES // self._kv_bytes_per_token(), n_positions)
        else:
            tokens = num_blocks * block_size
        if kv_cache == "paged":
            return -(-tokens // block_size)
        if tokens < n_positions:
            raise ValueError(
                f"num_blocks={num_blocks} blocks of {block_size} tokens hold {tokens} tokens: less than "
                f"one contiguous buffer of the context length n_positions={n_positions}")
        return tokens // n_positions

    def _make_backend(self, tensors, num_blocks, block_size, gpu_memory_fraction, max_num_seqs,
                      num_threads):
        if self.device == "cpu":
            return _core.CpuModel(self.config, tensors, num_blocks, block_size, num_threads or 0)
        return cuda_module().CudaModel(
            self.config, tensors, self.dtype, num_blocks, block_size, gpu_memory_fraction, 0,
            max_num_seqs, max(self.max_num_batched_tokens, self.generate_batched_tokens))

    # -- inputs -------------------------------------------------------------------------------

    def _token_ids(self, prompt, index: int) -> list[int]:
        vocab_size = self.config["vocab_size"]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            if set(map(type, prompt)) == {int}:  # the common case, checked in C
                ids = list(prompt)
            else:
                bad = [t for t in prompt if not is_int(t)]
                if bad:
                    raise TypeError(f"prompt {index}: token ids must be integers, got {bad[0]!r}")
                ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt {index}: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if not 0 <= min(ids) <= max(ids) < vocab_size:
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise ValueError(f"prompt {index}: token id {bad} is outside the vocabulary [0, {vocab_size})")
        if len(ids) > self.config["n_positions"]:
            raise ValueError(f"prompt {index} has {len(ids)} tokens, more than the model's context "
                             f"(n_positions={self.config['n_positions']})")
        return ids

    def _check_fits(self, ids: list[int], params: SamplingParams, index: int) -> None:
        n_positions = self.config["n_positions"]
        total = len(ids) + params.max_new_tokens
        if total > n_positions:
            raise ValueError(
                f"prompt {index}: {len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens} = "
                f"{total} exceeds the model's context (n_positions={n_positions})")
        need = self.kv.blocks_for(total)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"prompt {index}: {total} tokens need {need} KV blocks of {self.kv.block_size} tokens, "
                f"but the pool has only {self.kv.num_blocks}; raise num_blocks")

    def _make_request(self, prompt, params: SamplingParams, index: int) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected SamplingParams, got {type(params).__name__}")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} samples exceed max_num_seqs={self.scheduler.max_num_seqs}")
        ids = self._token_ids(prompt, index)
        self._check_fits(ids, params, index)
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        request_id = next(self._seq_ids)
        return Request(request_id, ids, params, [Sequence(request_id, request_id, 0, ids, params, seed)])

    # -- the request-level loop ---------------------------------------------------------------

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queues a request (checked now); it runs from the next step() on. Returns its id."""
        request = self._make_request(prompt, params if params is not None else SamplingParams(), 0)
        self._start(request)
        return request.request_id

    def _start(self, request: Request) -> None:
        self._requests[request.request_id] = request
        self.scheduler.add(request.samples[0])

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[StepOutput]:
        """One forward over every scheduled sequence: the new tokens of each, and which finished.

        When every running sequence decodes and no request can start, one step runs up to
        decode_steps forwards in one backend call, and a sequence may get several tokens. With
        async_decode, such a step launches the next run before it reads its own tokens, so the
        GPU computes while the host reads them; the next step() returns that run. A finished
        request leaves the engine in the step it finishes."""
        if self._running_ahead is not None:
            (batch, num_steps), self._running_ahead = self._running_ahead, None
            return self._read_run(batch, num_steps)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        num_steps = self.scheduler.decode_run_length(self.decode_steps)
        if num_steps > 1:
            self.runner.launch_steps(batch, num_steps)
            return self._read_run(batch, num_steps)
        outputs = []
        finished = []
        for item, tokens in zip(batch, self.runner.sample(batch)):
            if not tokens:
                continue
            if len(tokens) > 1:  # the prompt forks into n samples
                for j, token in enumerate(tokens[1:], start=1):
                    outputs.append(self._fork(item.seq, j, token, finished))
            outputs.append(self._advance(item.seq, tokens[:1], finished))
        self._forget_finished(finished)
        return outputs

    def _read_run(self, batch: list[ScheduledSeq], num_steps: int) -> list[StepOutput]:
        """The outputs of the oldest launched decode run (num_steps tokens per sequence of
        batch). With async_decode the next run of the same batch is launched first, when the
        scheduler says nothing can change it."""
        num_ahead = self.scheduler.next_run_length(self.decode_steps, num_steps) if self.async_decode else 0
        if num_ahead > 0:
            self.runner.launch_steps(batch, num_ahead, continues=True)
            self._running_ahead = (batch, num_ahead)
            self._detokenize_ahead(batch)  # the GPU has two runs to do meanwhile
        outputs, finished = [], []
        for item, tokens in zip(batch, self.runner.collect_steps()):
            if not item.seq.is_finished:  # else it stopped (or was aborted) during this run
                outputs.append(self._advance(item.seq, tokens, finished))
        self._forget_finished(finished)
        return outputs

    def _detokenize_ahead(self, batch: list[ScheduledSeq]) -> None:
        """The text bytes of the tokens generate()'s sequences in batch have so far, all but the
        newest (a stop token, whose text is left out, can only be the newest), so that the
        outputs at the end decode only their last few tokens."""
        for item in batch:
            seq = item.seq
            end = len(seq.output_ids) - 1
            request = self._requests.get(seq.request_id)
            if end > seq.num_detokenized and request is not None and request.text_ahead:
                ids = self._text_ids(seq.output_ids[seq.num_detokenized:end])
                seq.text_bytes += self.tokenizer.decode_bytes_valid(ids)
                seq.num_detokenized = end

    def _forget_finished(self, finished: list[int]) -> None:
        for request_id in set(finished):
            if self._requests[request_id].is_finished:
                del self._requests[request_id]

    def _advance(self, seq: Sequence, tokens: list[int], finished: list[int]) -> StepOutput:
        """Appends seq's new tokens (up to where it finishes); a finished seq leaves the
        scheduler and its request id goes into finished."""
        taken = seq.extend(tokens)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            finished.append(seq.request_id)
        return StepOutput(seq.request_id, seq.sample_index, tokens[:taken], seq.finish_reason)

    def _fork(self, parent: Sequence, sample_index: int, token: int, finished: list[int]) -> StepOutput:
        child = parent.fork(next(self._seq_ids), sample_index)
        self.kv.manager.fork(parent.seq_id, child.seq_id)
        self._requests[parent.request_id].samples.append(child)
        self.scheduler.add_running(child, after=parent)
        return self._advance(child, [token], finished)

    def abort(self, request_id: int) -> None:
        """Stops a request and frees every block it holds. Unknown or finished ids are ignored."""
        request = self._requests.pop(request_id, None)
        for seq in request.samples if request else []:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.abort(seq)

    # -- whole requests -----------------------------------------------------------------------

    def _text_ids(self, ids: list[int]) -> list[int]:
        """ids without those past the tokenizer's vocabulary (a model's padded rows have no text)."""
        n_vocab = self.tokenizer.n_vocab
        return ids if not ids or max(ids) < n_vocab else [t for t in ids if t < n_vocab]

    def _completion(self, seq: Sequence) -> Completion:
        ids = seq.output_ids
        end = len(ids) - 1 if seq.finish_reason == "stop" else len(ids)  # the stop token has no text
        rest = self._text_ids(ids[seq.num_detokenized:end])
        return Completion(list(ids), self.tokenizer.decode_valid(rest, head=seq.text_bytes), seq.finish_reason)

    def _output(self, request: Request) -> RequestOutput:
        samples = sorted(request.samples, key=lambda s: s.sample_index)
        return RequestOutput(request.request_id, request.prompt_ids, [self._completion(s) for s in samples])

    def generate(self, prompts: Prompt | list[Prompt],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Runs all prompts to completion together (continuous batching, one forward per step,
        each step within generate_batched_tokens: see DEFAULT_BATCHED_TOKENS).

        prompts: a string, a list of token ids, or a list of those. Returns one RequestOutput per
        prompt, in order. Every prompt is checked before any runs.
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(is_int(t) for t in prompts)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("generate() needs at least one prompt")
        params = params if params is not None else SamplingParams()
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        requests = [self._make_request(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, params_list))]
        self.scheduler.max_num_batched_tokens = self.generate_batched_tokens
        try:
            for request in requests:
                request.text_ahead = True
                self._start(request)
            unfinished = {r.request_id for r in requests}
            while unfinished:
                for out in self.step():
                    if out.finished and out.request_id not in self._requests:
                        unfinished.discard(out.request_id)
        finally:
            self.scheduler.max_num_batched_tokens = self.max_num_batched_tokens
            for request in requests:
                self.abort(request.request_id)
        return [self._output(r) for r in requests]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Generates for one prompt, yielding text pieces of its first sample as they come.

        Other requests in the engine advance too. Bytes of a character split across tokens are
        held back until the character is whole. Closing the iterator early aborts the request.
        """
        request = self._make_request(prompt, params if params is not None else SamplingParams(), 0)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._start(request)
        seq = request.samples[0]
        try:
            num_seen = 0
            while not seq.is_finished:
                self.step()
                new_ids = seq.output_ids[num_seen:]
                num_seen = len(seq.output_ids)
                if seq.finish_reason == "stop":
                    new_ids = new_ids[:-1]
                piece = decoder.decode(self.tokenizer.decode_bytes(self._text_ids(new_ids)))
                if piece:
                    yield piece
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            self.abort(request.request_id)

    def logits(self, tokens: Prompt) -> np.ndarray:
        """float32 [T, vocab]: the next-token logits at every position of one sequence."""
        ids = self._token_ids(tokens, 0)
        need = self.kv.blocks_for(len(ids))
        if need > self.kv.manager.num_free:
            raise ValueError(f"{len(ids)} tokens need {need} KV blocks; {self.kv.manager.num_free} are free")
        seq_id = next(self._seq_ids)
        seq = Sequence(seq_id, seq_id, 0, ids, SamplingParams(max_new_tokens=1), 0)
        self.kv.manager.add_sequence(seq_id)
        try:
            return self.runner.logits(seq)
        finally:
            self.kv.manager.free_sequence(seq_id)

    def kv_stats(self) -> dict:
        """Pool size and use: num_blocks, blocks_used, blocks_free, bytes_reserved,
        bytes_holding_tokens, blocks_shared, waste, prefix-cache hits, preemptions…"""
        return {**self.kv.stats(), "num_preemptions": self.scheduler.num_preemptions,
                "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting)}

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine(n_layer={c['n_layer']}, n_embd={c['n_embd']}, device={self.device!r}, "
                f"dtype={self.dtype!r}, kv_cache={self.kv.mode!r}, block_size={self.kv.block_size}, "
                f"num_blocks={self.kv.num_blocks})")
