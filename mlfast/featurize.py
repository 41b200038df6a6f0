"""Serving-side featurisation: raw log lines, or column-name -> value dicts, turned into exactly the
arrays a run's reader (and vocabulary) produced for its training data.

Nothing is re-implemented here: the lines are written into an in-memory file (``os.memfd_create``;
a file in /dev/shm where that is missing) and read by the same native parser, with the run's
reader options (hashing, buckets, seed, int bucketing, schema, quoting, sequence truncation) and
its vocabulary, through ``mlfast.io.prepare.read_file`` as training did. So a model served from
`mlfast.export` sees the ids it was trained on, and a bad line raises the reader's own
``ParseError`` (with the line numbered within the given lines).

Example (from the repository root)::

    from mlfast.featurize import Featurizer
    fz = Featurizer.from_run("runs/head10k")
    x = fz.featurize_lines(open("../shared/datasets_raw/criteo_kaggle_head10k/test_head10000_nolabel.txt").readlines()[:4])
    x["sparse"].shape, x["dense"].shape       # (4, 39), (4, 13)
    fz.model_inputs(x)                        # {"sparse": ..., "dense": ...}: what the exported file takes
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mlfast.io.data import CTRData
from mlfast.io.prepare import READER_DEFAULTS, apply_vocabulary, read_file

__all__ = ["Featurizer"]


class Featurizer:
    """A run's reader configuration (and vocabulary): raw rows in, model inputs out.

    ``reader``: the run's reader options (``Predictor.reader``); ``schema``: the trained models'
    ``FeatureSchema`` (every result's field layout is checked against it); ``columns``: for a
    delimited log with a header, the training file's column names in order (a field's hash depends
    on its column number), or None to read them from the header of ``train_path`` (the training
    file the run names) when it is needed.

    Example::

        >>> from mlfast.io.prepare import reader_options
        >>> from mlfast.models import FeatureSchema
        >>> fz = Featurizer(reader_options(hash_buckets=100), FeatureSchema(tuple(range(0, 39 * 101 + 1, 101))))
        >>> x = fz.featurize_dicts([{"I1": 3, "C1": "68fd1e64"}, {"label": None}])
        >>> x["sparse"].shape, x["dense"][:, 0].tolist(), int(x["sparse"][1, 13]) == 13 * 101   # C1 missing
        ((2, 39), [1.3862943649291992, 0.0], True)
    """

    def __init__(self, reader: dict[str, Any], schema, *, vocab=None,
                 columns: Sequence[str] | None = None, on_bad_line: str = "error", train_path: str | None = None):
        self.reader = {**READER_DEFAULTS, **reader}
        if self.reader["schema"] is not None and not isinstance(self.reader["schema"], dict):
            self.reader["schema"] = dataclasses.asdict(self.reader["schema"])  # a DelimitedSchema, as stored
        self.schema = schema
        self.field_offsets = tuple(int(x) for x in schema.field_offsets)
        self.field_names = list(schema.field_names)
        self.vocab = vocab
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
        self.on_bad_line = on_bad_line
        self.train_path = train_path
        s = self.reader.get("schema")
        self.log_schema = None if s is None else _delimited_schema(s)
        self.family = self._family()
        self._columns = list(columns) if columns is not None else None

    # construction --------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: str | Path, *, columns: Sequence[str] | None = None,
                 on_bad_line: str = "error") -> "Featurizer":
        """The featurizer of a run directory (its ``config.json`` and ``vocab.npz``; no model is loaded).

        ``on_bad_line``: "error" (default, whatever the run used: a served row must not vanish) or
        "skip" (drop bad lines, as the reader does).
        """
        run = Path(run_dir)
        cfg_file = run / "config.json"
        if not cfg_file.is_file():
            if not run.is_dir():
                raise FileNotFoundError(f"run directory not found: {run}")
            raise FileNotFoundError(f"{run}: no config.json (is this an mlfast run directory?)")
        cfg = json.loads(cfg_file.read_text())
        vocab = None
        if cfg["reader"].get("min_count") is not None:
            from mlfast.io.vocab import Vocabulary

            if not (run / "vocab.npz").is_file():
                raise FileNotFoundError(f"{run}: a vocabulary-mode run (min_count={cfg['reader']['min_count']}) "
                                        f"without its vocab.npz")
            vocab = Vocabulary.load(run / "vocab.npz")
        from mlfast.models import FeatureSchema

        data = cfg.get("data") or {}
        if columns is None:
            columns = data.get("columns")  # the training file's header, where the run stored it
        return cls(cfg["reader"], FeatureSchema.from_dict(cfg["schema"]), vocab=vocab, columns=columns,
                   on_bad_line=on_bad_line, train_path=data.get("train"))

    @classmethod
    def from_predictor(cls, predictor, *, columns: Sequence[str] | None = None, train_path: str | None = None,
                       on_bad_line: str = "error") -> "Featurizer":
        """The featurizer of a loaded ``Predictor`` (e.g. ``fit(...).predictor``)."""
        return cls(predictor.reader, predictor.schema, vocab=predictor.vocab, columns=columns,
                   on_bad_line=on_bad_line, train_path=train_path)

    # what the run reads ----------------------------------------------------------------------------
    def _family(self) -> str:
        """"criteo", "avazu", "delimited" or "columnar" (Parquet / Arrow training input)."""
        fmt = str(self.reader.get("format") or "auto")
        if fmt in ("parquet", "arrow"):
            return "columnar"
        if self.reader.get("schema") is not None:
            if self.train_path and os.path.exists(self.train_path):
                from mlfast.io.arrow import dataset_files

                if dataset_files(self.train_path) is not None:
                    return "columnar"
            return "delimited"
        from mlfast.io.reader import AVAZU_HOUR_FIELD_IDS

        return "avazu" if fmt.startswith("avazu") or set(AVAZU_HOUR_FIELD_IDS) <= set(self.field_names) else "criteo"

    @property
    def columns(self) -> list[str] | None:
        """The delimited log's column names in file order (None for Criteo / Avazu). Found from
        the run's training file's header when not given."""
        if self.family != "delimited":
            return None
        if self._columns is None:
            self._columns = self._training_columns()
        return self._columns

    def _training_columns(self) -> list[str] | None:
        from mlfast.io.reader import iter_delimited_chunks

        if not self.train_path or not os.path.isfile(self.train_path):
            return None
        for chunk in iter_delimited_chunks(self.train_path, self.log_schema, chunk_bytes=1 << 16, on_bad_line="skip",
                                           num_threads=1):
            return [c[1] for c in chunk.meta["reader"]["columns"]]
        return None

    # featurising ---------------------------------------------------------------------------------
    def read_lines(self, lines: Sequence[str | bytes]) -> CTRData:
        """The rows of ``lines`` (one log line each, without or with its line ending) as the run's
        reader and vocabulary read them: a ``CTRData`` in the trained layout.

        For a delimited log with a header, the lines are data lines; a first line equal to the
        training header is taken as that header. When the run's header is unknown (its training file
        is gone and no ``columns`` were given), the first line must be the header, as in a file.
        """
        if self.family == "columnar":
            raise ValueError("this run was trained on Parquet / Arrow input, which has no text lines: write the rows "
                             "to a Parquet file and use Featurizer.read(path)")
        body = [_line_bytes(x, i) for i, x in enumerate(lines)]
        return self._read_lines(self._header_line(body), body)

    def _read_lines(self, header: bytes | None, body: list[bytes], what: str = "lines") -> CTRData:
        """Read ``body`` after ``header`` (None: none) from an in-memory file; errors name the item of
        ``what`` (the caller's sequence) a bad line came from."""
        if not body:
            return self._empty()
        head = [header] if header is not None else []
        content = b"".join(x + b"\n" for x in head + body)
        with _memory_file(content) as path:
            try:
                return self._read(path)
            except Exception as e:  # noqa: BLE001 - re-raised as the reader raised it, the input renamed
                raise _renamed(e, path, len(head), what) from None

    def read(self, path: str | Path) -> CTRData:
        """A file read exactly as the run's training data was (``Predictor.read`` without the models)."""
        return self._read(str(path))

    def featurize_lines(self, lines: Sequence[str | bytes]) -> dict[str, Any]:
        """The arrays of `read_lines`: ``sparse`` [N, F] int64, ``dense`` [N, Dd] float32,
        ``dense_missing`` [N, Dd] bool, ``labels`` [N] float32 (only when the lines have labels),
        ``bags`` [(offsets [N+1], values [nnz]) per multi-hot field], also as ``bag<s>_offsets`` /
        ``bag<s>_values`` (the exported model's input names)."""
        return _arrays(self.read_lines(lines))

    def featurize_dicts(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """`featurize_lines` of rows given as {column name: value}.

        Criteo: ``I1``..``I13`` (integers), ``C1``..``C26`` (hex strings), ``label`` optional (in
        every row or none). Avazu: its column names (``click`` optional, ``id`` ignored). A delimited
        log: its header's names (or ``col<i>`` / the 0-based index without a header); a sequence
        column may be a list. An absent key or None is a missing value; an unknown key is an error.
        Values are written as the file format expects (quoted where needed) and then read by the
        run's reader, so ``featurize_dicts`` and ``featurize_lines`` agree.
        """
        fam = self.family
        if fam == "columnar":
            raise ValueError("this run was trained on Parquet / Arrow input: featurize_dicts writes text lines, "
                             "which its reader does not read")
        if fam == "criteo":
            return _arrays(self._read_lines(None, _criteo_lines(rows), "rows"))
        if fam == "avazu":
            return _arrays(self._read_lines(*_avazu_lines(rows), "rows"))
        return _arrays(self._read_lines(self._header_line([]), self._delimited_lines(rows), "rows"))

    def model_inputs(self, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The arrays an exported model takes (``mlfast.export``: sparse, dense when the run trained
        on dense features, bag<s>_offsets / bag<s>_values), from `featurize_lines`' result."""
        out = {"sparse": np.ascontiguousarray(features["sparse"], np.int64)}
        if self.schema.num_dense:
            out["dense"] = np.ascontiguousarray(features["dense"], np.float32)
        for s, (o, v) in enumerate(features.get("bags", ())):
            out[f"bag{s}_offsets"] = np.ascontiguousarray(o, np.int64)
            out[f"bag{s}_values"] = np.ascontiguousarray(v, np.int64)
        return out

    # internals ---------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        opts = {**self.reader, "cache": False, "on_bad_line": self.on_bad_line}
        if opts.get("format") in ("train", "test", "criteo-train", "criteo-test"):
            opts["format"] = "auto"  # unlabelled rows must be accepted too (as Predictor.read does)
        elif str(opts.get("format")).startswith("avazu-"):
            opts["format"] = "avazu"
        return opts

    def _read(self, path: str) -> CTRData:
        data = read_file(path, self._options(), keys=self.vocab is not None)
        if self.vocab is not None:
            data = apply_vocabulary(data, self.vocab)
        if tuple(int(x) for x in data.field_offsets) != self.field_offsets:
            raise ValueError(f"{path}: its field layout differs from the run's ({data.num_fields} fields, "
                             f"{data.table_rows} rows vs {len(self.field_offsets) - 1}, {self.field_offsets[-1]})")
        return data

    def _empty(self) -> CTRData:
        """No rows, in the run's layout (the reader refuses an empty file)."""
        from mlfast.io.data import BagField

        nb = self.schema.num_bags
        nd = self._num_dense_columns()
        return CTRData(labels=None, dense=np.zeros((0, nd), np.float32), dense_missing=np.zeros((0, nd), bool),
                       sparse=np.zeros((0, self.schema.num_onehot), np.int64),
                       field_offsets=np.asarray(self.field_offsets, np.int64), field_names=list(self.field_names),
                       bags=[BagField(np.zeros(1, np.int64), np.zeros(0, np.int64)) for _ in range(nb)])

    def _num_dense_columns(self) -> int:
        fam = self.family
        if fam == "criteo":
            return 13
        if fam == "avazu":
            return 0
        return len(self.log_schema.numeric)

    def _header_line(self, body: list[bytes]) -> bytes | None:
        """The header to put before ``body`` (None: none, or ``body[0]`` is it)."""
        s = self.log_schema
        if self.family != "delimited" or not s.header:
            return None
        names = self.columns
        if names is None:
            return None  # the first line is the header, as in a file
        if body and _cells(body[0], s) == names:
            return None
        return _join([_cell(n, s, f"header column {i}") for i, n in enumerate(names)], s)

    def _delimited_lines(self, rows: Sequence[Mapping[str, Any]]) -> list[bytes]:
        s = self.log_schema
        names = self.columns
        if names is None:
            if s.header:
                raise ValueError(f"the run's header is unknown (its training file {self.train_path!r} is gone): pass "
                                 f"columns=[...] (the training file's column names, in order) to Featurizer.from_run")
            used = [r for r in [s.label, *s.numeric, *s.categorical, *s.sequence] if r is not None]
            names = [f"col{i}" for i in range(max(int(r) for r in used) + 1)]
        index = {n: i for i, n in enumerate(names)}
        if not s.header:
            index.update({i: i for i in range(len(names))})
        seq = {names[r] if isinstance(r, int) else r for r in s.sequence}
        out = []
        for k, row in enumerate(rows):
            cells = [b""] * len(names)
            for key, value in row.items():
                if key not in index:
                    raise ValueError(f"row {k}: unknown column {key!r}; the log's columns: {', '.join(map(str, names))}")
                i = index[key]
                if value is not None and names[i] in seq and isinstance(value, (list, tuple, np.ndarray)):
                    value = _sequence(value, s.sequence_separator, k, names[i])
                cells[i] = _cell(value, s, f"row {k}, column {names[i]!r}")
            out.append(_join(cells, s))
        return out


# ------------------------------------------------------------------------------------ formatting
def _delimited_schema(d: dict[str, Any]):
    from mlfast.io.reader import DelimitedSchema

    return DelimitedSchema(**{"quote": None, **d})  # as read_file: a run from before quoting read none


def _line_bytes(x: str | bytes, i: int) -> bytes:
    b = x.encode("utf-8") if isinstance(x, str) else bytes(x)
    if b.endswith(b"\n"):
        b = b[:-1]
    if b.endswith(b"\r"):
        b = b[:-1]
    if b"\n" in b or b"\r" in b:
        raise ValueError(f"lines[{i}] holds a line break: give one log line per item")
    if not b:
        raise ValueError(f"lines[{i}] is blank: the reader skips blank lines, so it would have no row")
    return b


def _text(value: Any, where: str) -> str:
    """A value as the text a log holds."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        return repr(float(value))  # the shortest text that reads back as the same double
    if isinstance(value, str):
        return value
    raise TypeError(f"{where}: a value of type {type(value).__name__} ({value!r}); expected str, bytes, int, "
                    f"float, bool or None")


def _sequence(values, sep: str, k: int, name: str) -> str:
    parts = [_text(v, f"row {k}, column {name!r}") for v in values]
    for p in parts:
        if not p or sep in p:
            raise ValueError(f"row {k}, column {name!r}: sequence value {p!r} is empty or holds the separator {sep!r}")
    return sep.join(parts)


def _cell(value: Any, schema, where: str) -> bytes:
    """One delimited cell, quoted (RFC 4180, as the reader reads) when its text needs it."""
    if value is None:
        return b""
    text = _text(value, where).encode("utf-8")
    delim = schema.delimiter.encode()
    quote = schema.quote.encode() if schema.quote else None
    if b"\n" in text or b"\r" in text:
        raise ValueError(f"{where}: a value holding a line break cannot be written on one log line")
    if quote is not None and (delim in text or text.startswith(quote)):
        return quote + text.replace(quote, quote + quote) + quote
    if delim in text:
        raise ValueError(f"{where}: {text!r} holds the delimiter {schema.delimiter!r} and the run reads no quotes")
    return text


def _join(cells: list[bytes], schema) -> bytes:
    return schema.delimiter.encode().join(cells)


def _cells(line: bytes, schema) -> list[str] | None:
    from mlfast.io.reader import _split_quoted

    try:
        cells = _split_quoted(line, schema.delimiter.encode(), schema.quote.encode() if schema.quote else None)
        return [c.decode("utf-8") for c in cells]
    except (ValueError, UnicodeDecodeError):
        return None


def _plain_lines(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], label: str, delim: str) -> list[bytes]:
    """Rows of a log without quoting (Criteo, Avazu), cells in file order ``columns``; the ``label``
    column is written when every row has it and left out when none does."""
    has = [r.get(label) is not None for r in rows]
    if any(has) and not all(has):
        raise ValueError(f"rows 0 and {has.index(not has[0])} differ: one has {label!r}, the other not (a batch is "
                         f"all labelled or all unlabelled)")
    cols = [c for c in columns if c != label or all(has)]
    known = set(columns)
    out = []
    for k, row in enumerate(rows):
        for key in row:
            if key not in known:
                raise ValueError(f"row {k}: unknown column {key!r}; expected {', '.join(columns)}")
        cells = []
        for c in cols:
            v = row.get(c)
            t = "" if v is None else _text(v, f"row {k}, column {c!r}")
            if delim in t or "\n" in t or "\r" in t:
                raise ValueError(f"row {k}, column {c!r}: {t!r} holds the delimiter or a line break")
            cells.append(t)
        out.append(delim.join(cells).encode("utf-8"))
    return out


def _criteo_lines(rows: Sequence[Mapping[str, Any]]) -> list[bytes]:
    from mlfast.io.reader import CRITEO_CAT_NAMES, CRITEO_INT_NAMES

    fixed = []
    for k, row in enumerate(rows):
        row = dict(row)
        for c in CRITEO_CAT_NAMES:
            v = row.get(c)
            if v is not None and not isinstance(v, (str, bytes)):
                raise TypeError(f"row {k}, column {c!r}: Criteo categorical values are hex strings such as "
                                f"'68fd1e64', got {type(v).__name__} {v!r}")
        for c in CRITEO_INT_NAMES:
            v = row.get(c)
            if isinstance(v, (float, np.floating)) and float(v).is_integer():
                row[c] = int(v)  # 5.0 -> "5": Criteo's integer columns
        fixed.append(row)
    return _plain_lines(fixed, ["label", *CRITEO_INT_NAMES, *CRITEO_CAT_NAMES], "label", "\t")


def _avazu_lines(rows: Sequence[Mapping[str, Any]]) -> tuple[bytes, list[bytes]]:
    """(Avazu's header, train or test by the label: it tells the reader the layout; the rows' lines)."""
    from mlfast.io.reader import AVAZU_COLUMNS

    lines = _plain_lines(rows, AVAZU_COLUMNS, "click", ",")
    labelled = bool(rows) and rows[0].get("click") is not None
    return ",".join(c for c in AVAZU_COLUMNS if labelled or c != "click").encode(), lines


def _arrays(d: CTRData) -> dict[str, Any]:
    out: dict[str, Any] = {"sparse": d.sparse, "dense": d.dense, "dense_missing": d.dense_missing}
    if d.labels is not None:
        out["labels"] = d.labels
    out["bags"] = [(b.offsets, b.values) for b in d.bags]
    for s, b in enumerate(d.bags):
        out[f"bag{s}_offsets"] = b.offsets
        out[f"bag{s}_values"] = b.values
    return out


# ------------------------------------------------------------------------------ in-memory files
@contextlib.contextmanager
def _memory_file(content: bytes) -> Iterator[str]:
    """A path whose file holds ``content``: a memfd (never on disk) or, without memfd, /dev/shm."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mlfast-featurize", os.MFD_CLOEXEC)
        try:
            _write_all(fd, content)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix="mlfast-featurize-", dir=where)
    try:
        _write_all(fd, content)
        os.close(fd)
        fd = -1
        yield path
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)


def _write_all(fd: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view):]


def _renamed(e: BaseException, path: str, shift: int, what: str) -> BaseException:
    """The reader's error about the in-memory file, naming the caller's input instead: ``<lines>``
    (or ``<rows>``), the line numbered 1-based within it (the header put in front not counted)."""
    from mlfast.io.reader import ParseError

    name = f"<{what}>"
    if isinstance(e, ParseError):
        line = e.line - shift
        msg = str(e).replace(f"{path}, line {e.line},", f"{name}, line {line} ({what}[{line - 1}]),", 1)
        return ParseError(name, line, e.field, e.reason, e.text, msg)
    if type(e) is ValueError and path in str(e):
        return ValueError(str(e).replace(path, name))
    return e
