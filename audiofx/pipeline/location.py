"""Where a feature store lives: a local directory (or shared mount) or an fsspec URL.

The store code asks a Location for the few file operations it needs, by paths relative to
the store root, and for a Zarr store object. Local directories keep what made them safe
for concurrent writers on one machine: atomic temp-file-and-rename writes and flock. On
object storage (s3://, gs://, ...) every object PUT is atomic by itself, so a write is
simply one PUT; there is no lock, and the store's protocol is built so that it needs none
(see store.py).

Credentials come from the usual places (environment variables, ~/.aws profiles, instance
XX
server) and are never passed through audiofx's own arguments, so they cannot end up in a
manifest, a run's config.json or a log line. `redact` strips user:password@ from URLs that
are shown.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from audiofx.errors import ConfigError, StoreError

# Errors of a remote filesystem that mean "cannot reach or may not read", as opposed to a
# missing object (FileNotFoundError), which callers handle.
_ACCESS_HINT = ("check the URL, your credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE, ...) and, for an "
                "S3-compatible server, AWS_ENDPOINT_URL")


_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_remote(url: str | Path) -> bool:
    text = str(url)
    return "://" in text and not text.startswith("file://")


def redact(url: str | Path) -> str:
    """The URL without any user:password@ part, for messages and run configs."""
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", str(url))


@contextlib.contextmanager
def remote_errors(url: str) -> Iterator[None]:
    """Turn an unreachable server, a missing bucket or refused credentials into a one-line
    StoreError. FileNotFoundError passes through: callers treat it as "not there"."""
    try:
        yield
    except (FileNotFoundError, StoreError, ConfigError, KeyboardInterrupt):
        raise
    except ImportError as err:
        raise ConfigError(f"cannot open {redact(url)}: {err}",
                          "install the remote-store extras: pip install 'audiofx[s3]' (gcsfs for gs://)") from None
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp errors have no common base worth importing
        name = type(err).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            raise StoreError(f"cannot access {redact(url)}: no credentials found", _ACCESS_HINT) from None
        if isinstance(err, PermissionError) or name in ("ClientError", "AccessDenied"):
            raise StoreError(f"cannot access {redact(url)}: permission denied ({str(err)[:120]})", _ACCESS_HINT) from None
        if isinstance(err, OSError) or "Connect" in name or "Endpoint" in name:
            raise StoreError(f"cannot reach {redact(url)} ({name}: {str(err)[:120]})", _ACCESS_HINT) from None
        raise


class Location:
    """A store root: local path or fsspec URL, with the file operations the store needs."""

    def __init__(self, url: str | Path):
        self.url = str(url)
        self.remote = is_remote(self.url)
        if self.remote:
            import fsspec

            if redact(self.url) != self.url:
                # A URL is printed and recorded (run configs, logs): it must not carry secrets.
                raise ConfigError(f"{redact(self.url)}: a store URL may not hold credentials",
                                  "set them in the environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                  "or AWS_PROFILE)")

            with remote_errors(self.url):
                # No listings cache: other processes and machines write the same store, and a
                # stale listing would hide their objects (e.g. a unit record just written).
                self.fs, base = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
            self.base = base.rstrip("/")
            self.protocol = self.url.split("://", 1)[0]
            self.path = None
        else:
            self.path = Path(self.url.removeprefix("file://")).expanduser()
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"store {self.path} is a file, not a folder",
                                 "pass --store a folder (it is made if missing) or an s3:// URL")

    def __repr__(self) -> str:
        return f"Location({redact(self.url)!r})"

    def __str__(self) -> str:
        return redact(self.url) if self.remote else str(self.path)

    # -- names -----------------------------------------------------------------------------
    def full(self, rel: str = "") -> str:
        """The filesystem path of `rel` (no protocol for remote filesystems)."""
        rel = rel.strip("/")
        if self.remote:
            return f"{self.base}/{rel}" if rel else self.base
        return str(self.path / rel) if rel else str(self.path)

    def show(self, rel: str = "") -> str:
        """`rel` as the user would type it: a local path or a redacted URL."""
        if not self.remote:
            return self.full(rel)
        rel = rel.strip("/")
        return f"{redact(self.url).rstrip('/')}/{rel}" if rel else redact(self.url)

    def require_bucket(self) -> None:
        """Before an S3 store is written: its bucket must exist (an object store creates no
        bucket on a write; the write would fail half-way with a traceback). Only a bucket S3
        says is not there (404) or a name S3 cannot have is refused: a policy that grants a
        prefix and not the bucket (403 on HEAD) may still write, and other stores' own
        errors stay theirs."""
        if not self.remote or self.protocol not in ("s3", "s3a"):
            return
        bucket = self.base.split("/", 1)[0]
        if not _S3_BUCKET.match(bucket):
            raise StoreError(f"{redact(self.url)}: {bucket!r} is not a valid S3 bucket name",
                             "bucket names are 3-63 lower-case letters, digits, dots and hyphens")
        with remote_errors(self.url):
            try:
                self.fs.call_s3("head_bucket", Bucket=bucket)
                return
            except PermissionError:  # may still write under its prefix: the writes will tell
                return
            except FileNotFoundError:
                pass
        raise StoreError(f"{redact(self.url)}: the bucket {bucket} does not exist",
                         f"create it first (e.g. aws s3 mb {self.protocol}://{bucket}), or pass another --store")

    # -- objects ---------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.remote:
            return os.path.exists(self.full(rel))
        with remote_errors(self.url):
            return self.fs.exists(self.full(rel))

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return Path(self.full(rel)).read_bytes()
        with remote_errors(self.url):
            return self.fs.cat_file(self.full(rel))

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """rel -> bytes of the objects that exist; remote reads run concurrently."""
        if not self.remote:
            out = {}
            for rel in rels:
                try:
                    out[rel] = self.read_bytes(rel)
                except FileNotFoundError:
                    pass
            return out
        if not rels:
            return {}
        full = {self.full(rel): rel for rel in rels}
        with remote_errors(self.url):
            got = self.fs.cat(list(full), on_error="omit")
        return {full[k.removeprefix(f"{self.protocol}://")]: v for k, v in got.items()
                if k.removeprefix(f"{self.protocol}://") in full}

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole object so that readers see the old one or the new one, never a part:
        a temp file renamed into place locally (fsynced), one PUT remotely."""
        if not self.remote:
            path = Path(self.full(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        with remote_errors(self.url):
            self.fs.pipe_file(self.full(rel), data)

    def remove(self, rel: str) -> None:
        """Remove an object or a whole prefix; absent is fine."""
        if not self.remote:
            import shutil

            path = Path(self.full(rel))
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            return
        with remote_errors(self.url):
            try:
                self.fs.rm(self.full(rel), recursive=True)
            except FileNotFoundError:
                pass

    def listdir(self, rel: str = "") -> list[tuple[str, bool]]:
        """(name, is_directory) of the direct children of `rel`; [] when it does not exist."""
        if not self.remote:
            path = Path(self.full(rel))
            return sorted((p.name, p.is_dir()) for p in path.iterdir()) if path.is_dir() else []
        with remote_errors(self.url):
            try:
                entries = self.fs.ls(self.full(rel), detail=True, refresh=True)
            except FileNotFoundError:
                return []
        return sorted((e["name"].rstrip("/").rsplit("/", 1)[-1], e["type"] == "directory") for e in entries)

    def files(self, rel: str = "") -> dict[str, int]:
        """Every object under `rel`, as path relative to `rel` -> size in bytes."""
        top = self.full(rel)
        if not self.remote:
            base = Path(top)
            if not base.is_dir():
                return {}
            return {p.relative_to(base).as_posix(): p.stat().st_size for p in base.rglob("*") if p.is_file()}
        with remote_errors(self.url):
            try:
                found = self.fs.find(top, detail=True, withdirs=False)
            except FileNotFoundError:
                return {}
        return {name[len(top):].lstrip("/"): int(info.get("size") or 0) for name, info in found.items()
                if info.get("type") != "directory" and name != top}

    def newest_mtime(self, rel: str = "") -> float:
        """Seconds since the epoch of the newest object under `rel` (0 when empty)."""
        top = self.full(rel)
        if not self.remote:
            base = Path(top)
            return max((p.stat().st_mtime for p in base.rglob("*")), default=base.stat().st_mtime if base.exists() else 0.0)
        with remote_errors(self.url):
            try:
                found = self.fs.find(top, detail=True, withdirs=False)
            except FileNotFoundError:
                return 0.0
        times = []
        for info in found.values():
            stamp = info.get("LastModified") or info.get("mtime") or info.get("created")
            if hasattr(stamp, "timestamp"):
                stamp = stamp.timestamp()
            if isinstance(stamp, (int, float)):
                times.append(float(stamp))
        return max(times, default=0.0)

    def zarr_store(self, rel: str, read_only: bool = False):
        """A Zarr store object rooted at `rel`."""
        if not self.remote:
            return self.full(rel)  # zarr's LocalStore: atomic chunk writes by rename
        from zarr.storage import FsspecStore

        with remote_errors(self.url):
            return FsspecStore.from_url(f"{self.protocol}://{self.full(rel)}", read_only=read_only,
                                        storage_options={"use_listings_cache": False})
