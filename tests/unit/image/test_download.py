"""image/download.py against a local HTTP server (127.0.0.1 only) that can cut, stall, ignore Range."""

from __future__ import annotations

import hashlib
import random
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coreslice.errors import UsageError
from coreslice.image import download
from coreslice.image.download import DownloadError, check_sha256_arg, fetch, is_url, sha256_file

DATA = random.Random(10).randbytes(1_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


class _State:
    """What the handler does (set by the test) and what it saw (checked by the test)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends stalls at teardown
        self.requests: list[dict] = []  # per request: its Range header and the body bytes sent
        self.cuts = 0  # how many of the next responses end early ...
        self.cut_after = 300_000  # ... after this many body bytes
        self.how = "close"  # "close": FIN (a short read); "reset": RST; "stall": go silent
        self.ignore_range = False
        self.bad_range = False  # answer 206 with a Content-Range that does not start where asked
        self.statuses: list[int] = []  # error statuses for the next requests
        self.redirect: str | None = None


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        st: _State = self.server.state
        rec = {"range": self.headers.get("Range"), "sent": 0}
        with st.lock:
            st.requests.append(rec)
            status = st.statuses.pop(0) if st.statuses else None
            cut = st.cuts > 0
            st.cuts -= cut
        if status:
            return self.send_error(status)
        if st.redirect:
            self.send_response(302)
            self.send_header("Location", st.redirect)
            return self.end_headers()
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rec["range"] or "")
        if m and not st.ignore_range:
            start = int(m[1])
            if start >= len(DATA):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(DATA)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            if st.bad_range:
                start = 0
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(DATA) - 1}/{len(DATA)}")
            else:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(DATA) - start))
        self.end_headers()
        body = DATA[start:start + st.cut_after] if cut else DATA[start:]
        rec["sent"] = len(body)  # before the write: the client may be done before it returns
        self.wfile.write(body)
        self.wfile.flush()
        if cut:
            self.close_connection = True
            if st.how == "stall":
                st.release.wait(5)
            elif st.how == "reset":  # SO_LINGER 0: the close in shutdown_request sends RST
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.server.resets.add(self.connection)
            else:
                self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    def shutdown_request(self, request):
        # The stock shutdown(SHUT_WR) would send FIN before the RST; close alone sends only RST.
        if request in self.resets:
            self.resets.discard(request)
            return request.close()
        super().shutdown_request(request)


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.state, httpd.resets = _State(), set()
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}/rootfs.tar.xz"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _fetch(server, dest, sha=SHA, **kw):
    lines: list[str] = []
    kw.setdefault("timeout", 2.0)
    return fetch(server.url, dest, sha, lines.append, **kw), lines


def _assert_done(dest):
    assert dest.read_bytes() == DATA
    assert not dest.with_name(dest.name + ".part").exists()


def test_cut_connections_resume_with_range(server, tmp_path):
    server.cuts = 2
    dest = tmp_path / "root.tar.xz"
    got, lines = _fetch(server, dest)
    assert got == dest
    _assert_done(dest)
    assert [r["range"] for r in server.requests] == [None, "bytes=300000-", "bytes=600000-"]
    assert sum(r["sent"] for r in server.requests) == len(DATA)  # nothing sent twice
    assert any("100%" in ln and "MiB/s" in ln for ln in lines)
    assert sum("retrying" in ln for ln in lines) == 2


def test_reset_connections_resume(server, tmp_path):
    server.cuts, server.how = 2, "reset"
    dest = tmp_path / "root.tar.xz"
    _fetch(server, dest)
    _assert_done(dest)
    assert len(server.requests) == 3
    # An RST may discard bytes in flight, so only: nothing was sent more than twice.
    assert sum(r["sent"] for r in server.requests) < 2 * len(DATA)


def test_stalled_connection_times_out_and_resumes(server, tmp_path):
    server.cuts, server.how = 1, "stall"
    dest = tmp_path / "root.tar.xz"
    _, lines = _fetch(server, dest, timeout=0.3)
    _assert_done(dest)
    assert [r["range"] for r in server.requests] == [None, "bytes=300000-"]
    assert any("TimeoutError" in ln for ln in lines)


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.cuts, server.ignore_range = 2, True
    dest = tmp_path / "root.tar.xz"
    _, lines = _fetch(server, dest)
    _assert_done(dest)
    assert len(server.requests) == 3
    assert any("ignored the Range" in ln for ln in lines)


def test_wrong_content_range_restarts_from_zero(server, tmp_path):
    server.cuts, server.bad_range = 1, True
    dest = tmp_path / "root.tar.xz"
    _fetch(server, dest)
    _assert_done(dest)
    assert [r["range"] for r in server.requests] == [None, "bytes=300000-", None]


def test_wrong_sha256_deletes_everything(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    wrong = "AB" * 32
    with pytest.raises(UsageError) as ei:
        _fetch(server, dest, wrong)
    msg = str(ei.value)
    assert "\n" not in msg and server.url in msg and wrong.lower() in msg and SHA in msg and "--sha256" in msg
    assert list(tmp_path.iterdir()) == []


def test_part_from_an_earlier_run_is_resumed(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    dest.with_name("root.tar.xz.part").write_bytes(DATA[:400_000])
    _fetch(server, dest)
    _assert_done(dest)
    assert server.requests == [{"range": "bytes=400000-", "sent": 600_000}]


def test_complete_part_answered_416_is_done(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    dest.with_name("root.tar.xz.part").write_bytes(DATA)
    _fetch(server, dest)
    _assert_done(dest)
    assert server.requests == [{"range": f"bytes={len(DATA)}-", "sent": 0}]


def test_too_long_part_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    dest.with_name("root.tar.xz.part").write_bytes(DATA + b"junk")
    _fetch(server, dest)
    _assert_done(dest)
    assert [r["range"] for r in server.requests] == [f"bytes={len(DATA) + 4}-", None]


def test_verified_dest_is_not_downloaded_again(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    dest.write_bytes(DATA)
    _, lines = _fetch(server, dest, SHA.upper())
    assert server.requests == []
    assert "already downloaded" in lines[0]


def test_dest_with_other_bytes_is_replaced(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    dest.write_bytes(b"old")
    _fetch(server, dest)
    _assert_done(dest)


def test_unverified_download_says_so(server, tmp_path):
    dest = tmp_path / "root.tar.xz"
    _, lines = _fetch(server, dest, None)
    _assert_done(dest)
    assert any("not be verified" in ln for ln in lines)
    assert any(SHA in ln and "unverified" in ln for ln in lines)


def test_persistent_failure_is_one_line_download_error(server, tmp_path):
    server.cuts, server.cut_after = 99, 0
    dest = tmp_path / "root.tar.xz"
    with pytest.raises(DownloadError) as ei:
        _fetch(server, dest, attempts=3)
    msg = str(ei.value)
    assert "\n" not in msg and server.url in msg and "3 attempts" in msg and "0 bytes" in msg
    assert "run again" in msg and ei.value.exit_code == 1
    assert len(server.requests) == 3
    assert not dest.exists()


def test_503_is_retried_404_is_not(server, tmp_path):
    server.statuses = [503, 503]
    dest = tmp_path / "root.tar.xz"
    _fetch(server, dest)
    _assert_done(dest)
    assert len(server.requests) == 3

    server.requests.clear()
    server.statuses = [404]
    with pytest.raises(DownloadError, match="HTTP 404.*check the URL"):
        _fetch(server, tmp_path / "other.tar.xz")
    assert len(server.requests) == 1


def test_redirect_to_ftp_is_refused(server, tmp_path):
    server.redirect = "ftp://127.0.0.1/rootfs.tar.xz"
    with pytest.raises(DownloadError, match="unknown url type"):
        _fetch(server, tmp_path / "root.tar.xz")
    assert len(server.requests) == 1


def test_connection_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "BACKOFF", 0.0)
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="2 attempts.*Connection refused"):
        fetch(f"http://127.0.0.1:{port}/r.tar", tmp_path / "r.tar", SHA, attempts=2, timeout=2)


@pytest.mark.parametrize("url", ["ftp://host/r.tar", "file:///tmp/r.tar", "http:///r.tar", "https://",
                                 "gopher://host/r.tar", "http://host:x/r.tar"])
def test_bad_urls_are_refused_before_any_network(url, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "_opener", lambda: pytest.fail("network used"))
    with pytest.raises(UsageError, match="only http:// and https://") as ei:
        fetch(url, tmp_path / "r.tar", SHA)
    assert "\n" not in str(ei.value)


def test_password_is_not_shown(tmp_path):
    with pytest.raises(UsageError) as ei:
        fetch("ftp://user:secret@host/r.tar", tmp_path / "r.tar", SHA)
    assert "secret" not in str(ei.value)


def test_is_url():
    assert is_url("https://host/r.tar") and is_url("ftp://host/r.tar") and is_url("HTTP://h/")
    assert not is_url("/srv/r.tar") and not is_url("r.tar") and not is_url("c:r.tar")


def test_check_sha256_arg():
    assert check_sha256_arg(" " + SHA.upper() + "\n") == SHA
    for bad in ("", SHA[:-1], SHA + "0", "g" * 64, f"sha256:{SHA}"):
        with pytest.raises(UsageError, match="64 hex digits") as ei:
            check_sha256_arg(bad)
        assert "\n" not in str(ei.value)


def test_sha256_file(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "CHUNK", 4096)  # many chunks
    p = tmp_path / "f"
    p.write_bytes(DATA)
    assert sha256_file(p) == SHA
