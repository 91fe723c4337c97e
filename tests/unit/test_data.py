"""Packing, data-parallel sharding, held-out split and exact resume of the StatefulDataLoader."""

import json
import random

import pytest
import torch

from titan_aquila.data.dataset import (PackedWindows, build_dataloader, build_validation_dataloader, default_eval_paths,
                               default_train_paths, default_validation_paths, split_validation, tokenize_documents)
from titan_aquila.errors import UserError
from titan_aquila.data.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 noise


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, tok):
    """1,354 tokens in 3 documents: short epochs, so tests cross epoch boundaries quickly."""
    d = tmp_path_factory.mktemp("corpus")
    words = "It is a truth universally acknowledged that a single man in possession of a good fortune".split()
    rng = random.Random(0)  # aperiodic text: every window of the stream is distinct
    for k in range(3):
        (d / f"doc{k}.txt").write_text(" ".join(rng.choice(words) for _ in range(450)))
    return str(d)


def test_stream_is_documents_joined_with_separator(tmp_path, tok):
    (tmp_path / "b.txt").write_text("one two")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    (tmp_path / "c.txt").write_text(" \n\n")  # blank document: skipped
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("five")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "e.txt").write_text("never")
    (tmp_path / "notes.md").write_text("not text data")
    stream = tokenize_documents([str(tmp_path)], tok)
    assert stream.dtype == torch.int32
    # sorted paths: a.jsonl (two documents), b.txt, c.txt (blank), sub/d.txt
    expected = [tok.encode(t, eos=True) for t in ("three", "four", "one two", "five")]
    assert stream.tolist() == sum(expected, [])


def test_fixture_paths_exist_and_tokenize(tok):
    sizes = [len(tokenize_documents(p(), tok)) for p in (default_train_paths, default_validation_paths,
                                                         default_eval_paths)]
    assert sizes[0] > 60_000 and sizes[1] > 8_000 and sizes[2] > 2_500, sizes


@pytest.mark.parametrize("dp_degree", [1, 2, 3])
def test_windows_cover_the_stream_once_across_ranks(dp_degree):
    T, N = 7, 200
    tokens = torch.arange(1000, 1000 + N, dtype=torch.int32)
    seen = {}
    for r in range(dp_degree):
        ds = PackedWindows(tokens, T, r, dp_degree, infinite=False, shuffle=False)
        windows = list(ds)
        assert len(windows) == ((N - 1) // T) // dp_degree  # equal share per rank
        for x, y in windows:
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (T,)
            assert torch.equal(x[1:], y[:-1])  # labels are inputs shifted by one
            w = (int(x[0]) - 1000) // T
            assert w not in seen  # no window on two ranks
            seen[w] = (x, y)
    W = (N - 1) // T
    kept = (W // dp_degree) * dp_degree
    assert sorted(seen) == list(range(kept))  # none missing but the < R tail windows
    rebuilt = torch.cat([seen[w][0] for w in range(kept)] + [seen[kept - 1][1][-1:]])
    assert torch.equal(rebuilt, tokens[: kept * T + 1].long())  # concatenation minus overlap = the stream


@pytest.mark.parametrize("dp_degree", [2, 3])
def test_shuffled_loader_shards_disjointly(tok, small_corpus, dp_degree):
    T, B = 16, 4
    stream = tokenize_documents(small_corpus, tok).long()
    W = (len(stream) - 1) // T
    starts = []
    for r in range(dp_degree):
        batches = list(build_dataloader(small_corpus, tok, T, B, r, dp_degree, infinite=False, seed=7))
        xs = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        assert len(xs) == W // dp_degree
        for x, y in zip(xs, ys):
            hits = [s for s in range(0, W * T, T) if torch.equal(stream[s:s + T], x)]
            assert len(hits) == 1 and torch.equal(stream[hits[0] + 1:hits[0] + T + 1], y)
            starts.append(hits[0])
    assert len(set(starts)) == len(starts) == (W // dp_degree) * dp_degree
    assert starts[: W // dp_degree] != sorted(starts[: W // dp_degree])  # shuffled


def test_shuffled_epochs_differ_but_cover_the_same_windows():
    ds = PackedWindows(torch.arange(1000), 9, 0, 1, infinite=True, shuffle=True, seed=3)
    e0, e1 = ds.rank_windows(0), ds.rank_windows(1)
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(111))
    other_seed = PackedWindows(torch.arange(1000), 9, 0, 1, seed=2)
    assert not torch.equal(other_seed.rank_windows(1), e0)  # seed s epoch 1 is not seed s+1 epoch 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_same_batches(tok, small_corpus, num_workers):
    """1,354 tokens, T=16, 2 ranks: 42 windows a rank, 10.5 batches of 4 an epoch (batches run across epochs).
    Snapshot after 29 batches (inside epoch 2), then compare 11 more: they cross into epoch 3."""
    def make():
        return build_dataloader(small_corpus, tok, 16, 4, 1, 2, num_workers=num_workers, seed=5)

    ref_it = iter(make())
    ref = [next(ref_it) for _ in range(40)]
    dl = make()
    it = iter(dl)
    for _ in range(29):
        next(it)
    state = dl.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(11), resumed)]
    for k, (x, y) in enumerate(got, 29):
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1]), k


