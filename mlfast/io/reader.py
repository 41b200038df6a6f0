"""Read raw click logs (Criteo, Avazu, any delimited text) into :class:`mlfast.io.data.CTRData`.

One native, schema-driven parser (``csrc/reader.cpp``) does the work: a line is split on one
delimiter byte into columns and each column has a kind (label, integer, hex categorical, text
categorical, float, Avazu hour, ignored). Criteo, Avazu and generic logs are configurations of it,
built here. Every categorical value is hashed as :mod:`mlfast.io.hashing` documents and lands in one
flat table: ``sparse[i, f] = field_offsets[f] + 1 + key % buckets[f]``, ``field_offsets[f]`` when
the value is missing (empty).

* Input streams through blocks of ``chunk_bytes`` (whole lines; gzip is read directly), so a file
  of any size can be parsed; ``iter_*_chunks`` yield one CTRData per block.
* Parsing runs on ``num_threads`` threads with the GIL released; the arrays are the parser's own
  buffers, handed to numpy without a copy.
* ``read_*`` keep a verified binary cache of the result (:mod:`mlfast.io.cache`): later calls
  return memory-mapped arrays.
* A bad line raises :class:`ParseError` (file, line, field, what was found and expected), or with
  ``on_bad_line="skip"`` is dropped and counted in ``CTRData.skipped`` under a stable reason:
  ``field_count, bad_integer, integer_overflow, bad_categorical, bad_label, bad_float, bad_hour,
  invalid_utf8, bad_sequence, bad_quote`` (and ``blank_line``, which is never an error). The counts
  of ``iter_*_chunks`` add up to those of the whole-file read for every chunk size: a chunk has
  rows, except a last one that carries only the counts of bad or blank lines at the end. A file
  whose data lines are all bad gives, in skip mode, an empty result (no rows; every line in
  ``skipped``; ``iter_*_chunks`` yields that one row-less chunk) and a ``UserWarning`` saying so.
* Damaged compressed input (a gzip file truncated, or with any byte of its header, deflate data,
  CRC or length trailer changed, or followed by bytes that are neither another member nor zero
  padding) raises :class:`CorruptInputError` naming the file, the compressed byte offset where
  decoding stopped and the decompressed line it was in, whether the damage is found while
  telling the format, while parsing, or after garbage it decoded to failed to parse (a parse
  error in a gzip file is reported as corruption when the next 256 MiB of the stream is damaged).
  A file counts as gzip by its first two bytes (1f 8b), whatever its name: one whose magic itself
  is damaged is read as text (and fails to parse as such).
* Generic logs may have multi-hot columns (``DelimitedSchema.sequence``, e.g. a click history
  ``170301^573514``): each becomes a :class:`mlfast.io.data.BagField` in ``CTRData.bags``.
* Every row knows where it came from: ``CTRData.lines[i]`` is its 1-based line number in the file
  (in the decompressed text of a gzip file; the header, blank and skipped lines counted), written by
  the parsing threads as they keep the row. With ``id_column=`` (a header name, or a 0-based column
  index; Criteo and Avazu columns by their names too, e.g. Avazu's ``"id"``) ``CTRData.ids`` holds
  that column's raw value for every kept row, as text (:class:`mlfast.io.data.TextColumn`): the
  bytes as they are in the file, a quoted value unquoted, never parsed or checked (invalid UTF-8
  decodes as U+FFFD). Either joins predictions back to the input when bad lines were skipped.

Line endings may be ``\\n`` or ``\\r\\n``; the last line may lack its newline; a UTF-8 byte-order mark
at the start of the file is ignored. Generic logs may quote fields as CSV files from pandas or Excel
do (``DelimitedSchema.quote``, ``"`` by default): a field whose first byte is the quote char runs to
the matching closing quote, ``""`` inside standing for one quote (``1,"New York, NY","a ""b"" c"``),
and its value is what lies between; the closing quote must be followed by the delimiter or the line
end, else the line is bad (``bad_quote``, as is a quote never closed: a quoted field cannot span
lines). A field not starting with the quote char is taken as it is (a quote inside it is just a
byte). Criteo and Avazu logs are never quoted: there a delimiter always ends a field.

Example::

    >>> from mlfast.io.reader import read_criteo
    >>> d = read_criteo("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt", cache=False)
    >>> d.sparse.shape, d.dense.shape, d.field_names[13]
    ((10000, 39), (10000, 13), 'C1')
"""
from __future__ import annotations

import contextvars
import errno
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from mlfast import _native
from mlfast.io import cache as _cache
from mlfast.io import hashing
from mlfast.io.data import BagField, CTRData, TextColumn

__all__ = [
    "read_on_disk",
    "ParseError",
    "CorruptInputError",
    "DelimitedSchema",
    "read",
    "read_criteo",
    "read_avazu",
    "read_delimited",
    "iter_criteo_chunks",
    "iter_read",
    "iter_avazu_chunks",
    "iter_delimited_chunks",
    "release_memory",
    "REASONS",
]

DEFAULT_CHUNK_BYTES = 64 << 20
# Smallest share of a block worth a thread of its own (tests lower it to split small files).
MIN_RANGE_BYTES = 256 << 10
# Hash four fields at a time with AVX-512 where the CPU has it (tests turn it off to check the
# scalar path gives the same ids).
VECTOR_HASH = True
# Format version of what the readers produce; part of every cache key.
READER_VERSION = 1

REASONS: tuple[str, ...] = tuple(_native.REASONS)

CRITEO_INT_NAMES = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT_NAMES = tuple(f"C{i}" for i in range(1, 27))
AVAZU_COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)
AVAZU_HOUR_FIELD_IDS = {"hour": 101, "weekday": 102, "weekend": 103}

_EXPECTED = {
    "bad_label": "a label: 0 or 1",
    "bad_integer": "an integer: optional sign and decimal digits (empty = missing)",
    "integer_overflow": "an integer in the int64 range [-2^63, 2^63 - 1]",
    "bad_categorical": "1-8 hex digits (empty = missing)",
    "bad_float": "a finite decimal number such as 3.5 or -2e-3 (empty = missing)",
    "bad_hour": "an hour YYMMDDHH: 8 digits forming a valid date (20YY) and hour 00-23",
    "invalid_utf8": "valid UTF-8 text",
    "bad_sequence": "values separated by the sequence separator, none of them empty (an empty cell = missing)",
    "bad_quote": "a quoted field closed by a quote followed by the delimiter or the line end "
                 "(\"\" inside for a quote; a quoted field cannot span lines)",
}


