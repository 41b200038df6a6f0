"""Plain-Python reference for the native reader (tests only): the same grammar, written plainly.

Every value goes through :mod:`mlfast.io.hashing` (the definition). Criteo is parsed from bytes with
``bytes.split``; Avazu and generic CSV through the ``csv`` module. Field grammar (what
``csrc/fields.hpp`` implements):

* label: exactly ``0`` or ``1``
* integer: ``[+-]?[0-9]+`` within int64 (non-digits are ``bad_integer`` before any overflow)
* Criteo categorical: ``[0-9a-fA-F]{1,8}``; empty = missing
* text categorical: any UTF-8; empty = missing
* float: ``[+-]?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)([eE][+-]?[0-9]+)?`` and finite
* Avazu hour: 8 digits YYMMDDHH, a real date in 20YY and an hour 00-23

A line is checked for its field count first, then field by field from the left; the first problem
is the line's reason.
"""
from __future__ import annotations

import csv
import datetime
import functools
import gzip
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mlfast.io import hashing

INT_RE = re.compile(rb"[+-]?[0-9]+")
HEX_RE = re.compile(rb"[0-9a-fA-F]{1,8}")
FLOAT_RE = re.compile(rb"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
HOUR_RE = re.compile(rb"[0-9]{8}")
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

CRITEO_INTS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATS = [f"C{i}" for i in range(1, 27)]
AVAZU_COLUMNS = ["id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


class BadLine(Exception):
    def __init__(self, line: int, field: str | None, reason: str):
        super().__init__(f"line {line}, field {field}: {reason}")
        self.line, self.field, self.reason = line, field, reason


class BadValue(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------
# One field


def parse_label(b: bytes) -> float:
    if b not in (b"0", b"1"):
        raise BadValue("bad_label")
    return float(b)


def parse_int(b: bytes) -> int:
    if not INT_RE.fullmatch(b):
        raise BadValue("bad_integer")
    x = int(b)
    if not INT64_MIN <= x <= INT64_MAX:
        raise BadValue("integer_overflow")
    return x


def parse_hex(b: bytes) -> int:
    if not HEX_RE.fullmatch(b):
        raise BadValue("bad_categorical")
    return hashing.hex_value(b.decode("ascii"))


def parse_text(b: bytes) -> int:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        raise BadValue("invalid_utf8") from None
    return hashing.text_value(b)


def parse_float(b: bytes) -> float:
    if not FLOAT_RE.fullmatch(b):
        raise BadValue("bad_float")
    x = float(b)
    if x != x or x in (float("inf"), float("-inf")):
        raise BadValue("bad_float")
    return x


def parse_hour(b: bytes) -> tuple[int, int, int]:
    if not HOUR_RE.fullmatch(b):
        raise BadValue("bad_hour")
    yy, mm, dd, hh = int(b[0:2]), int(b[2:4]), int(b[4:6]), int(b[6:8])
    try:
        day = datetime.date(2000 + yy, mm, dd)
    except ValueError:
        raise BadValue("bad_hour") from None
    if hh > 23:
        raise BadValue("bad_hour")
    wd = day.weekday()
    return hh, wd, int(wd >= 5)


@functools.lru_cache(maxsize=1 << 20)
def key(value_u64: int, seed: int, field_id: int) -> int:
    return hashing.hash_key(value_u64, seed, field_id)


# ------------------------------------------------------------------------------------------------
# Results


@dataclass
class Parsed:
    """Rows as the reference sees them: keys (None = missing) rather than ids."""

    field_names: list[str]
    field_ids: list[int]
    kinds: list[str]  # "int" / "cat" per field, for hashing.resolve_buckets
    dense_names: list[str]
    labels: list[float] | None
    dense: list[list[float]] = field(default_factory=list)  # float64, transformed; 0.0 where missing
    dense_missing: list[list[bool]] = field(default_factory=list)
    keys: list[list[int | None]] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def sparse(self, buckets: int | Sequence[int] | None = None) -> np.ndarray:
        """Global row ids, as hashing.row_id defines them."""
        b = hashing.resolve_buckets(buckets, self.kinds)
        offsets = hashing.field_offsets_for(b)
        out = np.empty((len(self.keys), len(self.field_names)), np.int64)
        for i, row in enumerate(self.keys):
            for f, k in enumerate(row):
                out[i, f] = hashing.row_id(k, f, offsets, b)
        return out

    def key_matrix(self) -> np.ndarray:
        """keys=True output: the key's bit pattern in int64, 0 = missing, a real 0 key -> 1."""
        out = np.empty((len(self.keys), len(self.field_names)), np.uint64)
        for i, row in enumerate(self.keys):
            for f, k in enumerate(row):
                out[i, f] = 0 if k is None else (k or 1)
        return out.view(np.int64)

    def dense_array(self) -> np.ndarray:
        return np.asarray(self.dense, np.float64).reshape(len(self.dense), len(self.dense_names)).astype(np.float32)

    def missing_array(self) -> np.ndarray:
        return np.asarray(self.dense_missing, bool).reshape(len(self.dense), len(self.dense_names))

    def label_array(self) -> np.ndarray | None:
        return None if self.labels is None else np.asarray(self.labels, np.float32)


def _read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _lines(data: bytes) -> list[tuple[int, bytes]]:
    """(1-based number, content without \\n or a trailing \\r) of every line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()  # the final newline ends the last line, it does not start another
    return [(i + 1, p[:-1] if p.endswith(b"\r") else p) for i, p in enumerate(parts)]


def _count_error(line_no: int, names: list[str], found: int) -> BadLine:
    return BadLine(line_no, names[found] if found < len(names) else names[-1], "field_count")


# ------------------------------------------------------------------------------------------------
# Criteo


def criteo(path, *, fmt: str = "auto", int_buckets: bool = True, seed: int = 0,
           on_bad_line: str = "error") -> Parsed:
    lines = _lines(_read_bytes(path))
    if fmt == "auto":
        first = next(line for _, line in lines if line)
        fmt = {40: "train", 39: "test"}[first.count(b"\t") + 1]
    label = fmt == "train"
    names = (["label"] if label else []) + CRITEO_INTS + CRITEO_CATS
    fields = (CRITEO_INTS if int_buckets else []) + CRITEO_CATS
    ids = (list(range(1, 14)) if int_buckets else []) + list(range(14, 40))
    out = Parsed(fields, ids, (["int"] * 13 if int_buckets else []) + ["cat"] * 26, list(CRITEO_INTS),
                 [] if label else None)
    seed &= hashing.MASK64
    for line_no, line in lines:
        if not line:
            out.skipped["blank_line"] += 1
            continue
        cells = line.split(b"\t")
        try:
            if len(cells) != len(names):
                raise _count_error(line_no, names, len(cells))
            row_label, dense, missing, keys = None, [], [], []
            for name, cell in zip(names, cells):
                try:
                    if name == "label":
                        row_label = parse_label(cell)
                    elif name.startswith("I"):
                        if cell == b"":
                            dense.append(0.0)
                            missing.append(True)
                            if int_buckets:
                                keys.append(None)
                        else:
                            x = parse_int(cell)
                            dense.append(hashing.signed_log1p(x))
                            missing.append(False)
                            if int_buckets:
                                keys.append(key(hashing.int_value(hashing.fuxictr_int_bucket(x)), seed, int(name[1:])))
                    else:
                        keys.append(None if cell == b"" else key(parse_hex(cell), seed, 13 + int(name[1:])))
                except BadValue as e:
                    raise BadLine(line_no, name, e.reason) from None
        except BadLine as e:
            if on_bad_line == "error":
                raise
            out.skipped[e.reason] += 1
            continue
        if label:
            out.labels.append(row_label)
        out.dense.append(dense)
        out.dense_missing.append(missing)
        out.keys.append(keys)
    return out


# ------------------------------------------------------------------------------------------------
# CSV formats (through the csv module)


def _csv_rows(path, delimiter: str) -> list[tuple[int, list[str]]]:
    text = _read_bytes(path).decode("utf-8")
    if text.startswith("\ufeff"):
        text = text[1:]
    rows = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=csv.QUOTE_NONE)
    for row in reader:
        rows.append((reader.line_num, row))
    return rows


def avazu(path, *, header: bool = True, seed: int = 0) -> Parsed:
    rows = _csv_rows(path, ",")
    if header:
        names = rows[0][1]
        rows = rows[1:]
    else:
        names = AVAZU_COLUMNS if len(rows[0][1]) == 24 else [c for c in AVAZU_COLUMNS if c != "click"]
    label = "click" in names
    fields, ids, kinds = [], [], []
    for name in names:
        if name == "hour":
            fields += ["hour", "weekday", "weekend"]
            ids += [101, 102, 103]
            kinds += ["int"] * 3
        elif name not in ("id", "click"):
            fields.append(name)
            ids.append(AVAZU_COLUMNS.index(name) + 1)
            kinds.append("cat")
    out = Parsed(fields, ids, kinds, [], [] if label else None)
    seed &= hashing.MASK64
    for line_no, cells in rows:
        if not cells:
            out.skipped["blank_line"] += 1
            continue
        assert len(cells) == len(names), f"line {line_no}"
        keys = []
        for name, cell in zip(names, cells):
            b = cell.encode("utf-8")
            if name == "click":
                out.labels.append(parse_label(b))
            elif name == "hour":
                for value, fid in zip(parse_hour(b), (101, 102, 103)):
                    keys.append(key(hashing.int_value(value), seed, fid))
            elif name != "id":
                keys.append(None if b == b"" else key(parse_text(b), seed, AVAZU_COLUMNS.index(name) + 1))
        out.dense.append([])
        out.dense_missing.append([])
        out.keys.append(keys)
    return out


def delimited(path, *, delimiter: str, header: bool, label, numeric: list, categorical: list,
              transform: str = "log", seed: int = 0) -> Parsed:
    rows = _csv_rows(path, delimiter)
    if header:
        names = rows[0][1]
        rows = rows[1:]
    else:
        names = [f"col{i}" for i in range(len(rows[0][1]))]

    def index(ref):
        return ref if isinstance(ref, int) else names.index(ref)

    li = None if label is None else index(label)
    num = [index(r) for r in numeric]
    cat = [index(r) for r in categorical]
    out = Parsed([names[i] for i in cat], [i + 1 for i in cat], ["cat"] * len(cat), [names[i] for i in num],
                 None if li is None else [])
    seed &= hashing.MASK64
    for line_no, cells in rows:
        if not cells:
            out.skipped["blank_line"] += 1
            continue
        assert len(cells) == len(names), f"line {line_no}"
        b = [c.encode("utf-8") for c in cells]
        if li is not None:
            out.labels.append(parse_label(b[li]))
        dense, missing = [], []
        for i in num:
            if b[i] == b"":
                dense.append(0.0)
                missing.append(True)
            else:
                x = parse_float(b[i])
                dense.append(hashing.signed_log1p(x) if transform == "log" else x)
                missing.append(False)
        out.dense.append(dense)
        out.dense_missing.append(missing)
        out.keys.append([None if b[i] == b"" else key(parse_text(b[i]), seed, i + 1) for i in cat])
    return out


# ------------------------------------------------------------------------------------------------
# Parquet / Arrow tables (values through to_pylist, one at a time)


@dataclass
class ParsedColumnar(Parsed):
    bag_names: list[str] = field(default_factory=list)
    bag_ids: list[int] = field(default_factory=list)
    bags: list[list[list[int | None]]] = field(default_factory=list)  # row -> bag field -> keys (None = missing)

    def bag_arrays(self, buckets: int | Sequence[int] | None = None, keys: bool = False):
        """[(offsets, values)] per bag field, ids as CTRData.bags holds them (fields after the one-hot ones)."""
        kinds = self.kinds + ["cat"] * len(self.bag_names)
        b = hashing.resolve_buckets(buckets, kinds)
        offsets = hashing.field_offsets_for(b)
        out = []
        for s in range(len(self.bag_names)):
            f = len(self.field_names) + s
            vals = [(0 if k is None else (k or 1)) if keys else hashing.row_id(k, f, offsets, b)
                    for row in self.bags for k in row[s]]
            lens = [len(row[s]) for row in self.bags]
            out.append((np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                        np.asarray(vals, np.uint64 if keys else np.int64).view(np.int64)))
        return out


def _float32_text(x: float) -> float:
    """A float32 as the double its shortest decimal text reads back as (numpy prints the shortest)."""
    return float(str(np.float32(x)))


def _cell_value(v, arrow_type) -> bytes | None:
    """A categorical value's text as the CSV of the table holds it (None = missing)."""
    import pyarrow as pa

    if v is None:
        return None
    if isinstance(v, bool):
        return b"true" if v else b"false"
    if isinstance(v, int):
        return str(v).encode()
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    raise TypeError(f"no reference text for {v!r} of {arrow_type}")


def columnar(table, *, label, numeric: list, categorical: list, sequence: list = (), separator: str = "^",
             transform: str = "log", seed: int = 0, on_bad_line: str = "error") -> ParsedColumnar:
    """A pyarrow Table read as mlfast.io.arrow documents it, value by value (float32 columns must
    keep their type: their values arrive here widened)."""
    import pyarrow as pa

    names = table.column_names
    cols = {n: table.column(n).to_pylist() for n in names}
    types = {n: table.schema.field(n).type for n in names}
    seed &= hashing.MASK64
    out = ParsedColumnar(list(categorical), [names.index(c) + 1 for c in categorical], ["cat"] * len(categorical),
                         list(numeric), None if label is None else [], bag_names=list(sequence),
                         bag_ids=[names.index(c) + 1 for c in sequence])
    order = sorted({names.index(c) for c in [label, *numeric, *categorical, *sequence] if c is not None})

    def text_key(b: bytes, col: str) -> int:
        return key(parse_text(b), seed, names.index(col) + 1)

    def bag(v, col) -> list[int | None]:
        if v is None:
            return [None]
        if isinstance(v, list):
            if not v or (len(v) == 1 and v[0] in (None, "", b"")):  # as the joined cell: empty
                return [None]
            keys = []
            for x in v:
                b = _cell_value(x, types[col])
                if b is None or b == b"":
                    raise BadValue("bad_sequence")
                keys.append(text_key(b, col))
            return keys
        b = _cell_value(v, types[col])
        if b == b"":
            return [None]
        parts = b.split(separator.encode())
        if any(p == b"" for p in parts):
            raise BadValue("bad_sequence")
        return [text_key(p, col) for p in parts]

    for r in range(table.num_rows):
        row_label, dense, missing, keys, bags = None, {}, {}, {}, {}
        try:
            for c in order:
                col = names[c]
                v = cols[col][r]
                try:
                    if col == label:
                        if isinstance(v, (bytes, str)):
                            row_label = parse_label(v.encode() if isinstance(v, str) else v)
                        elif v is not None and v in (0, 1):  # bool, int or float (NaN is neither)
                            row_label = float(v)
                        else:
                            raise BadValue("bad_label")
                    elif col in numeric:
                        if v is None or v in (b"", ""):
                            dense[col], missing[col] = 0.0, True
                            continue
                        if isinstance(v, (bytes, str)):
                            x = parse_float(v.encode() if isinstance(v, str) else v)
                        elif isinstance(v, float):
                            if v != v or v in (float("inf"), float("-inf")):
                                raise BadValue("bad_float")
                            x = _float32_text(v) if pa.types.is_float32(types[col]) else v
                        else:
                            x = float(v)
                        dense[col] = hashing.signed_log1p(x) if transform == "log" else x
                        missing[col] = False
                    elif col in categorical:
                        b = _cell_value(v, types[col])
                        keys[col] = None if b is None or b == b"" else text_key(b, col)
                    else:
                        bags[col] = bag(v, col)
                except BadValue as e:
                    raise BadLine(r + 1, col, e.reason) from None
        except BadLine as e:
            if on_bad_line == "error":
                raise
            out.skipped[e.reason] += 1
            continue
        if label is not None:
            out.labels.append(row_label)
        out.dense.append([dense[c] for c in numeric])
        out.dense_missing.append([missing[c] for c in numeric])
        out.keys.append([keys[c] for c in categorical])
        out.bags.append([bags[c] for c in sequence])
    return out