def test_resume_across_an_epoch_boundary():
    ds = PackedWindows(torch.arange(100), 9, 0, 1, infinite=True, shuffle=True, seed=1)
    it = iter(ds)
    for _ in range(13):  # 11 windows per epoch
        next(it)
    state = ds.state_dict()
    assert (state["epoch"], state["pos"]) == (1, 2)
    ds2 = PackedWindows(torch.arange(100), 9, 0, 1, infinite=True, shuffle=True, seed=1)
    ds2.load_state_dict(state)
    assert torch.equal(next(iter(ds2))[0], next(it)[0])


def test_state_of_other_data_restarts_with_a_warning():
    state = PackedWindows(torch.arange(100), 9, 0, 1, seed=1).state_dict() | {"epoch": 3, "pos": 4}
    ds = PackedWindows(torch.arange(100), 10, 0, 1, seed=1)  # seq_len changed
    with pytest.warns(UserWarning, match="other data"):
        ds.load_state_dict(state)
    assert (ds.epoch, ds.pos) == (0, 0)


def test_holdout_split_is_disjoint_and_complete(tok, small_corpus):
    stream = tokenize_documents(small_corpus, tok).long()
    N, f, T = len(stream), 0.25, 8
    cut = N - round(f * N)
    train, val = split_validation(stream, f)
    assert torch.equal(torch.cat([train, val]), stream) and len(val) == round(f * N)
    tr = list(build_dataloader(small_corpus, tok, T, 1000, 0, 1, infinite=False, shuffle=False, holdout=f))
    va = list(build_validation_dataloader(small_corpus, tok, T, 1000, 0, 1, holdout=f))
    (tx, ty), (vx, vy) = tr[0], va[0]
    assert torch.equal(tx.flatten(), stream[: len(tx) * T]) and len(tx) == (cut - 1) // T
    assert torch.equal(ty.flatten(), stream[1: len(tx) * T + 1])  # labels: the next token of each input
    assert torch.equal(vx.flatten(), stream[cut: cut + len(vx) * T]) and len(vx) == (N - cut - 1) // T
    assert torch.equal(vy[-1, -1:], stream[cut + len(vx) * T: cut + len(vx) * T + 1])
    with pytest.raises(UserError, match=r"holdout must be a fraction in \(0, 1\)"):
        build_dataloader(small_corpus, tok, T, 1, 0, 1, holdout=1.5)


def test_validation_passes_restart_and_ranks_get_equal_batch_counts(tok):
    loaders = [build_validation_dataloader(None, tok, 64, 5, r, 3) for r in range(3)]
    passes = [[x for x, _ in dl] for dl in loaders]
    assert len({len(p) for p in passes}) == 1 and len(passes[0]) > 1
    again = iter(loaders[0])
    assert torch.equal(next(again)[0], passes[0][0])  # a partial pass...
    assert torch.equal(next(iter(loaders[0]))[0], passes[0][0])  # ...then a new pass starts at window 0
    assert all(not torch.equal(passes[0][0], passes[r][0]) for r in (1, 2))


def test_bad_data_inputs(tmp_path, tok):
    with pytest.raises(UserError, match="data path not found: .*missing"):
        build_dataloader([str(tmp_path / "missing")], tok, 8, 1, 0, 1)
    with pytest.raises(UserError, match="has no .txt or .jsonl files"):
        build_dataloader([str(tmp_path)], tok, 8, 1, 0, 1)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text in 1 file.*empty.txt"):
        build_dataloader([str(tmp_path)], tok, 8, 1, 0, 1)
    (tmp_path / "short.txt").write_text("just a few words")  # 4 tokens + separator
    with pytest.raises(UserError, match="has 5 tokens, fewer than the 129 needed .* seq_len 64 on each of 2"):
        build_dataloader([str(tmp_path)], tok, 64, 1, 0, 2)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not a JSON object"):
        build_dataloader([str(tmp_path / "bad.jsonl")], tok, 8, 1, 0, 1)
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="num.jsonl:1: 'text' is a int"):
        build_dataloader([str(tmp_path / "num.jsonl")], tok, 8, 1, 0, 1)
    with pytest.raises(UserError, match="rank 2 is outside 0..1"):
        build_dataloader(None, tok, 8, 1, 2, 2)
    with pytest.raises(UserError, match="local batch size"):
        build_dataloader(None, tok, 8, 0, 0, 1)