class ParseError(ValueError):
    """A line of the input is not what the format says.

    Attributes: ``path``, ``line`` (1-based), ``field`` (column name, e.g. ``"C7"``; for a wrong
    field count the first missing column, or the last one when there are extra fields),
    ``reason`` (one of :data:`REASONS`) and ``text`` (the offending bytes).
    """

    def __init__(self, path: str, line: int, field: str | None, reason: str, text: bytes, message: str):
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field
        self.reason = reason
        self.text = text


class CorruptInputError(ValueError):
    """Compressed input (gzip) or columnar input (Parquet, Arrow) that is damaged or truncated.

    Attributes: ``path``; ``offset``, the byte offset in the compressed file where decoding
    stopped; ``decompressed``, the bytes decoded cleanly before it; ``line``, the 1-based line of
    the decompressed text the damage fell in (each None where unknown, e.g. for Parquet).
    """

    def __init__(self, message: str, path: str, offset: int | None = None, decompressed: int | None = None,
                 line: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.decompressed = decompressed
        self.line = line


def _corrupt(e: BaseException, path: str) -> CorruptInputError:
    """A native CorruptInput as the public error."""
    message, where, offset, decompressed, line = e.args
    return CorruptInputError(message, where or path, offset, decompressed, line)


@dataclass
class DelimitedSchema:
    """How to read a generic delimited log with :func:`read_delimited`.

    Columns are named by header name (``header=True``) or 0-based index. ``numeric`` columns are
    parsed as decimals, transformed (``numeric_transform``: ``"log"`` = :func:`hashing.signed_log1p`,
    or ``"none"``) and become ``dense`` (missing -> 0 with the mask set); ``categorical`` columns
    are hashed as text (``fnv1a64`` of their UTF-8 bytes) into sparse fields, in the order listed;
    ``sequence`` columns hold lists of values separated by ``sequence_separator`` (FuxiCTR's
    sequence features, e.g. a click history ``170301^573514``): each value is hashed as a
    categorical of that column and the column becomes a multi-hot bag field (``CTRData.bags``,
    after the categorical fields); an empty cell is a bag holding the field's missing row, an
    empty value inside a list (``a^^b``) is a bad line (``bad_sequence``); ``sequence_max_len``
    keeps each list's last N values (the most recent, for a history listed oldest first). The label must be
    ``0``/``1``; other columns are ignored. A field's hash id is its 1-based column number.

    ``quote`` (one ASCII character other than a line break, the delimiter and the sequence
    separator; ``None`` or ``""``: no quoting) quotes fields as RFC 4180 does, the header too: a
    field whose first byte is the quote runs to the matching closing quote, ``""`` inside standing
    for one quote, and every column kind reads the unquoted value (``"New York, NY"`` is one text
    value, ``"1^2"`` a list of two, ``""`` an empty, missing value). The closing quote must be
    followed by the delimiter or the line end, else the line is bad (``bad_quote``, as is a quote
    that is never closed: a quoted field cannot span lines). A field not starting with the quote
    is taken as it is, quotes inside it included.

    Example::

        >>> s = DelimitedSchema(delimiter=",", label="clk", numeric=["price"], categorical=["userid", "pid"],
        ...                     sequence=["click_sequence"])
    """

    delimiter: str = ","
    header: bool = True
    label: str | int | None = None
    numeric: list[str | int] = field(default_factory=list)
    categorical: list[str | int] = field(default_factory=list)
    numeric_transform: str = "log"
    sequence: list[str | int] = field(default_factory=list)
    sequence_separator: str = "^"
    sequence_max_len: int | None = None
    quote: str | None = '"'


# ------------------------------------------------------------------------------------------------
# Layout: the resolved configuration of one read


@dataclass
class _Layout:
    format: str
    spec: dict[str, Any]  # for _native.Reader (without threads / block size)
    field_names: list[str]
    dense_names: list[str]
    field_offsets: np.ndarray
    expected: str  # what a line must look like, for error messages
    config: dict[str, Any]  # everything the parsed output depends on (the cache keys on it)
    bag_max_len: int | None = None  # applied to the parsed (or cached) bags, so not in config
    id_name: str | None = None  # the id column's name (CTRData.ids.name), None: no id column
    id_plan: Any = None  # Parquet / Arrow: how to turn the id column into text (mlfast.io.arrow._id_plan)


def _layout(fmt: str, *, delimiter: str, header: bool, columns: list[tuple], field_names: list[str],
            field_ids: list[int], kinds: list[str], dense_names: list[str], hash_buckets, hash_seed: int,
            keys: bool, on_bad_line: str, expected: str, extra: dict[str, Any], num_bags: int = 0,
            bag_separator: str = "^", bag_max_len: int | None = None, quote: str | None = None) -> _Layout:
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if not isinstance(hash_seed, (int, np.integer)):
        raise TypeError(f"hash_seed must be an int, got {type(hash_seed).__name__}")
    buckets = hashing.resolve_buckets(hash_buckets, kinds)
    if sum(b + 1 for b in buckets) >= 1 << 63:  # Python ints: int64 offsets must not wrap
        raise ValueError(f"hash_buckets add up to a table of 2^63 rows or more: {buckets[:4]}...")
    offsets = np.zeros(len(buckets) + 1, np.int64) if keys else hashing.field_offsets_for(buckets)
    seed = int(hash_seed) & hashing.MASK64
    spec = {
        "delimiter": delimiter,
        "header": bool(header),
        "columns": columns,
        "num_dense": len(dense_names),
        "has_label": any(c[0] == "label" for c in columns),
        "field_ids": [int(i) for i in field_ids],
        "buckets": buckets,
        "offsets": [int(x) for x in offsets],
        "seed": seed,
        "keys": bool(keys),
        "skip_bad": on_bad_line == "skip",
        "num_bags": int(num_bags),
        "bag_separator": bag_separator,
    }
    if quote:  # Criteo and Avazu never quote: their specs have no quote
        spec["quote"] = quote
    config = {
        "reader_version": READER_VERSION,
        "format": fmt,
        "delimiter": delimiter,
        "header": bool(header),
        "columns": [list(c) for c in columns],
        "field_names": list(field_names),
        "dense_names": list(dense_names),
        "field_ids": spec["field_ids"],
        "hash_buckets": buckets,
        "hash_seed": seed,
        "keys": bool(keys),
        "on_bad_line": on_bad_line,
        **extra,
    }
    if num_bags:  # cache keys of logs without bags stay as they were
        config.update(num_bags=int(num_bags), bag_separator=bag_separator)
    return _Layout(fmt, spec, list(field_names), list(dense_names), offsets, expected, config, bag_max_len)


def _criteo_layout(fmt: str, int_buckets: bool, hash_buckets, hash_seed, keys, on_bad_line) -> _Layout:
    label = fmt == "train"
    columns: list[tuple] = [("label", "label", -1, -1, False)] if label else []
    first_cat = 13 if int_buckets else 0
    for i, name in enumerate(CRITEO_INT_NAMES):
        columns.append(("int", name, i, i if int_buckets else -1, True))
    for j, name in enumerate(CRITEO_CAT_NAMES):
        columns.append(("hex", name, -1, first_cat + j, False))
    field_names = (list(CRITEO_INT_NAMES) if int_buckets else []) + list(CRITEO_CAT_NAMES)
    field_ids = (list(range(1, 14)) if int_buckets else []) + list(range(14, 40))
    kinds = (["int"] * 13 if int_buckets else []) + ["cat"] * 26
    expected = (f"{len(columns)} tab-separated fields "
                f"({'label, ' if label else ''}I1..I13, C1..C26)")
    return _layout(f"criteo-{fmt}", delimiter="\t", header=False, columns=columns, field_names=field_names,
                   field_ids=field_ids, kinds=kinds, dense_names=list(CRITEO_INT_NAMES),
                   hash_buckets=hash_buckets, hash_seed=hash_seed, keys=keys, on_bad_line=on_bad_line,
                   expected=expected, extra={"int_buckets": bool(int_buckets)})


def _avazu_layout(fmt: str, header: bool, hash_buckets, hash_seed, keys, on_bad_line) -> _Layout:
    names = AVAZU_COLUMNS if fmt == "train" else tuple(c for c in AVAZU_COLUMNS if c != "click")
    columns: list[tuple] = []
    field_names: list[str] = []
    field_ids: list[int] = []
    kinds: list[str] = []
    for name in names:
        column_number = AVAZU_COLUMNS.index(name) + 1  # ids follow the 24-column train layout
        if name == "id":
            columns.append(("ignore", name, -1, -1, False))
        elif name == "click":
            columns.append(("label", name, -1, -1, False))
        elif name == "hour":
            columns.append(("hour", name, -1, len(field_names), False))
            for sub, fid in AVAZU_HOUR_FIELD_IDS.items():
                field_names.append(sub)
                field_ids.append(fid)
                kinds.append("int")
        else:
            columns.append(("text", name, -1, len(field_names), False))
            field_names.append(name)
            field_ids.append(column_number)
            kinds.append("cat")
    expected = f"{len(names)} comma-separated fields ({','.join(names)})"
    return _layout(f"avazu-{fmt}", delimiter=",", header=header, columns=columns, field_names=field_names,
                   field_ids=field_ids, kinds=kinds, dense_names=[], hash_buckets=hash_buckets,
                   hash_seed=hash_seed, keys=keys, on_bad_line=on_bad_line, expected=expected, extra={})


def _split_quoted(line: bytes, delimiter: bytes, quote: bytes | None) -> list[bytes]:
    """The cells of one line (no line break) under the reader's quoting rule (DelimitedSchema.quote);
    a bad quote raises ValueError naming the field (1-based)."""
    if not quote or quote not in line:
        return line.split(delimiter)
    cells: list[bytes] = []
    i, n = 0, len(line)
    while True:
        if line[i:i + 1] == quote:
            value = bytearray()
            j = i + 1
            while True:
                k = line.find(quote, j)
                if k < 0:
                    raise ValueError(f"field {len(cells) + 1}: the quote is not closed on this line")
                value += line[j:k]
                if line[k + 1:k + 2] == quote:  # "" stands for one quote
                    value += quote
                    j = k + 2
                    continue
                i = k + 1
                break
            if i < n and line[i:i + 1] != delimiter:
                raise ValueError(f"field {len(cells) + 1}: the closing quote is followed by {line[i:i + 1]!r}, "
                                 f"not the delimiter or the line end")
            cells.append(bytes(value))
        else:
            k = line.find(delimiter, i)
            k = n if k < 0 else k
            cells.append(line[i:k])
            i = k
        if i >= n:
            return cells
        i += 1  # past the delimiter


def _check_schema_options(schema: DelimitedSchema) -> None:
    """The checks every input format makes of a schema (delimited text adds its own)."""
    if schema.numeric_transform not in ("log", "none"):
        raise ValueError(f"numeric_transform must be 'log' or 'none', got {schema.numeric_transform!r}")
    if schema.sequence_max_len is not None and (not isinstance(schema.sequence_max_len, (int, np.integer))
                                                or isinstance(schema.sequence_max_len, bool)
                                                or schema.sequence_max_len < 1):
        raise ValueError(f"sequence_max_len must be None or an integer >= 1, got {schema.sequence_max_len!r}")
    sep = schema.sequence_separator
    if len(sep) != 1 or sep in "\r\n" or len(sep.encode()) != 1:
        raise ValueError(f"sequence_separator must be one ASCII character other than a line break, got {sep!r}")


def _delimited_layout(path: str, schema: DelimitedSchema, hash_buckets, hash_seed, keys, on_bad_line) -> _Layout:
    if len(schema.delimiter) != 1 or schema.delimiter in "\r\n" or len(schema.delimiter.encode()) != 1:
        raise ValueError(f"delimiter must be one ASCII character other than a line break, got {schema.delimiter!r}")
    _check_schema_options(schema)
    sep = schema.sequence_separator
    if len(sep) != 1 or sep in "\r\n" or len(sep.encode()) != 1 or sep == schema.delimiter:
        raise ValueError(f"sequence_separator must be one ASCII character other than a line break and the "
                         f"delimiter, got {sep!r}")
    quote = schema.quote or None
    if quote is not None and (not isinstance(quote, str) or len(quote) != 1 or quote in "\r\n"
                              or len(quote.encode()) != 1 or quote in (schema.delimiter, sep)):
        raise ValueError(f"quote must be None (no quoting) or one ASCII character other than a line break, the "
                         f"delimiter and the sequence separator, got {quote!r}")
    line_no, first = _first_line(path)
    try:
        cells = _split_quoted(first, schema.delimiter.encode(), quote.encode() if quote else None)
    except ValueError as e:
        what = "the header" if schema.header else "the first line"
        raise ValueError(f"{path}: {what} (line {line_no}) is not a valid quoted line: {e} "
                         f"(quote={quote!r}; pass quote=None to read quotes as plain bytes)") from None
    if schema.header:
        try:
            names = [c.decode("utf-8") for c in cells]
        except UnicodeDecodeError:
            raise ValueError(f"{path}: the header (line {line_no}) is not valid UTF-8") from None
    else:
        names = [f"col{i}" for i in range(len(cells))]
    delim_name = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe", " ": "space"}.get(
        schema.delimiter, repr(schema.delimiter))
    return _schema_layout(path, names, schema, "delimited", named=schema.header, where="the header",
                          hash_buckets=hash_buckets, hash_seed=hash_seed, keys=keys, on_bad_line=on_bad_line,
                          expected=f"{len(names)} {delim_name}-separated fields",
                          extra={"numeric_transform": schema.numeric_transform, "quote": quote}, quote=quote)


