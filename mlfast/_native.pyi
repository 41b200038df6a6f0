"""Type stub of mlfast._native, the C++ extension built from csrc/ (pybind11).

Use it through mlfast.io.reader and mlfast.io.cache; the functions below the reader exist so tests can
check the C++ hash, grammar and checksum against their Python definitions.
"""
from typing import Any, Optional

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

REASONS: list[str]  # stable skip / error reasons, "field_count" ... "bad_sequence", "bad_quote", "blank_line"
INT_TABLE_SIZE: int  # Criteo integers in [0, INT_TABLE_SIZE) take the table path
AVX512_HASH: bool  # this CPU hashes 4 fields at a time (power-of-two buckets or keys; see csrc/hash_rows.hpp)

class ParseFailure(ValueError):
    """Raised by Reader on the first bad line; args = (line, field, reason, text: bytes,
    found_fields, expected_fields). mlfast.io.reader turns it into ParseError."""

class CorruptInput(ValueError):
    """Damaged or truncated compressed input (gzip: a bad header, bad deflate data, a CRC-32 or
    length mismatch, a stream ending mid-member, bytes after the last member that are neither a
    member nor zero padding), or malformed Arrow buffers; args = (message, path, offset: int | None
    (compressed byte offset where decoding stopped), decompressed: int | None (bytes decoded
    cleanly before it), line: int | None (the 1-based decompressed line it fell in)).
    mlfast.io.reader turns it into CorruptInputError. A line that fails to parse in a gzip file
    whose stream turns out damaged within the next 256 MiB raises this, not ParseFailure."""

class Reader:
    """Streaming parser of one file (plain or gzip) under a spec dict built by mlfast.io.reader:
    delimiter, header, columns [(kind, name, dense, sparse, log)], num_dense, has_label,
    field_ids, buckets, offsets, seed, keys, skip_bad, num_threads, block_bytes,
    min_range_bytes, vector_hash, and optionally num_bags (S, default 0), bag_separator (one
    byte, default "^"; with bags it must differ from the delimiter and not be a line break),
    quote (one byte, or "" / None / absent: no quoting; not a line break, the delimiter or, with
    bags, the bag separator) and id_column (a 0-based column index, or -1 / None / absent: none;
    ValueError outside the columns).

    Quoting: a field whose first byte is the quote is quoted; its value is the bytes up to the
    matching closing quote, "" inside standing for one quote, and every column kind parses that
    value (a delimiter or bag separator inside it included). The closing quote must be followed
    by the delimiter or the line end; that, or a quote not closed on its line (a quoted field
    never spans lines), makes the line bad_quote, reported at the field it is in. Other fields
    are taken as they are, a quote inside them included. The field count is the count after
    unquoting. Lines without the quote byte take the unquoted fast path.

    Column kinds: ignore, label, int, hex, text, float, hour, and textseq: a multi-hot column,
    texts joined by bag_separator (FuxiCTR's "170301^573514"). field_ids / buckets (F + S) and
    offsets (F + S + 1) list the F one-hot fields first, then the S bag fields; a textseq
    column's `sparse` is its bag field's index in [F, F + S), each bag field has exactly one
    textseq column and no other column points at one. Each value of a textseq cell is hashed as
    a text value of its bag field (invalid_utf8 likewise); an empty cell is a bag of one id, the
    field's missing row (keys: 0); an empty value inside a cell ("a^^b", "^a", "a^") makes the
    line bad_sequence.

    Raises OSError subclasses for files it cannot open or read, ValueError for a bad spec,
    CorruptInput for damaged gzip data."""

    def __init__(self, path: str, spec: dict[str, Any]) -> None: ...
    def next_chunk(self) -> Optional[dict[str, Any]]:
        """The next block's rows: {"labels": float32[N] | None, "dense": float32[N, Dd],
        "dense_missing": bool[N, Dd], "sparse": int64[N, F], "lines": int64[N] (each row's
        1-based line number in the decompressed input, header and blank and skipped lines
        counted), "skipped": {reason: count}, "first_line", "end_line", "input_bytes"}; None at
        the end. A chunk has rows, except a last one that only carries the skip counts of blank or
        bad lines at the end of the input.

        With an id_column also "id_lengths": int64[N] and "id_data": uint8[sum(id_lengths)], each
        kept row's bytes of that column (unquoted; never parsed or checked) concatenated in row
        order.

        With num_bags S > 0 also "bag_lengths": int64[N, S] (row r's number of ids in bag field
        s, at least 1) and "bag_values": a list of S int64 arrays, bag field s's ids of all the
        chunk's rows concatenated in row order (len(bag_values[s]) == bag_lengths[:, s].sum());
        with S = 0 neither key is there."""
    def read_all(self) -> dict[str, Any]:
        """Everything left, as one dict shaped like next_chunk()'s."""
    @property
    def next_line(self) -> int: ...

