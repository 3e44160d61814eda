"""GPT-2 byte-level BPE tokenizer (owns text <-> token id conversion).

The merge ranks come from the vendored ``assets/gpt2.tiktoken`` file (the GPT-2
vocabulary, byte-identical to tiktoken's ``r50k_base``), so tokenizing never
touches the network. tiktoken does the actual BPE work.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources
import operator
from collections.abc import Iterable

import tiktoken

__all__ = ["Tokenizer", "get_tokenizer", "EOT_TOKEN", "N_VOCAB"]

EOT_TEXT = "<|endoftext|>"
EOT_TOKEN = 50256
N_VOCAB = 50257

_ASSET = "assets/gpt2.tiktoken"
_ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenizer: common English contractions, then runs of letters, of
# digits, of other symbols (each optionally led by one space), then whitespace
# (a whitespace run leaves its last space to lead the following word).
_GPT2_SPLIT = (
    r"'s|'t|'re|'ve|'m|'ll|'d"
    r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)


def _read_ranks(data: bytes) -> dict[bytes, int]:
    """Parses the .tiktoken format (one "base64-token rank" per line) after checking its hash.

    NOTE: tiktoken's own loader would also copy the file into its cache directory; reading it
    here keeps import free of writes outside the package.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != _ASSET_SHA256:
        raise ValueError(f"GPT-2 vocabulary file is corrupt: sha256 {digest}, expected {_ASSET_SHA256}")
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


@functools.lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    """Build the GPT-2 tiktoken Encoding from the vendored ranks (once per process)."""
    asset = importlib.resources.files(__package__ or "pagedgpt2").joinpath(_ASSET)
    with importlib.resources.as_file(asset) as path:
        if not path.is_file():
            raise FileNotFoundError(f"GPT-2 vocabulary file missing from the package: {path}")
        ranks = _read_ranks(path.read_bytes())
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_GPT2_SPLIT,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )


class Tokenizer:
    """GPT-2 tokenizer: ``encode(str) -> list[int]``, ``decode(ids) -> str``."""

    def __init__(self) -> None:
        self._enc = _encoding()

    @property
    def eot_token(self) -> int:
        return EOT_TOKEN

    @property
    def n_vocab(self) -> int:
        return N_VOCAB

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a literal ``<|endoftext|>`` becomes token 50256."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
        return self._enc.encode(text, allowed_special={EOT_TEXT})

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw UTF-8 bytes of ``ids`` (may end inside a multi-byte character)."""
        return self._enc.decode_bytes(_check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 sequences become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes_valid(self, ids: list[int]) -> bytes:
        """decode_bytes() of ids known to be Python ints in [0, n_vocab), such as the engine's
        own samples, without checking each one again (half of decode's time on generated text)."""
        return self._enc.decode_bytes(ids)

    def decode_valid(self, ids: list[int], head: bytes = b"") -> str:
        """decode() of head (the bytes of the ids before these) followed by ids, ids as
        decode_bytes_valid takes them."""
        return (head + self.decode_bytes_valid(ids)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(gpt2, n_vocab={N_VOCAB})"


def _check_ids(ids: Iterable[int]) -> list[int]:
    """ids as a list of Python ints, each in [0, N_VOCAB)."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"token ids must be a sequence of ints, got {type(ids).__name__}")
    ids = list(ids)
    # The common case, checked in C: plain ints, all in range (a generated text of a batch).
    if not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < N_VOCAB):
        return ids
    out = []
    for tok in ids:
        try:
            tok = operator.index(tok)  # accepts numpy ints, rejects floats
        except TypeError:
            raise TypeError(f"token ids must be ints, got {type(tok).__name__}: {tok!r}") from None
        if not 0 <= tok < N_VOCAB:
            raise ValueError(f"token id {tok} is out of range [0, {N_VOCAB})")
        out.append(tok)
    return out


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared process-wide Tokenizer."""
    return Tokenizer()
