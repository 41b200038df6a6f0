"""Multi-hot bag fields through every stage after the reader: BagField slicing, CTRData checks, the
batch iterator, the models' pooled lookup and vocabulary mode, each against a plain-Python
reference."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mlfast.io.batches import BatchLoader
from mlfast.io.data import BagField, CTRData
from mlfast.models import FeatureSchema, parse_peers
from mlfast.train.group import PeerGroup
from mlfast.io.vocab import Vocabulary


def random_bags(rng, n, lo, hi, max_len=5, allow_empty=True):
    lists = [list(rng.integers(lo, hi, size=rng.integers(0 if allow_empty else 1, max_len + 1))) for _ in range(n)]
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    values = np.array([v for x in lists for v in x], np.int64)
    return BagField(offsets, values), lists


def bag_data(rng, n=37):
    """3 one-hot fields, then 2 bag fields, in one flat table."""
    offs = np.array([0, 11, 30, 41, 90, 120], np.int64)
    sparse = np.stack([rng.integers(offs[f], offs[f + 1], n) for f in range(3)], 1).astype(np.int64)
    (b1, l1), (b2, l2) = random_bags(rng, n, offs[3], offs[4]), random_bags(rng, n, offs[4], offs[5])
    d = CTRData(labels=(rng.random(n) < 0.4).astype(np.float32), dense=rng.random((n, 2)).astype(np.float32),
                dense_missing=np.zeros((n, 2), bool), sparse=sparse, field_offsets=offs,
                field_names=["a", "b", "c", "hist", "tags"], bags=[b1, b2])
    return d, [l1, l2]


def test_bag_field_take_matches_lists(np_rng):
    bag, lists = random_bags(np_rng, 50, 0, 1000)
    for index in (np.array([3, 3, 0, 49, 7]), slice(5, 40, 3), slice(None), np_rng.random(50) < 0.5,
                  np.array([-1, -50]), np.zeros(0, np.int64)):
        rows = np.arange(50)[index]
        got = bag.take(index)
        assert [got.values[got.offsets[i]:got.offsets[i + 1]].tolist() for i in range(len(rows))] == \
            [lists[r] for r in rows]
    assert bag.lengths.tolist() == [len(x) for x in lists]
    with pytest.raises(ValueError, match="offsets must run"):
        BagField(np.array([0, 2], np.int64), np.zeros(3, np.int64))


def test_ctrdata_with_bags_checks_layout_and_takes_rows(np_rng):
    d, lists = bag_data(np_rng)
    assert d.num_fields == 5 and d.num_bags == 2 and d.sparse.shape[1] == 3
    sub = d.take(np.array([4, 1]))
    assert [sub.bags[1].values[sub.bags[1].offsets[i]:sub.bags[1].offsets[i + 1]].tolist() for i in (0, 1)] == \
        [lists[1][4], lists[1][1]]
    with pytest.raises(ValueError, match="F\\+S\\+1"):
        CTRData(labels=None, dense=d.dense, dense_missing=d.dense_missing, sparse=d.sparse,
                field_offsets=d.field_offsets[:-1], field_names=d.field_names[:-1], bags=d.bags)
    with pytest.raises(ValueError, match="rows"):
        CTRData(labels=None, dense=d.dense, dense_missing=d.dense_missing, sparse=d.sparse,
                field_offsets=d.field_offsets, field_names=d.field_names, bags=[d.bags[0], d.bags[1].take(slice(1))])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_batches_carry_each_rows_bags_once(np_rng, prefetch):
    d, lists = bag_data(np_rng, n=53)
    loader = BatchLoader(d, 8, shuffle=True, seed=4, prefetch=prefetch)
    seen = []
    for b in loader.epoch(1):
        assert len(b.bags) == 2
        for s, (offsets, values) in enumerate(b.bags):
            assert offsets.shape == (len(b) + 1,) and offsets[0] == 0 and offsets[-1] == values.numel()
            for i, row in enumerate(b.index.tolist()):
                assert values[offsets[i]:offsets[i + 1]].tolist() == lists[s][row]
        seen += b.index.tolist()
    assert sorted(seen) == list(range(53))


@pytest.mark.parametrize("kind", ["fused", "dense"])
@pytest.mark.parametrize("peer", ["lr", "fm", "deepfm", "dcn", "ipnn", "fibinet", "autoint"])
def test_models_read_bags_as_mean_pooled_fields(np_rng, peer, kind):
    """group(sparse, dense, bags) = model(rows of the one-hot ids, then each bag's mean row (zeros
    for an empty bag)), the rows computed here one by one in plain Python, for both table kinds."""
    d, lists = bag_data(np_rng, n=6)
    schema = FeatureSchema.from_data(d)
    assert schema.num_bags == 2 and schema.num_fields == 5 and schema.num_onehot == 3
    g = PeerGroup.build(parse_peers(peer), schema, embedding_dim=4, seeds=[3], kind=kind).eval()
    w = torch.from_numpy(np_rng.standard_normal((schema.table_rows, g.peers[0].embedding_width)).astype(np.float32))
    if kind == "fused":
        g.tables.set_peer_weight(0, w)
    else:
        with torch.no_grad():
            g.tables.tables[0].copy_(w)
    emb = torch.zeros(6, 5, w.shape[1])
    for i in range(6):
        emb[i, :3] = w[torch.from_numpy(d.sparse[i])]
        for s in range(2):
            if lists[s][i]:
                emb[i, 3 + s] = w[torch.tensor(lists[s][i])].mean(0)
    b = next(iter(BatchLoader(d, 6, prefetch=0, use_dense=False)))
    with torch.no_grad():
        torch.testing.assert_close(g(b.sparse, None, b.bags)[:, 0], g.peers[0](emb, None), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 bag fields"):
        g(b.sparse, None)


def test_vocabulary_counts_every_bag_member(np_rng):
    """Keys mode: a bag field's vocabulary counts each member occurrence over the training rows;
    missing (key 0) -> the field's row 0, rare or unseen -> its OOV row."""
    n, train = 300, np.arange(0, 300, 2)
    keys = np_rng.integers(1, 12, (n, 2)).astype(np.int64)
    bag, lists = random_bags(np_rng, n, 1, 25, max_len=4)
    lists = [x or [0] for x in lists]  # the reader's empty cell: one missing key
    bag = BagField.from_lengths(np.array([len(x) for x in lists]), np.array([v for x in lists for v in x], np.int64))
    vocab = Vocabulary.fit(keys, ["a", "b", "hist"], 3, rows=train, backend="numba", bags=[bag])
    assert vocab.num_bags == 1 and len(vocab.field_offsets) == 4
    counts = Counter(v for r in train for v in lists[r] if v != 0)
    kept = sorted((v for v, c in counts.items() if c >= 3), key=lambda v: (-counts[v], v))
    base = int(vocab.field_offsets[2])
    expect = [base + (0 if v == 0 else kept.index(v) + 1 if v in kept else len(kept) + 1) for x in lists for v in x]
    (mapped,) = vocab.transform_bags([bag])
    assert mapped.values.tolist() == expect and np.array_equal(mapped.offsets, bag.offsets)
    assert vocab.transform(keys).shape == (n, 2)
    again = Vocabulary.from_state(vocab.to_state())
    assert again.num_bags == 1 and again.transform_bags([bag])[0].values.tolist() == expect
    with pytest.raises(ValueError, match="bag fields"):
        vocab.transform_bags([])


