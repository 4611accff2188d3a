"""`audiofx download`: fetch a dataset from its official location into its official layout.

One table (SOURCES) says where each dataset's archives are, their published checksums, the
archive folder that becomes the dataset root and how many clips the dataset adapter must
find once it is complete. download() then:

1. does nothing when the root already holds the complete dataset (fetch_missing(), which
   extract --download calls, does nothing when the root holds any file: extract checks it);
2. fetches every archive into <root>/../downloads/ with HTTP Range resume: bytes go to
   NAME.part, which a rerun (or an automatic retry) continues; the file gets its real name
   only when complete (and its md5 matches, where the table has one);
3. extracts zip (split zips too, see splitzip.py) and tar.gz archives (Archive.kind tells
   which, from the name) with zipfile/tarfile into a staging folder next to the root,
   refusing members that would land outside it, then renames the archive's top folder to
   the root, so a root never holds half a dataset;
4. checks the result with the dataset's own adapter (the same index() extract uses): the
   number of clips it lists and that each of them is on disk.

A mirror (--mirror or AUDIOFX_DOWNLOAD_MIRROR; mirror_base() decides which, for download()
and listing() alike) replaces the scheme and host of every URL, so a local copy of the files
(and the tests' local server) goes through the same code.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import http.client
import os
import re
import shutil
import socket
import sys
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from audiofx import __version__
from audiofx.errors import ConfigError, DatasetError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.datasets.base import default_root, file_digest, safe_relpath

MIRROR_ENV = "AUDIOFX_DOWNLOAD_MIRROR"
CHUNK = 1 << 20


_SPLIT_PART = re.compile(r"\.z\d\d$")  # NAME.z01, NAME.z02, ...: the leading parts of NAME.zip


@dataclass(frozen=True)
class Archive:
    name: str  # file name in the downloads folder
    url: str
    md5: str = ""  # the checksum its host publishes; "" where there is none

    @property
    def kind(self) -> str:
        """How it is unpacked, from its name (the one place that decides): "zip" (NAME.zip,
        with its NAME.z01.. parts if any), "tar" (.tar.gz, .tgz, .tar) or "part" (NAME.z01..,
        read as part of NAME.zip, never on its own)."""
        if self.name.endswith(".zip"):
            return "zip"
        if self.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "tar"
        if _SPLIT_PART.search(self.name):
            return "part"
        raise ConfigError(f"{self.name}: not a zip, split zip part or tar archive", "name it NAME.zip, "
                          "NAME.z01.., NAME.tar.gz or NAME.tar")


@dataclass(frozen=True)
class Source:
    dataset: str
    page: str  # the record or page that lists the files
    archives: tuple[Archive, ...]  # all files to fetch; NAME.z01.. are parts of NAME.zip
    clips: int  # clips the adapter's index() lists for the complete dataset
    folder: str = ""  # the archive folder that becomes the root ("": members go straight into it)
    note: str = ""


def _zenodo(record: str, *names_md5: tuple[str, str]) -> tuple[Archive, ...]:
    return tuple(Archive(n, f"https://zenodo.org/records/{record}/files/{n}?download=1", md5) for n, md5 in names_md5)


_ESC50_ARCHIVE = (Archive("ESC-50-master.zip", "https://github.com/karoldvl/ESC-50/archive/master.zip"),)
_ESC_NOTE = "GitHub builds the archive of the master branch on request: it has no published checksum"

# Checksums are the md5 values the Zenodo records and the GTZAN host publish.
SOURCES: dict[str, Source] = {
    "esc50": Source("esc50", "https://github.com/karolpiczak/ESC-50", _ESC50_ARCHIVE, 2000, "ESC-50-master", _ESC_NOTE),
    # ESC-10 is the 400 clips of ESC-50 whose esc10 column is true: the same archive.
    "esc10": Source("esc10", "https://github.com/karolpiczak/ESC-50", _ESC50_ARCHIVE, 400, "ESC-50-master", _ESC_NOTE),
    "urbansound8k": Source(
        "urbansound8k", "https://zenodo.org/records/1203745",
        _zenodo("1203745", ("UrbanSound8K.tar.gz", "9aa69802bbf37fb986f71ec1483a196e")),
        8732, "UrbanSound8K",
    ),
    "gtzan": Source(
        "gtzan", "http://marsyas.info/downloads/datasets.html",
        (Archive("genres.tar.gz", "http://opihi.cs.uvic.ca/sound/genres.tar.gz", "5b3d6dddb579ab49814ab86dba69e7c7"),),
        1000, "",
        "the original UVic host is often unreachable; marsyas also publishes the same archive at "
        "https://huggingface.co/datasets/marsyas/gtzan/resolve/main/data/genres.tar.gz",
    ),
    # dev and eval audio are Info-ZIP split archives (.z01.. + .zip); 40966 dev + 10231 eval clips.
    "fsd50k": Source(
        "fsd50k", "https://zenodo.org/records/4060432",
        _zenodo(
            "4060432",
            ("FSD50K.ground_truth.zip", "ca27382c195e37d2269c4c866dd73485"),
            ("FSD50K.dev_audio.z01", "faa7cf4cc076fc34a44a479a5ed862a3"),
            ("FSD50K.dev_audio.z02", "8f9b66153e68571164fb1315d00bc7bc"),
            ("FSD50K.dev_audio.z03", "1196ef47d267a993d30fa98af54b7159"),
            ("FSD50K.dev_audio.z04", "d088ac4e11ba53daf9f7574c11cccac9"),
            ("FSD50K.dev_audio.z05", "81356521aa159accd3c35de22da28c7f"),
            ("FSD50K.dev_audio.zip", "c480d119b8f7a7e32fdb58f3ea4d6c5a"),
            ("FSD50K.eval_audio.z01", "3090670eaeecc013ca1ff84fe4442aeb"),
            ("FSD50K.eval_audio.zip", "6fa47636c3a3ad5c7dfeba99f2637982"),
        ),
        51197, "",
    ),
    # 21 audio zips and the metadata zip, all under one top folder. The development set has
    # 14400 segments; its official setup (fold1_train 9185 + fold1_evaluate 4185) uses 13370,
    # which is what the adapter indexes.
    "tau2019": Source(
        "tau2019", "https://zenodo.org/records/2589280",
        _zenodo(
            "2589280",
            ("TAU-urban-acoustic-scenes-2019-development.meta.zip", "09782f2097e4735687af73c44919329c"),
            *((f"TAU-urban-acoustic-scenes-2019-development.audio.{i}.zip", md5) for i, md5 in enumerate((
                "aca4ebfd9ed03d5f747d6ba8c24bc728", "c4f170408ce77c8c70c532bf268d7be0", "c7214a07211f10f3250290d05e72c37e",
                "a6a62110f6699cf4432072acb1dffda6", "091a0b6d3c84b8e60e46940aa7d4a8a0", "114f4ca13e074391b98a1cfd8140de65",
                "5951dd2968f7a514e2afbe279c4f060d", "b0b63dc95b327e1509857c8d8a663cc3", "3c32a693a6b111ffb957be3c1dd22e9b",
                "0ffbf60006da520cc761fb74c878b98b", "599055d93b4c11057c29be2df54538d4", "98b8d162ff3665695c4c910e6c372cc8",
                "a356c08b1a5a21d433eba37ef87587f4", "f8969771e7faf7dd471d1cf78b0cf011", "4758c4b0fb7484faa632266e78850820",
                "a18acad9ede8ea76574216feb887f0bc", "1af7703484632f340da5c33662dc9632", "b67402bf3e08f4da394a7c18756c0fd2",
                "035db315f19106eb848b6f9b32bcc47c", "9cb28c74911bf8a3eadcf53f50a5b5d6", "0e44ed85c88ec036a9725b4dd1dfaea0",
            ), start=1)),
        ),
        13370, "TAU-urban-acoustic-scenes-2019-development",
    ),
}


@dataclass
class DownloadSummary:
    dataset: str
    root: Path
    status: str  # "present" (nothing done) or "downloaded"
    clips: int  # clips the dataset adapter found
    fetched_bytes: int = 0  # bytes transferred in this run
    resumed: list[str] = field(default_factory=list)  # archives continued from a .part file
    archives: Path | None = None  # where the archives are (kept) or were (removed)
    kept_archives: bool = False


@dataclass(frozen=True)
class Listing:
    """What `audiofx download --list` shows: the files to fetch by hand and where they go."""

    source: Source
    urls: tuple[str, ...]  # each archive's URL, through the mirror in effect
    root: Path


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ConfigError(f"audiofx download does not know {name!r}", f"it knows: {', '.join(SOURCES)}")
    return SOURCES[name]


def mirror_base(mirror: str | None = None) -> str | None:
    """The mirror in effect: the one given ("" for none) or else $AUDIOFX_DOWNLOAD_MIRROR."""
    return mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None


def resolve_url(url: str, mirror: str | None) -> str:
    """The URL with its scheme and host replaced by the mirror's (a mirror path is a prefix)."""
    if not mirror:
        return url
    u, m = urllib.parse.urlsplit(url), urllib.parse.urlsplit(mirror)
    if not m.scheme or not m.netloc:
        raise ConfigError(f"mirror {mirror!r} is not a base URL", "write it as http://host:port or https://host/prefix")
    return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


