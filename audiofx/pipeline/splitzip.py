"""Read a split ZIP archive (NAME.z01, NAME.z02, ..., NAME.zip) with the standard zipfile module.

FSD50K's audio is published as Info-ZIP split archives. zipfile cannot read them: every
offset in their central directory is relative to the start of the part ("disk") it points
into, and zipfile refuses archives that say they span several disks. The parts, laid end to
end, do hold every byte of a normal archive, so this module shows zipfile a read-only view of
the concatenated parts whose central directory (the last few KB) is rewritten with absolute
offsets and disk numbers of 0. Nothing is copied: a 24 GB archive needs no extra disk space,
where ``zip -s 0`` (the tool the FSD50K page suggests) writes a second full copy.

Format: PKWARE APPNOTE 4.3.6 (central directory header), 4.3.14-4.3.16 (end records),
4.5.3 (Zip64 extra field) and 8.5 (split archives).
"""

from __future__ import annotations

import bisect
import io
import struct
import zipfile
from pathlib import Path
from typing import Sequence

_CD = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory, 22 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # Zip64 end of central directory, 56 bytes
_LOC64 = struct.Struct("<IIQI")  # Zip64 end of central directory locator, 20 bytes
_SIG_CD, _SIG_EOCD, _SIG_EOCD64, _SIG_LOC64 = 0x02014B50, 0x06054B50, 0x06064B50, 0x07064B50
_MAX32, _MAX16 = 0xFFFFFFFF, 0xFFFF


