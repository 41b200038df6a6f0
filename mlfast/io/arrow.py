"""Read Parquet and Arrow IPC / Feather files into :class:`mlfast.io.data.CTRData`, exactly as the
delimited reader reads the same table written as CSV.

pyarrow decodes the file one record batch at a time (Parquet: row groups, read in batches of
``batch_rows``; Arrow IPC: its record batches, memory-mapped, sliced to ``batch_rows``), so memory
stays bounded by a batch whatever the file size, and no value ever becomes a Python object. Each
batch's columns go to the native parser (``csrc/arrow_batch.cpp``) as their raw Arrow buffers
(validity, offsets, data), parsed with the GIL released under the same reader spec, value grammar
and field hash as :func:`mlfast.io.reader.read_delimited`:

* a column's field id is its 1-based position in the file's schema (as a CSV column's is in its
  header), so a table written both as CSV and as Parquet gives identical ``CTRData`` arrays;
* **categorical** columns: text (UTF-8 checked; empty and null = missing), integers hashed as their
  decimal text, bool as ``true`` / ``false``; any other type (float, decimal, date, timestamp, ...)
  is hashed as the text Arrow's cast to string gives it, which is what ``pyarrow.csv.write_csv``
  writes; dictionary-encoded columns as their values;
* **numeric** columns: floats (a float32 as its shortest decimal text, which is what a CSV writer
  prints, so ``3.9`` reads as the double 3.9), integers, decimals (as their exact text) or text
  (the text grammar), through the same transform (``numeric_transform``); null = missing; NaN and
  infinities are ``bad_float``, as the text reader rejects them;
* the **label**: integers or floats equal to 0 / 1, bool, or text ``"0"`` / ``"1"``; anything else,
  null included, is ``bad_label``;
* **sequence** columns: ``list<string>`` / ``list<int>`` (large and fixed-size lists too, elements
  of other types as their text), one bag value per element, a list reading as the text cell of its
  elements joined by ``sequence_separator`` would (so a null list, ``[]``, ``[""]`` and ``[null]``
  are the field's missing row, and an empty or null element among others is ``bad_sequence``, as
  ``a^^b`` is in text; an element may hold the separator, though); or a text column holding
  ``sequence_separator``-joined values, read as the text reader reads it.

Each row's ``CTRData.lines`` entry is its 0-based row index in its file (``meta["position"]`` is
``"row"``); rows read from a directory or glob also have ``CTRData.file_index``, the index of their
file in ``meta["files"]``. ``id_column=`` (a column name or 0-based index) keeps that column's values
as text in ``CTRData.ids``, by the rules categoricals follow (text as it is, integers in decimal,
bool as ``true`` / ``false``, other types as Arrow casts them to text; null as the empty string),
read with pyarrow from the id column alone and taken at the kept rows' ``lines``: features still come
from the cache entry of a read without it, and reading one column of a columnar file costs that
column only.

Bad values follow ``on_bad_line`` as in the text reader: :class:`mlfast.io.reader.ParseError`
naming file, row (``ParseError.line`` is the 1-based row of the file) and column, or the row is
skipped and counted. A file pyarrow cannot decode raises
:class:`mlfast.io.reader.CorruptInputError`. ``DelimitedSchema``'s ``delimiter``, ``header`` and
``quote`` do not apply to these formats.

``path`` may be one file, a directory (its ``*.parquet`` / ``*.arrow`` / ``*.feather`` files, hidden
and ``_``-prefixed ones left out, in name order) or a glob; the files must share their column
names and order, and their rows are concatenated in that order. pyarrow is an optional dependency:
``pip install 'mlfast[parquet]'``.

Example::

    >>> import pyarrow.csv, pyarrow.parquet, tempfile, os
    >>> from mlfast.io.reader import DelimitedSchema
    >>> t = pyarrow.csv.read_csv("../shared/datasets_raw/taobao_ad_tiny_fuxictr/train_sample.csv")
    >>> path = os.path.join(tempfile.mkdtemp(), "taobao.parquet")
    >>> pyarrow.parquet.write_table(t, path)
    >>> d = read_columnar(path, DelimitedSchema(label="clk", numeric=["price"], categorical=["userid", "pid"]))
    >>> d.sparse.shape, d.dense_names
    ((100, 2), ['price'])
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mlfast import _native
from mlfast.io import cache as _cache
from mlfast.io import reader as _reader
from mlfast.io.data import BagField, CTRData, TextColumn
from mlfast.io.reader import CorruptInputError, DelimitedSchema, ParseError

__all__ = ["read_columnar", "iter_columnar_chunks", "file_format", "dataset_files", "MissingExtraError",
           "DEFAULT_BATCH_ROWS"]

DEFAULT_BATCH_ROWS = 1 << 16
# Fewest rows of a batch worth a parser thread of their own (tests lower it to split small batches).
MIN_RANGE_ROWS = 8192
EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".parq": "parquet", ".arrow": "arrow", ".feather": "arrow",
              ".ipc": "arrow", ".arrows": "arrow-stream"}
# Format version of what this reader produces; part of every cache key.
ARROW_READER_VERSION = 1


class MissingExtraError(ImportError, ValueError):
    """pyarrow is not installed (it is the optional extra ``mlfast[parquet]``)."""


def _pyarrow(path: str) -> Any:
    try:
        import pyarrow
        import pyarrow.compute  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(f"{path}: reading Parquet / Arrow files needs pyarrow, which is not installed "
                                f"({e}): pip install 'mlfast[parquet]'") from None
    return pyarrow


# ------------------------------------------------------------------------------------------------
# Which files


def file_format(path: str | os.PathLike) -> str | None:
    """``"parquet"``, ``"arrow"`` (IPC file / Feather v2), ``"arrow-stream"`` (IPC stream) or None,
    by the magic bytes (``PAR1``, ``ARROW1``, an IPC continuation marker), else by the extension
    (so that a damaged ``.parquet`` is reported as a damaged Parquet file). Needs no pyarrow."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"ARROW1"):
        return "arrow"
    if head.startswith(b"\xff\xff\xff\xff"):
        return "arrow-stream"
    return EXTENSIONS.get(os.path.splitext(p)[1].lower())