def history_data(rng, n=24000, items=300):
    """Labels driven by a click history: p = sigmoid(3 * mean(item weight over the bag) - 1), plus
    two one-hot fields of noise. Returns the data with the bag field and the Bayes AUC."""
    from mlfast.train.metrics import roc_auc

    weight = rng.normal(size=items)
    lengths = rng.integers(1, 7, n)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(lengths)
    members = rng.integers(0, items, int(offsets[-1]))
    score = np.add.reduceat(weight[members], offsets[:-1]) / lengths
    p = 1 / (1 + np.exp(-(3 * score - 1)))
    y = (rng.random(n) < p).astype(np.float32)
    offs = np.array([0, 11, 22, 22 + items + 1], np.int64)
    sparse = np.stack([rng.integers(1, 11, n), rng.integers(12, 22, n)], 1).astype(np.int64)
    d = CTRData(labels=y, dense=np.zeros((n, 0), np.float32), dense_missing=np.zeros((n, 0), bool), sparse=sparse,
                field_offsets=offs, field_names=["a", "b", "history"], bags=[BagField(offsets, members + 23)])
    return d, roc_auc(y, p)


@pytest.mark.parametrize("engine", ["fused", "plain"])
def test_peers_learn_from_a_history_bag(engine):
    """End to end (batches, pooled lookup, fused or dense optimizer): peers reading the bag get
    close to the Bayes AUC; the same data without the bag field cannot beat chance."""
    import dataclasses

    from mlfast.api import fit

    d, bayes = history_data(np.random.default_rng(3))
    kw = dict(peers="deepfm,dcn", epochs=2, batch_size=256, lr=3e-3, engine=engine, progress=False, log=lambda *a: None)
    with_bag = fit(d, **kw).metrics["test"]
    no_bag = fit(dataclasses.replace(d, bags=[], field_offsets=d.field_offsets[:3], field_names=["a", "b"]),
                 **kw).metrics["test"]
    for peer in ("deepfm", "dcn", "ensemble"):
        assert with_bag[peer]["auc"] > bayes - 0.03, (peer, with_bag[peer], bayes)
        assert no_bag[peer]["auc"] < 0.56, (peer, no_bag[peer])


def test_bag_truncate_keeps_the_last_values(np_rng):
    bag, lists = random_bags(np_rng, 60, 0, 100, max_len=9)
    for k in (1, 3, 9):
        got = bag.truncate(k)
        assert [got.values[got.offsets[i]:got.offsets[i + 1]].tolist() for i in range(60)] == \
            [x[-k:] if x else [] for x in lists]
    assert bag.truncate(9) is bag
    with pytest.raises(ValueError, match="max_len"):
        bag.truncate(0)
