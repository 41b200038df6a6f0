"""Fuzz target of the readers' Python entry points (Criteo, Avazu, delimited; gzip; error and skip
modes; whole, chunked and cached; one thread and several), checked against each other and, for
plain Criteo input, against the plain-Python reference reader.

An input is two bytes of configuration followed by the file's bytes (see ``Case``); seeds are
made at run time from the heads of the real samples in ../shared/datasets_raw (never copied into
the repository). The oracle, for every input:

* no crash, no hang (a per-input alarm / libFuzzer's -timeout);
* the file parses, or raises ParseError (line >= 1, a known reason, a known column) or
  CorruptInputError (naming the file); nothing else, except a ValueError while telling the layout
  from the first line (too few columns for the schema, an empty file, a bad header);
* error mode succeeds  <=> skip mode skips nothing but blank lines, with the same arrays;
  error mode corrupt   <=> skip mode corrupt; error mode ParseError => skip mode succeeds;
* skip mode: the chunks' arrays concatenate to the whole read's and their counts add up to its;
  the cached read (miss, then hit) equals the uncached one; 1 and 3 threads agree;
* plain Criteo: the arrays and counts equal tests/reference_reader.py's.

Engines: ``--engine atheris`` (libFuzzer through atheris, coverage of the Python side; pip install
atheris) or ``--engine random`` (a seeded mutator of the seeds, no dependency; what the sanitizer
run uses). Bounded by ``--runs`` and/or ``--seconds``. Examples::

    python tests/fuzz/fuzz_reader.py --engine random --runs 2000 --seed 1
    python tests/fuzz/fuzz_reader.py --engine atheris --seconds 3600 --corpus /tmp/mlfast-corpus
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # reference_reader
DATA = HERE.parents[2] / "shared" / "datasets_raw"
# Samples held out of all development use: never read, not even as fuzz seeds.
HELD_OUT = ("criteo_kaggle_3idiots_samples", "criteo_1tb_day0_head1000")
SEED_FILES = ["criteo_kaggle_head10k/train_head10000.txt", "paddlerec_criteo_tiny/part-0.txt",
              "avazu_head10k/avazu_train_head10k.csv", "avazu_head10k/test_part_1000_noheader.csv",
              "taobao_ad_tiny_fuxictr/train_sample.csv", "deepctr_samples/criteo_sample.txt"]
FORMATS = ("criteo", "avazu", "delimited")
CHUNKS = (1, 64, 300, 4096)
LAYOUT_ERRORS = ("out of range", "empty file", "no data lines", "not a valid quoted line", "not valid UTF-8",
                 "is not an Avazu header")
STATS = {"inputs": 0, "parsed": 0, "parse_error": 0, "corrupt": 0, "layout_rejected": 0, "gzip": 0}


class Case:
    """Byte 0: format (criteo / avazu / delimited); byte 1: bit 0 gzip the content, bits 1-2 chunk
    size, bit 3 1000 buckets, bit 4 keys, bit 5 damage the gzip stream (byte 2: truncate or flip,
    bytes 3-4: where), bit 6 no quoting (delimited). The rest is the file (before gzip)."""

    def __init__(self, data: bytes):
        a = data[0] if len(data) > 0 else 0
        b = data[1] if len(data) > 1 else 0
        self.format = FORMATS[a % 3]
        self.gzip = bool(b & 1)
        self.chunk = CHUNKS[(b >> 1) & 3]
        self.buckets = 1000 if b & 8 else None
        self.keys = bool(b & 16)
        self.damage = bool(b & 32) and self.gzip
        self.quote = None if b & 64 else '"'
        body = data[2:]
        if self.damage:
            self.op, self.where, body = (body[:1] or b"\0")[0], int.from_bytes(body[1:3].ljust(2, b"\0"), "little"), body[3:]
        self.body = body

    def file_bytes(self) -> bytes:
        if not self.gzip:
            return self.body
        z = bytearray(gzip.compress(self.body, compresslevel=1, mtime=0))
        if self.damage:
            pos = self.where % len(z)
            if self.op & 1:
                z[pos] ^= 1 << (self.op >> 1) % 8
            else:
                del z[max(pos, 2):]
        return bytes(z)


def encode(fmt: str, content: bytes, flags: int = 0, damage: bytes = b"") -> bytes:
    return bytes([FORMATS.index(fmt), flags]) + damage + content


def seeds(max_bytes: int = 3000) -> list[bytes]:
    """Inputs made from the heads of the real samples (whole lines up to max_bytes)."""
    out = []
    for rel in SEED_FILES:
        path = DATA / rel
        if not path.exists() or any(h in rel for h in HELD_OUT):
            continue
        head = path.read_bytes()[:max_bytes]
        head = head[: head.rfind(b"\n") + 1] or head
        fmt = "criteo" if "criteo" in rel else "avazu" if "avazu" in rel else "delimited"
        if rel.startswith("deepctr"):
            fmt = "delimited"  # a CSV with a header, not the Criteo TSV layout
        for flags in (0, 1, 1 | 32, 2 | 8, 4 | 16 | 1, 64):
            damage = b"\x01\x40\x00" if flags & 32 else b""
            out.append(encode(fmt, head, flags, damage))
        out.append(encode(fmt, head[: len(head) // 2], 6))
    if not out:
        raise SystemExit(f"no seed files under {DATA}")
    return out


def native_seeds(max_lines: int = 25) -> list[bytes]:
    """Seeds of tests/fuzz/fuzz_native.cpp (mode byte, flags byte, body): Criteo heads (mode 0),
    Avazu heads cut to its 8-column spec (mode 1), Taobao cut to its 5-column quoted spec with the
    click history as the bag (mode 2), each plain and gzip; and Arrow column descriptions (mode 3)."""
    def head(rel: str) -> list[bytes]:
        return (DATA / rel).read_bytes().split(b"\n")[:max_lines]

    bodies = []
    bodies.append((0, b"\n".join(head("criteo_kaggle_head10k/train_head10000.txt")) + b"\n"))
    bodies.append((0, b"\n".join(head("paddlerec_criteo_tiny/part-0.txt")) + b"\n"))
    av = [line.split(b",") for line in head("avazu_head10k/avazu_train_head10k.csv")[1:]]
    bodies.append((1, b"\n".join(b",".join(c[:3] + c[5:10]) for c in av if len(c) == 24) + b"\n"))
    tb = [line.split(b",") for line in head("taobao_ad_tiny_fuxictr/train_sample.csv")[1:]]
    rows = [b",".join([c[0], c[9], c[2], b'"' + c[4] + b'"', c[18]]) for c in tb if len(c) == 19]
    bodies.append((2, b"\n".join(rows) + b"\n"))
    out = []
    for mode, body in bodies:
        for flags in (0, 1, 2, 4, 0x35):
            out.append(bytes([mode, flags]) + body)
        out.append(bytes([mode, 0]) + gzip.compress(body, compresslevel=1, mtime=0))
    rng = random.Random(7)
    for k in range(24):
        out.append(bytes([3, rng.randrange(256)]) + bytes(rng.randrange(256) for _ in range(rng.randrange(40, 400))))
    return out


# ------------------------------------------------------------------------------------------------
# The oracle


class Checker:
    def __init__(self, workdir: Path):
        from mlfast.io import reader

        self.reader = reader
        self.work = workdir
        reader.MIN_RANGE_BYTES = 64  # several threads on small inputs

    def read(self, case: Case, path: Path, **kw):
        r = self.reader
        common = dict(hash_buckets=case.buckets, keys=case.keys, **kw)
        if case.format == "criteo":
            return r.read_criteo(path, format="train", **common)
        if case.format == "avazu":
            return r.read_avazu(path, format="train", header=False, **common)
        return r.read_delimited(path, self.schema(case), **common)

    def chunks(self, case: Case, path: Path, **kw):
        r = self.reader
        common = dict(hash_buckets=case.buckets, keys=case.keys, chunk_bytes=case.chunk, **kw)
        if case.format == "criteo":
            return list(r.iter_criteo_chunks(path, format="train", **common))
        if case.format == "avazu":
            return list(r.iter_avazu_chunks(path, format="train", header=False, **common))
        return list(r.iter_delimited_chunks(path, self.schema(case), **common))

    def schema(self, case: Case):
        return self.reader.DelimitedSchema(header=False, label=0, numeric=[1], categorical=[2, 3], sequence=[4],
                                           quote=case.quote)

    def outcome(self, fn):
        """("ok", value) | ("parse", error) | ("corrupt", error) | ("layout", error)."""
        r = self.reader
        try:
            return "ok", fn()
        except r.CorruptInputError as e:
            assert e.path, e
            return "corrupt", e
        except r.ParseError as e:
            assert e.line >= 1 and e.reason in r.REASONS and e.reason != "blank_line", e
            assert isinstance(e.text, bytes) and e.field, e
            return "parse", e
        except ValueError as e:
            if any(m in str(e) for m in LAYOUT_ERRORS):
                return "layout", e
            raise

    def check(self, data: bytes) -> None:
        case = Case(data)
        STATS["inputs"] += 1
        STATS["gzip"] += case.gzip
        content = case.file_bytes()
        if not content:
            return
        path = self.work / ("in.gz" if case.gzip else "in.txt")
        path.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "every data line is bad": expected on fuzz input
            self._check(case, path)

    def _check(self, case: Case, path: Path) -> None:
        kind_e, err = self.outcome(lambda: self.read(case, path, cache=False, num_threads=2))
        if kind_e == "layout":
            STATS["layout_rejected"] += 1
            return
        kind_s, skip = self.outcome(lambda: self.read(case, path, on_bad_line="skip", cache=False, num_threads=1))
        STATS[{"ok": "parsed", "parse": "parse_error", "corrupt": "corrupt"}[kind_e]] += 1
        if kind_e == "corrupt" or kind_s == "corrupt":
            assert kind_e == kind_s == "corrupt", (kind_e, kind_s, err, skip)
            kind_c, _ = self.outcome(lambda: self.chunks(case, path, on_bad_line="skip"))
            assert kind_c == "corrupt", kind_c
            return
        assert kind_s == "ok", (kind_s, skip)
        if kind_e == "ok":
            assert set(skip.skipped) <= {"blank_line"}, skip.skipped
            same(err, skip)
        else:
            assert sum(v for k, v in skip.skipped.items() if k != "blank_line") >= 1
            kind_c, chunk_err = self.outcome(lambda: self.chunks(case, path))
            assert kind_c == "parse" and (chunk_err.line, chunk_err.field, chunk_err.reason) == \
                (err.line, err.field, err.reason), (chunk_err, err)
        three = self.read(case, path, on_bad_line="skip", cache=False, num_threads=3)
        same(skip, three)
        chunks = self.chunks(case, path, on_bad_line="skip", num_threads=2)
        total: dict[str, int] = {}
        for c in chunks:
            for k, v in c.skipped.items():
                total[k] = total.get(k, 0) + v
        assert total == skip.skipped, (total, skip.skipped)
        assert all(len(c) > 0 for c in chunks[:-1])
        if chunks:
            np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), skip.sparse)
            np.testing.assert_array_equal(np.concatenate([c.dense for c in chunks]), skip.dense)
            for s, bag in enumerate(skip.bags):
                np.testing.assert_array_equal(np.concatenate([c.bags[s].values for c in chunks]), bag.values)
        else:
            assert len(skip) == 0
        cache_dir = self.work / "cache"
        miss = self.read(case, path, on_bad_line="skip", cache_dir=cache_dir)
        hit = self.read(case, path, on_bad_line="skip", cache_dir=cache_dir)
        assert hit.meta["cache"]["status"] == "hit", hit.meta["cache"]
        same(skip, miss)
        same(skip, hit)
        del miss, hit
        shutil.rmtree(cache_dir, ignore_errors=True)
        if case.format == "criteo" and not case.gzip and not case.keys:
            import reference_reader as ref

            r = ref.criteo(path, fmt="train", on_bad_line="skip")
            assert dict(r.skipped) == skip.skipped, (dict(r.skipped), skip.skipped)
            np.testing.assert_array_equal(skip.sparse, r.sparse(case.buckets if case.buckets else None))
            np.testing.assert_array_equal(skip.dense, r.dense_array())


def same(a, b) -> None:
    for name in ("labels", "dense", "dense_missing", "sparse"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape and x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.skipped == b.skipped, (a.skipped, b.skipped)
    for s, (x, y) in enumerate(zip(a.bags, b.bags)):
        np.testing.assert_array_equal(x.offsets, y.offsets, err_msg=f"bag {s}")
        np.testing.assert_array_equal(x.values, y.values, err_msg=f"bag {s}")


# ------------------------------------------------------------------------------------------------
# Engines

SPECIAL = [b"\t", b"\n", b",", b"\r\n", b'"', b'""', b"^", b"^^", b"\xff", b"\xc3\x28", b"\xef\xbb\xbf", b"-",
           b"99999999999999999999", b"1e999", b"nan", b"2", b"", b"\x00", b"14102100", b"14023000"]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """A seeded structure-aware mutation: byte flips, special tokens, line splices and cuts."""
    d = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(8)
        pos = rng.randrange(len(d) + 1) if d else 0
        if op == 0 and len(d) > 2:
            d[max(pos - 1, 2)] ^= 1 << rng.randrange(8)
        elif op == 1:
            d[max(pos, 2):max(pos, 2)] = rng.choice(SPECIAL)
        elif op == 2 and len(d) > 3:
            del d[max(pos, 2):max(pos, 2) + rng.randint(1, 16)]
        elif op == 3:  # splice lines of another input
            other = rng.choice(pool)[2:]
            lines = other.split(b"\n")
            k = rng.randrange(len(lines))
            d[max(pos, 2):max(pos, 2)] = b"\n".join(lines[k:k + rng.randint(1, 4)]) + b"\n"
        elif op == 4 and len(d) > 2:
            d[0] = rng.randrange(256)
        elif op == 5 and len(d) > 2:
            d[1] = rng.randrange(256)
        elif op == 6 and len(d) > 2:
            del d[rng.randrange(2, len(d) + 1):]  # cut the end (no final newline, a short file)
        else:  # duplicate a line
            lines = bytes(d[2:]).split(b"\n")
            k = rng.randrange(len(lines))
            lines.insert(k, lines[k])
            d[2:] = b"\n".join(lines)
    return bytes(d[:8192])


def run_random(checker: Checker, runs: int | None, seconds: float | None, seed: int, timeout: int) -> None:
    rng = random.Random(seed)
    pool = seeds()
    start = time.monotonic()
    n = 0

    def on_alarm(signum, frame):
        raise TimeoutError(f"an input took more than {timeout} s (a hang?)")

    signal.signal(signal.SIGALRM, on_alarm)
    for s in pool:  # every seed as it is first
        signal.alarm(timeout)
        checker.check(s)
        signal.alarm(0)
    while (runs is None or n < runs) and (seconds is None or time.monotonic() - start < seconds):
        data = mutate(rng, rng.choice(pool), pool)
        signal.alarm(timeout)
        try:
            checker.check(data)
        except BaseException:
            crash = Path(tempfile.gettempdir()) / f"mlfast-fuzz-crash-{seed}-{n}"
            crash.write_bytes(data)
            print(f"input {n} failed; saved to {crash} (replay: {sys.argv[0]} --replay {crash})", file=sys.stderr)
            raise
        finally:
            signal.alarm(0)
        if rng.random() < 0.05:
            pool.append(data)  # keep some mutants to mutate further
        n += 1


def run_atheris(checker: Checker, runs: int | None, seconds: float | None, corpus: str | None, timeout: int,
                extra: list[str]) -> None:
    import atheris

    corpus_dir = Path(corpus) if corpus else Path(tempfile.mkdtemp(prefix="mlfast-corpus-"))
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(seeds()):
        (corpus_dir / f"seed-{k:03d}").write_bytes(s)
    argv = [sys.argv[0], str(corpus_dir), f"-timeout={timeout}", "-max_len=8192", "-len_control=0",
            "-rss_limit_mb=4096", "-print_final_stats=1"]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seconds is not None:
        argv.append(f"-max_total_time={int(seconds)}")
    atheris.Setup(argv + extra, checker.check)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", choices=["atheris", "random"], default="random")
    ap.add_argument("--runs", type=int, default=None, help="inputs to try (after the seeds)")
    ap.add_argument("--seconds", type=float, default=None, help="stop after this long")
    ap.add_argument("--seed", type=int, default=0, help="the random engine's seed")
    ap.add_argument("--timeout", type=int, default=20, help="seconds one input may take")
    ap.add_argument("--corpus", help="atheris: corpus directory (kept; seeds are added to it)")
    ap.add_argument("--replay", help="check one saved input and exit")
    ap.add_argument("--write-native-seeds", metavar="DIR", help="write tests/fuzz/fuzz_native.cpp's seeds to DIR "
                                                                "and exit")
    args, extra = ap.parse_known_args()
    if args.write_native_seeds:
        out = Path(args.write_native_seeds)
        out.mkdir(parents=True, exist_ok=True)
        for k, data in enumerate(native_seeds()):
            (out / f"seed-{k:03d}").write_bytes(data)
        print(f"wrote {k + 1} seeds to {out}")
        return 0
    if args.runs is None and args.seconds is None and not args.replay:
        args.runs = 1000
    work = Path(tempfile.mkdtemp(prefix="mlfast-fuzz-"))
    os.environ["MLFAST_CACHE_DIR"] = str(work / "default-cache")
    try:
        if args.engine == "atheris" and not args.replay:
            import atheris

            # Coverage of mlfast's Python (the editable install imports it through its own
            # loader, which atheris must not replace to see into).
            with atheris.instrument_imports(include=["mlfast", "reference_reader"], enable_loader_override=False):
                import reference_reader  # noqa: F401
                import mlfast.io.arrow  # noqa: F401
                checker = Checker(work)
            run_atheris(checker, args.runs, args.seconds, args.corpus, args.timeout, extra)
            return 0
        checker = Checker(work)
        start = time.monotonic()
        if args.replay:
            checker.check(Path(args.replay).read_bytes())
        else:
            run_random(checker, args.runs, args.seconds, args.seed, args.timeout)
        took = time.monotonic() - start
        print(f"fuzz_reader: {STATS['inputs']} inputs in {took:.1f} s ({STATS['inputs'] / max(took, 1e-9):.0f}/s): "
              + ", ".join(f"{k} {v}" for k, v in STATS.items() if k != "inputs"))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