def dataset_files(path: str | os.PathLike) -> list[str] | None:
    """The Parquet / Arrow files ``path`` names (a file, a directory or a glob), or None when it
    does not name such input (a text log, a directory without them). A glob matching nothing
    raises FileNotFoundError; one matching files of other kinds too, ValueError."""
    p = os.fspath(path)
    if os.path.isdir(p):
        names = sorted(n for n in os.listdir(p) if not n.startswith((".", "_")))
        files = [os.path.join(p, n) for n in names
                 if os.path.isfile(os.path.join(p, n)) and file_format(os.path.join(p, n)) is not None]
        return files or None
    if not os.path.exists(p) and glob.has_magic(p):
        matches = sorted(m for m in glob.glob(p) if os.path.isfile(m))
        if not matches:
            raise FileNotFoundError(f"no file matches {p}")
        files = [m for m in matches if file_format(m) is not None]
        if not files:
            return None
        if len(files) != len(matches):
            other = next(m for m in matches if file_format(m) is None)
            raise ValueError(f"{p} matches Parquet / Arrow files and others ({other}): give a pattern that "
                             f"matches only one kind")
        return files
    return [p] if os.path.isfile(p) and file_format(p) is not None else None


# ------------------------------------------------------------------------------------------------
# Column types: what the native parser takes, and how other types get there

