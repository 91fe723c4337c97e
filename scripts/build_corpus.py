"""Build a larger real bilingual training corpus (about 25 MB of text) from Debian packages, into a folder you choose.

    python scripts/build_corpus.py OUT_DIR [--debs DIR]
    # then train on it:  --training.dataset_path OUT_DIR   (or list sub-folders: OUT_DIR/en OUT_DIR/zh ...)

Packages are downloaded with `apt-get download` (or taken from --debs DIR) and unpacked with `dpkg-deb -x` into a
temporary folder; nothing is installed. Output (one .txt file = one document, one .jsonl line = one document):

    en/austen/<novel>.txt           r-cran-janeaustenr: the six Austen novels         public domain (MIT packaging)
    en/bible_kjv.jsonl              bible-kjv(+-text): the KJV, one line per book    public domain
    en/jargon.txt                   jargon-text: the Jargon File 4.4.7                public domain
    zh/tang300.txt song100.txt chinese.txt   fortunes-zh: Tang 300, Song 100, classical sayings   public domain
    zh/libreoffice_help.jsonl       libreoffice-help-zh-cn: one line per help page   MPL-2.0
    zh/debian_reference.txt         debian-reference-zh-cn                             GPL-2+
    code/python311_docs.jsonl       python3.11-doc: reST sources, one line per page   PSF-2.0
    PROVENANCE.md                   package versions, sha256 of each .deb, licenses

The corpus is not shipped (licenses vary, 25 MB); the small test fixture in assets/ is (scripts/build_assets.py).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_assets import FORTUNES, austen_novels, fetch_debs, fortunes  # noqa: E402

PACKAGES = {  # package -> license of the text we extract
    "r-cran-janeaustenr": "text public domain; packaging MIT",
    "bible-kjv": "public domain (program GPL-2+, run to print the text)",
    "bible-kjv-text": "public domain",
    "jargon-text": "public domain",
    "fortunes-zh": "classical texts public domain; package GPL-3+",
    "libreoffice-help-zh-cn": "MPL-2.0",
    "debian-reference-zh-cn": "GPL-2+",
    "python3.11-doc": "PSF-2.0",
}
BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "ul", "ol"}


class _HelpText(HTMLParser):
    """Visible text inside <div id="DisplayArea"> (the page body without navigation), one block per line."""

    def __init__(self):
        super().__init__()
        self.depth, self.skip, self.out = 0, 0, []

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += tag == "div"
        elif tag == "div" and ("id", "DisplayArea") in attrs:
            self.depth = 1
        self.skip += tag in ("script", "style")
        if self.depth and tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0
        if self.depth and tag == "div":
            self.depth -= 1
        if self.depth and tag in BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.out.append(data)

    def text(self) -> str:
        lines = (re.sub(r"[ \t\r\f\v]+", " ", ln).strip() for ln in "".join(self.out).split("\n"))
        return "\n".join(ln for ln in lines if ln)


def html_to_text(html: str) -> str:
    p = _HelpText()
    p.feed(html)
    return p.text()


def bible_books(root: Path) -> list[tuple[str, str]]:
    """[(book, text)]: verses printed by the package's own `bible` program, chapters separated by blank lines."""
    out = subprocess.run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-f", "-l", "0",
                          "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True).stdout
    books: dict[str, list[str]] = {}
    last_chapter = {}
    for line in out.splitlines():
        m = re.match(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)", line)
        if not m:
            continue
        book, chapter, _, verse = m.groups()
        lines = books.setdefault(book, [])
        if last_chapter.get(book, chapter) != chapter:
            lines.append("")
        last_chapter[book] = chapter
        lines.append(verse)
    return [(b, "\n".join(v) + "\n") for b, v in books.items()]


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for name, text in docs:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")


def build(out: Path, debs: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = fetch_debs(list(PACKAGES), work, debs)
        deb_dir = debs or work
        for sub in ("en/austen", "zh", "code"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        for name, lines in austen_novels(root).items():
            (out / "en/austen" / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        write_jsonl(out / "en/bible_kjv.jsonl", bible_books(root))
        jargon = gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes())
        (out / "en/jargon.txt").write_bytes(jargon)
        for name in ("tang300", "song100", "chinese"):
            entries = fortunes((root / FORTUNES / name).read_text("utf-8", errors="replace"))
            (out / "zh" / f"{name}.txt").write_text("\n".join(entries), encoding="utf-8")
        help_root = root / "usr/share/libreoffice/help/zh-CN"
        pages = [(str(p.relative_to(help_root)), html_to_text(p.read_text("utf-8", errors="replace")))
                 for p in sorted(help_root.rglob("*.html"))]
        write_jsonl(out / "zh/libreoffice_help.jsonl", [(n, t) for n, t in pages if t.strip()])
        ref = root / "usr/share/debian-reference/debian-reference.zh-cn.txt.gz"
        (out / "zh/debian_reference.txt").write_bytes(gzip.decompress(ref.read_bytes()))
        src = root / "usr/share/doc/python3.11/html/_sources"
        write_jsonl(out / "code/python311_docs.jsonl",
                    [(str(p.relative_to(src)), p.read_text("utf-8", errors="replace"))
                     for p in sorted(src.rglob("*.rst.txt"))])
        rows = []
        for name, lic in PACKAGES.items():
            deb = sorted(deb_dir.glob(f"{name}_*.deb"))[-1]
            version = unquote(deb.name.split("_")[1])
            rows.append(f"| {name} | {version} | `{hashlib.sha256(deb.read_bytes()).hexdigest()}` | {lic} |")
    (out / "PROVENANCE.md").write_text(
        "# Corpus provenance\n\nBuilt by `python scripts/build_corpus.py` of titan_aquila from these Debian "
        "packages (`apt-get download`, `dpkg-deb -x`; see the script's docstring for what each file holds).\n\n"
        "| package | version | sha256 of the .deb | license |\n|---|---|---|---|\n" + "\n".join(rows) + "\n",
        encoding="utf-8")
    files = sorted(p for p in out.rglob("*") if p.suffix in (".txt", ".jsonl"))
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1e6:.1f} MB of text, to {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write the corpus into (created if missing)")
    ap.add_argument("--debs", type=Path, default=None, help="folder with the .deb files (default: apt-get download)")
    args = ap.parse_args(argv)
    build(args.out, args.debs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
