"""Rebuild the shipped assets (tokenizer + real text fixtures) and, optionally, a larger local corpus.

Sources are Debian packages, downloaded (not installed) with `apt-get download` and unpacked with `dpkg-deb -x`:
    r-cran-janeaustenr  Jane Austen's six novels (public-domain text), stored as an R lazy-load database
    fortunes-zh         Tang 300 poems (classical Chinese, public domain), fortune-file format
The committed outputs in assets/ make CI independent of apt; this script documents and reproduces them.

    python scripts/build_assets.py                      # rebuild assets/text and assets/tokenizer
    python scripts/build_assets.py --corpus DIR         # also write all six Austen novels + Tang/Song to DIR
"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "assets" / "text"


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
        if kind == 255:  # back-reference
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            name = self._item()
            self.refs.append(name)
            return name
        if kind == 2:  # pairlist: (attr) (tag) car cdr
            attr = self._item() if has_attr else None
            tag = self._item() if has_tag else None
            car = self._item()
            cdr = self._item()
            del attr  # attributes of a pairlist cell carry nothing we need
            return [(tag, car)] + (cdr or [])
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if kind in (10, 13):  # logical, integer
            n = self._int()
            vals = struct.unpack_from(f">{n}i", self.b, self.i)
            self.i += 4 * n
            out = list(vals)
        elif kind == 14:  # double
            n = self._int()
            out = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif kind in (16, 19, 20):  # character vector, list, expression
            n = self._int()
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
        chunk = blob[offset:offset + length]
        out[name] = _RReader(zlib.decompress(chunk[4:])).read()
    return out


def fetch_debs(names: list[str], work: Path) -> Path:
    subprocess.run(["apt-get", "download", *names], cwd=work, check=True, capture_output=True)
    root = work / "x"
    for deb in work.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def austen_chapters(lines: list[str]) -> list[str]:
    """Split a novel (one line per element, '' between paragraphs) into chapters at 'Chapter N' headings."""
    text = "\n".join(lines)
    parts = re.split(r"\n(?=Chapter \d+\n)", text)
    return [p.strip() + "\n" for p in parts if p.strip().startswith("Chapter")]


def tang_poems(raw: str) -> list[str]:
    clean = re.sub(r"\x1b\[[0-9;]*m", "", raw)
    return [p.strip() + "\n" for p in re.split(r"^%\s*$", clean, flags=re.M) if p.strip()]


def build(corpus: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_debs(["r-cran-janeaustenr", "fortunes-zh"], Path(tmp))
        data = root / "usr/lib/R/site-library/janeaustenr/data"
        novels = read_r_lazyload(data / "Rdata.rdb", data / "Rdata.rdx")
        pp = austen_chapters(novels["prideprejudice"])
        tang = tang_poems((root / "usr/share/games/fortunes/tang300").read_text("utf-8"))
        TEXT.mkdir(parents=True, exist_ok=True)
        for sub in ("train", "val", "eval"):
            (TEXT / sub).mkdir(exist_ok=True)
        (TEXT / "train" / "austen_pp_ch01-06.txt").write_text("\n".join(pp[:6]))
        (TEXT / "train" / "tang300_train.txt").write_text("\n".join(tang[:280]))
        (TEXT / "val" / "austen_pp_ch07-08.txt").write_text("\n".join(pp[6:8]))
        (TEXT / "val" / "tang300_val.txt").write_text("\n".join(tang[280:]))
        (TEXT / "eval" / "austen_pp_ch34.txt").write_text(pp[33])  # mid-novel passage for perplexity checks
        if corpus is not None:
            corpus.mkdir(parents=True, exist_ok=True)
            for name, lines in novels.items():
                if isinstance(lines, list) and lines and isinstance(lines[0], str):
                    (corpus / f"austen_{name}.txt").write_text("\n".join(x or "" for x in lines))
            for f in ("tang300", "song100", "chinese"):
                (corpus / f"{f}.txt").write_text("\n".join(tang_poems(
                    (root / "usr/share/games/fortunes" / f).read_text("utf-8", errors="replace"))))
    subprocess.run([sys.executable, "-m", "titan_aquila.tokenizer", "convert"], cwd=ROOT, check=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=None, help="also write the larger corpus into this folder")
    build(ap.parse_args().corpus)