_INTS = {"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


def _native_name(t: Any) -> str | None:
    """The native parser's name of an Arrow type it reads directly, or None."""
    import pyarrow as pa

    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return str(t)
    if pa.types.is_float32(t):
        return "float32"
    if pa.types.is_float64(t):
        return "float64"
    if pa.types.is_string(t) or pa.types.is_binary(t):
        return "utf8"
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return "large_utf8"
    if pa.types.is_list(t):
        return "list"
    if pa.types.is_large_list(t):
        return "large_list"
    return None


def _plan(t: Any, kind: str, column: str, path: str) -> Callable[[Any], Any]:
    """How to turn an array of type ``t`` into one the native parser reads for a column of ``kind``
    (label / float / text / textseq). Raises ValueError, at layout time, for a type that cannot be."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def fail(why: str = "") -> ValueError:
        return ValueError(f"{path}: column {column!r} is {t}, which cannot be a {_ROLE[kind]} column{why}")

    if pa.types.is_dictionary(t):
        inner = _plan(t.value_type, kind, column, path)
        return lambda a: inner(a.dictionary_decode())
    if isinstance(t, pa.ExtensionType):
        inner = _plan(t.storage_type, kind, column, path)
        return lambda a: inner(a.storage)
    if hasattr(pa.types, "is_string_view") and (pa.types.is_string_view(t) or pa.types.is_binary_view(t)):
        target = pa.large_string() if pa.types.is_string_view(t) else pa.large_binary()
        return lambda a: pc.cast(a, target)
    if pa.types.is_fixed_size_binary(t):
        return lambda a: pc.cast(a, pa.binary())
    if pa.types.is_float16(t) and kind in ("label", "float"):
        return lambda a: pc.cast(a, pa.float32())
    name = _native_name(t)
    if kind == "label":
        if name in _INTS or name in ("null", "bool", "float32", "float64", "utf8", "large_utf8"):
            return lambda a: a
        raise fail()
    if kind == "float":
        if name in _INTS or name in ("null", "float32", "float64", "utf8", "large_utf8"):
            return lambda a: a
        if pa.types.is_decimal(t):  # exact: its text, through the text grammar
            return lambda a: pc.cast(a, pa.large_string())
        raise fail(" (expected a number or text)")
    if kind == "text":
        if name in _INTS or name in ("null", "bool", "utf8", "large_utf8"):
            return lambda a: a
        if name in ("list", "large_list") or pa.types.is_struct(t) or pa.types.is_map(t) or \
                pa.types.is_fixed_size_list(t):
            raise fail(" (a list is a sequence column)")
        if not _castable(t, pa.large_string()):
            raise fail(" (Arrow cannot cast it to text)")
        return lambda a: pc.cast(a, pa.large_string())  # its text, as pyarrow.csv.write_csv writes it
    # textseq: text, or a list of values
    if name in ("null", "utf8", "large_utf8"):
        return lambda a: a
    if pa.types.is_fixed_size_list(t):
        inner = _plan(pa.list_(t.value_type), kind, column, path)
        return lambda a: inner(pc.cast(a, pa.list_(t.value_type)))
    if name in ("list", "large_list"):
        vt = t.value_type
        element = _plan(vt, "text", column, path)  # an element is hashed as a categorical value
        if pa.types.is_null(vt):
            raise fail(" (a list of nulls)")
        wrap = pa.ListArray if name == "list" else pa.LargeListArray

        def convert(a: Any) -> Any:
            values = a.values
            new = element(values)
            if new is values:
                return a
            # The offsets still index the converted values (their logical positions are kept).
            return wrap.from_buffers(pa.list_(new.type) if name == "list" else pa.large_list(new.type),
                                     len(a), [a.buffers()[0], a.buffers()[1]], a.null_count, a.offset, [new])
        return convert
    raise fail(" (expected a list or text)")


_ROLE = {"label": "label", "float": "numeric", "text": "categorical", "textseq": "sequence"}


def _castable(t: Any, target: Any) -> bool:
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        pc.cast(pa.array([], t), target)
        return True
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False


def _describe(a: Any) -> tuple:
    """An array as the native parser's (type, length, offset, validity, offsets, data, child)."""
    name = _native_name(a.type)
    bufs = a.buffers()
    if name == "null":
        return (name, len(a), a.offset, None, None, None, None)
    if name in ("list", "large_list"):
        return (name, len(a), a.offset, bufs[0], bufs[1], None, _describe(a.values))
    if name in ("utf8", "large_utf8"):
        return (name, len(a), a.offset, bufs[0], bufs[1], bufs[2], None)
    return (name, len(a), a.offset, bufs[0], None, bufs[1], None)


def _id_plan(t: Any, column: str, path: str) -> Callable[[Any], Any]:
    """How to turn an array of type ``t`` into the large_binary text of an id column (the categorical
    rules: text as it is, other types as Arrow's cast to text; null as b""). ValueError if it cannot."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(t):
        inner = _id_plan(t.value_type, column, path)
        return lambda a: inner(a.dictionary_decode())
    if isinstance(t, pa.ExtensionType):
        inner = _id_plan(t.storage_type, column, path)
        return lambda a: inner(a.storage)
    empty = pa.scalar(b"", pa.large_binary())
    if pa.types.is_null(t):
        return lambda a: pa.repeat(empty, len(a))
    views = hasattr(pa.types, "is_string_view") and (pa.types.is_string_view(t) or pa.types.is_binary_view(t))
    if (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t) or views):
        return lambda a: pc.fill_null(pc.cast(a, pa.large_binary()), empty)
    if pa.types.is_nested(t) or not _castable(t, pa.large_string()):
        raise ValueError(f"{path}: column {column!r} is {t}, which cannot be an id column (it has no text form)")
    return lambda a: pc.fill_null(pc.cast(pc.cast(a, pa.large_string()), pa.large_binary()), empty)


def _text_column(pieces: list[Any], name: str) -> TextColumn:
    """large_binary arrays, concatenated, as a TextColumn (its own copy of the bytes)."""
    import pyarrow as pa

    if not pieces:
        return TextColumn(np.zeros(1, np.int64), np.zeros(0, np.uint8), name)
    a = pa.concat_arrays(pieces)
    bufs = a.buffers()
    offsets = np.frombuffer(bufs[1], np.int64, count=len(a) + 1, offset=a.offset * 8)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return TextColumn(offsets - offsets[0], data[offsets[0]:offsets[-1]].copy(), name)


def _take_ids(array: Any, plan: Callable[[Any], Any], rows: np.ndarray) -> Any:
    """The id text of ``array``'s rows ``rows`` (indices into it)."""
    import pyarrow as pa

    return plan(array).take(pa.array(rows, pa.int64()))


def _read_ids(f: "_File", name: str, plan: Callable[[Any], Any], lines: np.ndarray) -> TextColumn:
    """The id column ``name`` of file ``f`` at its rows ``lines`` (0-based, ascending): one pass over
    that column alone."""
    lines = np.asarray(lines, np.int64)
    pieces, start = [], 0
    for batch in f.batches([name]):
        lo, hi = np.searchsorted(lines, [start, start + batch.num_rows])
        if hi > lo:
            with f._errors():
                pieces.append(_take_ids(batch.column(0), plan, lines[lo:hi] - start))
        start += batch.num_rows
    return _text_column(pieces, name)


# ------------------------------------------------------------------------------------------------
# One file


class _File:
    """One Parquet / Arrow file: its column names and types, and its record batches."""

    def __init__(self, path: str, batch_rows: int, num_threads: int):
        self.path = path
        self.format = file_format(path)
        self.batch_rows = batch_rows
        self.num_threads = num_threads
        pa = _pyarrow(path)
        self._pa = pa
        with self._errors():
            if self.format == "parquet":
                import pyarrow.parquet as pq

                self._pf = pq.ParquetFile(path, memory_map=True)
                self.schema = self._pf.schema_arrow
                self.num_rows = self._pf.metadata.num_rows
            else:
                self._open_ipc()
                self.schema = self._reader.schema
                self.num_rows = None

    def _open_ipc(self) -> None:
        import pyarrow.ipc as ipc

        source = self._pa.memory_map(self.path)
        self._reader = ipc.open_file(source) if self.format == "arrow" else ipc.open_stream(source)

    def _errors(self) -> Any:
        return _ArrowErrors(self._pa, self.path)

    def batches(self, columns: list[str]) -> Iterator[Any]:
        """Record batches of at most batch_rows rows holding ``columns`` (in that order)."""
        if self.format == "parquet":
            with self._errors():
                it = self._pf.iter_batches(batch_size=self.batch_rows, columns=columns,
                                           use_threads=self.num_threads > 1)
            while True:
                with self._errors():
                    batch = next(it, None)
                if batch is None:
                    return
                yield batch
        with self._errors():
            if self.format == "arrow":
                reader = self._reader
                source = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                self._open_ipc()  # a stream is read once: open it afresh
                source = iter(self._reader)
            index = [self.schema.get_field_index(c) for c in columns]
        while True:
            with self._errors():
                batch = next(source, None)
                if batch is not None:
                    batch = batch.select(index)
            if batch is None:
                return
            for start in range(0, batch.num_rows, self.batch_rows):
                yield batch.slice(start, self.batch_rows)


class _ArrowErrors:
    """pyarrow's errors on a damaged file as CorruptInputError (an unsupported feature: ValueError)."""

    def __init__(self, pa: Any, path: str):
        self.pa, self.path = pa, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if e is None or isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, ParseError,
                                       CorruptInputError, MemoryError, KeyboardInterrupt)):
            return False
        if isinstance(e, self.pa.ArrowNotImplementedError):
            raise ValueError(f"{self.path}: pyarrow cannot read this file: {e}") from None
        if isinstance(e, (self.pa.ArrowException, OSError)):
            raise CorruptInputError(f"{self.path}: not a readable {file_format(self.path) or 'Parquet / Arrow'} "
                                    f"file (damaged or truncated?): {e}", self.path) from None
        return False


