"""Packing, data-parallel sharding and exact resume of the StatefulDataLoader."""

import json

import pytest
import torch

from titan_aquila.data import PackedWindows, build_dataloader, tokenize_documents
from titan_aquila.errors import UserError
from titan_aquila.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_stream_is_documents_joined_with_separator(tmp_path, tok):
    (tmp_path / "a.txt").write_text("one two")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    stream = tokenize_documents([str(tmp_path)], tok).tolist()
    expected = tok.encode("one two") + [0] + tok.encode("three") + [0] + tok.encode("four") + [0]
    assert stream == expected


@pytest.mark.parametrize("dp_degree", [1, 2, 3])
def test_windows_cover_the_stream_once_across_ranks(dp_degree):
    T, N = 7, 200
    tokens = torch.arange(N)
    seen = {}
    for r in range(dp_degree):
        ds = PackedWindows(tokens, T, r, dp_degree, infinite=False, shuffle=False)
        for x, y in ds:
            assert torch.equal(x[1:], y[:-1])  # labels are inputs shifted by one
            seen[int(x[0]) // T] = (x, y)
    W = (N - 1) // T
    kept = (W // dp_degree) * dp_degree
    assert sorted(seen) == list(range(kept))  # no window twice, none missing but the < R tail windows
    rebuilt = torch.cat([seen[w][0] for w in range(kept)] + [seen[kept - 1][1][-1:]])
    assert torch.equal(rebuilt, tokens[: kept * T + 1])


def test_shuffled_epochs_differ_but_cover_the_same_windows():
    ds = PackedWindows(torch.arange(1000), 9, 0, 1, infinite=True, shuffle=True, seed=3)
    e0, e1 = ds.rank_windows(0), ds.rank_windows(1)
    assert not torch.equal(e0, e1) and sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(111))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_the_same_batches(tok, num_workers):
    def make():
        return build_dataloader(None, tok, 64, 3, 1, 2, num_workers=num_workers, seed=5)

    ref_it = iter(make())
    ref = [next(ref_it)[0] for _ in range(8)]
    dl = make()
    it = iter(dl)
    for _ in range(5):
        next(it)
    state = dl.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for k in range(5, 8):
        assert torch.equal(next(it2)[0], ref[k]), k


def test_resume_across_an_epoch_boundary():
    ds = PackedWindows(torch.arange(100), 9, 0, 1, infinite=True, shuffle=True, seed=1)
    it = iter(ds)
    for _ in range(13):  # 11 windows per epoch
        next(it)
    state = ds.state_dict()
    assert state == {"epoch": 1, "pos": 2}
    ds2 = PackedWindows(torch.arange(100), 9, 0, 1, infinite=True, shuffle=True, seed=1)
    ds2.load_state_dict(state)
    assert torch.equal(next(iter(ds2))[0], next(it)[0])


def test_bad_data_inputs(tmp_path, tok):
    with pytest.raises(UserError, match="data path not found"):
        build_dataloader([str(tmp_path / "missing")], tok, 8, 1, 0, 1)
    with pytest.raises(UserError, match="no .txt or .jsonl"):
        build_dataloader([str(tmp_path)], tok, 8, 1, 0, 1)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="no text"):
        build_dataloader([str(tmp_path)], tok, 8, 1, 0, 1)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(UserError, match="fewer than"):
        build_dataloader([str(tmp_path)], tok, 64, 1, 0, 2)
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        build_dataloader([str(tmp_path / "bad.jsonl")], tok, 8, 1, 0, 1)
