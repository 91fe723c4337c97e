"""`prepare`: the shards equal the raw-text stream (every input format, any number of workers), the folder appears
only when complete, a mismatched tokenizer is refused, bad inputs are one clear error."""

import gzip
import io
import json
import random

import numpy as np
import pytest
import torch

from titan_aquila.data.dataset import build_dataloader, tokenize_documents
from titan_aquila.data.prepare import prepare
from titan_aquila.data.prepared import TokenStream
from titan_aquila.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from titan_aquila.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def _docs(n: int, seed: int = 0) -> list[str]:
    """Mixed English/Chinese/digit documents, some with leading/trailing whitespace and blank lines inside."""
    rng = random.Random(seed)
    words = ["Elizabeth", "Darcy", "床前明月光", "疑是地上霜", "2024", " ", "\n\n", "it's", "emoji 🙂", "tab\t"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .txt and .jsonl (blank lines and blank documents included) in sorted-path order."""
    d = tmp_path_factory.mktemp("corpus")
    docs = _docs(300)
    (d / "a.txt").write_text(docs[0] + "\r\nwindows line end\r\n")
    (d / "b.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in docs[1:200])
                               + "\n\n" + json.dumps({"text": "   "}) + "\n")
    (d / "c").mkdir()
    (d / "c" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[200:]))
    (d / "c" / "e.txt").write_text(" \n")  # blank document: skipped, as the raw loader does
    return d


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_equals_tokenizing_directly(tmp_path, tok, corpus, workers):
    out = tmp_path / "prep"
    # units of ~2 KB: the .jsonl files are cut into many byte ranges, several shards per file
    index = prepare([corpus], out, DEFAULT_TOKENIZER, workers=workers, unit_mb=0.002, progress_every=0,
                    stream=io.StringIO())
    direct = tokenize_documents([str(corpus)], tok)
    stream = TokenStream([out], tok)
    assert len(index["shards"]) > 5 and index["dtype"] == "uint16"
    assert index["n_tokens"] == len(direct) == len(stream)
    assert torch.equal(stream[:], direct)
    rng = random.Random(1)
    for _ in range(200):  # slices inside one shard and across shard boundaries, negative bounds
        a, b = sorted(rng.randrange(-len(direct), len(direct)) for _ in range(2))
        assert torch.equal(stream[a:b], direct[a:b])
    assert index["n_documents"] == int((direct == tok.eos_id).sum()) == 1 + 199 + 100  # "   " and e.txt dropped


def test_gzip_and_parquet_give_the_jsonl_stream(tmp_path, tok):
    docs = _docs(120, seed=3)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_bytes(lines)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "x.jsonl.gz").write_bytes(gzip.compress(lines))
    want = tokenize_documents([str(tmp_path / "plain")], tok)
    got = prepare([tmp_path / "gz"], tmp_path / "p_gz", DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    assert got["n_tokens"] == len(want) and torch.equal(TokenStream([tmp_path / "p_gz"], tok)[:], want)
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), tmp_path / "pq" / "x.parquet",
                   row_group_size=25)  # 5 row groups = 5 pieces
    prepare([tmp_path / "pq"], tmp_path / "p_pq", DEFAULT_TOKENIZER, workers=1, unit_mb=1e-5, stream=io.StringIO())
    assert torch.equal(TokenStream([tmp_path / "p_pq"], tok)[:], want)
    pq.write_table(pa.table({"body": docs}), tmp_path / "pq" / "y.parquet")
    with pytest.raises(UserError, match=r"y.parquet has no 'text' column \(columns: body\)"):
        prepare([tmp_path / "pq" / "y.parquet"], tmp_path / "p_bad", DEFAULT_TOKENIZER, workers=1)
    assert not (tmp_path / "p_bad").exists()


def test_training_loader_reads_prepared_like_raw_text(tmp_path, tok, corpus):
    prepare([corpus], tmp_path / "prep", DEFAULT_TOKENIZER, workers=1, unit_mb=0.003, stream=io.StringIO())
    raw = build_dataloader([str(corpus)], tok, 16, 3, 1, 2, seed=5)
    mm = build_dataloader([str(tmp_path / "prep")], tok, 16, 3, 1, 2, seed=5)
    for (xa, ya), (xb, yb), _ in zip(raw, mm, range(40)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(UserError, match="mix prepared folders and raw text"):
        build_dataloader([str(tmp_path / "prep"), str(corpus)], tok, 16, 3, 1, 2)


def test_progress_lines_and_up_to_date_and_atomic_replace(tmp_path, corpus):
    out, log = tmp_path / "prep", io.StringIO()
    first = prepare([corpus], out, DEFAULT_TOKENIZER, workers=1, unit_mb=0.002, progress_every=0, stream=log)
    lines = log.getvalue().splitlines()
    assert len(lines) > 3 and lines[-1].startswith(f"prepare: {first['input_bytes'] / 1e6:,.1f}/") and "(100%)" in \
        lines[-1] and "MB/s" in lines[-1] and "per process" in lines[-1]
    log = io.StringIO()
    assert prepare([corpus], out, DEFAULT_TOKENIZER, workers=1, stream=log) == first
    assert "is up to date" in log.getvalue()
    # new input: the folder is replaced by the complete new one, no temporary folder is left next to it
    (corpus / "z.txt").write_text("one more document")
    (tmp_path / ".prep.tmp-4194305").mkdir()  # left by a killed run (no such process): removed
    try:
        second = prepare([corpus], out, DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    finally:
        (corpus / "z.txt").unlink()
    assert second["n_documents"] == first["n_documents"] + 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_bad_inputs_are_one_clear_error(tmp_path, tok, corpus):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n\t")
    (tmp_path / "blank" / "b.jsonl").write_text(json.dumps({"text": " "}) + "\n\n")
    with pytest.raises(UserError, match=r"no text in 2 input file\(s\): every document is blank"):
        prepare([tmp_path / "blank"], tmp_path / "out", DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank"]  # nothing half-written
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not a JSON object with a 'text' field"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out", DEFAULT_TOKENIZER, workers=2, stream=io.StringIO())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(UserError, match="input path not found"):
        prepare([tmp_path / "nope"], tmp_path / "out", DEFAULT_TOKENIZER)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(UserError, match="notes.md: unsupported input"):
        prepare([tmp_path / "notes.md"], tmp_path / "out", DEFAULT_TOKENIZER)
    with pytest.raises(UserError, match="exists and is not a prepared data folder"):
        prepare([corpus], tmp_path / "blank", DEFAULT_TOKENIZER)


def test_other_tokenizer_is_refused(tmp_path, tok, corpus):
    """Swap the ranks of two byte tokens: a valid vocabulary that gives other ids, so another fingerprint."""
    lines = DEFAULT_TOKENIZER.read_text().splitlines()
    (a_tok, a_rank), (b_tok, b_rank) = lines[100].split(), lines[200].split()
    lines[100], lines[200] = f"{a_tok} {b_rank}", f"{b_tok} {a_rank}"
    (tmp_path / "other.tiktoken").write_text("\n".join(lines) + "\n")
    other = Tokenizer(tmp_path / "other.tiktoken")
    assert other.fingerprint != tok.fingerprint and Tokenizer(DEFAULT_TOKENIZER).fingerprint == tok.fingerprint
    prepare([corpus], tmp_path / "prep", DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    with pytest.raises(UserError, match=r"prep was tokenized with another tokenizer .*prepare it again"):
        TokenStream([tmp_path / "prep"], other)
    shard = next((tmp_path / "prep").glob("shard_*.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="folder is damaged"):
        TokenStream([tmp_path / "prep"], tok)


def test_uint32_shards_for_a_large_vocabulary(tmp_path, tok, corpus, monkeypatch):
    """Ids of a vocabulary over 65,536 do not fit uint16: such shards are uint32 and read back the same."""
    import titan_aquila.data.prepare as prep

    assert (prep.token_dtype(65_536), prep.token_dtype(65_537), prep.token_dtype(128_256)) == \
        ("uint16", "uint32", "uint32")
    monkeypatch.setattr(prep, "token_dtype", lambda vocab_size: "uint32")  # workers=1: this process writes
    index = prepare([corpus], tmp_path / "prep", DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    assert index["dtype"] == "uint32"
    shard = tmp_path / "prep" / index["shards"][0]["file"]
    assert shard.stat().st_size == 4 * index["shards"][0]["n_tokens"]
    assert torch.equal(TokenStream([tmp_path / "prep"], tok)[:], tokenize_documents([str(corpus)], tok))
    assert np.fromfile(shard, dtype=np.uint32).max() < tok.vocab_size


def test_hf_tokenizer_json_round_trip(tmp_path, tok, corpus):
    """A byte-level BPE tokenizer.json (Llama-3 split regex, trained by `tokenizers` on the fixture): the worker
    processes load it from the folder and the shards equal its direct tokenization; the SmolLM2 run refuses them."""
    hf_lib = pytest.importorskip("tokenizers")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    hf = hf_lib.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    fixture = sorted(str(p) for p in (DEFAULT_TOKENIZER.parents[1] / "text").rglob("*.txt"))
    hf.train(fixture, trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    hf.save(str(tmp_path / "tok" / "tokenizer.json"))
    mine = Tokenizer(tmp_path / "tok")
    index = prepare([corpus], tmp_path / "prep", tmp_path / "tok", workers=2, unit_mb=0.005, stream=io.StringIO())
    assert index["tokenizer_fingerprint"] == mine.fingerprint != tok.fingerprint and len(index["shards"]) > 1
    assert torch.equal(TokenStream([tmp_path / "prep"], mine)[:], tokenize_documents([str(corpus)], mine))
    with pytest.raises(UserError, match="tokenized with another tokenizer"):
        TokenStream([tmp_path / "prep"], tok)