def _layout(f: _File, schema: DelimitedSchema, hash_buckets, hash_seed, keys, on_bad_line, id_column=None):
    if not isinstance(schema, DelimitedSchema):
        raise TypeError(f"schema must be a DelimitedSchema, got {type(schema).__name__}")
    _reader._check_schema_options(schema)
    names = list(f.schema.names)
    layout = _reader._schema_layout(
        f.path, names, schema, f.format, named=True, where="the columns", hash_buckets=hash_buckets,
        hash_seed=hash_seed, keys=keys, on_bad_line=on_bad_line, expected=f"{len(names)} columns",
        extra={"numeric_transform": schema.numeric_transform, "arrow_reader_version": ARROW_READER_VERSION})
    used: list[tuple[int, str, Callable[[Any], Any]]] = []  # (spec column, name, conversion)
    types = {}
    for c, col in enumerate(layout.spec["columns"]):
        kind, name = col[0], col[1]
        if kind == "ignore":
            continue
        t = f.schema.field(c).type
        used.append((c, name, _plan(t, kind, name, f.path)))
        types[name] = str(t)
    layout.config["arrow_types"] = types  # the cache keys on them (ids follow the values, not the types)
    if id_column is not None:  # read apart from the features (see the module docstring): not in the config
        i = _reader._id_column_index(names, id_column, f.path, named=True, where="the columns")
        layout.id_name = names[i]
        layout.id_plan = _id_plan(f.schema.field(i).type, names[i], f.path)
    return layout, used


