"""Binary cache of parsed click logs: columnar, memory-mapped, verified on every load.

The first ``read_*`` of a file streams the parser's chunks into one raw file per column
(``labels.bin``, ``dense.bin``, ``dense_missing.bin``, ``sparse.bin``, ``lines.bin`` (each row's
source line); with bag fields ``bag_lengths.bin`` and one ``bag_values_<s>.bin`` each, whose length
is the bag's id count; with an id column ``id_lengths.bin`` and ``id_data.bin``, its bytes),
so files larger than RAM work, then writes ``manifest.json`` last and renames the finished directory into place: an entry
is complete or absent. Later reads memory-map the columns.

An entry is keyed by the source's absolute path and the full reader configuration (format,
buckets, seed, int_buckets, keys, schema, skip mode, versions). Its manifest records the source's
identity, every column's dtype, shape, byte size and a 64-bit checksum (``csrc/checksum.hpp``:
computed in C++ on all threads, so verifying runs near memory speed), and a SHA-256 of the whole
manifest (so the skip counts and line count it carries are covered too). Nothing is trusted: a
load checks all of it, and an entry that is stale (the source changed) or corrupt (bad manifest,
truncated or altered data, a file in the entry that is not a regular file, e.g. a symlink) is
rebuilt with a warning saying why.

The source's identity is its size, mtime_ns, inode, **ctime_ns** (the inode change time, which a
rewrite updates and user space cannot set back: a file rewritten in place with its mtime restored,
as ``touch -r`` or ``rsync --inplace -t`` leave it, is stale) and a content **fingerprint**: the
checksums of 64 KiB blocks at the start, the end and six evenly spaced places (all of a file up to
512 KiB), read without reading the rest.

Example::

    >>> import tempfile, mlfast.io.reader as r
    >>> path, where = "../shared/datasets_raw/paddlerec_criteo_tiny/part-0.txt", tempfile.mkdtemp()
    >>> a = r.read_criteo(path, cache_dir=where)
    >>> b = r.read_criteo(path, cache_dir=where)
    >>> a.meta["cache"]["status"], b.meta["cache"]["status"], bool((a.sparse == b.sparse).all())
    ('miss', 'hit', True)
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mlfast import _native

MAGIC = "mlfast-ctr-cache"
CACHE_VERSION = 3  # 2: ctime + content fingerprint in the identity, checksummed manifest; 3: lines.bin
# The content fingerprint: FINGERPRINT_BLOCKS blocks of FINGERPRINT_BYTES (first, last, evenly between).
FINGERPRINT_BLOCKS = 8
FINGERPRINT_BYTES = 64 << 10
MANIFEST = "manifest.json"

__all__ = ["default_cache_dir", "cached_read", "DiskColumn", "ctr_columns", "entry_path", "source_identity", "fingerprint",
           "clear_cache", "CacheInvalid"]


class CacheInvalid(Exception):
    """A cache entry that must not be used (the message says why)."""


class _WriteFailed(Exception):
    """Writing the cache failed (disk full, permissions): fall back to reading without it."""


class DiskColumn:
    """One verified column file of a cache entry, read by row ranges (``pread``), never mapped:
    what streaming reads (``mlfast.io.stream``), so memory holds only the rows asked for.

    The file is opened once, through the descriptor the load checked (a file swapped in after the
    check is never read)."""

    def __init__(self, f: Any, dtype: np.dtype, shape: tuple[int, ...], name: str = "?"):
        self._f = f
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.name = name

    def __len__(self) -> int:
        return self.shape[0]

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Rows ``start .. start + len(out)`` into ``out`` (C-contiguous, this column's dtype)."""
        n = len(out)
        if not 0 <= start <= start + n <= self.shape[0]:
            raise IndexError(f"{self.name}: rows [{start}, {start + n}) outside [0, {self.shape[0]})")
        view = memoryview(out.reshape(-1).view(np.uint8))
        want, got = n * self.row_bytes, 0
        while got < want:
            r = os.preadv(self._f.fileno(), [view[got:]], start * self.row_bytes + got)
            if r <= 0:
                raise OSError(f"{self.name}: the cache file ended at byte {start * self.row_bytes + got} "
                              f"(truncated after it was verified?)")
            got += r

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        self.read_into(start, out)
        return out

    def close(self) -> None:
        self._f.close()

    def __del__(self) -> None:
        f = getattr(self, "_f", None)
        if f is not None:
            f.close()


