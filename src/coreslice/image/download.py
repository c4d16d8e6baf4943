"""Resumable, verified download of a root-file-system tarball (``image build --rootfs URL``).

Hand-written on the standard library (urllib.request / http.client): a GET with resume is a few
dozen lines, and no well-kept resumable-download library fits the rule of no extra runtime
dependency.  The protocol is RFC 9110 §14 (Range Requests): after a cut connection the next
request asks ``Range: bytes=N-`` for the rest; a server that honours it answers
``206 Partial Content`` with ``Content-Range: bytes N-END/TOTAL`` (§14.4), one that ignores it
answers ``200`` with the whole file (so we start again from zero), and ``416 Range Not
Satisfiable`` with ``Content-Range: bytes */TOTAL`` (§15.5.17) means N is already the end.

Bytes go to ``DEST.part``, which survives a failed run and is resumed by the next one; only a
file whose SHA-256 matches is renamed to DEST, so DEST is always complete and verified (and is
used as a cache: a DEST that matches is returned without any request).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from coreslice.errors import CoresliceError, UsageError

BACKOFF = 1.0  # seconds before the 2nd attempt, doubling up to 8x; tests set it to 0
CHUNK = 1 << 20
_SCHEMES = ("http", "https")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)", re.ASCII)


class DownloadError(CoresliceError):
    """The network failed (after every retry) or the server refused; the .part stays for a rerun."""

    exit_code = 1


class _Retry(Exception):
    """A condition of our own that the next attempt fixes (short read, resume at the wrong byte)."""


def is_url(value: str) -> bool:
    """True for anything shaped ``scheme://``: such a value goes to fetch(), which refuses the
    schemes it does not speak, rather than being taken for a local file name that is missing."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value) is not None


def check_sha256_arg(value: str) -> str:
    """``--sha256`` as 64 lower-case hex digits, or UsageError."""
    v = value.strip()
    if not _HEX64.fullmatch(v):
        raise UsageError(f"--sha256 {value[:80]!r}: not a SHA-256 digest; give the 64 hex digits "
                         "that `sha256sum FILE` prints for the tarball")
    return v.lower()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _shown(url: str) -> str:
    # Messages and logs never repeat a password given as user:password@host.
    p = urllib.parse.urlsplit(url)
    return p._replace(netloc=p.netloc.rpartition("@")[2]).geturl() if "@" in p.netloc else url


def _line(text: object) -> str:
    return " ".join(str(text).split())  # exception texts may hold newlines; messages are one line


def _check_url(url: str) -> None:
    p = urllib.parse.urlsplit(url)
    try:
        p.port  # http.client would raise InvalidURL (a traceback) on a port like ":x"
    except ValueError:
        p = p._replace(netloc="")
    if p.scheme.lower() not in _SCHEMES or not p.hostname:
        raise UsageError(f"--rootfs {_line(_shown(url))!r}: only http:// and https:// URLs with a host "
                         "are downloaded; give such a URL, or the path of a local tarball")


def _opener() -> urllib.request.OpenerDirector:
    # urlopen() would also follow a redirect to ftp:// or file://; without those handlers such a
    # redirect ends in "unknown url type" (UnknownHandler) instead.
    o = urllib.request.OpenerDirector()
    for h in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
              urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
              urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
              urllib.request.HTTPErrorProcessor()):
        o.add_handler(h)
    return o