def _parse_error(path: str, layout, failure: Exception) -> ParseError:
    row, column, reason, text, found, _ = failure.args
    shown = "null" if found == 0 else _reader._show(text)
    message = (f"{path}, row {row}, column {column}: got {shown}, expected "
               f"{_reader._EXPECTED.get(reason, reason)} [{reason}]")
    return ParseError(path, row, column, reason, text, message)


def _iter_file(f: _File, layout, used, num_threads: int, whole: bool = False,
               ids: bool = False) -> Iterator[dict[str, Any]]:
    """One arrays dict per record batch; ``whole``: one for the whole file (the batches parsed into
    one set of native buffers, grown in place: no concatenation). ``ids`` (not with ``whole``): each
    batch's dict also holds ``ids``, the id column's text of its kept rows, read with the batch."""
    spec = dict(layout.spec, num_threads=num_threads, block_bytes=1, min_range_bytes=int(MIN_RANGE_ROWS),
                vector_hash=False)
    parser = _native.ArrowParser(spec)
    ncols = len(layout.spec["columns"])
    first, nbytes = 1, 0
    names = [name for _, name, _ in used]
    id_at = None
    if ids and not whole:
        if layout.id_name not in names:
            names.append(layout.id_name)
        id_at = names.index(layout.id_name)
    for batch in f.batches(names):
        columns: list[Any] = [None] * ncols
        with f._errors():
            for k, (c, _, convert) in enumerate(used):
                columns[c] = _describe(convert(batch.column(k)))
        try:
            chunk = parser.parse(columns, batch.num_rows, first, whole)
        except _native.ParseFailure as e:
            raise _parse_error(f.path, layout, e) from None
        except _native.CorruptInput as e:
            raise _reader._corrupt(e, f.path) from None
        first += batch.num_rows
        nbytes += batch.nbytes
        if not whole:
            chunk["input_bytes"] = batch.nbytes
            if id_at is not None:
                batch_start = first - 1 - batch.num_rows  # the batch's first row, 0-based in the file
                with f._errors():
                    taken = _take_ids(batch.column(id_at), layout.id_plan, chunk["lines"] - batch_start)
                chunk["ids"] = _text_column([taken], layout.id_name)
            yield _reader._flat(chunk)
            del chunk
    if whole:
        chunk = parser.finish(first)
        chunk["input_bytes"] = nbytes
        yield _reader._flat(chunk)


