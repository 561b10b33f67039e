"""File checksums for saved artifacts: written when a save is complete, verified before a load.

Standard library only, and nothing from the rest of `mmedit_jax`, so any saver (converted models today, saved
editors later) can use it.

    write_checksums(root, files=None) -> str
        Hash `files` (paths relative to `root`; default: every regular file under `root`, recursively) and
        write `root/checksums.json` atomically. Call it after the save is complete.
    verify_checksums(root, remedy=...) -> int | None
        Check every file listed in `root/checksums.json`: its size first (a truncated or grown file is named as
        such without reading it), then its sha256. Raises `IntegrityError` naming the first bad file and what to
        do (`remedy`); returns the number of files verified; with no checksums file (a save written before
        checksums existed) warns once (`UnverifiedWarning`, one line) and returns None.
    list_files(root, under="") -> list[str]
        Every regular file below `root/under`, relative to `root`, sorted (the checksums file excluded).
    skip_requested() -> bool
        Whether `$MMEDIT_JAX_SKIP_VERIFY` asks to skip verification ("1", "true", "yes", "on").

`checksums.json`: {"format": 1, "algorithm": "sha256", "files": {"rel/path": {"size": N, "sha256": HEX}}}.
Hashing streams each file in 1 MiB chunks (sha256 runs at about 1.5-1.7 GB/s per core with SHA-NI) and hashes
several files at once in threads (hashlib releases the GIL), so a multi-GB checkpoint takes seconds.

CLI: `python -m mmedit_jax.integrity write|verify ROOT [--under SUBDIR]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

CHECKSUMS_FILE = "checksums.json"
ALGORITHM = "sha256"
CHUNK = 1 << 20
FORMAT = 1
SKIP_ENV = "MMEDIT_JAX_SKIP_VERIFY"


class IntegrityError(ValueError):
    """A file whose size or checksum differs from the one recorded at save time (or a missing file).
    `path` is the offending file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class UnverifiedWarning(UserWarning):
    """A saved artifact without a checksums file: it loads, but nothing was verified."""


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def file_digest(path: str | os.PathLike, algorithm: str = ALGORITHM, chunk: int = CHUNK) -> str:
    """Hex digest of a file, streamed `chunk` bytes at a time."""
    h = hashlib.new(algorithm)
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def list_files(root: str | os.PathLike, under: str = "") -> list[str]:
    root = os.fspath(root)
    out = []
    for dirpath, _, names in os.walk(os.path.join(root, under)):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != CHECKSUMS_FILE and os.path.isfile(full) and not os.path.islink(full):
                out.append(rel)
    return sorted(out)


def _workers(n_files: int, workers: int | None) -> int:
    return max(1, min(n_files, workers or min(8, os.cpu_count() or 1)))


def _safe_rel(root: str, rel: str) -> str:
    """`root/rel`, refusing a listed path that is absolute or climbs out of `root`."""
    if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise IntegrityError(f"{os.path.join(root, CHECKSUMS_FILE)} lists {rel!r}, which is outside {root}")
    return os.path.join(root, rel)


def write_checksums(root: str | os.PathLike, files: Iterable[str] | None = None, *, algorithm: str = ALGORITHM,
                    workers: int | None = None) -> str:
    """Hash `files` (relative to `root`; default all files under it) into `root/checksums.json`; its path."""
    root = os.path.abspath(os.fspath(root))
    rels = sorted(set(list_files(root) if files is None else (str(f).replace(os.sep, "/") for f in files)))
    paths = [_safe_rel(root, rel) for rel in rels]
    with ThreadPoolExecutor(_workers(len(paths), workers)) as pool:
        digests = list(pool.map(lambda p: file_digest(p, algorithm), paths))
    table = {rel: {"size": os.path.getsize(p), algorithm: d} for rel, p, d in zip(rels, paths, digests)}
    out = os.path.join(root, CHECKSUMS_FILE)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "algorithm": algorithm, "files": table}, f, indent=1, sort_keys=True)
    os.replace(tmp, out)
    return out


def read_checksums(root: str | os.PathLike) -> dict | None:
    """The parsed checksums file of `root` (None when there is none)."""
    file = os.path.join(os.fspath(root), CHECKSUMS_FILE)
    try:
        with open(file) as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise IntegrityError(f"{file} is not valid JSON ({e}); it is corrupt", file) from None
    algorithm = table.get("algorithm") if isinstance(table, dict) else None
    if (not isinstance(table, dict) or table.get("format") != FORMAT or algorithm not in hashlib.algorithms_available
            or not isinstance(table.get("files"), dict)):
        raise IntegrityError(f"{file} is not a checksums file this code reads (format {FORMAT})", file)
    return table


def verify_checksums(root: str | os.PathLike, *, remedy: str = "re-create it from its source",
                     workers: int | None = None, warn_if_missing: bool = True) -> int | None:
    """Check the files listed in `root/checksums.json` (sizes first, then hashes). Raises `IntegrityError`
    naming the first bad file and `remedy`; returns how many files were verified, or None (after a one-line
    `UnverifiedWarning`) when `root` has no checksums file."""
    root = os.path.abspath(os.fspath(root))
    table = read_checksums(root)
    if table is None:
        if warn_if_missing:
            warnings.warn(f"{root} has no {CHECKSUMS_FILE} (saved before checksums existed): loading it unverified; "
                          f"{remedy} to add them", UnverifiedWarning, stacklevel=2)
        return None
    algorithm, entries = table["algorithm"], table["files"]
    checked = []
    for rel in sorted(entries):
        path, want = _safe_rel(root, rel), entries[rel]
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing (listed in {CHECKSUMS_FILE}); {remedy}", path) from None
        if size != want.get("size"):
            how = "truncated" if size < want.get("size", 0) else "longer than when it was saved"
            raise IntegrityError(f"{path} is {how} ({size} bytes, {want.get('size')} when saved); {remedy}", path)
        checked.append((path, want.get(algorithm)))
    with ThreadPoolExecutor(_workers(len(checked), workers)) as pool:
        digests = list(pool.map(lambda pw: file_digest(pw[0], algorithm), checked))
    for (path, want), got in zip(checked, digests):
        if got != want:
            raise IntegrityError(f"{path} is corrupt ({algorithm} differs from the one recorded when it was saved); "
                                 f"{remedy}", path)
    return len(checked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmedit_jax.integrity", description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("write", "verify"))
    ap.add_argument("root", help="directory holding (or to hold) checksums.json")
    ap.add_argument("--under", default="", help="write: hash only the files below ROOT/UNDER (e.g. params)")
    args = ap.parse_args(argv)
    try:
        if args.action == "write":
            out = write_checksums(args.root, list_files(args.root, args.under))
            print(f"wrote {out}")
        else:
            n = verify_checksums(args.root)
            print(f"{args.root}: no {CHECKSUMS_FILE}" if n is None else f"{args.root}: {n} files verified")
    except (IntegrityError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