# -- the layout check -----------------------------------------------------------------------


def check_dataset(name: str, root: Path, clips: int | None = None) -> int:
    """Index root with the dataset's adapter; the number of clips it lists must be `clips`
    (the table's count by default) and each of them must be a file. Returns the count."""
    expected = get_source(name).clips if clips is None else clips
    adapter = get_adapter(name)
    index = adapter.index(root, dict(adapter.options))
    found = len(index.clips)
    if found != expected:
        raise DatasetError(f"{name}: {root} lists {found} clips, expected {expected}",
                           f"an incomplete or different release; remove {root} and download again")
    missing = [c.path for c in index.clips if not (root / c.path).is_file()]
    if missing:
        raise DatasetError(f"{name}: {len(missing)} of {found} clips are missing under {root}, e.g. {missing[0]}",
                           f"remove {root} and download again")
    return found


# -- fetching ----------------------------------------------------------------------------------

# What a host that is down, unknown or unreachable raises (urllib wraps connect errors in
# URLError; a connection cut while reading raises ConnectionError or TimeoutError).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.gaierror)


_BUSY = (429, 500, 502, 503, 504)  # answers worth another try after a pause


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file keeps what arrived."""


def _offline(url: str, reason: object, target: Path, root: Path, source: Source) -> DatasetError:
    """The one line for a host that cannot be reached: what to fetch by hand, where it goes."""
    root = root.resolve()
    where = f"its {source.folder}/ folder" if source.folder else "it"
    others = (f" (and the other {len(source.archives) - 1} files that `audiofx download {source.dataset} --list` "
              f"names)" if len(source.archives) > 1 else "")
    return DatasetError(
        f"cannot reach {url} ({reason})",
        f"fetch it by hand and save it as {target.resolve()}{others}, then rerun "
        f"`audiofx download {source.dataset} --root {root}`; or unpack {where} so that it is {root}",
    )


def _total_from_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) from 'bytes 100-199/200' or 'bytes */200'."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    return (int(m.group(1)) if m.group(1) else None), (int(m.group(2)) if m.group(2) != "*" else None)


def _fetch_once(url: str, part: Path, timeout: float, progress: bool, label: str, received: list[int]) -> bool:
    """One request: continue part from its current size; adds the bytes written to
    received[0]. Returns whether it resumed a partial file. Raises _Interrupted when the body
    ends early, and urllib's errors when the host fails."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"audiofx/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # Range not satisfiable: the part may already hold the whole file.
        _, total = _total_from_content_range(e.headers.get("Content-Range"))
        e.close()
        if total == have:
            return True
        part.unlink()
        raise _Interrupted(f"the server has {total} bytes, the partial file {have}; starting again") from None

    with resp:
        if have and resp.status == 206:
            start, total = _total_from_content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Interrupted(f"asked for bytes from {have}, got a range from {start}; starting again")
            mode, resumed = "ab", True
        else:  # 200: a server that ignores Range sends the whole file again
            length = resp.headers.get("Content-Length")
            total, have, mode, resumed = (int(length) if length else None), 0, "wb", False
        from tqdm import tqdm

        written = 0
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=label, disable=not progress, file=sys.stderr, leave=True) as bar:
            while True:
                try:
                    block = resp.read(CHUNK)
                except (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout) as e:
                    raise _Interrupted(f"{type(e).__name__}: {e}") from None
                if not block:
                    break
                f.write(block)
                written += len(block)
                received[0] += len(block)
                bar.update(len(block))
        if total is not None and have + written < total:
            raise _Interrupted(f"the connection closed after {have + written} of {total} bytes")
        return resumed


