"""The published layout (../shared/docs/swift-app-contract.md): package and Resources folders, deterministic zips."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

# Every zip entry gets this time, so that the same files always give the same zip bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_COPY_CHUNK = 8 * 1024 * 1024
_ZIP32_LIMIT = 0xFFFFFFFF


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a stored (immutable) file into place; copy where the file system cannot link."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name != "record.json":
            link_or_copy(path, target / path.relative_to(source))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(staged: Path, target: Path) -> None:
    """Swap a fully assembled folder (or file) into place in one rename; what was at `target` is removed only after
    the new one is there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    _remove(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staged, target)
    _remove(old)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_COPY_CHUNK):
            crc = zlib.crc32(block, crc)  # releases the GIL: runs beside the copy of the previous file
    return crc


def _copy_into(source: Path, sink: BinaryIO) -> None:
    """Append a file's bytes to `sink` in the kernel where possible (copy_file_range), else through a buffer."""
    sink.flush()
    with open(source, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        copied = 0
        try:
            while copied < size:
                n = os.copy_file_range(handle.fileno(), sink.fileno(), size - copied)
                if n == 0:
                    break
                copied += n
        except (AttributeError, OSError):
            handle.seek(copied)
            sink.seek(0, os.SEEK_END)
            shutil.copyfileobj(handle, sink, _COPY_CHUNK)
            return
    sink.seek(0, os.SEEK_END)


def write_zip(resources: Path, zip_path: Path, top_folder: str) -> None:
    """Zip `resources` under one top folder: sorted entries, fixed times and modes, stored (not deflated), ZIP64
    where sizes need it. The CRC of the next file is computed in a second thread while the current one is copied
    in the kernel, so zipping runs near the speed of a plain copy."""
    entries: list[tuple[str, Path | None]] = [(f"{top_folder}/", None)]
    for item in sorted(p for p in resources.rglob("*") if p.name != "record.json"):
        name = f"{top_folder}/{item.relative_to(resources).as_posix()}"
        entries.append((name + "/", None) if item.is_dir() else (name, item))
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    date = ((ZIP_TIME[0] - 1980) << 9) | (ZIP_TIME[1] << 5) | ZIP_TIME[2]
    central = []
    with ThreadPoolExecutor(max_workers=1) as pool, open(zip_path, "wb") as sink:
        crcs = {name: pool.submit(_crc32, path) for name, path in entries if path is not None}
        headers = []
        for name, path in entries:
            encoded = name.encode("utf-8")
            size = path.stat().st_size if path is not None else 0
            offset = sink.tell()
            big = size >= _ZIP32_LIMIT
            extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
            shown = _ZIP32_LIMIT if big else size
            flags = 0x800  # names are UTF-8
            # the CRC is patched in below, once the second thread has it: copying never waits for it
            sink.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, flags, 0, 0, date, 0, shown, shown,
                                   len(encoded), len(extra)) + encoded + extra)
            if path is not None:
                _copy_into(path, sink)
            attributes = ((0o40755 << 16) | 0x10) if path is None else (0o100644 << 16)
            headers.append((name, path, encoded, size, offset, attributes))
        sink.flush()
        for name, path, encoded, size, offset, attributes in headers:
            crc = crcs[name].result() if path is not None else 0
            os.pwrite(sink.fileno(), struct.pack("<I", crc), offset + 14)
            central.append((encoded, crc, size, offset, attributes))
        directory_start = sink.tell()
        for encoded, crc, size, offset, attributes in central:
            needs64 = size >= _ZIP32_LIMIT or offset >= _ZIP32_LIMIT
            extra = struct.pack("<HH", 1, 24) + struct.pack("<QQQ", size, size, offset) if needs64 else b""
            sink.write(struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | 45, 45, 0x800, 0, 0, date, crc,
                _ZIP32_LIMIT if needs64 else size, _ZIP32_LIMIT if needs64 else size, len(encoded), len(extra), 0,
                0, 0, attributes, _ZIP32_LIMIT if needs64 else offset) + encoded + extra)
        directory_size = sink.tell() - directory_start
        count = len(central)
        if directory_start >= _ZIP32_LIMIT or count >= 0xFFFF:
            zip64_end = sink.tell()
            sink.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, directory_size,
                                   directory_start))
            sink.write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1))
            sink.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _ZIP32_LIMIT, _ZIP32_LIMIT, 0))
        else:
            sink.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, directory_size, directory_start, 0))
