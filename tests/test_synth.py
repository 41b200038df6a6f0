"""The Criteo-format generator: format, marginals, hidden-model reference vs fast path, determinism."""
from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numba
import numpy as np
import pytest

from mlfast.train.metrics import logloss, roc_auc as auc
from mlfast.io.synth import (NUM_CAT, NUM_INT, HiddenModel, SynthConfig, bucket_root, criteo_config, hex_of,
                          rank_of_hex, ranks_of_hex_values, read_sidecar, synth_criteo)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets_raw"
ROWS = 20_000
INT_RE = re.compile(rb"-?[0-9]+\Z")
HEX_RE = re.compile(rb"[0-9a-f]{8}\Z")


def parse_tsv(data: bytes, with_label: bool = True) -> dict:
    """Plain-Python Criteo parser (the reference the generator's output must satisfy)."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "file must end with a newline"
    lines = lines[:-1]
    nf = 40 if with_label else 39
    n = len(lines)
    labels = np.zeros(n, np.int8)
    ints = np.zeros((n, NUM_INT), np.int64)
    int_present = np.zeros((n, NUM_INT), bool)
    hexes = np.zeros((n, NUM_CAT), np.int64)
    cat_present = np.zeros((n, NUM_CAT), bool)
    for i, line in enumerate(lines):
        f = line.split(b"\t")
        assert len(f) == nf, f"line {i + 1}: {len(f)} fields, expected {nf}"
        if with_label:
            assert f[0] in (b"0", b"1"), f"line {i + 1}: label {f[0]!r}"
            labels[i] = f[0] == b"1"
            f = f[1:]
        for j in range(NUM_INT):
            if f[j]:
                assert INT_RE.match(f[j]), f"line {i + 1}, I{j + 1}: {f[j]!r}"
                ints[i, j] = int(f[j])
                int_present[i, j] = True
        for c in range(NUM_CAT):
            v = f[NUM_INT + c]
            if v:
                assert HEX_RE.match(v), f"line {i + 1}, C{c + 1}: {v!r}"
                hexes[i, c] = int(v, 16)
                cat_present[i, c] = True
    return dict(n=n, labels=labels, ints=ints, int_present=int_present, hexes=hexes, cat_present=cat_present,
                line_bytes=np.array([len(x) + 1 for x in lines]))


def decode_ranks(parsed: dict, seed: int) -> np.ndarray:
    ranks = np.full((parsed["n"], NUM_CAT), -1, np.int64)
    for c in range(NUM_CAT):
        m = parsed["cat_present"][:, c]
        ranks[m, c] = ranks_of_hex_values(c, parsed["hexes"][m, c], seed)
    return ranks


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    rep = synth_criteo(d / "train.tsv", ROWS, seed=5, return_probs=True, chunk_rows=6_000)
    data = Path(rep.path).read_bytes()
    parsed = parse_tsv(data)
    return dict(dir=d, rep=rep, data=data, parsed=parsed, ranks=decode_ranks(parsed, 5))


def test_fields_parse_and_labels_match(generated):
    rep, p = generated["rep"], generated["parsed"]
    assert p["n"] == rep.rows == ROWS
    np.testing.assert_array_equal(p["labels"], rep.labels)
    assert rep.positive_rate == p["labels"].mean()
    assert abs(rep.positive_rate - 0.25) < 0.015  # Criteo's rate; calibrated on 65k pilot rows
    assert rep.text_bytes == rep.bytes == len(generated["data"])
    assert 220 <= p["line_bytes"].mean() <= 265  # Criteo Kaggle: ~243 bytes a line


def test_integer_columns(generated):
    p = generated["parsed"]
    ints, present = p["ints"], p["int_present"]
    neg = ints < 0
    assert not (neg & ~present).any()
    assert neg[:, 1].sum() > 0.05 * ROWS  # I2: configured 9.8% negative
    assert set(np.unique(ints[neg[:, 1], 1]).tolist()) <= {-1, -2, -3}
    assert (ints[:, [0] + list(range(2, 13))] >= 0).all()  # only I2 goes negative
    # heavy tails: the 99th percentile far above the median (I5 counts run into the 100k's)
    i5 = ints[present[:, 4], 4]
    assert np.percentile(i5, 99) > 20 * np.median(i5)
    cfg = criteo_config()
    for j, spec in enumerate(cfg.ints):
        v = ints[present[:, j], j]
        zero = np.mean(v == 0)
        assert abs(zero - spec.zero * (1 - spec.negative)) < 0.02, f"I{j + 1} zero rate {zero}"


def test_missing_rates_and_groups(generated):
    p = generated["parsed"]
    cfg = criteo_config()
    for j, spec in enumerate(cfg.ints):
        rate = 1 - p["int_present"][:, j].mean()
        tol = 4 * math.sqrt(spec.missing * (1 - spec.missing) / ROWS) + 1e-3
        assert abs(rate - spec.missing) < tol, f"I{j + 1} missing {rate:.4f} vs {spec.missing}"
    for c, spec in enumerate(cfg.cats):
        rate = 1 - p["cat_present"][:, c].mean()
        tol = 4 * math.sqrt(spec.missing * (1 - spec.missing) / ROWS) + 1e-3
        assert abs(rate - spec.missing) < tol, f"C{c + 1} missing {rate:.4f} vs {spec.missing}"
    # fields of one group share the draw: same rate -> identical masks, as in Criteo
    cp = p["cat_present"]
    for c in (19, 24, 25):  # C20, C25, C26 go missing exactly with C19
        np.testing.assert_array_equal(cp[:, c], cp[:, 18])
    np.testing.assert_array_equal(p["int_present"][:, 0], p["int_present"][:, 9])  # I1 / I10
    # different rates in one group nest: I13 (19.8%) missing implies I3 (20.4%) missing
    assert not (~p["int_present"][:, 12] & p["int_present"][:, 2]).any()
    assert (p["int_present"][:, 12] & ~p["int_present"][:, 2]).sum() > 0


def test_zipf_head_and_tail(generated):
    ranks = generated["ranks"]
    cfg = criteo_config()
    for c, spec in enumerate(cfg.cats):
        r = ranks[ranks[:, c] >= 0, c]
        assert r.max() < spec.cardinality  # every hex decodes to a value of the field
        pmf = spec.head_pmf()
        counts = np.bincount(r[r < 3], minlength=3)
        for k in range(min(3, spec.head_size)):
            tol = 4 * math.sqrt(pmf[k] * (1 - pmf[k]) / len(r)) + 1e-3
            assert abs(counts[k] / len(r) - pmf[k]) < tol, f"C{c + 1} rank {k}"
        if spec.head_size >= 3 and spec.zipf > 0.5:  # Zipf: P(r=0) / P(r=2) = 3 ** s
            assert counts[0] / counts[2] == pytest.approx(3 ** spec.zipf, rel=0.25)
        tail = r[r >= spec.head_size]
        t = spec.tail_mass
        assert abs(len(tail) / len(r) - t) < 4 * math.sqrt(max(t, 1e-4) * (1 - t) / len(r)) + 1e-3, f"C{c + 1} tail"
        if spec.cardinality > 1_000_000:  # tail values spread evenly over millions: nearly all seen once
            assert len(np.unique(tail)) > 0.99 * len(tail)
            assert tail.min() >= spec.head_size and np.median(tail) > spec.cardinality / 4
        if spec.head_size > 1 and pmf[0] > 1.5 * pmf[1]:  # the most frequent hex string is rank 0's
            vals, cnt = np.unique(generated["parsed"]["hexes"][ranks[:, c] >= 0, c], return_counts=True)
            assert f"{vals[np.argmax(cnt)]:08x}" == hex_of(c, 0, seed=5)
    # varied cardinalities: a handful of values in some fields, thousands in others
    distinct = [len(np.unique(ranks[ranks[:, c] >= 0, c])) for c in range(NUM_CAT)]
    assert min(distinct) <= 4 and max(distinct) > 1500


def test_hidden_model_reference_matches_fast_path(generated):
    """Probabilities recomputed from the TEXT (numpy reference) equal the generator's, and the
    reported Bayes AUC / logloss are those of these probabilities against the written labels."""
    rep, p = generated["rep"], generated["parsed"]
    model = HiddenModel(criteo_config(), seed=5)
    assert model.bias == rep.bias
    ref = model.probabilities(generated["ranks"], p["ints"], p["int_present"])
    np.testing.assert_allclose(ref, rep.probs, rtol=0, atol=1e-12)
    exact = auc(p["labels"], ref)
    assert abs(rep.bayes_auc - exact) < 2e-5  # streamed through a 2^20-bin logit histogram
    assert rep.bayes_logloss == pytest.approx(logloss(p["labels"], ref), abs=1e-9)
    assert 0.75 <= rep.bayes_auc <= 0.82


def test_labels_follow_probabilities(generated):
    rep = generated["rep"]
    # calibration: within each probability decile the click rate matches the mean probability
    edges = np.quantile(rep.probs, np.linspace(0, 1, 11))
    b = np.clip(np.searchsorted(edges, rep.probs, side="right") - 1, 0, 9)
    for k in range(10):
        m = b == k
        se = math.sqrt(rep.probs[m].mean() * (1 - rep.probs[m].mean()) / m.sum())
        assert abs(rep.labels[m].mean() - rep.probs[m].mean()) < 4.5 * se + 1e-3


def test_determinism_chunking_and_prefix(generated, tmp_path):
    a = synth_criteo(tmp_path / "a.tsv", ROWS, seed=5, chunk_rows=100_000)
    assert Path(a.path).read_bytes() == generated["data"]  # chunk size 6000 vs 100000
    assert a.bayes_auc == generated["rep"].bayes_auc and a.bayes_logloss == generated["rep"].bayes_logloss
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        short = synth_criteo(tmp_path / "short.tsv", 1234, seed=5, chunk_rows=97)
    finally:
        numba.set_num_threads(threads)
    # the first N rows are the N-row file, whatever the chunking and the thread count
    assert generated["data"].startswith(Path(short.path).read_bytes())
    other = synth_criteo(tmp_path / "other.tsv", 1234, seed=6)
    o = Path(other.path).read_bytes().split(b"\n")
    s = Path(short.path).read_bytes().split(b"\n")
    assert sum(x != y for x, y in zip(o, s)) > 1200


def test_test_format_and_gzip(generated, tmp_path):
    t = synth_criteo(tmp_path / "test.tsv", 3000, seed=5, test_format=True)
    tdata = Path(t.path).read_bytes()
    parse_tsv(tdata, with_label=False)
    train_lines = generated["data"].split(b"\n")[:3000]
    assert tdata.split(b"\n")[:3000] == [x.split(b"\t", 1)[1] for x in train_lines]
    assert t.test_format and t.positive_rate == generated["rep"].labels[:3000].mean()

    g1 = synth_criteo(tmp_path / "a.tsv.gz", 3000, seed=5, chunk_rows=1000)
    g2 = synth_criteo(tmp_path / "b.tsv.gz", 3000, seed=5)
    raw = Path(g1.path).read_bytes()
    assert raw[:2] == b"\x1f\x8b" and g1.bytes == len(raw) < g1.text_bytes
    assert gzip.decompress(raw) == b"".join(x + b"\n" for x in train_lines)
    assert Path(g2.path).read_bytes() == raw  # no name or time in the header


def test_sidecar_round_trip(generated):
    rep = generated["rep"]
    doc = json.loads(Path(rep.path + ".synth.json").read_text())
    assert doc["report"]["bayes_auc"] == rep.bayes_auc and doc["report"]["rows"] == ROWS
    assert "probs" not in doc["report"]
    srep, cfg = read_sidecar(rep.path)
    assert cfg == criteo_config()
    assert srep.bias == rep.bias and srep.positive_rate == rep.positive_rate
    assert SynthConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_hex_mapping_is_a_bijection():
    rng = np.random.default_rng(0)
    ranks = rng.integers(0, 1 << 32, 2000)
    for field, seed in ((0, 0), (7, 1), (25, 123456789)):
        hexes = [hex_of(field, int(r), seed) for r in ranks]
        assert all(len(h) == 8 and h == h.lower() for h in hexes)
        assert [rank_of_hex(field, h, seed) for h in hexes[:200]] == ranks[:200].tolist()
        np.testing.assert_array_equal(ranks_of_hex_values(field, np.array([int(h, 16) for h in hexes]), seed), ranks)
    small = [hex_of(3, r, 0) for r in range(50_000)]
    assert len(set(small)) == 50_000
    assert hex_of(3, 0, 0) != hex_of(4, 0, 0) and hex_of(3, 0, 0) != hex_of(3, 0, 1)


def test_config_marginals_match_real_criteo():
    """The default config was fitted to the first 10k lines of Criteo Kaggle train.txt."""
    path = DATASETS / "criteo_kaggle_head10k" / "train_head10000.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    real = parse_tsv(path.read_bytes())
    cfg = criteo_config()
    for j, spec in enumerate(cfg.ints):
        assert abs((1 - real["int_present"][:, j].mean()) - spec.missing) < 0.01
    for c, spec in enumerate(cfg.cats):
        assert abs((1 - real["cat_present"][:, c].mean()) - spec.missing) < 0.01
    assert abs(real["labels"].mean() - cfg.hidden.positive_rate) < 0.05
    assert (real["ints"][:, 1] < 0).any()
    for c, spec in enumerate(cfg.cats):  # top-value frequency (the flat C7/C11/C13/C15 run ~2x high)
        v, cnt = np.unique(real["hexes"][real["cat_present"][:, c], c], return_counts=True)
        assert abs(cnt.max() / cnt.sum() - spec.head_pmf()[0]) < 0.02, f"C{c + 1}"
    lo = np.array([s.median for s in cfg.ints])
    real_median = [np.median(real["ints"][real["int_present"][:, j] & (real["ints"][:, j] > 0), j]) for j in range(NUM_INT)]
    np.testing.assert_allclose(real_median, lo, rtol=0.25)


def test_reader_reads_generated_file(generated):
    """Cross-check with the native reader when it is built (the plain parser above is the contract)."""
    reader = pytest.importorskip("mlfast.io.reader")
    d = reader.read_criteo(generated["rep"].path)
    assert d.num_rows == ROWS
    np.testing.assert_array_equal(d.labels, generated["rep"].labels.astype(np.float32))


def test_bucket_root_is_constant_on_fuxictr_buckets():
    from mlfast.io.hashing import fuxictr_int_bucket

    x = np.array([-3, -1, 0, 1, 2, 3, 4, 5, 20, 1000, 123456, 2**31 - 1])
    b = np.array([fuxictr_int_bucket(int(v)) for v in x], np.float64)
    np.testing.assert_array_equal(bucket_root(x), np.sign(b) * np.sqrt(np.abs(b)))
    assert bucket_root(np.array([1]))[0] == bucket_root(np.array([3]))[0] == bucket_root(np.array([4]))[0]