def fetch(url: str, target: Path, *, md5: str = "", timeout: float = 30.0, retries: int = 3, progress: bool = True,
          offline: Callable[[object], DatasetError] | None = None) -> tuple[int, bool]:
    """Download url to target, resuming target.part; returns (bytes received, resumed).

    A transfer cut off midway is retried (from where it stopped) up to `retries` times; after
    that the .part file stays for the next run. A host that cannot be reached at all raises
    offline(reason) at once.
    """
    part = target.with_name(target.name + ".part")
    received, resumed, last = [0], False, ""
    for attempt in range(retries + 1):
        try:
            resumed = _fetch_once(url, part, timeout, progress, target.name, received) or resumed
            break
        except _Interrupted as e:
            last = str(e)
        except urllib.error.HTTPError as e:
            if e.code not in _BUSY or attempt == retries:
                raise DatasetError(f"{url} answered HTTP {e.code} {e.reason}",
                                   "the file may have moved; check the dataset's page (audiofx download --list)") from None
            last = f"HTTP {e.code} {e.reason}"
        except _NETWORK_ERRORS as e:
            reason = getattr(e, "reason", e)
            if not part.exists() or attempt == retries:
                raise (offline(reason) if offline else DatasetError(f"cannot reach {url} ({reason})")) from None
            last = str(reason)
        if attempt < retries:
            time.sleep(0.5 * (attempt + 1))
    else:
        size = part.stat().st_size if part.exists() else 0
        raise DatasetError(f"the download of {url} was interrupted ({last}); {size} bytes are kept in {part}",
                           "rerun the same command to resume from there")
    if md5:
        got = file_digest(part, "md5")
        if got != md5:
            part.unlink()
            raise DatasetError(f"{target.name}: md5 {got} differs from the published {md5}",
                               "the damaged file was removed; rerun to download it again")
    part.replace(target)
    return received[0], resumed


