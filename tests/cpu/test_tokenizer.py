"""Tokenizer tests: our vendored GPT-2 BPE against tiktoken's own r50k_base, offline."""

import hashlib
import importlib.resources
import shutil

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedgpt2.tokenizer import Tokenizer, get_tokenizer

R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
ASSET_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

TRICKY = [
    "",
    "Hello world",
    "héllo wörld — naïve café, résumé",
    "e\u0301 a\u0308 n\u0303 (combining marks) \u0915\u094d\u0937",
    "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "   leading spaces and trailing   ",
    "a  b   c    d     e",
    "\n\n\nnewlines\n\n\n",
    "tabs\tand\t\tmore\t",
    " \t \n mixed \r\n whitespace \u00a0\u2003",
    "I'm you're they've we'll she'd it's can't DON'T",
    "0123456789 3.14159 1,000,000 2024-01-01 0x1f",
    "<|endoftext|>",
    "before<|endoftext|>after <|endoftext|> again",
    "def f(x):\n    return x ** 2  # code\n",
    "!!!???... --- ***",
    "\x00\x01 control \x7f chars",
]


def _asset_path():
    return importlib.resources.files("pagedgpt2").joinpath("assets/gpt2.tiktoken")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def r50k(tmp_path_factory):
    """tiktoken's r50k_base, loaded offline from a cache seeded with our vendored file."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    with importlib.resources.as_file(_asset_path()) as src:
        shutil.copyfile(src, cache / hashlib.sha1(R50K_URL.encode()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr("tiktoken.load.read_file", _no_network)
        return tiktoken.get_encoding("r50k_base")


def _no_network(blobpath):
    raise AssertionError(f"test tried to download {blobpath}")


def test_vendored_file_sha256():
    data = _asset_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == ASSET_SHA256


def test_license_notice_present():
    notice = importlib.resources.files("pagedgpt2").joinpath("assets/LICENSE.gpt2-tiktoken")
    assert notice.is_file()
    assert "MIT" in notice.read_text(encoding="utf-8")


def test_hello_world(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_constants(tok):
    assert tok.eot_token == 50256
    assert tok.n_vocab == 50257
    assert tok.encode("<|endoftext|>") == [50256]


def test_singleton():
    assert get_tokenizer() is get_tokenizer()
    assert isinstance(get_tokenizer(), Tokenizer)


@pytest.mark.parametrize("text", TRICKY)
def test_matches_r50k(tok, r50k, text):
    assert tok.encode(text) == r50k.encode(text, allowed_special={"<|endoftext|>"})


@pytest.mark.parametrize("text", TRICKY)
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_roundtrip_and_match_random(tok, r50k, text):
    ids = tok.encode(text)
    assert ids == r50k.encode(text, allowed_special={"<|endoftext|>"})
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(" \t\n\r'sdlmvreAé1中😀<|>endoftx"), max_size=60))
def test_match_random_tricky_alphabet(tok, r50k, text):
    assert tok.encode(text) == r50k.encode(text, allowed_special={"<|endoftext|>"})


def test_long_whitespace_run(tok, r50k):
    text = " " * 5000 + "x" + "\n" * 5000
    assert tok.encode(text) == r50k.encode(text)


def test_decode_partial_utf8(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1  # the emoji spans several byte-level tokens
    assert set(tok.decode(ids[:1])) == {"\ufffd"}
    assert tok.decode_bytes(ids[:1]) + tok.decode_bytes(ids[1:]) == "😀".encode()


def test_decode_valid_equals_decode(tok):
    """The engine's unchecked decode of its own samples gives decode's text, split UTF-8
    characters included."""
    import random
    rng = random.Random(7)
    for n in (0, 1, 2, 17, 128):
        ids = [rng.randrange(tok.n_vocab) for _ in range(n)]
        assert tok.decode_valid(ids) == tok.decode(ids)
    ids = tok.encode("naïve 😀 text")
    assert tok.decode_valid(ids[:-1]) == tok.decode(ids[:-1])
    for cut in range(len(ids) + 1):  # the bytes of a head decoded earlier, split anywhere
        assert tok.decode_valid(ids[cut:], head=tok.decode_bytes_valid(ids[:cut])) == tok.decode(ids)


def test_decode_accepts_numpy_ints(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([15496, 995], dtype=np.int64)) == "Hello world"


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="expects str"):
        tok.encode(None)


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match=r"token id 50257 is out of range \[0, 50257\)"):
        tok.decode([50257])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="must be ints"):
        tok.decode([1.5])
    # one bad id among good ones, whatever its place
    with pytest.raises(ValueError, match=r"token id 50300 is out of range"):
        tok.decode([15496, 995] * 64 + [50300])
    with pytest.raises(TypeError, match="must be ints, got float"):
        tok.decode([15496, 995.0, 11])
