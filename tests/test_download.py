"""`audiofx download`: a real HTTP server on 127.0.0.1 serves archives built in the official
layouts; downloads go through the real urllib code path via the mirror setting.

The CLI keeps the real clip counts, so the CLI tests serve a full-size ESC-50 (2000 clips of
a few samples each); the in-process tests swap a table entry for one with a small count and
the test archive's own md5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import socket
import tarfile
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import soundfile as sf

from audiofx.errors import ConfigError, DatasetError
from audiofx.pipeline import download as dl
from audiofx.pipeline.splitzip import open_split_zip
from tests.conftest import assert_one_line_error, run_cli, run_process
from tests.layouts import make_fsd50k, make_tut, make_urbansound8k, tone
from tests.s3server import free_port

# -- a local file server with Range support and a switch that cuts transfers ------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        srv = self.server
        path = urllib.parse.urlsplit(self.path).path
        srv.log.append((path, self.headers.get("Range")))
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:  # send part of the body, then cut the connection
            srv.drops -= 1
            self.wfile.write(body[:srv.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.log, srv.drops, srv.drop_after = {}, [], 0, 0
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def serve(srv, source: dl.Source, blobs: dict[str, bytes]) -> None:
    """Put each archive's bytes at the path of its official URL (the mirror keeps paths)."""
    for a in source.archives:
        srv.files[urllib.parse.urlsplit(a.url).path] = blobs[a.name]


# -- archives in the official layouts -----------------------------------------------------------