def _empty_chunk(layout) -> dict[str, Any]:
    nb = layout.spec["num_bags"]
    n_sparse = len(layout.field_names) - nb
    d = {"labels": np.zeros(0, np.float32) if layout.spec["has_label"] else None,
         "dense": np.zeros((0, len(layout.dense_names)), np.float32),
         "dense_missing": np.zeros((0, len(layout.dense_names)), np.bool_),
         "sparse": np.zeros((0, n_sparse), np.int64), "lines": np.zeros(0, np.int64), "skipped": {},
         "first_line": 1, "end_line": 1, "input_bytes": 0}
    if nb:
        d["bag_lengths"] = np.zeros((0, nb), np.int64)
        for s in range(nb):
            d[f"bag_values_{s}"] = np.zeros(0, np.int64)
    return d


def _read_file(f: _File, schema, hash_buckets, hash_seed, keys, on_bad_line, threads: int, cache: bool,
               cache_dir, id_column=None) -> CTRData:
    path = f.path
    layout, used = _layout(f, schema, hash_buckets, hash_seed, keys, on_bad_line, id_column)

    def chunks() -> Iterator[dict[str, Any]]:
        any_chunk = False
        for chunk in _iter_file(f, layout, used, threads):
            any_chunk = True
            yield chunk
        if not any_chunk:
            yield _empty_chunk(layout)

    if cache:
        nb = layout.spec["num_bags"]
        columns = _cache.ctr_columns(layout.spec["has_label"], len(layout.dense_names),
                                     len(layout.field_names) - nb, nb)
        result = _cache.cached_read(path, layout.config, chunks, columns, cache_dir=cache_dir, num_threads=threads)
        if result is not None:
            arrays, info = result
            _reader._warn_if_all_bad(path, len(arrays["sparse"]), arrays["skipped"])
            if layout.id_name is not None:
                arrays["ids"] = _read_ids(f, layout.id_name, layout.id_plan, arrays["lines"])
            meta = _reader._meta(layout, threads, cache=info, lines=arrays["line_count"])
            return _reader._to_data(arrays, layout, path, meta)
    arrays = next(_iter_file(f, layout, used, threads, whole=True))
    if layout.id_name is not None:
        arrays["ids"] = _read_ids(f, layout.id_name, layout.id_plan, arrays["lines"])
    _reader._warn_if_all_bad(path, len(arrays["sparse"]), arrays["skipped"])
    meta = _reader._meta(layout, threads, cache={"status": "disabled", "path": None}, lines=arrays["end_line"] - 1)
    return _reader._to_data(arrays, layout, path, meta)


