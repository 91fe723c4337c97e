"""An HF `tokenizer.json` of a byte-level BPE model -> the parts of a tiktoken `Encoding`, converted exactly.

Supported: model BPE (no byte_fallback, no subword prefix/suffix, no dropout), decoder ByteLevel, normalizer none
or NFC (Qwen2), and one of these pre-tokenizers (the families GPT-2/SmolLM2, Llama 3, Qwen2):

    ByteLevel(use_regex=True)                                  split regex = GPT-2's (GPT2_PAT)
    Sequence[Digits(individual_digits=b), ByteLevel(use_regex)] digits isolated first (SmolLM2): DIGITS_PAT[b]
    Sequence[Split(Regex(p), Isolated), ByteLevel(use_regex=False)]   split regex = p (Llama 3, Qwen2)

ByteLevel(add_prefix_space=True) and anything else -> UserError naming what is supported.

Ranks. tiktoken merges, inside each regex piece, the adjacent pair whose concatenation has the lowest rank; HF
BPE the pair that comes first in the merge list. With rank = token id these agree when merge k produces a token
whose id exceeds the ids of its two parts and is not below merge k-1's token (`check_merge_order`, checked at load:
a vocabulary that fails is refused), and when the pairs that meet inside a piece are merges of the list (true of
vocabularies grown by BPE training and of those converted from tiktoken; tests/unit/test_hf_tokenizer.py compares
the ids with `tokenizers`). Token strings are bytes through GPT-2's bytes_to_unicode. A multi-byte token that no
merge produces is left out of the ranks unless the model sets `ignore_merges` (then HF, like tiktoken, takes a
whole piece that is in the vocabulary as one token): otherwise tiktoken's whole-piece shortcut would emit a token
HF never does.

Special tokens. Every entry of `added_tokens` keeps its id as a tiktoken special token; `encode` never matches
their text inside plain text (HF does): pretraining text that happens to contain "<|endoftext|>" stays text.
Single bytes the vocabulary lacks: HF BPE drops them silently, tiktoken cannot encode them; the ASCII ones are
stripped before encoding (the same ids, except where the stripped byte stood between two pieces that then merge,
e.g. "a\x04b" in SmolLM2's vocabulary, which lacks six control bytes); lacking a lead byte of planes 4..16
(unassigned or private use), their characters become U+FFFD; a vocabulary lacking any other byte UTF-8 uses is
refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from titan_aquila.errors import UserError

GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits isolated first, then GPT-2's rules inside the rest: the lookahead of `\s+(?!\S)` must not look across a
# digit (HF's ByteLevel regex never sees the digit: it is a separate piece already), hence (?![^\s\p{N}]).
DIGITS_PAT = {True: r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
              False: r"""\p{N}+|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""}
# The split regexes of Llama 3 and Qwen2 (their tokenizer.json Split pattern); named so GGUF exports can tell
# llama.cpp which pre-tokenizer to use.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED = ("supported tokenizers: a .tiktoken file, or an HF tokenizer.json of a byte-level BPE model "
             "(GPT-2/SmolLM2, Llama 3, Qwen2 families: BPE model, ByteLevel decoder)")
# Names of the end-of-document token in the byte-level BPE families, preferred over an Instruct model's eos.
DOCUMENT_END = ("<|endoftext|>", "<|end_of_text|>")


def bytes_of_char() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _refuse(path: Path, what: str):
    raise UserError(f"tokenizer {path}: {what}; {SUPPORTED}")


def split_regex(pre: dict | None, path: Path) -> str:
    """The tiktoken split regex equal to the pre-tokenizer `pre` (see the module docstring)."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        _refuse(path, f"pre-tokenizer {kinds or None} does not end in ByteLevel")
    if byte_level.get("add_prefix_space"):
        _refuse(path, "ByteLevel add_prefix_space = true is not supported")
    use_regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PAT
    if kinds == ["Digits", "ByteLevel"] and use_regex:
        return DIGITS_PAT[bool(steps[0].get("individual_digits", False))]
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = steps[0]
        pattern = split.get("pattern", {})
        if "Regex" not in pattern or split.get("behavior") != "Isolated" or split.get("invert"):
            _refuse(path, f"Split pre-tokenizer {split} is not a Regex with behavior Isolated")
        return pattern["Regex"]
    _refuse(path, f"pre-tokenizer {kinds} (use_regex={use_regex}) is not one of ByteLevel, "
                  "Digits + ByteLevel, Split(Regex) + ByteLevel(use_regex=false)")


def _merge_pairs(merges: list, path: Path) -> list[tuple[str, str]]:
    out = []
    for m in merges:  # "a b" (tokenizers < 0.20) or ["a", "b"]
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) != 2:
            _refuse(path, f"merge {m!r} is not a pair")
        out.append((pair[0], pair[1]))
    return out


def check_merge_order(ids: dict[str, int], merges: list[tuple[str, str]], where: str) -> None:
    """Merge k (a, b) must make a token whose id exceeds the ids of a, b and is not below the id of merge k-1's
    token (several merges may make the same token: every split of it, as `tokenizer_json` writes them)."""
    last = -1
    for k, (a, b) in enumerate(merges):
        new = ids.get(a + b, -1)
        if not (new >= last and new > ids.get(a, new) and new > ids.get(b, new)):
            raise UserError(f"{where}: merge {k} ({a!r} {b!r} -> id {new}) breaks merge order = id order; "
                            "rank = id would tokenize differently from the BPE merges")
        last = new


def unencodable(ranks: dict[bytes, int], path: Path) -> tuple[str, str | None]:
    """(ASCII characters to strip, regex of characters to replace by U+FFFD) for the single bytes `ranks` lacks.

    0xC0, 0xC1 and 0xF5.. never occur in UTF-8; a missing lead byte 0xF1..0xF4 only loses code points of planes
    4..16 (unassigned or private use), replaced by U+FFFD. Any other missing non-ASCII byte: refused."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    lost = [b for b in missing if 0x80 <= b <= 0xF0 and b not in (0xC0, 0xC1)]
    if lost:
        _refuse(path, f"the vocabulary lacks the bytes {[hex(b) for b in lost][:8]} (not every UTF-8 text can be "
                      "encoded)")
    planes = "".join(f"{chr(0x40000 * (b - 0xF0))}-{chr(0x40000 * (b - 0xF0) + 0x3FFFF)}"
                     for b in missing if 0xF1 <= b <= 0xF4)
    return "".join(chr(b) for b in missing if b < 0x80), (f"[{planes}]" if planes else None)


