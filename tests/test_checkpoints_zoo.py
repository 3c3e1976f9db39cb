"""Tests for the model zoo: entries, cache directory, verified downloads (offline)."""

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import threading

import pytest

from nfnets_jax.checkpoints import zoo

PAYLOAD = b"\x80\x04not really weights, but bytes to verify" * 1000


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv(zoo.CACHE_ENV, str(directory))
    return directory


@pytest.fixture
def served(tmp_path):
    """An http.server on 127.0.0.1 serving a file the test wrote."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "F0_haiku.npz").write_bytes(PAYLOAD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/F0_haiku.npz"
    server.shutdown()
    server.server_close()


def test_zoo_entries_match_the_release():
    assert list(zoo.ZOO) == ["F0", "F1", "F2", "F3", "F4", "F5", "F6"]
    f0 = zoo.ZOO["F0"]
    assert f0.url == "https://storage.googleapis.com/dm-nfnets/F0_haiku.npz"
    assert f0.md5 == "0a41039da1cb43adf47f1b7d86ddfe0f" and f0.top1 == 83.6
    assert zoo.ZOO["F6"].md5 == "b16cca40ac1ecec2bd5e3273866da0c1"
    assert all(e.variant == e.name and len(e.md5) == 32 for e in zoo.ZOO.values())
    assert [e.top1 for e in zoo.ZOO.values()] == sorted(e.top1 for e in zoo.ZOO.values())
    assert zoo.get("f3").name == "F3"
    with pytest.raises(KeyError, match="F7.*not a released checkpoint"):
        zoo.get("F7")


def test_cache_dir_env_override(cache, monkeypatch):
    assert zoo.cache_dir() == str(cache)
    monkeypatch.delenv(zoo.CACHE_ENV)
    assert zoo.cache_dir().endswith(os.path.join(".cache", "nfnets_jax"))


def _use_url(monkeypatch, url, md5):
    entry = dataclasses.replace(zoo.ZOO["F0"], url=url, md5=md5)
    monkeypatch.setitem(zoo.ZOO, "F0", entry)
    return entry


def test_http_download_verifies_md5_and_shows_progress(cache, served, monkeypatch):
    _use_url(monkeypatch, served, hashlib.md5(PAYLOAD).hexdigest())
    progress = io.StringIO()
    path = zoo.resolve("f0", progress=progress)
    assert path == str(cache / "F0_haiku.npz")
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert "100.0%" in progress.getvalue() and "F0_haiku.npz" in progress.getvalue()
    assert os.listdir(cache) == ["F0_haiku.npz"]
    # Cached: a second call does not download (a download attempt would fail loudly).
    monkeypatch.setattr(zoo, "download", lambda *a, **k: pytest.fail("downloaded again"))
    assert zoo.fetch("F0", progress=None) == path


def test_bad_md5_is_refused_and_removed(cache, served, monkeypatch):
    _use_url(monkeypatch, served, "0" * 32)
    with pytest.raises(zoo.ChecksumError, match="md5 mismatch.*expected 0000"):
        zoo.fetch("F0", progress=None)
    assert not os.path.exists(cache / "F0_haiku.npz")
    assert os.listdir(cache) == []  # No partial file left behind.


def test_file_url_and_corrupted_cache_is_replaced(cache, tmp_path, monkeypatch):
    source = tmp_path / "source.npz"
    source.write_bytes(PAYLOAD)
    _use_url(monkeypatch, source.as_uri(), hashlib.md5(PAYLOAD).hexdigest())
    path = zoo.fetch("F0", progress=None)
    with open(path, "wb") as f:
        f.write(b"corrupted")
    assert zoo.fetch("F0", progress=None) == path
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD


def test_failed_download_leaves_nothing(cache, tmp_path):
    missing = (tmp_path / "nowhere.npz").as_uri()
    with pytest.raises(OSError):
        zoo.download(missing, str(cache / "x.npz"), md5=None, progress=None)
    assert os.listdir(cache) == []


def test_resolve_paths_and_unknown_names(tmp_path, cache):
    local = tmp_path / "mine.npz"
    local.write_bytes(b"x")
    assert zoo.resolve(str(local)) == str(local)
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a zoo name"):
        zoo.resolve("F9")


def test_copy_into_cache_checks_md5(tmp_path, cache, monkeypatch):
    source = tmp_path / "F0_haiku.npz"
    source.write_bytes(PAYLOAD)
    _use_url(monkeypatch, "http://unused/F0_haiku.npz", hashlib.md5(PAYLOAD).hexdigest())
    assert zoo.copy_into_cache("F0", str(source)) == str(cache / "F0_haiku.npz")
    _use_url(monkeypatch, "http://unused/F0_haiku.npz", "1" * 32)
    with pytest.raises(zoo.ChecksumError, match="should be 1111"):
        zoo.copy_into_cache("F0", str(source))