# -- extraction --------------------------------------------------------------------------------


def _checked(member: str, archive: Path, staging: Path) -> str:
    """A member name that stays inside the staging folder, or a DatasetError."""
    try:
        return safe_relpath(staging, member, archive)
    except DatasetError as e:
        raise DatasetError(f"{e.message}: refusing to extract {archive.name}",
                           f"the archive is damaged or not the official one; delete {archive} and rerun") from None


def archive_groups(source: Source) -> list[tuple[str, list[str]]]:
    """Each archive to extract as (kind, its file names): NAME.z01.. NAME.zip for a split zip."""
    parts = sorted(a.name for a in source.archives if a.kind == "part")
    groups = []
    for a in source.archives:
        if a.kind == "zip":  # NAME.zip reads its NAME.z01.. parts first, if it has any
            groups.append((a.kind, [p for p in parts if p[:-4] == a.name[:-4]] + [a.name]))
        elif a.kind == "tar":
            groups.append((a.kind, [a.name]))
    return groups


def _extract_zip(parts: list[Path], staging: Path, progress: bool) -> None:
    import zipfile

    from tqdm import tqdm

    from audiofx.pipeline.splitzip import open_split_zip

    try:
        with open_split_zip(parts) as zf:
            members = zf.infolist()
            for info in members:
                _checked(info.filename, parts[-1], staging)
            for info in tqdm(members, unit="file", desc=f"extract {parts[-1].name}", disable=not progress,
                             file=sys.stderr):
                # A link member (Unix mode bits in the high 16 bits) would be written as a file
                # holding its target's path: datasets need no links, as with tar archives.
                if not stat.S_ISLNK(info.external_attr >> 16):
                    zf.extract(info, staging)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DatasetError(f"{parts[-1].name} is not a readable zip archive ({e})",
                           f"delete {', '.join(str(p) for p in parts)} and rerun") from None


def _extract_tar(parts: list[Path], staging: Path, progress: bool) -> None:
    from tqdm import tqdm

    (path,) = parts

    def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        with tqdm(unit="file", desc=f"extract {path.name}", disable=not progress, file=sys.stderr) as bar:
            for m in tar:
                _checked(m.name, path, staging)
                if m.isfile() or m.isdir():  # datasets need no links or device files
                    bar.update(1)
                    yield m

    # The "data" filter (Python >= 3.10.12/3.11.4) also strips odd permissions and owners.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(path, "r:*") as tar:
            tar.extractall(staging, members=members(tar), **safe)
    except getattr(tarfile, "FilterError", ()) as e:  # a link or member the data filter refuses
        raise DatasetError(f"{path.name}: {e}: refusing to extract it",
                           f"the archive is damaged or not the official one; delete {path} and rerun") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path.name} is not a readable tar archive ({e})", f"delete {path} and rerun") from None