def zip_dir(folder: Path, arc_root: str = "", exclude: tuple[str, ...] = ()) -> bytes:
    """A zip of folder's files; arc_root is the top folder inside the archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and not rel.startswith(exclude):
                zf.write(p, f"{arc_root}/{rel}" if arc_root else rel)
    return buf.getvalue()


def tar_gz_dir(folder: Path, arc_root: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(folder, arcname=arc_root)
    return buf.getvalue()


@pytest.fixture(scope="session")
def esc50_zip() -> bytes:
    """ESC-50 at full size (2000 clips, 400 of them ESC-10) as GitHub's master.zip, with
    everything under ESC-50-master/. Names and CSV columns as in layouts.make_esc50; built in
    memory from one 2 ms WAV, since writing 2000 files first took 10-15 s on the shared test
    machine (the layout check reads the metadata and the files' presence, not their audio)."""
    wav = io.BytesIO()
    sf.write(wav, tone(44100, 0.002, 440.0), 44100, subtype="PCM_16", format="WAV")
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for target in range(50):
            for i in range(40):
                fold, src = i % 5 + 1, 100000 + 137 * target + i
                name = f"{fold}-{src}-A-{target}.wav"
                zf.writestr(f"ESC-50-master/audio/{name}", wav.getvalue())
                rows.append(f"{name},{fold},{target},class{target:02d},{target % 5 == 0},{src},A")  # 10 ESC-10 classes
        zf.writestr("ESC-50-master/meta/esc50.csv", "\n".join(rows) + "\n")
        zf.writestr("ESC-50-master/README.md", "ESC-50\n")
    return buf.getvalue()


def with_entry(monkeypatch, name: str, clips: int, blobs: dict[str, bytes], **changes) -> dl.Source:
    """Swap a table entry for one with the test archives' md5s and a small clip count."""
    src = dl.SOURCES[name]
    archives = changes.pop("archives", src.archives)
    archives = tuple(dataclasses.replace(a, md5=hashlib.md5(blobs[a.name]).hexdigest()) for a in archives)
    new = dataclasses.replace(src, archives=archives, clips=clips, **changes)
    monkeypatch.setitem(dl.SOURCES, name, new)
    return new


# -- through the real CLI -----------------------------------------------------------------------


def test_cli_download_extract_check_then_nothing_to_do(server, esc50_zip, tmp_path, monkeypatch):
    serve(server, dl.SOURCES["esc50"], {"ESC-50-master.zip": esc50_zip})
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    root = tmp_path / "raw" / "esc50"

    proc = run_process("download", "esc50", "--root", str(root), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"downloaded esc50 -> {root}: 2000 clips, layout checked" in proc.stdout
    assert server.log == [("/karoldvl/ESC-50/archive/master.zip", None)]
    assert len(list((root / "audio").glob("*.wav"))) == 2000 and (root / "meta/esc50.csv").is_file()
    assert not (tmp_path / "raw" / "downloads" / "ESC-50-master.zip").exists()  # removed after the check
    assert not (tmp_path / "raw" / ".esc50.extracting").exists()

    again = run_cli("download", "esc50", "--root", str(root), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"esc50 is already complete in {root} (2000 clips); nothing to do" in again.stdout
    assert len(server.log) == 1  # nothing fetched the second time


def test_cli_wrong_layout_is_one_line_error(server, esc50_zip, tmp_path, monkeypatch):
    # The official archive without its meta/ folder: the adapter's own layout check rejects it.
    broken = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(esc50_zip)) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            if not info.filename.startswith("ESC-50-master/meta/"):
                dst.writestr(info, src.read(info))
    serve(server, dl.SOURCES["esc50"], {"ESC-50-master.zip": broken.getvalue()})
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    root = tmp_path / "raw" / "esc50"

    proc = run_cli("download", "esc50", "--root", str(root), "--no-progress")
    assert_one_line_error(proc, str(root), "meta/esc50.csv")
    assert (tmp_path / "raw" / "downloads" / "ESC-50-master.zip").is_file()  # kept for a look

    # An archive without the expected top folder names the root and the folder.
    serve(server, dl.SOURCES["esc50"], {"ESC-50-master.zip": zip_dir(tmp_path / "raw" / "esc50", "ESC-50-main")})
    other = tmp_path / "other" / "esc50"
    assert_one_line_error(run_cli("download", "esc50", "--root", str(other), "--no-progress"),
                          str(other), "ESC-50-master/", "ESC-50-main")


def test_cli_offline_names_url_and_root_then_a_hand_fetched_file_is_used(esc50_zip, tmp_path):
    root = tmp_path / "raw" / "esc10"
    saved = tmp_path / "raw" / "downloads" / "ESC-50-master.zip"
    mirror = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("download", "esc10", "--root", str(root), "--mirror", mirror, "--no-progress")
    line = assert_one_line_error(proc, f"{mirror}/karoldvl/ESC-50/archive/master.zip", str(root), str(saved),
                                 f"rerun `audiofx download esc10 --root {root}`")
    assert "ESC-50-master/ folder" in line
    assert not root.exists()

    # Doing what the line says works, still offline.
    saved.write_bytes(esc50_zip)
    again = run_cli("download", "esc10", "--root", str(root), "--mirror", mirror, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert f"downloaded esc10 -> {root}: 400 clips, layout checked" in again.stdout


def test_cli_extract_download_fetches_missing_root_then_extracts(server, esc50_zip, tmp_path, monkeypatch):
    serve(server, dl.SOURCES["esc10"], {"ESC-50-master.zip": esc50_zip})
    monkeypatch.setenv(dl.MIRROR_ENV, server.url)
    root, store = tmp_path / "raw" / "esc10", tmp_path / "features"
    tiny = ["--set", "sample_rate=8000", "--set", "clip_seconds=0.1", "--set", "frames=8", "--set", "n_mels=16"]

    proc = run_cli("extract", "--dataset", "esc10", "--root", str(root), "--store", str(store), "--download",
                   "--workers", "1", "--no-progress", *tiny)
    assert proc.returncode == 0, proc.stderr
    assert f"downloaded esc10 -> {root}: 400 clips, layout checked" in proc.stdout
    assert "extracted esc10" in proc.stdout
    manifests = list(store.glob("esc10/*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["clips"] == 400

    # The root is there now: --download does not fetch again.
    again = run_cli("extract", "--dataset", "esc10", "--root", str(root), "--store", str(store), "--download",
                    "--workers", "1", "--no-progress", *tiny)
    assert again.returncode == 0, again.stderr
    assert "store is complete" in again.stdout and "downloaded" not in again.stdout
    assert len(server.log) == 1


def test_cli_list_names_every_file_through_the_mirror_in_effect(tmp_path, monkeypatch):
    monkeypatch.setenv(dl.MIRROR_ENV, "http://env.mirror:8000")
    root = tmp_path / "fsd"
    proc = run_cli("download", "fsd50k", "--list", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "fsd50k: 9 file(s) from https://zenodo.org/records/4060432; 51197 clips once complete"
    assert ("  FSD50K.dev_audio.z01  http://env.mirror:8000/records/4060432/files/FSD50K.dev_audio.z01?download=1"
            "  md5 faa7cf4cc076fc34a44a479a5ed862a3") in lines
    assert lines[-1] == f"  unpack into {root}"
    # --mirror wins over the environment; an empty one means the official hosts, as download() does.
    other = run_cli("download", "fsd50k", "--list", "--mirror", "https://m.lab/pub").stdout
    assert "https://m.lab/pub/records/4060432/files/FSD50K.eval_audio.zip?download=1" in other
    assert "env.mirror" not in other
    official = run_cli("download", "esc50", "--list", "--mirror", "").stdout
    assert "  ESC-50-master.zip  https://github.com/karoldvl/ESC-50/archive/master.zip  md5 -" in official
    assert "unpack ESC-50-master/ as " in official


# -- in process, with table entries for small test archives -------------------------------------


def test_every_table_file_is_unpacked_once_with_its_split_parts():
    for name, source in dl.SOURCES.items():
        groups = dl.archive_groups(source)
        names = [n for _, files in groups for n in files]
        assert sorted(names) == sorted(a.name for a in source.archives), name  # none left out, none twice
        for kind, files in groups:
            assert kind in ("zip", "tar") and dl.Archive(files[-1], "").kind == kind
    fsd = dict((files[-1], files) for _, files in dl.archive_groups(dl.SOURCES["fsd50k"]))
    assert fsd["FSD50K.dev_audio.zip"] == [f"FSD50K.dev_audio.z0{i}" for i in range(1, 6)] + ["FSD50K.dev_audio.zip"]
    assert fsd["FSD50K.eval_audio.zip"] == ["FSD50K.eval_audio.z01", "FSD50K.eval_audio.zip"]
    assert fsd["FSD50K.ground_truth.zip"] == ["FSD50K.ground_truth.zip"]
    assert dl.archive_groups(dl.SOURCES["gtzan"]) == [("tar", ["genres.tar.gz"])]
    with pytest.raises(ConfigError, match="not a zip, split zip part or tar archive"):
        dl.Archive("notes.rar", "").kind


def test_a_present_root_is_trusted_without_indexing_or_fetching(server, tmp_path):
    root = tmp_path / "raw" / "esc50"
    (root / "audio").mkdir(parents=True)  # far from complete: only extract's own check would say so
    assert dl.fetch_missing("esc50", root, mirror=server.url, progress=False) is None
    assert server.log == [] and not (tmp_path / "raw" / "downloads").exists()
    with pytest.raises(DatasetError, match=f"{root} exists but is not a complete esc50"):
        dl.download("esc50", root, mirror=server.url, progress=False)  # download itself checks it



@pytest.fixture
def us8k(tmp_path, monkeypatch) -> tuple[dl.Source, bytes]:
    """UrbanSound8K's tar.gz (top folder UrbanSound8K/) with 10 clips; its md5 in the table."""
    blob = tar_gz_dir(make_urbansound8k(tmp_path / "build" / "UrbanSound8K", per_fold=1), "UrbanSound8K")
    return with_entry(monkeypatch, "urbansound8k", 10, {"UrbanSound8K.tar.gz": blob}), blob


def test_interrupted_transfer_resumes_with_range(server, us8k, tmp_path):
    source, blob = us8k
    serve(server, source, {"UrbanSound8K.tar.gz": blob})
    root = tmp_path / "raw" / "urbansound8k"
    part = tmp_path / "raw" / "downloads" / "UrbanSound8K.tar.gz.part"
    server.drops, server.drop_after = 1, 5000

    with pytest.raises(DatasetError, match="interrupted.*5000 bytes are kept") as err:
        dl.download("urbansound8k", root, mirror=server.url, progress=False, retries=0)
    assert "rerun" in err.value.hint
    assert part.stat().st_size == 5000 and part.read_bytes() == blob[:5000] and not root.exists()

    s = dl.download("urbansound8k", root, mirror=server.url, progress=False, retries=0, keep_archives=True)
    assert server.log[-1] == ("/records/1203745/files/UrbanSound8K.tar.gz", "bytes=5000-")
    assert s.resumed == ["UrbanSound8K.tar.gz"] and s.fetched_bytes == len(blob) - 5000
    assert (tmp_path / "raw" / "downloads" / "UrbanSound8K.tar.gz").read_bytes() == blob  # md5 checked too
    assert not part.exists()
    assert s.clips == 10 and len(list(root.glob("audio/fold*/*.wav"))) == 10


def test_cut_transfer_is_retried_in_the_same_run(server, us8k, tmp_path):
    source, blob = us8k
    serve(server, source, {"UrbanSound8K.tar.gz": blob})
    server.drops, server.drop_after = 2, 3000  # two cut responses, then a whole one
    s = dl.download("urbansound8k", tmp_path / "raw" / "urbansound8k", mirror=server.url, progress=False, retries=2)
    assert [r for _, r in server.log] == [None, "bytes=3000-", "bytes=6000-"]
    assert s.clips == 10 and s.resumed == ["UrbanSound8K.tar.gz"]


def test_md5_mismatch_removes_the_file(server, us8k, tmp_path, monkeypatch):
    source, blob = us8k
    serve(server, source, {"UrbanSound8K.tar.gz": blob[:-1] + bytes([blob[-1] ^ 1])})
    with pytest.raises(DatasetError, match="md5 .* differs from the published"):
        dl.download("urbansound8k", tmp_path / "raw" / "urbansound8k", mirror=server.url, progress=False)
    assert list((tmp_path / "raw" / "downloads").glob("UrbanSound8K*")) == []

    # A damaged file saved by hand is not used either (and is left for the user to delete).
    by_hand = tmp_path / "raw" / "downloads" / "UrbanSound8K.tar.gz"
    by_hand.write_bytes(blob[:-10])
    with pytest.raises(DatasetError, match="md5 differs from the published") as err:
        dl.download("urbansound8k", tmp_path / "raw" / "urbansound8k", mirror=server.url, progress=False)
    assert str(by_hand) in err.value.message and by_hand.is_file() and len(server.log) == 1


def test_wrong_clip_count_names_root(server, us8k, tmp_path):
    source, blob = us8k
    serve(server, source, {"UrbanSound8K.tar.gz": blob})
    root = tmp_path / "raw" / "urbansound8k"
    with pytest.raises(DatasetError, match=f"{root} lists 10 clips, expected 8732"):
        dl.download("urbansound8k", root, mirror=server.url, progress=False, clips=8732)
    # A rerun finds the incomplete root and says so, without downloading again.
    with pytest.raises(DatasetError, match="exists but is not a complete urbansound8k"):
        dl.download("urbansound8k", root, mirror=server.url, progress=False, clips=8732)
    assert len(server.log) == 1


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_escaping_the_root_are_refused(server, tmp_path, monkeypatch, kind):
    evil = b"not a dataset"
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("ESC-50-master/meta/esc50.csv", "filename,fold,target,category,esc10\n")
            zf.writestr("../../evil.txt", evil)
        serve(server, dl.SOURCES["esc50"], {"ESC-50-master.zip": buf.getvalue()})
        name = "esc50"
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("UrbanSound8K/../../evil.txt")
            info.size = len(evil)
            tf.addfile(info, io.BytesIO(evil))
        with_entry(monkeypatch, "urbansound8k", 1, {"UrbanSound8K.tar.gz": buf.getvalue()})
        serve(server, dl.SOURCES["urbansound8k"], {"UrbanSound8K.tar.gz": buf.getvalue()})
        name = "urbansound8k"
    with pytest.raises(DatasetError, match="escapes the dataset root: refusing to extract"):
        dl.download(name, tmp_path / "a" / "raw" / name, mirror=server.url, progress=False)
    assert not list(tmp_path.rglob("evil.txt"))


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_link_members_are_not_extracted(tmp_path, kind):
    """A symbolic link inside an archive (here one pointing out of the root) is left out: a zip
    would otherwise write it as a file holding the target's path; tar's data filter refuses it."""
    import stat

    path = tmp_path / f"a.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            link = zipfile.ZipInfo("top/audio/link.wav")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "../../../etc/passwd")
            zf.writestr("top/audio/a.wav", b"RIFF")
    else:
        with tarfile.open(path, "w") as tf:
            link = tarfile.TarInfo("top/audio/link.wav")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
            tf.addfile(link)
            info = tarfile.TarInfo("top/audio/a.wav")
            info.size = 4
            tf.addfile(info, io.BytesIO(b"RIFF"))
    staging = tmp_path / "staging"
    staging.mkdir()
    dl._EXTRACTORS[kind]([path], staging, False)
    assert (staging / "top" / "audio" / "a.wav").read_bytes() == b"RIFF"
    assert not (staging / "top" / "audio" / "link.wav").exists()
    assert not (staging / "top" / "audio" / "link.wav").is_symlink()


def test_several_archives_share_one_top_folder(server, tmp_path, monkeypatch):
    """TAU 2019: audio zips and a metadata zip, all under one top folder."""
    top = "TAU-urban-acoustic-scenes-2019-development"
    built = make_tut(tmp_path / "build" / top, seconds=0.01)
    blobs = {
        f"{top}.meta.zip": zip_dir(built, top, exclude=("audio/",)),
        f"{top}.audio.1.zip": zip_dir(built / "audio", f"{top}/audio", exclude=("airport",)),
        f"{top}.audio.2.zip": zip_dir(built / "audio", f"{top}/audio", exclude=("metro", "park")),
    }
    archives = tuple(a for a in dl.SOURCES["tau2019"].archives if a.name in blobs)
    source = with_entry(monkeypatch, "tau2019", 12, blobs, archives=archives)
    serve(server, source, blobs)
    s = dl.download("tau2019", tmp_path / "raw" / "tau2019", mirror=server.url, progress=False)
    assert s.clips == 12  # 18 segments, 6 outside the official setup (as in the real set)
    assert len(list((tmp_path / "raw" / "tau2019" / "audio").glob("*.wav"))) == 18


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's zip to make split archives")
def test_fsd50k_split_zips_are_joined(server, tmp_path, monkeypatch):
    import subprocess

    built = make_fsd50k(tmp_path / "build", vocabulary=True)
    out = tmp_path / "parts"
    out.mkdir()
    for folder in ("FSD50K.dev_audio", "FSD50K.eval_audio"):
        subprocess.run(["zip", "-q", "-0", "-r", "-s", "64k", out / f"{folder}.zip", folder], cwd=built, check=True)
    blobs = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"FSD50K.dev_audio.z01", "FSD50K.dev_audio.z02"} <= set(blobs)  # really split
    blobs["FSD50K.ground_truth.zip"] = zip_dir(built, exclude=("FSD50K.dev", "FSD50K.eval"))
    archives = tuple(dl.Archive(n, f"https://zenodo.org/records/4060432/files/{n}?download=1") for n in sorted(blobs))
    source = with_entry(monkeypatch, "fsd50k", 7, blobs, archives=archives)
    serve(server, source, blobs)

    root = tmp_path / "raw" / "fsd50k"
    assert dl.download("fsd50k", root, mirror=server.url, progress=False).clips == 7
    for wav in built.glob("FSD50K.*_audio/*.wav"):
        assert (root / wav.relative_to(built)).read_bytes() == wav.read_bytes()


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's zip to make split archives")
@pytest.mark.parametrize("zip64", [False, True])
def test_split_zip_reader_matches_the_files(tmp_path, zip64):
    import os
    import subprocess

    src = tmp_path / "data"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(30000 + 7000 * i) for i in range(5)}  # entries cross part boundaries
    for name, data in files.items():
        (src / name).write_bytes(data)
    subprocess.run(["zip", "-q", "-r", "-s", "64k", *(["-fz"] if zip64 else []), "../a.zip", "."], cwd=src, check=True)
    parts = sorted(tmp_path.glob("a.z[0-9][0-9]")) + [tmp_path / "a.zip"]
    assert len(parts) >= 3
    with open_split_zip(parts) as zf:
        assert zf.testzip() is None
        assert {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()} == files
    with pytest.raises(zipfile.BadZipFile, match="parts"):
        open_split_zip(parts[1:])  # a part missing


def test_mirror_replaces_scheme_and_host_only():
    url = "https://zenodo.org/records/1203745/files/UrbanSound8K.tar.gz?download=1"
    assert dl.resolve_url(url, "http://127.0.0.1:8000") == "http://127.0.0.1:8000/records/1203745/files/UrbanSound8K.tar.gz?download=1"
    assert dl.resolve_url(url, "https://m.lab/pub/") == "https://m.lab/pub/records/1203745/files/UrbanSound8K.tar.gz?download=1"
    assert dl.resolve_url(url, None) == url