class _View(io.RawIOBase):
    """Seekable read-only concatenation of the parts. Built once per open: the header reads
    go through it, then replace_end() puts the rewritten central directory in place of the
    parts' own end and the same view (the same open files) is handed to zipfile."""

    def __init__(self, paths: Sequence[Path]):
        self._files: list[io.BufferedReader] = []
        try:
            for p in paths:
                self._files.append(open(p, "rb"))
        except BaseException:
            self.close()
            raise
        self.sizes = [f.seek(0, io.SEEK_END) for f in self._files]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # each part's absolute offset
        self._cut = self._size = sum(self.sizes)  # bytes of the parts that are shown
        self._tail = b""  # shown after them, in place of the rest
        self._pos = 0

    def replace_end(self, cut: int, tail: bytes) -> None:
        """Show the parts' bytes up to `cut`, then `tail` instead of the rest."""
        self._cut, self._tail, self._size = cut, tail, cut + len(tail)

    def read_at(self, pos: int, n: int) -> bytes:
        """Exactly n bytes at an absolute position (may cross part boundaries)."""
        self.seek(pos)
        out = bytearray()
        while len(out) < n:
            chunk = self.read(n - len(out))
            if not chunk:
                raise zipfile.BadZipFile("split archive ends inside its central directory")
            out += chunk
        return bytes(out)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        if self._pos >= self._cut:
            chunk = self._tail[self._pos - self._cut:self._pos - self._cut + len(view)]
        else:
            i = bisect.bisect_right(self.starts, self._pos) - 1
            f = self._files[i]
            f.seek(self._pos - self.starts[i])
            chunk = f.read(min(len(view), self._cut - self._pos))
        view[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _zip64_fields(extra: bytes, want: list[str]) -> tuple[dict[str, int], bytes]:
    """The Zip64 extra block's values (present only for fields whose header holds the
    0xFFFF... marker, in APPNOTE order) and the other extra blocks, unchanged."""
    values: dict[str, int] = {}
    rest = bytearray()
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        body = extra[i + 4:i + 4 + size]
        if tag == 0x0001:
            j = 0
            for name in want:
                width = 4 if name == "disk" else 8
                if j + width <= len(body):
                    values[name] = int.from_bytes(body[j:j + width], "little")
                    j += width
        else:
            rest += extra[i:i + 4 + size]
        i += 4 + size
    return values, bytes(rest)


def _rewrite_directory(cd: bytes, starts: list[int], count: int) -> bytes:
    """The central directory with every entry's local header offset made absolute, disk 0."""
    out = bytearray()
    pos = 0
    for _ in range(count):
        if pos + _CD.size > len(cd):
            raise zipfile.BadZipFile("split archive: central directory is truncated")
        (sig, made, need, flags, method, mtime, mdate, crc, csize, usize, nlen, elen, clen,
         disk, iattr, eattr, offset) = _CD.unpack_from(cd, pos)
        if sig != _SIG_CD:
            raise zipfile.BadZipFile("split archive: bad central directory entry")
        name = cd[pos + 46:pos + 46 + nlen]
        extra = cd[pos + 46 + nlen:pos + 46 + nlen + elen]
        comment = cd[pos + 46 + nlen + elen:pos + 46 + nlen + elen + clen]
        pos += 46 + nlen + elen + clen

        want = [k for k, v in (("usize", usize), ("csize", csize), ("offset", offset)) if v == _MAX32]
        want += ["disk"] if disk == _MAX16 else []
        big, extra = _zip64_fields(extra, want)
        disk = big.get("disk", disk)
        if disk >= len(starts):
            raise zipfile.BadZipFile(f"split archive: entry {name!r} is on part {disk + 1} of {len(starts)}")
        absolute = starts[disk] + big.get("offset", offset)

        z64 = b"".join(struct.pack("<Q", big[k]) for k in ("usize", "csize") if k in big)
        if absolute >= _MAX32:
            z64 += struct.pack("<Q", absolute)
            offset = _MAX32
        else:
            offset = absolute
        if z64:
            extra += struct.pack("<HH", 0x0001, len(z64)) + z64
        out += _CD.pack(sig, made, need, flags, method, mtime, mdate, crc, csize, usize, nlen, len(extra), clen,
                        0, iattr, eattr, offset)
        out += name + extra + comment
    return bytes(out)


def _end_records(cd_offset: int, cd_size: int, count: int) -> bytes:
    """End records for a one-disk archive; Zip64 ones when a value does not fit 16/32 bits."""
    if count < _MAX16 and cd_offset < _MAX32 and cd_size < _MAX32:
        return _EOCD.pack(_SIG_EOCD, 0, 0, count, count, cd_size, cd_offset, 0)
    eocd64_at = cd_offset + cd_size
    return (
        _EOCD64.pack(_SIG_EOCD64, _EOCD64.size - 12, 45, 45, 0, 0, count, count, cd_size, cd_offset)
        + _LOC64.pack(_SIG_LOC64, 0, eocd64_at, 1)
        + _EOCD.pack(_SIG_EOCD, 0, 0, min(count, _MAX16), min(count, _MAX16), min(cd_size, _MAX32),
                     min(cd_offset, _MAX32), 0)
    )


def open_split_zip(parts: Sequence[Path]) -> zipfile.ZipFile:
    """A ZipFile over the parts of a split archive, in order: NAME.z01, ..., NAME.zip.

    A single part is an ordinary archive and is opened as it is. Raises zipfile.BadZipFile
    when the parts do not form one archive (a part missing, truncated or out of order).
    """
    parts = [Path(p) for p in parts]
    if len(parts) == 1:
        return zipfile.ZipFile(parts[0])
    view = _View(parts)
    try:
        return _SplitZipFile(_with_directory(view, parts))
    except BaseException:
        view.close()
        raise


def _with_directory(view: _View, parts: list[Path]) -> _View:
    """The view with the last part's central directory rewritten for one disk at its end."""
    starts, last = view.starts, view.sizes[-1]
    # The end record is in the last 64 KB + 22 bytes (its comment is at most 64 KB).
    tail_at = starts[-1] + max(0, last - (_MAX16 + _EOCD.size))
    tail = view.read_at(tail_at, starts[-1] + last - tail_at)
    at = tail.rfind(struct.pack("<I", _SIG_EOCD))
    if at < 0 or at + _EOCD.size > len(tail):
        raise zipfile.BadZipFile(f"{parts[-1].name}: no end of central directory record")
    _, disk_no, cd_disk, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    eocd_abs = tail_at + at

    loc_abs = eocd_abs - _LOC64.size
    if loc_abs >= 0:
        sig, z64_disk, z64_offset, _ = _LOC64.unpack(view.read_at(loc_abs, _LOC64.size))
        if sig == _SIG_LOC64:
            if z64_disk >= len(parts):
                raise _wrong_parts(z64_disk + 1, parts)
            rec = _EOCD64.unpack(view.read_at(starts[z64_disk] + z64_offset, _EOCD64.size))
            if rec[0] != _SIG_EOCD64:
                raise zipfile.BadZipFile("split archive: bad Zip64 end of central directory record")
            _, _, _, _, disk_no, cd_disk, _, count, cd_size, cd_offset = rec
    if disk_no + 1 != len(parts) or cd_disk >= len(parts):
        raise _wrong_parts(disk_no + 1, parts)

    cd_abs = starts[cd_disk] + cd_offset
    directory = _rewrite_directory(view.read_at(cd_abs, cd_size), starts, count)
    view.replace_end(cd_abs, directory + _end_records(cd_abs, len(directory), count))
    return view


def _wrong_parts(expected: int, parts: Sequence[Path]) -> zipfile.BadZipFile:
    names = ", ".join(p.name for p in parts)
    return zipfile.BadZipFile(f"split archive has {expected} parts but {len(parts)} were given ({names})")


class _SplitZipFile(zipfile.ZipFile):
    """A ZipFile that also closes the view of the parts it reads from."""

    def __init__(self, view: _View):
        self._view = io.BufferedReader(view, buffer_size=1 << 20)
        try:
            super().__init__(self._view)
        except BaseException:
            self._view.close()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._view.close()