_EXTRACTORS = {"zip": _extract_zip, "tar": _extract_tar}


def _extract(source: Source, downloads: Path, root: Path, progress: bool) -> None:
    """Extract every archive into a staging folder beside root, then rename into place."""
    staging = root.parent / f".{root.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run: start the extraction again
    staging.mkdir(parents=True)
    for kind, names in archive_groups(source):
        _EXTRACTORS[kind]([downloads / n for n in names], staging, progress)
    top = staging / source.folder if source.folder else staging
    if not top.is_dir():
        found = ", ".join(sorted(p.name for p in staging.iterdir())[:5]) or "nothing"
        raise DatasetError(f"{source.dataset}: cannot make {root}: the archives hold no {source.folder}/ folder "
                           f"(found: {found})",
                           f"they are not the official release; delete them from {downloads} and rerun")
    if root.is_dir():
        root.rmdir()  # only ever an empty folder here
    top.rename(root)
    if staging.exists():
        shutil.rmtree(staging)


# -- the command -------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(path: Path, name: str) -> Iterator[None]:
    """One download per dataset and downloads folder at a time (flock: freed if we die)."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DatasetError(f"another audiofx download of {name} is running ({path} is locked)",
                               "wait for it to finish, then rerun") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def listing(name: str, root: Path | str | None = None, mirror: str | None = None) -> Listing:
    """The files download() would fetch, from where, and the root it would fill."""
    source, base = get_source(name), mirror_base(mirror)
    return Listing(source, tuple(resolve_url(a.url, base) for a in source.archives),
                   Path(root) if root else default_root(name))


def fetch_missing(name: str, root: Path | str | None = None, **kw: Any) -> DownloadSummary | None:
    """extract --download: download() when the root is missing or empty; None, without
    indexing it, when it holds files (extract indexes and checks the root itself right after,
    so checking it here too would list a large dataset twice)."""
    get_source(name)  # an unknown dataset is an error whatever the root holds
    root = Path(root) if root else default_root(name)
    return None if _nonempty_dir(root) else download(name, root, **kw)


def download(name: str, root: Path | str | None = None, *, mirror: str | None = None, progress: bool = True,
             keep_archives: bool = False, timeout: float = 30.0, retries: int = 3, clips: int | None = None,
             say: Callable[[str], None] = lambda s: None) -> DownloadSummary:
    """Fetch, extract and check one dataset. `clips` overrides the expected clip count (tests).

    A root that already holds files is never downloaded into: it is checked with the
    adapter (status "present").
    """
    source = get_source(name)
    root = Path(root) if root else default_root(name)
    mirror = mirror_base(mirror)

    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file, not a dataset folder", "pass another --root")
    if _nonempty_dir(root):
        try:
            return DownloadSummary(name, root, "present", check_dataset(name, root, clips))
        except DatasetError as e:
            raise DatasetError(f"{root} exists but is not a complete {name}: {e.message}",
                               "move it away or pass another --root, then rerun") from None

    downloads = root.parent / "downloads"
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"cannot write {downloads}: {e.strerror or e}", "pass a writable --root") from None
    summary = DownloadSummary(name, root, "downloaded", 0, archives=downloads, kept_archives=keep_archives)
    with _lock(downloads / f".{name}.lock", name):
        for archive in source.archives:
            target = downloads / archive.name
            if target.is_file():  # from an earlier --keep-archives run, or saved by hand
                if archive.md5 and file_digest(target, "md5") != archive.md5:
                    raise DatasetError(f"{target}: md5 differs from the published {archive.md5}",
                                       "delete it and rerun to download it again")
                say(f"{archive.name}: already downloaded")
                continue
            url = resolve_url(archive.url, mirror)
            n, resumed = fetch(url, target, md5=archive.md5, timeout=timeout, retries=retries, progress=progress,
                               offline=lambda reason, u=url, t=target: _offline(u, reason, t, root, source))
            summary.fetched_bytes += n
            if resumed:
                summary.resumed.append(archive.name)
        _extract(source, downloads, root, progress)
        try:
            summary.clips = check_dataset(name, root, clips)
        except DatasetError as e:
            raise DatasetError(e.message, f"the archives are kept in {downloads}; remove {root} to extract again") from None
        if not keep_archives:
            for archive in source.archives:
                (downloads / archive.name).unlink(missing_ok=True)
    return summary