def _schema_layout(path: str, names: list[str], schema: DelimitedSchema, fmt: str, *, named: bool, where: str,
                   hash_buckets, hash_seed, keys, on_bad_line, expected: str, extra: dict[str, Any],
                   quote: str | None = None) -> _Layout:
    """The layout of a log whose columns are ``names`` (a header's, or an Arrow schema's) under
    ``schema``: which column is the label, which are dense, one-hot and bag fields. A field's hash
    id is its 1-based column number, whatever the file format."""

    def index(ref: str | int, role: str) -> int:
        if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
            if not 0 <= ref < len(names):
                raise ValueError(f"{role} column {ref} is out of range: {path} has {len(names)} columns")
            return int(ref)
        if not named:
            raise ValueError(f"{role} column {ref!r}: without a header, columns are named by 0-based index")
        if ref not in names:
            raise ValueError(f"{role} column {ref!r} is not in {where} of {path}: {names}")
        if names.count(ref) > 1:
            raise ValueError(f"{role} column {ref!r} appears more than once in {where} of {path}")
        return names.index(ref)

    role: dict[int, str] = {}

    def claim(i: int, what: str) -> None:
        if i in role:
            raise ValueError(f"column {names[i]!r} is both {role[i]} and {what}")
        role[i] = what

    label = None if schema.label is None else index(schema.label, "label")
    if label is not None:
        claim(label, "label")
    numeric = [index(r, "numeric") for r in schema.numeric]
    for i in numeric:
        claim(i, "numeric")
    categorical = [index(r, "categorical") for r in schema.categorical]
    for i in categorical:
        claim(i, "categorical")
    sequence = [index(r, "sequence") for r in schema.sequence]
    for i in sequence:
        claim(i, "sequence")
    columns: list[tuple] = []
    log = schema.numeric_transform == "log"
    for i, name in enumerate(names):
        if i == label:
            columns.append(("label", name, -1, -1, False))
        elif i in numeric:
            columns.append(("float", name, numeric.index(i), -1, log))
        elif i in categorical:
            columns.append(("text", name, -1, categorical.index(i), False))
        elif i in sequence:
            columns.append(("textseq", name, -1, len(categorical) + sequence.index(i), False))
        else:
            columns.append(("ignore", name, -1, -1, False))
    fields = categorical + sequence
    return _layout(fmt, delimiter=schema.delimiter, header=schema.header, columns=columns,
                   field_names=[names[i] for i in fields], field_ids=[i + 1 for i in fields],
                   kinds=["cat"] * len(fields), dense_names=[names[i] for i in numeric],
                   hash_buckets=hash_buckets, hash_seed=hash_seed, keys=keys, on_bad_line=on_bad_line,
                   expected=expected, extra=extra, num_bags=len(sequence), bag_separator=schema.sequence_separator,
                   bag_max_len=schema.sequence_max_len, quote=quote)