class _Meter:
    """Progress lines: one per 10 % step but at most one a second, and one every 10 s when a step
    takes longer (or the size is unknown), so a slow download still shows it is alive."""

    def __init__(self, url: str, progress: Callable[[str], None]):
        self.url, self.progress = url, progress

    def start(self, have: int, total: int | None) -> None:
        self.t0 = self.last = time.monotonic()
        self.have0, self.total = have, total
        self.step = self._step(have)

    def _step(self, have: int) -> int:
        return have * 10 // self.total if self.total else 0

    def update(self, have: int, final: bool = False) -> None:
        now, step = time.monotonic(), self._step(have)
        if final or (step > self.step and now - self.last >= 1) or now - self.last >= 10:
            self.step, self.last = step, now
            rate = (have - self.have0) / max(now - self.t0, 1e-3) / 2**20
            of = f" of {self.total / 2**20:.1f} MiB ({have * 100 // self.total}%)" if self.total else ""
            self.progress(f"{self.url}: {have / 2**20:.1f} MiB{of}, {rate:.1f} MiB/s")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _transfer(opener, url: str, shown: str, part: Path, timeout: float, meter: _Meter,
              progress: Callable[[str], None]) -> None:
    """One GET, resuming after the bytes already in ``part``; returns when the body is complete."""
    have = _size(part)
    req = urllib.request.Request(url, headers={"User-Agent": "coreslice"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and have:
                m = _UNSATISFIED.fullmatch((e.headers.get("Content-Range") or "").strip())
                if m and int(m[1]) == have:
                    progress(f"{shown}: all {have} bytes were already in {part.name}")
                    return
                part.unlink()  # longer than the file, or no size given: start again
                raise _Retry(f"server refused Range bytes={have}- (416); restarting from zero") from None
            if e.code >= 500 or e.code in (408, 429):
                raise  # the server's trouble, maybe passing: retried
            raise DownloadError(f"{shown}: HTTP {e.code} {_line(e.reason)}; check the URL") from None
    except urllib.error.URLError as e:
        if not isinstance(e.reason, OSError):  # e.g. a redirect to an unsupported scheme
            raise DownloadError(f"{shown}: {_line(e.reason)}; give an http:// or https:// URL") from None
        raise
    with resp:
        if resp.status == 206:
            m = _CONTENT_RANGE.fullmatch((resp.headers.get("Content-Range") or "").strip())
            if not m or int(m[1]) != have:
                part.unlink(missing_ok=True)
                raise _Retry(f"asked for bytes={have}-, got 206 with Content-Range "
                             f"{resp.headers.get('Content-Range')!r}; restarting from zero")
            end, total, mode = int(m[2]) + 1, (None if m[3] == "*" else int(m[3])), "ab"
        elif resp.status == 200:
            if have:
                progress(f"{shown}: the server ignored the Range request; restarting from zero")
            length = resp.headers.get("Content-Length")
            have, mode = 0, "wb"
            end = total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"{shown}: unexpected HTTP {resp.status} {_line(resp.reason)}; check the URL")
        meter.start(have, total)
        try:
            f = open(part, mode)
        except OSError as e:
            raise DownloadError(f"cannot write {part}: {_line(e)}; pass a destination you can write") from None
        with f:
            # read1, not read: read(n) loops until n bytes and drops what it has if the
            # connection breaks meanwhile; read1 hands over each piece as it arrives.
            while chunk := resp.read1(CHUNK):  # cut connections raise here, or read b"" early
                try:
                    f.write(chunk)
                except OSError as e:  # disk full etc.: retrying would not help
                    raise DownloadError(f"cannot write {part}: {_line(e)}; free space there") from None
                have += len(chunk)
                meter.update(have)
        # http.client returns b"" (no IncompleteRead) when the peer closes before Content-Length.
        if end is not None and have < end:
            raise _Retry(f"connection closed at byte {have} of {end}")
        meter.update(have, final=True)


def fetch(url: str, dest: Path, sha256: str | None, progress: Callable[[str], None] = lambda m: None,
          *, attempts: int = 6, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` (resuming DEST.part, retrying cut connections) and verify it."""
    _check_url(url)
    dest, shown = Path(dest), _shown(url)
    expected = check_sha256_arg(sha256) if sha256 is not None else None
    if not dest.parent.is_dir():
        raise UsageError(f"{dest}: directory {dest.parent} does not exist; create it or pick another destination")
    if expected and dest.is_file():
        if sha256_file(dest) == expected:
            progress(f"{dest}: already downloaded, sha256 matches")
            return dest
        progress(f"{dest}: exists with another sha256; downloading again")
    if expected is None:
        progress(f"{shown}: no --sha256 given; the download will not be verified")
    part = dest.with_name(dest.name + ".part")
    if _size(part):
        progress(f"{shown}: resuming {part.name} at byte {_size(part)}")
    opener, meter, last = _opener(), _Meter(shown, progress), None
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            _transfer(opener, url, shown, part, timeout, meter, progress)
            break
        except (OSError, http.client.HTTPException, _Retry) as e:  # resets, timeouts, IncompleteRead, 5xx
            last = f"{type(e).__name__}: {_line(e)}"
            if attempt < attempts:
                delay = BACKOFF * min(2 ** (attempt - 1), 8)
                progress(f"{shown}: {last}; retrying in {delay:.0f} s (attempt {attempt + 1} of {attempts})")
                time.sleep(delay)
    else:
        raise DownloadError(f"{shown}: download failed after {attempts} attempts with {_size(part)} bytes "
                            f"received ({last}); check the URL and the network, then run again "
                            f"(it resumes from {part})")
    actual = sha256_file(part)
    if expected and actual != expected:
        part.unlink()
        raise UsageError(f"{shown}: sha256 mismatch: expected {expected}, got {actual}; the download was "
                         "deleted; check --sha256 against the tarball's published checksum, or the URL")
    if expected is None:
        progress(f"{shown}: sha256 {actual} (unverified)")
    os.replace(part, dest)
    return dest