class ArrowParser:
    """Parser of Arrow record batches (Parquet / Arrow IPC via pyarrow) under a reader spec built by
    mlfast.io.arrow: the Reader's spec keys (delimiter, header and quote unused; id_column must be
    -1 or absent: mlfast.io.arrow reads an id column with pyarrow), columns of kinds ignore, label,
    float, text and textseq only; min_range_bytes is the fewest rows per thread.
    Values follow the text grammar and hash (see csrc/arrow_batch.hpp for each Arrow type)."""

    def __init__(self, spec: dict[str, Any]) -> None: ...
    def parse(self, columns: list[Optional[tuple]], rows: int, first_row: int) -> dict[str, Any]:
        """One batch: per spec column None (ignored) or (type, length, offset, validity, offsets,
        data, child) with type one of null, bool, int8..int64, uint8..uint64, float32, float64,
        utf8 (string/binary), large_utf8, list, large_list; buffers (pyarrow.Buffer, bytes, ...) or
        None, child a list's values described alike. Every buffer is checked against length and
        offset first (CorruptInput). Returns next_chunk()'s dict ("first_line" / "end_line": the
        batch's 1-based rows, first_row .. first_row + rows; "lines": each kept row's 0-based row
        in the file, first_row - 1 + its index in the batch); a bad row raises ParseFailure with
        line = its row and found_fields = 0 when the value was null (1 otherwise), or is skipped
        and counted. GIL released."""

def read_head(path: str, max_bytes: int) -> tuple[bytes, bool]:
    """(the first max_bytes bytes of the content, is_gzip), decompressed by the Reader's own source
    (format detection sees what the parser sees; damage raises CorruptInput). GIL released."""

class Checksum:
    """Streaming cache checksum: update() with consecutive pieces equals one checksum() of all."""

    def __init__(self) -> None: ...
    def update(self, buffer: Buffer, threads: int = 1) -> None: ...
    def digest(self) -> int: ...
    @property
    def nbytes(self) -> int: ...

def checksum(buffer: Buffer, threads: int = 1) -> int:
    """64-bit checksum of a C-contiguous buffer's bytes (csrc/checksum.hpp), GIL released."""

def hash_keys(values: npt.ArrayLike, seed: int, field_id: int, buckets: int = 0) -> npt.NDArray[np.uint64]:
    """mlfast.io.hashing.hash_key(v, seed, field_id) for each uint64 v; with buckets > 0, key % buckets."""

def hash_text(texts: list[str] | list[bytes], seed: int, field_id: int) -> npt.NDArray[np.uint64]:
    """hash_key(fnv1a64(utf-8 bytes), seed, field_id) for each text."""

def int_features(values: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The reader's (signed_log1p as float32, FuxiCTR bucket) of int64 Criteo integers."""

def parse_value(kind: str, data: bytes) -> tuple[Optional[str], Any]:
    """One field parsed as the reader does: (None, value) or (reason, None). kind: label, int,
    hex, text, float or hour (value (hour, weekday, weekend)); not textseq (ValueError): parse
    each of its values as text."""

def release_memory() -> int:
    """Unmap the released output buffers the reader keeps for reuse; returns the bytes freed."""
