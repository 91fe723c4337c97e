"""Mixture of prepared sources: the stratified schedule (shares, determinism), exact resume with token counts,
and the `training.datasets` config checks."""

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch

from titan_aquila.config import JobConfig
from titan_aquila.data.mixture import apportion, block_size, build_mixture_loader, schedule_block
from titan_aquila.data.prepare import prepare
from titan_aquila.data.prepared import TokenStream
from titan_aquila.data.sources import Source, parse_sources
from titan_aquila.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from titan_aquila.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two prepared sources whose tokens are told apart by their text: English words vs Chinese characters."""
    d = tmp_path_factory.mktemp("mix")
    rng = random.Random(0)
    en, zh = "the of and to a in that is was he".split(), list("床前明月光疑是地上霜举头望低思故乡")
    (d / "en").mkdir()
    (d / "en" / "a.txt").write_text(" ".join(rng.choice(en) for _ in range(3000)))
    (d / "zh").mkdir()
    (d / "zh" / "a.txt").write_text("".join(rng.choice(zh) for _ in range(1500)))
    for name in ("en", "zh"):
        prepare([d / name], d / f"p_{name}", DEFAULT_TOKENIZER, workers=1, stream=io.StringIO())
    return [Source("en", str(d / "p_en"), 0.7), Source("zh", str(d / "p_zh"), 0.3)]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.25, 0.125, 0.125], [1 / 3, 1 / 3, 1 / 3], [0.97, 0.03]])
def test_schedule_shares_equal_the_weights(weights):
    K = block_size(weights)
    assert all(K * w >= 1 for w in weights)
    seq = np.concatenate([schedule_block(weights, 11, b) for b in range(300)])
    for n in (K, 7 * K, 300 * K):  # after whole blocks: each count within 1 of p_i * n
        counts = np.bincount(seq[:n], minlength=len(weights))
        assert np.all(np.abs(counts - np.asarray(weights) * n) <= 1), (n, counts)
    for n in range(1000, len(seq), 997):  # anywhere after 1000 sequences: shares within 1% of the weights
        shares = np.bincount(seq[:n], minlength=len(weights)) / n
        assert np.all(np.abs(shares - weights) <= 0.01), (n, shares)


def test_schedule_is_a_seeded_permutation_of_the_apportionment():
    w = [0.6, 0.4]
    assert apportion(w, 17).tolist() == [10, 7] and apportion([1 / 3] * 3, 16).tolist() == [6, 5, 5]
    a, b, c = (schedule_block(w, s, 4) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # same seed same order; the seed changes it
    assert Counter(a.tolist()) == Counter(c.tolist())  # but not the counts


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _source_of(x: torch.Tensor, zh_ids: set) -> int:
    return int(sum(int(t) in zh_ids for t in x.tolist()) > len(x) // 2)


def test_mixture_resumes_exactly_with_token_counts(tok, sources):
    def make(rank=0):
        return build_mixture_loader(sources, tok, 16, 4, rank, 2, seed=3)

    ref = make()
    batches = _take(ref, 30)
    first = make()
    _take(first, 11)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.source_tokens == first.source_tokens and sum(first.source_tokens) == 11 * 4 * 16
    for (x, y), (xr, yr) in zip(batches[11:], _take(resumed, 19)):
        assert torch.equal(x, xr) and torch.equal(y, yr)
    assert resumed.source_tokens == ref.source_tokens
    # the counts are the sources the batches really came from (told apart by their tokens)
    zh_ids = set(TokenStream([sources[1].path], tok)[:].tolist()) - {tok.eos_id}
    assert not zh_ids & set(TokenStream([sources[0].path], tok)[:].tolist())
    seen = [0, 0]
    for x, _ in batches:
        for row in x:
            seen[_source_of(row, zh_ids)] += 16
    assert seen == ref.source_tokens
    # ranks of one data-parallel group draw different windows
    other = _take(make(rank=1), 5)
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(batches[:5], other))


def test_state_of_another_mixture_restarts_with_a_warning(tok, sources):
    a = build_mixture_loader(sources, tok, 16, 2, 0, 1, seed=3)
    _take(a, 5)
    b = build_mixture_loader([sources[0], Source("zh", sources[1].path, 0.5)], tok, 16, 2, 0, 1, seed=3)
    fresh = _take(build_mixture_loader([sources[0], Source("zh", sources[1].path, 0.5)], tok, 16, 2, 0, 1, seed=3),
                  3)
    b.load_state_dict(a.state_dict())
    with pytest.warns(UserWarning, match="another mixture"):  # the position is applied when iteration starts
        again = _take(b, 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(again, fresh)) and sum(b.source_tokens) == 3 * 2 * 16


def test_mixture_needs_prepared_sources(tok, tmp_path):
    (tmp_path / "a.txt").write_text("raw text")
    with pytest.raises(UserError, match=r"training.datasets.en.path .* is not a prepared folder"):
        build_mixture_loader([Source("en", str(tmp_path), 1.0)], tok, 16, 2, 0, 1)


def test_datasets_config_checks():
    cfg = JobConfig()
    cfg.training.datasets = {"zh": {"path": "b", "weight": 1}, "en": {"path": "a", "weight": 3,
                                                                       "validation_path": "v"}}
    cfg.validate()
    assert parse_sources(cfg.training.datasets) == [Source("en", "a", 0.75, "v"), Source("zh", "b", 0.25)]
    cases = [({"en": {"path": "a", "weight": 0}}, "training.datasets.en.weight must be a finite number > 0"),
             ({"en": {"weight": 1}}, "training.datasets.en.path must be a prepared folder path"),
             ({"en": {"path": "a", "weight": 1, "wieght": 2}}, r"en has unknown key\(s\) wieght"),
             ({"en": "a"}, "training.datasets.en must be a table")]
    for datasets, msg in cases:
        cfg = JobConfig()
        cfg.training.datasets = datasets
        with pytest.raises(UserError, match=msg):
            cfg.validate()
    cfg = JobConfig()
    cfg.training.datasets, cfg.training.dataset_path = {"en": {"path": "a", "weight": 1}}, ["x"]
    with pytest.raises(UserError, match="training.datasets and training.dataset_path are both set"):
        cfg.validate()