def _file_checksum(f: Any, nbytes: int, num_threads: int, name: str, chunk: int = 64 << 20) -> int:
    """The checksum of a file's first ``nbytes``, read in chunks (the file is never mapped)."""
    c = _native.Checksum()
    buf = np.empty(min(chunk, max(nbytes, 1)), np.uint8)
    done = 0
    while done < nbytes:
        n = os.preadv(f.fileno(), [memoryview(buf)[:min(len(buf), nbytes - done)]], done)
        if n <= 0:
            raise CacheInvalid(f"{name} ended at byte {done} of {nbytes}")
        c.update(buf[:n], num_threads)
        done += n
    return c.digest()


def default_cache_dir() -> Path:
    """``$MLFAST_CACHE_DIR``, else ``~/.cache/mlfast``."""
    env = os.environ.get("MLFAST_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mlfast"


RAGGED = "ragged"  # the width of a 1-D column whose length is its own (not the row count)


def ctr_columns(has_label: bool, num_dense: int, num_sparse: int, num_bags: int = 0,
                ids: bool = False) -> dict[str, tuple[np.dtype, int | str | None]]:
    """The cached columns of a CTRData: name -> (dtype, width; None for a 1-D column of one value per
    row, ``RAGGED`` for a 1-D column of any length: a bag field's ids, the id column's bytes)."""
    cols: dict[str, tuple[np.dtype, int | None]] = {}
    if has_label:
        cols["labels"] = (np.dtype(np.float32), None)
    cols["dense"] = (np.dtype(np.float32), num_dense)
    cols["dense_missing"] = (np.dtype(np.bool_), num_dense)
    cols["sparse"] = (np.dtype(np.int64), num_sparse)
    cols["lines"] = (np.dtype(np.int64), None)
    if num_bags:
        cols["bag_lengths"] = (np.dtype(np.int64), num_bags)
        for s in range(num_bags):
            cols[f"bag_values_{s}"] = (np.dtype(np.int64), RAGGED)
    if ids:
        cols["id_lengths"] = (np.dtype(np.int64), None)
        cols["id_data"] = (np.dtype(np.uint8), RAGGED)
    return cols


def fingerprint(path: str | os.PathLike, size: int | None = None) -> str:
    """Checksums of FINGERPRINT_BLOCKS blocks of the file (the first, the last and evenly spaced
    ones between; the whole file when it is small), as hex: a content check that costs a few
    reads, not a pass over the file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        n = os.fstat(fd).st_size if size is None else size
        span = max(n - FINGERPRINT_BYTES, 0)
        starts = sorted({span * k // (FINGERPRINT_BLOCKS - 1) for k in range(FINGERPRINT_BLOCKS)})
        sums = []
        for start in starts:
            block = os.pread(fd, FINGERPRINT_BYTES, start)
            sums.append(f"{_native.checksum(block):016x}")
        return f"{n}:" + "".join(sums)
    finally:
        os.close(fd)


def source_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What says "the same file": absolute path, size, mtime_ns, inode, ctime_ns and a content
    fingerprint (see :func:`fingerprint`)."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            "ctime_ns": st.st_ctime_ns, "fingerprint": fingerprint(path, st.st_size)}


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest without its own digest (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _open_regular(path: Path) -> Any:
    """``path`` opened for reading, refusing anything but a regular file (a symlink, a FIFO, a
    directory): an entry holds its own files, never a link to data elsewhere."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if os.path.islink(path):
            raise CacheInvalid(f"{path.name} is a symlink, not a regular file") from None
        raise CacheInvalid(f"cannot open {path.name} ({e})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise CacheInvalid(f"{path.name} is not a regular file")
    return f


def _check_entry_files(entry: Path, expected: set[str]) -> None:
    """The entry is a real directory holding exactly the expected regular files."""
    st = os.lstat(entry)
    if not stat.S_ISDIR(st.st_mode):
        raise CacheInvalid("the entry is not a directory (a symlink?)")
    for name in os.listdir(entry):
        if name not in expected:
            raise CacheInvalid(f"unexpected {name!r} in the entry")
        mode = os.lstat(entry / name).st_mode
        if not stat.S_ISREG(mode):
            kind = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
            raise CacheInvalid(f"{name} is {kind}")


def _normalized(config: dict[str, Any]) -> Any:
    return json.loads(json.dumps(config, sort_keys=True))


def entry_path(cache_dir: str | os.PathLike, source: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Directory of the entry for (source path, reader config)."""
    key = json.dumps({"version": CACHE_VERSION, "source": os.path.abspath(source), "config": config},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(source))[:64]
    return Path(cache_dir) / f"{stem}-{digest}"


def _shape(rows: int, width: int | str | None) -> tuple[int, ...]:
    return (rows,) if width is None or width == RAGGED else (rows, width)


def _empty_digest() -> int:
    return _native.Checksum().digest()


def _load(entry: Path, source: str, config: dict[str, Any], columns: dict[str, tuple[np.dtype, int | None]],
          num_threads: int, verify: bool = True, mapped: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    if not (entry / MANIFEST).exists() and not (entry / MANIFEST).is_symlink():
        raise CacheInvalid("incomplete entry (no manifest)")
    try:
        with _open_regular(entry / MANIFEST) as f:
            manifest = json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        raise CacheInvalid(f"unreadable manifest ({e})") from None
    try:
        if not isinstance(manifest, dict) or manifest.get("magic") != MAGIC:
            raise CacheInvalid("not an mlfast cache manifest (bad magic)")
        if manifest.get("version") != CACHE_VERSION:
            raise CacheInvalid(f"cache format version {manifest.get('version')}, this mlfast writes {CACHE_VERSION}")
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise CacheInvalid("manifest checksum mismatch (the manifest was altered)")
        _check_entry_files(entry, {MANIFEST} | {f"{name}.bin" for name in columns})
        recorded, now = manifest.get("source"), source_identity(source)
        if recorded != now:
            changed = sorted(k for k in now if not isinstance(recorded, dict) or recorded.get(k) != now[k])
            raise CacheInvalid(f"stale: the source file changed ({', '.join(changed)} differ)")
        if manifest.get("config") != _normalized(config):
            raise CacheInvalid("the manifest's reader configuration does not match")
        rows = manifest["rows"]
        if not isinstance(rows, int) or rows < 0:
            raise CacheInvalid(f"bad row count {rows!r}")
        if set(manifest["columns"]) != set(columns):
            raise CacheInvalid(f"columns {sorted(manifest['columns'])}, expected {sorted(columns)}")
        arrays: dict[str, Any] = {}
        for name, (dtype, width) in columns.items():
            col = manifest["columns"][name]
            if col["file"] != f"{name}.bin":  # never follow a manifest out of its entry
                raise CacheInvalid(f"{name}: unexpected file name {col['file']!r}")
            if width == RAGGED:
                n = col["shape"][0] if isinstance(col.get("shape"), list) and len(col["shape"]) == 1 else None
                if not isinstance(n, int) or n < 0:
                    raise CacheInvalid(f"{name}: bad shape {col.get('shape')!r}")
                shape = (n,)
            else:
                shape = _shape(rows, width)
            if col["dtype"] != dtype.str or tuple(col["shape"]) != shape:
                raise CacheInvalid(f"{name}: {col['dtype']} {col['shape']}, expected {dtype.str} {list(shape)}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            path = entry / col["file"]
            f = _open_regular(path)  # mapped / read through this descriptor: no swap after the check
            try:
                size = os.fstat(f.fileno()).st_size
                if size != nbytes or col["nbytes"] != nbytes:
                    raise CacheInvalid(f"{col['file']} has {size} bytes, expected {nbytes} (truncated or corrupt)")
                if mapped:
                    # Copy-on-write mapping: writable like a parsed array, and writes never reach the file.
                    arr = np.memmap(f, dtype=dtype, mode="c", shape=shape) if nbytes else np.zeros(shape, dtype)
                    digest = (_native.checksum(arr, num_threads) if nbytes else _empty_digest()) if verify else None
                else:
                    arr = DiskColumn(f, dtype, shape, str(path))
                    digest = _file_checksum(f, nbytes, num_threads, col["file"]) if verify else None
            except BaseException:
                f.close()
                raise
            if mapped:
                f.close()
            if digest is not None and f"{digest:016x}" != col["checksum"]:
                if not mapped:
                    f.close()
                raise CacheInvalid(f"checksum mismatch in {col['file']} (corrupt)")
            arrays[name] = arr
        if mapped and "bag_lengths" in arrays:  # each bag's ids must be exactly what its row lengths add up to
            totals = np.asarray(arrays["bag_lengths"]).sum(0)
            for s, total in enumerate(totals):
                if int(total) != len(arrays[f"bag_values_{s}"]):
                    raise CacheInvalid(f"bag_values_{s}.bin holds {len(arrays[f'bag_values_{s}'])} ids, "
                                       f"bag_lengths say {int(total)}")
        if mapped and "id_lengths" in arrays:  # likewise the id column's bytes
            total = int(np.asarray(arrays["id_lengths"]).sum())
            if total != len(arrays["id_data"]):
                raise CacheInvalid(f"id_data.bin holds {len(arrays['id_data'])} bytes, id_lengths say {total}")
        extra = manifest["extra"]
        arrays.setdefault("labels", None)
        arrays["skipped"] = {str(k): int(v) for k, v in extra["skipped"].items()}
        arrays["line_count"] = int(extra["lines"])  # lines read in all (the "lines" column: each row's)
        return arrays, manifest
    except CacheInvalid:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:
        raise CacheInvalid(f"malformed entry ({type(e).__name__}: {e})") from None


def _write_all(f: Any, arr: np.ndarray) -> None:
    if arr.nbytes == 0:
        return
    view = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
    while view.nbytes:
        n = f.write(view)
        view = view[n:]


def _commit(tmp: Path, entry: Path) -> None:
    """Move the finished tmp directory to ``entry``, replacing an older one."""
    try:
        os.rename(tmp, entry)
        return
    except OSError:
        pass
    old = entry.with_name(f".old-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(entry, old)
    except FileNotFoundError:
        old = None  # someone else removed it meanwhile
    os.rename(tmp, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(root: Path, entry: Path, source: str, config: dict[str, Any],
           chunks: Callable[[], Iterator[dict[str, Any]]], columns: dict[str, tuple[np.dtype, int | None]],
           num_threads: int) -> bool:
    """Stream the chunks into a new entry. False (with a warning) when it cannot be written."""
    before = source_identity(source)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    except OSError as e:
        warnings.warn(f"mlfast cache: cannot write to {root} ({e}); reading {source} without a cache", stacklevel=4)
        return False
    files: dict[str, Any] = {}
    try:
        try:
            files = {name: open(tmp / f"{name}.bin", "wb", buffering=0) for name in columns}
        except OSError as e:
            raise _WriteFailed(e) from None
        sums = {name: _native.Checksum() for name in columns}
        rows, lines, skipped = 0, 0, Counter()
        lengths = {name: 0 for name, (_, width) in columns.items() if width == RAGGED}
        # Parse and write overlap: a writer thread stores block k (write + checksum, both without
        # the GIL) while the parser reads block k + 1.
        pending: queue.Queue = queue.Queue(maxsize=1)
        failed: list[BaseException] = []

        def store() -> None:
            while (item := pending.get()) is not None:
                try:
                    if not failed:
                        for name, arr in item.items():
                            _write_all(files[name], arr)
                            if arr.nbytes:
                                sums[name].update(arr.reshape(-1), num_threads)
                except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
                    failed.append(e)
                del item  # the parser reuses these buffers for a later block

        writer = threading.Thread(target=store, name="mlfast-cache-writer", daemon=True)
        writer.start()
        try:
            for chunk in chunks():
                if failed:
                    break
                pending.put({name: chunk[name] for name in columns})
                rows += int(chunk["sparse"].shape[0])
                for name in lengths:
                    lengths[name] += len(chunk[name])
                lines = int(chunk["end_line"]) - 1
                skipped.update(chunk["skipped"])
                del chunk
        finally:
            pending.put(None)
            writer.join()
        if failed:
            if isinstance(failed[0], OSError):
                raise _WriteFailed(failed[0])
            raise failed[0]
        for f in files.values():
            f.close()
        if source_identity(source) != before:
            warnings.warn(f"mlfast cache: {source} changed while it was read; not caching it", stacklevel=4)
            return False
        manifest = {
            "magic": MAGIC,
            "version": CACHE_VERSION,
            "source": before,
            "config": _normalized(config),
            "rows": rows,
            "columns": {
                name: {"file": f"{name}.bin", "dtype": dtype.str,
                       "shape": [lengths[name]] if width == RAGGED else list(_shape(rows, width)),
                       "nbytes": int(sums[name].nbytes), "checksum": f"{sums[name].digest():016x}"}
                for name, (dtype, width) in columns.items()
            },
            "extra": {"skipped": dict(skipped), "lines": lines},
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _commit(tmp, entry)
        except OSError as e:
            raise _WriteFailed(e) from None
        return True
    except _WriteFailed as e:
        warnings.warn(f"mlfast cache: writing {entry} failed ({e.args[0]}); reading {source} without a cache",
                      stacklevel=4)
        return False
    finally:
        for f in files.values():
            f.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cached_read(source: str, config: dict[str, Any], chunks: Callable[[], Iterator[dict[str, Any]]],
                columns: dict[str, tuple[np.dtype, int | None]], *, cache_dir: str | os.PathLike | None = None,
                num_threads: int = 1, mapped: bool = True) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Columns of ``source`` parsed under ``config``, from the cache or built into it.

    ``chunks()`` parses the source and yields dicts holding the ``columns`` arrays plus
    ``skipped`` and ``end_line``. Returns (arrays + ``skipped`` + ``line_count``, info) where info is
    ``{"status": "hit" | "miss" | "rebuilt", "path": entry}``, or None when no entry can be written
    (the caller then reads without the cache). ``mapped=False``: each column is a
    :class:`DiskColumn` (read by row ranges, never mapped) instead of a memory map; the checksums
    are then verified by reading the files in chunks.

    Example::

        >>> import numpy as np
        >>> cols = ctr_columns(False, 0, 1)
        >>> chunk = {"dense": np.zeros((2, 0), np.float32), "dense_missing": np.zeros((2, 0), bool),
        ...          "sparse": np.arange(2, dtype=np.int64)[:, None], "lines": np.array([1, 2]), "skipped": {},
        ...          "end_line": 3}
        >>> import tempfile
        >>> arrays, info = cached_read(__file__, {"demo": 1}, lambda: iter([chunk]), cols,
        ...                            cache_dir=tempfile.mkdtemp())
        >>> arrays["sparse"][:, 0].tolist(), info["status"]
        ([0, 1], 'miss')
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = entry_path(root, source, config)
    status = "miss"
    if entry.exists():
        try:
            arrays, _ = _load(entry, source, config, columns, num_threads, mapped=mapped)
            return arrays, {"status": "hit", "path": str(entry)}
        except CacheInvalid as e:
            warnings.warn(f"mlfast cache entry {entry} for {source}: {e}; rebuilding it", stacklevel=3)
            status = "rebuilt"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"mlfast cache: cannot create {root} ({e}); reading {source} without a cache", stacklevel=3)
        return None
    if not _build(root, entry, source, config, chunks, columns, num_threads):
        return None
    try:
        # Map what was just written. Its checksums were computed from the arrays as they were
        # written; reading it all back to check them again would double the cost of a miss.
        arrays, _ = _load(entry, source, config, columns, num_threads, verify=False, mapped=mapped)
    except CacheInvalid as e:
        warnings.warn(f"mlfast cache entry {entry} failed verification right after writing: {e}", stacklevel=3)
        return None
    return arrays, {"status": status, "path": str(entry)}


def clear_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every entry under ``cache_dir`` (default: :func:`default_cache_dir`); returns how many.

    Example::

        >>> import tempfile
        >>> clear_cache(tempfile.mkdtemp())
        0
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return 0
    n = 0
    for child in root.iterdir():
        if child.is_dir() and ((child / MANIFEST).exists() or child.name.startswith((".tmp-", ".old-"))):
            shutil.rmtree(child, ignore_errors=True)
            n += 1
    return n