def load_hf_tokenizer(path: Path) -> dict:
    """Parse tokenizer.json (and tokenizer_config.json beside it) into the parts of a tiktoken Encoding:
    {pat_str, mergeable_ranks, special_tokens, normalizer, strip, replace, eos_id, bos_id, eos_token, pad_token}."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        model = d["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"tokenizer {path} is not a readable tokenizer.json ({type(e).__name__}: {e})") from None
    if model.get("type", "BPE" if "merges" in model else None) != "BPE":
        _refuse(path, f"model type {model.get('type')!r} (Unigram/WordPiece/SentencePiece are not supported)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("dropout"):
        _refuse(path, "a BPE with byte_fallback / subword prefix / suffix / dropout (SentencePiece-style) is not "
                      "supported")
    if (d.get("decoder") or {}).get("type") != "ByteLevel":
        _refuse(path, f"decoder {(d.get('decoder') or {}).get('type')!r} is not ByteLevel")
    norm = (d.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        _refuse(path, f"normalizer {norm!r} is not supported (none or NFC)")
    pat = split_regex(d.get("pre_tokenizer"), path)
    vocab: dict[str, int] = model["vocab"]
    merges = _merge_pairs(model.get("merges", []), path)
    added = {t["content"]: int(t["id"]) for t in d.get("added_tokens", [])}
    check_merge_order(vocab, merges, f"tokenizer {path}")
    produced = {a + b for a, b in merges}
    to_byte = bytes_of_char()
    added_ids = set(added.values())
    ranks: dict[bytes, int] = {}
    for tok, i in vocab.items():
        if i in added_ids:
            continue
        if any(c not in to_byte for c in tok):
            _refuse(path, f"vocabulary entry {tok!r} (id {i}) is not a byte-level token")
        raw = bytes(to_byte[c] for c in tok)
        if len(raw) > 1 and tok not in produced and not model.get("ignore_merges"):
            continue  # unreachable by merges: HF never emits it (see the module docstring)
        if raw in ranks:
            _refuse(path, f"two vocabulary entries decode to the bytes {raw!r}")
        ranks[raw] = int(i)
    strip, replace = unencodable(ranks, path)
    cfg_path = path.with_name("tokenizer_config.json")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}

    def named(key: str) -> str | None:
        v = cfg.get(key)
        return v.get("content") if isinstance(v, dict) else v

    eos_token = named("eos_token")
    doc_end = next((t for t in DOCUMENT_END if t in added), eos_token)
    if doc_end not in added:
        _refuse(path, f"no end-of-document token: none of {list(DOCUMENT_END)} is an added token and "
                      f"tokenizer_config.json names no eos_token that is one")
    bos = named("bos_token")
    return dict(pat_str=pat, mergeable_ranks=ranks, special_tokens=added, normalizer=norm,
                strip=strip, replace=replace, eos_id=added[doc_end],
                bos_id=added.get(bos) if bos else None, eos_token=eos_token, pad_token=named("pad_token"))


def tokenizer_json(tok) -> dict:
    """An HF tokenizer.json equal to a loaded `Tokenizer` (the inverse of `load_hf_tokenizer`, for exports of a
    .tiktoken vocabulary). Merges: every split (a, b) of every token t with rank(a), rank(b) < rank(t), ordered by
    rank(t): then the first listed merge among adjacent pairs is the pair whose concatenation has the lowest rank,
    tiktoken's rule; `ignore_merges` gives tiktoken's whole-piece shortcut."""
    enc = tok.encoding
    ranks: dict[bytes, int] = enc._mergeable_ranks
    to_char = {b: c for c, b in bytes_of_char().items()}
    text = {raw: "".join(to_char[b] for b in raw) for raw in ranks}
    merges = []
    for raw, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        for i in range(1, len(raw)):
            a, b = raw[:i], raw[i:]
            if ranks.get(a, r) < r and ranks.get(b, r) < r:
                merges.append([text[a], text[b]])
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "NFC"} if tok.normalizer == "NFC" else None, "pre_tokenizer": pre,
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text[raw]: r for raw, r in ranks.items()}, "merges": merges}}