def _id_column_index(names: list[str], id_column: str | int, path: str, *, named: bool, where: str) -> int:
    """The 0-based column ``id_column`` names among ``names``: a name (where the columns have names),
    or an index (an int, or a string of digits, as the command line gives it)."""
    if isinstance(id_column, bool) or not isinstance(id_column, (int, np.integer, str)):
        raise TypeError(f"id_column must be a column name or a 0-based index, got {type(id_column).__name__}")
    if isinstance(id_column, str) and named and id_column in names:
        if names.count(id_column) > 1:
            raise ValueError(f"id column {id_column!r} appears more than once in {where} of {path}")
        return names.index(id_column)
    if isinstance(id_column, str) and not (id_column.isascii() and id_column.isdigit()):
        if not named:
            raise ValueError(f"id column {id_column!r}: without a header, columns are named by 0-based index")
        raise ValueError(f"id column {id_column!r} is not in {where} of {path}: {names}")
    i = int(id_column)
    if not 0 <= i < len(names):
        raise ValueError(f"id column {i} is out of range: {path} has {len(names)} columns (0..{len(names) - 1})")
    return i


def _with_id_column(layout: _Layout, id_column: str | int | None, path: str, *, named: bool) -> _Layout:
    """``layout`` also handing out the raw text of column ``id_column`` (None: no id column). Only
    then is it part of the configuration, so a read without one keeps its cache entry."""
    if id_column is None:
        return layout
    names = [c[1] for c in layout.spec["columns"]]
    i = _id_column_index(names, id_column, path, named=named, where="the header" if layout.spec["header"]
                         else "the columns")
    layout.spec["id_column"] = i
    layout.config["id_column"] = i
    layout.id_name = names[i]
    return layout


# ------------------------------------------------------------------------------------------------
# Input checks and peeking


def _check_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not os.path.exists(p):
        raise FileNotFoundError(errno.ENOENT, "no such file", p)
    if os.path.isdir(p):
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a click-log file", p)
    if os.path.getsize(p) == 0:
        raise ValueError(f"{p}: empty file (no lines to read)")
    return p