def _files(path: str | os.PathLike) -> list[str]:
    p = os.fspath(path)
    files = dataset_files(p)
    if files is None:
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such file or directory: {p}")
        if os.path.isdir(p):
            raise ValueError(f"{p}: a directory holding no Parquet / Arrow files (*.parquet, *.arrow, *.feather)")
        raise ValueError(f"{p}: not a Parquet or Arrow IPC file (no PAR1 / ARROW1 magic, no such extension)")
    for f in files:
        if os.path.getsize(f) == 0:
            raise CorruptInputError(f"{f}: empty file (a Parquet / Arrow file is never empty)", f)
    return files


def _same_columns(first: _File, other: _File) -> None:
    if list(first.schema.names) != list(other.schema.names):
        raise ValueError(f"{other.path}: its columns {list(other.schema.names)} differ from those of {first.path} "
                         f"({list(first.schema.names)}): the files of one dataset must have the same columns in "
                         f"the same order")


def read_columnar(path: str | os.PathLike, schema: DelimitedSchema, *,
                  hash_buckets: int | Sequence[int] | None = None, hash_seed: int = 0, keys: bool = False,
                  on_bad_line: str = "error", num_threads: int | None = None, cache: bool = True,
                  cache_dir: str | os.PathLike | None = None, batch_rows: int = DEFAULT_BATCH_ROWS,
                  id_column: str | int | None = None) -> CTRData:
    """Read a Parquet or Arrow IPC / Feather file (or a directory or glob of them) under ``schema``.

    Options and output as :func:`mlfast.io.reader.read_delimited` (the module docstring says how
    each Arrow type is read); ``batch_rows`` bounds the rows decoded at a time. Each file is cached
    on its own; several files give one CTRData of all their rows, ``meta["files"]`` listing them
    and ``file_index`` saying which each row came from (``lines``: its 0-based row in that file).
    ``id_column``: a column name or 0-based index whose values, as text, each row keeps in ``ids``.

    Example::

        >>> import pyarrow.csv, pyarrow.parquet, tempfile, os
        >>> t = pyarrow.csv.read_csv("../shared/datasets_raw/taobao_ad_tiny_fuxictr/train_sample.csv")
        >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
        >>> pyarrow.parquet.write_table(t, path, row_group_size=30)
        >>> read_columnar(path, DelimitedSchema(label="clk", categorical=["userid"]), cache=False).num_rows
        100
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    files = _files(path)
    threads = _reader._threads(num_threads)
    datas = []
    first_file = None
    for p in files:
        f = _File(p, batch_rows, threads)
        if first_file is not None:
            _same_columns(first_file, f)
        first_file = first_file or f
        datas.append(_read_file(f, schema, hash_buckets, hash_seed, keys, on_bad_line, threads, cache, cache_dir,
                                id_column))
    if len(datas) == 1:
        return datas[0]
    return _concat_data(datas, os.fspath(path), files)


def _concat_data(datas: list[CTRData], source: str, files: list[str]) -> CTRData:
    first = datas[0]
    bags = []
    for s in range(first.num_bags):
        values = np.concatenate([np.asarray(d.bags[s].values) for d in datas])
        lengths = np.concatenate([np.asarray(d.bags[s].lengths) for d in datas])
        bags.append(BagField.from_lengths(lengths, values))
    skipped: dict[str, int] = {}
    for d in datas:
        for k, v in d.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    meta = dict(first.meta, files=list(files), lines=sum(int(d.meta.get("lines", 0)) for d in datas),
                cache=[d.meta.get("cache") for d in datas])
    file_index = np.concatenate([np.full(len(d), k, np.int32) for k, d in enumerate(datas)])
    return CTRData(
        labels=None if first.labels is None else np.concatenate([d.labels for d in datas]),
        dense=np.concatenate([d.dense for d in datas]),
        dense_missing=np.concatenate([d.dense_missing for d in datas]),
        sparse=np.concatenate([d.sparse for d in datas]),
        field_offsets=first.field_offsets.copy(), field_names=list(first.field_names),
        dense_names=list(first.dense_names), skipped=skipped, source=source, meta=meta, bags=bags,
        lines=np.concatenate([d.lines for d in datas]), file_index=file_index,
        ids=None if first.ids is None else TextColumn.concat([d.ids for d in datas]))


def iter_columnar_chunks(path: str | os.PathLike, schema: DelimitedSchema, *, batch_rows: int = DEFAULT_BATCH_ROWS,
                         hash_buckets: int | Sequence[int] | None = None, hash_seed: int = 0, keys: bool = False,
                         on_bad_line: str = "error", num_threads: int | None = None,
                         id_column: str | int | None = None) -> Iterator[CTRData]:
    """Stream a Parquet / Arrow file (or directory or glob) as one CTRData per record batch of at
    most ``batch_rows`` rows (never cached); concatenated, they are :func:`read_columnar`'s arrays
    and their ``skipped`` counts add up to its. A batch whose rows were all skipped is handed on
    (row-less) for its counts. ``meta`` carries ``file``, ``chunk``, ``first_line`` and ``end_line``
    (1-based rows of that file, end exclusive); each chunk's ``lines`` are 0-based rows of that file,
    and with ``id_column`` its ``ids`` are read with the batch.

    Example::

        >>> import pyarrow.csv, pyarrow.parquet, tempfile, os
        >>> t = pyarrow.csv.read_csv("../shared/datasets_raw/taobao_ad_tiny_fuxictr/train_sample.csv")
        >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
        >>> pyarrow.parquet.write_table(t, path)
        >>> [len(c) for c in iter_columnar_chunks(path, DelimitedSchema(label="clk", categorical=["pid"]),
        ...                                        batch_rows=40)]
        [40, 40, 20]
    """
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    files = _files(path)
    threads = _reader._threads(num_threads)
    first_file = None
    index = 0
    for file_no, p in enumerate(files):
        f = _File(p, batch_rows, threads)
        if first_file is not None:
            _same_columns(first_file, f)
        first_file = first_file or f
        layout, used = _layout(f, schema, hash_buckets, hash_seed, keys, on_bad_line, id_column)
        rows, skipped = 0, {}
        for chunk in _iter_file(f, layout, used, threads, ids=layout.id_name is not None):
            if chunk["sparse"].shape[0] == 0 and not chunk["skipped"]:
                continue
            rows += chunk["sparse"].shape[0]
            for k, v in chunk["skipped"].items():
                skipped[k] = skipped.get(k, 0) + int(v)
            meta = _reader._meta(layout, threads, file=p, chunk=index, first_line=chunk["first_line"],
                                 end_line=chunk["end_line"], input_bytes=chunk["input_bytes"])
            index += 1
            data = _reader._to_data(chunk, layout, p, meta)
            if len(files) > 1:  # as read_columnar's rows of several files
                data.meta["files"] = list(files)
                data.file_index = np.full(len(data), file_no, np.int32)
            yield data
        _reader._warn_if_all_bad(p, rows, skipped)