def _head(path: str, max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the content, decompressed by the parser's own source (so damage
    found while telling the format is the same CorruptInputError as damage found parsing)."""
    try:
        return _native.read_head(path, int(max_bytes))[0]
    except _native.CorruptInput as e:
        raise _corrupt(e, path) from None


def _first_line(path: str) -> tuple[int, bytes]:
    """(1-based number, bytes without line ending) of the first non-blank line."""
    want = 64 << 10
    while True:
        head = _head(path, want)
        complete = len(head) < want  # the whole content
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        lines = head.split(b"\n")
        if not complete:
            lines.pop()  # may be cut short
        for line_no, line in enumerate(lines, start=1):
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                return line_no, line
        if complete:
            raise ValueError(f"{path}: no data lines (the file holds only blank lines)")
        want *= 4


def _detect_criteo(path: str, fmt: str) -> str:
    if fmt in ("train", "test"):
        return fmt
    if fmt != "auto":
        raise ValueError(f"format must be 'auto', 'train' or 'test', got {fmt!r}")
    line_no, line = _first_line(path)
    n = line.count(b"\t") + 1
    if n == 40:
        return "train"
    if n == 39:
        return "test"
    raise ValueError(f"{path}: line {line_no} has {n} tab-separated fields; a Criteo file has 40 "
                     "(train: label, I1..I13, C1..C26) or 39 (test: no label). Pass format= to force one.")


def _detect_avazu(path: str, fmt: str, header: bool | None) -> tuple[str, bool]:
    if fmt not in ("auto", "train", "test"):
        raise ValueError(f"format must be 'auto', 'train' or 'test', got {fmt!r}")
    line_no, line = _first_line(path)
    train_header = ",".join(AVAZU_COLUMNS).encode()
    test_header = ",".join(c for c in AVAZU_COLUMNS if c != "click").encode()
    found = "train" if line == train_header else "test" if line == test_header else None
    if header is None:
        if found is None:
            raise ValueError(f"{path}: line {line_no} is not an Avazu header (expected {train_header.decode()!r}"
                             f" or the same without 'click'); pass header=False for a file without one")
        header = True
    if header:
        if found is None:
            raise ValueError(f"{path}: line {line_no} is not an Avazu header: {line[:200]!r}")
        if fmt != "auto" and fmt != found:
            raise ValueError(f"{path}: format={fmt!r} but the header is the {found} header")
        return found, True
    if fmt != "auto":
        return fmt, False
    n = line.count(b",") + 1
    if n == 24:
        return "train", False
    if n == 23:
        return "test", False
    raise ValueError(f"{path}: line {line_no} has {n} comma-separated fields; an Avazu file has 24 "
                     "(train, with click) or 23 (test)")


# ------------------------------------------------------------------------------------------------
# Running the native reader


def _threads(num_threads: int | None) -> int:
    n = (os.cpu_count() or 1) if num_threads is None else int(num_threads)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return n


def _show(text: bytes, limit: int = 120) -> str:
    """The offending bytes for a message: printable text as is, anything else escaped."""
    out = []
    for ch in text[:limit].decode("utf-8", "surrogateescape"):
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable() and ch != "\\":
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1] if ch != "\\" else "\\\\")
    return "'" + "".join(out) + ("...'" if len(text) > limit else "'")


def _parse_error(path: str, layout: _Layout, failure: Exception) -> ParseError:
    line, field_name, reason, text, found, expected_count = failure.args
    field_name = field_name or None
    if reason == "field_count":
        where = f"field {field_name}" if found < expected_count else f"after field {field_name}"
        message = (f"{path}, line {line}, {where}: found {found} fields, expected {layout.expected} "
                   f"[field_count]; the line: {_show(text)}")
    else:
        message = (f"{path}, line {line}, field {field_name}: got {_show(text)}, expected "
                   f"{_EXPECTED.get(reason, reason)} [{reason}]")
    return ParseError(path, line, field_name, reason, text, message)


def _native_reader(path: str, layout: _Layout, num_threads: int, chunk_bytes: int) -> Any:
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    spec = dict(layout.spec, num_threads=num_threads, block_bytes=int(chunk_bytes),
                min_range_bytes=int(MIN_RANGE_BYTES), vector_hash=bool(VECTOR_HASH))
    return _native.Reader(path, spec)


def _bags(arrays: dict[str, Any], layout: _Layout) -> list[BagField]:
    nb = layout.spec["num_bags"]
    if not nb:
        return []
    lengths = arrays["bag_lengths"]
    bags = [BagField.from_lengths(lengths[:, s], arrays[f"bag_values_{s}"]) for s in range(nb)]
    return [b.truncate(layout.bag_max_len) for b in bags] if layout.bag_max_len else bags


def _flat(chunk: dict[str, Any]) -> dict[str, Any]:
    """A native chunk with its list of bag value arrays as ``bag_values_<s>`` entries (cache columns)."""
    for s, values in enumerate(chunk.pop("bag_values", ())):
        chunk[f"bag_values_{s}"] = values
    return chunk


def _to_data(arrays: dict[str, Any], layout: _Layout, path: str, meta: dict[str, Any]) -> CTRData:
    ids = arrays.get("ids")  # Parquet / Arrow: a TextColumn already
    if "id_lengths" in arrays:
        ids = TextColumn.from_lengths(arrays["id_lengths"], arrays["id_data"], layout.id_name or "")
    return CTRData(
        bags=_bags(arrays, layout),
        labels=arrays["labels"],
        dense=arrays["dense"],
        dense_missing=arrays["dense_missing"],
        sparse=arrays["sparse"],
        field_offsets=layout.field_offsets.copy(),
        field_names=list(layout.field_names),
        dense_names=list(layout.dense_names),
        skipped=dict(arrays["skipped"]),
        source=path,
        meta=meta,
        lines=arrays.get("lines"),
        ids=ids,
    )


def _meta(layout: _Layout, num_threads: int, **more: Any) -> dict[str, Any]:
    c = layout.config
    meta = {"format": layout.format, "keys": c["keys"], "hash_seed": c["hash_seed"],
            "hash_buckets": list(c["hash_buckets"]), "field_ids": list(c["field_ids"]),
            "on_bad_line": c["on_bad_line"], "num_threads": num_threads, "reader": dict(c),
            # what CTRData.lines counts: text lines (1-based) or the rows of a columnar file (0-based)
            "position": "row" if layout.format in ("parquet", "arrow", "arrow-stream") else "line"}
    if "int_buckets" in c:
        meta["int_buckets"] = c["int_buckets"]
    meta.update(more)
    return meta


def _iter_native(path: str, layout: _Layout, num_threads: int, chunk_bytes: int) -> Iterator[dict[str, Any]]:
    reader = _native_reader(path, layout, num_threads, chunk_bytes)
    while True:
        try:
            chunk = reader.next_chunk()
        except _native.ParseFailure as e:
            raise _parse_error(path, layout, e) from None
        except _native.CorruptInput as e:
            raise _corrupt(e, path) from None
        if chunk is None:
            return
        yield _flat(chunk)
        # Drop our reference before parsing the next block: once the consumer drops its own,
        # the buffers return to the native pool and the next block reuses their pages.
        del chunk


# Set by read_on_disk for the duration of one read(): _read then returns the cache's columns unmapped.
_ON_DISK: contextvars.ContextVar[bool] = contextvars.ContextVar("mlfast_read_on_disk", default=False)


def read_on_disk(path: str | os.PathLike, format: str = "auto",
                 **kw: Any) -> tuple[CTRData, dict[str, _cache.DiskColumn], int]:
    """Parse a text log into the cache (or find it there) without loading it: returns (a zero-row
    ``CTRData`` carrying the field layout, names, meta and skip counts; the cache's columns as
    :class:`mlfast.io.cache.DiskColumn`, read by row ranges; the row count). Takes :func:`read`'s
    arguments. This is what streaming (``mlfast.io.stream``) reads data larger than memory from.

    Refused: Parquet / Arrow input (read into memory), ``cache=False``, ``keys=True`` (vocabulary
    mode counts every value in memory), bag (sequence) fields and ``id_column`` (ragged columns).
    """
    token = _ON_DISK.set(True)
    try:
        got = read(path, format, **kw)
    finally:
        _ON_DISK.reset(token)
    if isinstance(got, CTRData):
        raise ValueError(f"{os.fspath(path)}: Parquet / Arrow input is read into memory; streaming from disk "
                         "reads text logs (Criteo, Avazu, delimited) through the cache")
    return got


def _read_on_disk(path: str, layout: _Layout, threads: int, cache: bool, cache_dir, chunk_bytes: int):
    why = ("cache=False (streaming reads the cache's column files)" if not cache else
           "vocabulary mode (keys=True / --min-count) counts every value in memory" if layout.config["keys"] else
           "bag (sequence) fields are ragged columns" if layout.spec["num_bags"] else
           "an id column is a ragged column" if layout.id_name is not None else None)
    if why is not None:
        raise ValueError(f"{path}: cannot stream this input from disk: {why}")
    columns = _cache.ctr_columns(layout.spec["has_label"], len(layout.dense_names), len(layout.field_names), 0)
    result = _cache.cached_read(path, layout.config, lambda: _iter_native(path, layout, threads, chunk_bytes),
                                columns, cache_dir=cache_dir, num_threads=threads, mapped=False)
    if result is None:
        raise ValueError(f"{path}: streaming reads the cache, and no cache entry could be written or verified "
                         f"(see the warning above; MLFAST_CACHE_DIR chooses where the cache lives)")
    cols, info = result
    rows = len(cols["sparse"])
    _warn_if_all_bad(path, rows, cols["skipped"])
    empty = {name: np.empty((0,) + c.shape[1:], c.dtype) for name, c in cols.items()
             if isinstance(c, _cache.DiskColumn)}
    empty.setdefault("labels", None)
    empty["skipped"] = cols["skipped"]
    header = _to_data(empty, layout, path, _meta(layout, threads, cache=info, lines=cols["line_count"]))
    return header, {k: v for k, v in cols.items() if isinstance(v, _cache.DiskColumn)}, rows


def _read(path: str, layout: _Layout, num_threads: int | None, cache: bool, cache_dir, chunk_bytes: int) -> CTRData:
    threads = _threads(num_threads)
    if _ON_DISK.get():
        return _read_on_disk(path, layout, threads, cache, cache_dir, chunk_bytes)
    if cache:
        nb = layout.spec["num_bags"]
        # An id column is cached with the features, in an entry of its own (its configuration names
        # the column): a second pass over a text file to get it would cost as much as parsing.
        columns = _cache.ctr_columns(layout.spec["has_label"], len(layout.dense_names),
                                     len(layout.field_names) - nb, nb, ids=layout.id_name is not None)
        result = _cache.cached_read(path, layout.config, lambda: _iter_native(path, layout, threads, chunk_bytes),
                                    columns, cache_dir=cache_dir, num_threads=threads)
        if result is not None:
            arrays, info = result
            _warn_if_all_bad(path, len(arrays["sparse"]), arrays["skipped"])
            return _to_data(arrays, layout, path, _meta(layout, threads, cache=info, lines=arrays["line_count"]))
    reader = _native_reader(path, layout, threads, chunk_bytes)
    try:
        arrays = _flat(reader.read_all())
    except _native.ParseFailure as e:
        raise _parse_error(path, layout, e) from None
    except _native.CorruptInput as e:
        raise _corrupt(e, path) from None
    info = {"status": "disabled", "path": None}
    _warn_if_all_bad(path, len(arrays["sparse"]), arrays["skipped"])
    return _to_data(arrays, layout, path, _meta(layout, threads, cache=info, lines=arrays["end_line"] - 1))


def _warn_if_all_bad(path: str, rows: int, skipped: dict[str, int]) -> None:
    bad = {k: v for k, v in skipped.items() if k != "blank_line"}
    if rows == 0 and bad:
        warnings.warn(f"{path}: every data line is bad and was skipped ({sum(bad.values())} lines: {bad}); "
                      f"the result is empty", UserWarning, stacklevel=4)


def _iter_chunks(path: str, layout: _Layout, num_threads: int | None, chunk_bytes: int) -> Iterator[CTRData]:
    threads = _threads(num_threads)
    index, rows, skipped = 0, 0, Counter()
    for chunk in _iter_native(path, layout, threads, chunk_bytes):
        if chunk["sparse"].shape[0] == 0 and not chunk["skipped"]:
            continue  # a header alone: nothing to hand on
        # A row-less chunk is the last one and carries the counts of bad / blank lines at the end
        # of the input: yielded, so that the chunks' counts add up to the whole-file read's.
        rows += chunk["sparse"].shape[0]
        skipped.update(chunk["skipped"])
        index += 1
        yield _to_data(chunk, layout, path, _meta(layout, threads, chunk=index - 1, first_line=chunk["first_line"],
                                                  end_line=chunk["end_line"], input_bytes=chunk["input_bytes"]))
    _warn_if_all_bad(path, rows, dict(skipped))


# ------------------------------------------------------------------------------------------------
# Public readers


def read_criteo(path: str | os.PathLike, *, format: str = "auto", int_buckets: bool = True,
                hash_buckets: int | Sequence[int] | None = None, hash_seed: int = 0, keys: bool = False,
                on_bad_line: str = "error", num_threads: int | None = None, cache: bool = True,
                cache_dir: str | os.PathLike | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                id_column: str | int | None = None) -> CTRData:
    """Read a Criteo TSV log (Kaggle / 1TB layout, plain or gzip).

    ``format``: ``"train"`` (40 fields: label, I1..I13, C1..C26), ``"test"`` (39, no label:
    ``labels`` is None) or ``"auto"`` (by the first non-blank line's field count).

    * ``dense`` [N, 13]: :func:`hashing.signed_log1p` of I1..I13 (float64, stored float32);
      missing -> 0 with ``dense_missing`` set.
    * ``sparse``: with ``int_buckets`` (default) 39 fields, I1..I13 bucketed as
      :func:`hashing.fuxictr_int_bucket` and hashed as integers, then C1..C26 (hex values);
      without, the 26 C fields. Hash field ids are I1..I13 -> 1..13, C1..C26 -> 14..39 either way.
    * ``hash_buckets``: None (per-kind defaults of :mod:`hashing`), one int, or one per field.
    * ``keys=True``: ``sparse`` holds each value's raw 64-bit hash key (its bit pattern in int64)
      instead of a row id, for vocabulary building; 0 means missing, so a real key of 0 is
      stored as 1. ``field_offsets`` is then all zeros (no table exists yet) and
      ``meta["keys"]`` is True.
    * ``num_threads``: parser threads (default: all CPUs); ``chunk_bytes``: input block size.
    * ``cache``: keep / reuse a verified, memory-mapped binary copy (:mod:`mlfast.io.cache`) in
      ``cache_dir`` (default ``$MLFAST_CACHE_DIR`` or ``~/.cache/mlfast``); ``meta["cache"]``
      says whether it was a hit, a miss or a rebuild.
    * ``lines`` [N]: each row's 1-based line number in the file (see the module docstring).
    * ``id_column``: a column (0-based index among the 40 / 39, or a name: ``"label"``, ``"I1"``,
      ``"C1"``, ...) whose raw text every row also keeps, in ``ids`` (cached with the rest, in an
      entry of its own).

    Example::

        >>> d = read_criteo("../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt", cache=False)
        >>> d.labels.shape, d.table_rows, d.meta["cache"]["status"]
        ((10000,), 3421223, 'disabled')
    """
    p = _check_path(path)
    layout = _criteo_layout(_detect_criteo(p, format), int_buckets, hash_buckets, hash_seed, keys, on_bad_line)
    return _read(p, _with_id_column(layout, id_column, p, named=True), num_threads, cache, cache_dir, chunk_bytes)


def iter_criteo_chunks(path: str | os.PathLike, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, format: str = "auto",
                       int_buckets: bool = True, hash_buckets: int | Sequence[int] | None = None,
                       hash_seed: int = 0, keys: bool = False, on_bad_line: str = "error",
                       num_threads: int | None = None, id_column: str | int | None = None) -> Iterator[CTRData]:
    """Stream a Criteo log as CTRData chunks of about ``chunk_bytes`` of input each (never cached).

    Same options and output as :func:`read_criteo`; concatenating the chunks gives its arrays.
    ``meta`` carries ``chunk``, ``first_line`` and ``end_line`` (1-based, end exclusive).

    Example::

        >>> path = "../shared/datasets_raw/criteo_kaggle_head10k/train_head10000.txt"
        >>> sum(len(c) for c in iter_criteo_chunks(path, chunk_bytes=1 << 20))
        10000
    """
    p = _check_path(path)
    layout = _criteo_layout(_detect_criteo(p, format), int_buckets, hash_buckets, hash_seed, keys, on_bad_line)
    return _iter_chunks(p, _with_id_column(layout, id_column, p, named=True), num_threads, chunk_bytes)


def read_avazu(path: str | os.PathLike, *, format: str = "auto", header: bool | None = None,
               hash_buckets: int | Sequence[int] | None = None, hash_seed: int = 0, keys: bool = False,
               on_bad_line: str = "error", num_threads: int | None = None, cache: bool = True,
               cache_dir: str | os.PathLike | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               id_column: str | int | None = None) -> CTRData:
    """Read an Avazu CSV log (train: 24 columns with ``click``; test: 23 without).

    ``header=None`` requires the Avazu header and takes train/test from it; ``header=False``
    reads a file without one (train/test by the field count, or ``format``). ``id`` is dropped,
    ``click`` is the label, ``hour`` (YYMMDDHH) becomes three fields ``hour`` (0-23), ``weekday``
    (0 = Monday) and ``weekend`` (0/1) hashed as integers with field ids 101-103; every other
    column is a text categorical (``fnv1a64``) whose field id is its 1-based column number in the
    24-column train layout. No dense features. ``id_column="id"`` keeps the ``id`` column's text
    in ``ids`` (any column by name or 0-based index). Other options as :func:`read_criteo`.

    Example::

        >>> d = read_avazu("../shared/datasets_raw/avazu_head10k/avazu_train_head10k.csv", cache=False)
        >>> d.field_names[:4], d.num_dense
        (['hour', 'weekday', 'weekend', 'C1'], 0)
    """
    p = _check_path(path)
    fmt, has_header = _detect_avazu(p, format, header)
    layout = _avazu_layout(fmt, has_header, hash_buckets, hash_seed, keys, on_bad_line)
    return _read(p, _with_id_column(layout, id_column, p, named=True), num_threads, cache, cache_dir, chunk_bytes)


def iter_avazu_chunks(path: str | os.PathLike, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, format: str = "auto",
                      header: bool | None = None, hash_buckets: int | Sequence[int] | None = None,
                      hash_seed: int = 0, keys: bool = False, on_bad_line: str = "error",
                      num_threads: int | None = None, id_column: str | int | None = None) -> Iterator[CTRData]:
    """Stream an Avazu log as CTRData chunks (see :func:`read_avazu`, :func:`iter_criteo_chunks`).

    Example::

        >>> path = "../shared/datasets_raw/avazu_head10k/avazu_train_head10k.csv"
        >>> sum(len(c) for c in iter_avazu_chunks(path, chunk_bytes=1 << 18))
        9999
    """
    p = _check_path(path)
    fmt, has_header = _detect_avazu(p, format, header)
    layout = _avazu_layout(fmt, has_header, hash_buckets, hash_seed, keys, on_bad_line)
    return _iter_chunks(p, _with_id_column(layout, id_column, p, named=True), num_threads, chunk_bytes)


def read_delimited(path: str | os.PathLike, schema: DelimitedSchema, *,
                   hash_buckets: int | Sequence[int] | None = None, hash_seed: int = 0, keys: bool = False,
                   on_bad_line: str = "error", num_threads: int | None = None, cache: bool = True,
                   cache_dir: str | os.PathLike | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   id_column: str | int | None = None) -> CTRData:
    """Read any delimited log under a :class:`DelimitedSchema` (other options as :func:`read_criteo`;
    ``id_column``: a header name, or a 0-based index, which a file without a header needs).

    Example::

        >>> s = DelimitedSchema(label="clk", numeric=["price"], categorical=["userid", "adgroup_id", "pid"])
        >>> d = read_delimited("../shared/datasets_raw/taobao_ad_tiny_fuxictr/train_sample.csv", s, cache=False)
        >>> d.sparse.shape, d.dense_names
        ((100, 3), ['price'])
    """
    p = _check_path(path)
    layout = _delimited_layout(p, schema, hash_buckets, hash_seed, keys, on_bad_line)
    return _read(p, _with_id_column(layout, id_column, p, named=schema.header), num_threads, cache, cache_dir,
                 chunk_bytes)


def iter_delimited_chunks(path: str | os.PathLike, schema: DelimitedSchema, *,
                          chunk_bytes: int = DEFAULT_CHUNK_BYTES, hash_buckets: int | Sequence[int] | None = None,
                          hash_seed: int = 0, keys: bool = False, on_bad_line: str = "error",
                          num_threads: int | None = None, id_column: str | int | None = None) -> Iterator[CTRData]:
    """Stream a delimited log as CTRData chunks (see :func:`read_delimited`).

    Example::

        >>> s = DelimitedSchema(label="clk", categorical=["userid"])
        >>> path = "../shared/datasets_raw/taobao_ad_tiny_fuxictr/train_sample.csv"
        >>> [len(c) for c in iter_delimited_chunks(path, s)]
        [100]
    """
    p = _check_path(path)
    layout = _delimited_layout(p, schema, hash_buckets, hash_seed, keys, on_bad_line)
    return _iter_chunks(p, _with_id_column(layout, id_column, p, named=schema.header), num_threads, chunk_bytes)


def release_memory() -> int:
    """Give back the memory the reader keeps for reuse; returns how many bytes.

    Arrays the reader returned go, once dropped, to a small native pool (at most 1 GiB, or 1/16 of
    the RAM) that later reads and chunks take their buffers from, so they skip the cost of
    faulting in fresh pages. Call this after the last read to return that memory to the system.

    Example::

        >>> _ = read_criteo("../shared/datasets_raw/paddlerec_criteo_tiny/part-0.txt", cache=False)
        >>> release_memory() >= 0
        True
    """
    return int(_native.release_memory())


def read(path: str | os.PathLike, format: str = "auto", **kw: Any) -> CTRData:
    """Read a click log, telling its format from the first line when ``format="auto"``.

    Criteo: tab-separated with 40 (train) or 39 (test) fields. Avazu: the Avazu header, or 24
    comma-separated fields without one. Parquet and Arrow IPC / Feather files (by their magic bytes
    or extension), directories and globs of them, go to :func:`mlfast.io.arrow.read_columnar` and
    need a ``schema=DelimitedSchema(...)`` naming their columns (``format="auto"``, ``"delimited"``,
    ``"parquet"`` or ``"arrow"``). Any other log needs ``format="delimited"`` and a schema.
    ``format`` may also name the reader (``"criteo"``, ``"avazu"``), a Criteo layout (``"train"``,
    ``"test"``) or a ``meta["format"]`` value (``"criteo-train"``, ``"avazu-test"``, ...). Keyword
    arguments go to the chosen reader; ``int_buckets`` only concerns Criteo and is ignored for the
    others, ``chunk_bytes`` is ignored for Parquet / Arrow. Every reader takes ``id_column`` (a
    column whose raw text each row keeps in ``CTRData.ids``).

    Example::

        >>> read("../shared/datasets_raw/avazu_head10k/avazu_train_head10k.csv", cache=False).meta["format"]
        'avazu-train'
    """
    return _dispatch(path, format, kw, chunks=False)


def iter_read(path: str | os.PathLike, format: str = "auto", **kw: Any) -> Iterator[CTRData]:
    """:func:`read`'s rows as CTRData chunks, never all in memory: the same format detection and
    options, the format's chunk iterator (:func:`iter_criteo_chunks`, :func:`iter_avazu_chunks`,
    :func:`iter_delimited_chunks`, :func:`mlfast.io.arrow.iter_columnar_chunks`). ``chunk_bytes``
    sizes text chunks, ``batch_rows`` Parquet / Arrow ones; ``cache`` / ``cache_dir`` are ignored
    (chunks are never cached). Concatenated, the chunks are :func:`read`'s arrays, and their
    ``skipped`` counts add up to its (a last, row-less chunk may carry the trailing counts).

    Example::

        >>> path = "../shared/datasets_raw/avazu_head10k/avazu_train_head10k.csv"
        >>> sum(len(c) for c in iter_read(path, chunk_bytes=1 << 18))
        9999
    """
    kw = {k: v for k, v in kw.items() if k not in ("cache", "cache_dir")}
    return _dispatch(path, format, kw, chunks=True)


def _dispatch(path: str | os.PathLike, format: str, kw: dict[str, Any], chunks: bool):
    """The reader (whole or chunked) ``format`` and the file's first line choose, called with ``kw``."""
    if format in ("auto", "delimited", "parquet", "arrow"):
        from mlfast.io import arrow

        files = arrow.dataset_files(path) if format in ("auto", "delimited") else arrow._files(path)
        if files is not None:
            opts = {k: v for k, v in kw.items() if k not in ("int_buckets", "chunk_bytes")}
            schema = opts.pop("schema", None)
            if schema is None:
                raise ValueError(f"{os.fspath(path)}: Parquet / Arrow input needs a schema naming its columns: "
                                 "read(path, schema=DelimitedSchema(label=..., categorical=[...], numeric=[...])) "
                                 "(on the command line: --label, --categorical, --numeric, --sequence)")
            if chunks:
                return arrow.iter_columnar_chunks(path, schema, **opts)
            opts.pop("batch_rows", None)
            return arrow.read_columnar(path, schema, **opts)
    kw = {k: v for k, v in kw.items() if k != "batch_rows"}
    criteo, avazu, delimited = ((iter_criteo_chunks, iter_avazu_chunks, iter_delimited_chunks) if chunks
                                else (read_criteo, read_avazu, read_delimited))
    p = _check_path(path)
    family, _, layout = format.partition("-")
    if family in ("train", "test") and not layout:
        family, layout = "criteo", family
    if family == "criteo" and layout in ("", "train", "test"):
        return criteo(p, format=layout or "auto", **kw)
    not_criteo = {k: v for k, v in kw.items() if k != "int_buckets"}
    if family == "avazu" and layout in ("", "train", "test"):
        return avazu(p, format=layout or "auto", **not_criteo)
    if format == "delimited":
        if "schema" not in not_criteo:
            raise ValueError("format='delimited' needs schema=DelimitedSchema(...)")
        return delimited(p, not_criteo.pop("schema"), **not_criteo)
    if format != "auto":
        raise ValueError(f"format must be 'auto', 'criteo', 'train', 'test', 'avazu', 'delimited', 'parquet', 'arrow' or a "
                         f"meta['format'] value such as 'criteo-train', got {format!r}")
    line_no, line = _first_line(p)
    if b"\t" in line and line.count(b"\t") + 1 in (39, 40):
        return criteo(p, **kw)
    if line.split(b",")[:3] in ([b"id", b"click", b"hour"], [b"id", b"hour", b"C1"]):
        return avazu(p, **not_criteo)
    if line.count(b",") + 1 == 24:
        return avazu(p, **{"header": False, **not_criteo})
    raise ValueError(f"{p}: cannot tell the format from line {line_no} ({_show(line[:80])}): not Criteo "
                     "(39/40 tab-separated fields) nor Avazu (its header, or 24 comma-separated fields). "
                     "Use read_delimited(path, DelimitedSchema(...)) or read(path, format='delimited', schema=...)")
