"""Resumable, verified HTTPS downloads into the resources folder."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from shadowquant.errors import PipelineError

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_RETRYABLE_STATUS = (408, 425, 429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class _DroppedConnection(Exception):
    """The body ended before the announced length: retry (and resume)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dataset_cache_path(source: str, root: str = "resources") -> str:
    """Deterministic local path under `<root>/datasets/` for a dataset URL.

    The URL's file name is kept (so `.jsonl.zst` still says how to read it), odd
    characters become '_', and a short hash of the whole URL keeps apart two URLs
    with the same file name.
    """
    name = urllib.parse.unquote(Path(urllib.parse.urlsplit(source).path).name)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "dataset"
    name = name[-100:]  # keep the end: the extension is what readers look at
    url_hash = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    return f"{root}/datasets/{url_hash}-{name}"


def _check_url(url: str, allow_http: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if allow_http and parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS:
        return
    raise PipelineError(f"refusing to download {url!r}: only https:// URLs are allowed")


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs that `_check_url` admits (no https -> http downgrade)."""

    def __init__(self, allow_http: bool):
        super().__init__()
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_url(newurl, self.allow_http)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_dest(dest: str | os.PathLike, root: str | os.PathLike) -> Path:
    resolved_root = Path(root).resolve()
    resolved_dest = Path(dest).resolve()
    if resolved_dest == resolved_root or not resolved_dest.is_relative_to(resolved_root):
        raise PipelineError(f"download destination {os.fspath(dest)!r} is outside {os.fspath(root)!r}")
    return resolved_dest


def _check_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise PipelineError(f"sha256 {sha256!r} is not 64 hexadecimal digits")
    return sha256.lower()


def _fetch_once(url: str, part: Path, chunk: int, timeout: float, opener: urllib.request.OpenerDirector) -> None:
    """One request: append to or restart `part`; return when it holds the whole file."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "shadowquant", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            # Nothing left after `have`: complete, unless the server's size says otherwise.
            match = _UNSATISFIED_RANGE.search(error.headers.get("Content-Range", ""))
            if match and int(match.group(1)) != have:
                part.unlink()
                raise _DroppedConnection(f"partial file larger than the remote file ({match.group(1)} bytes)")
            return
        raise
    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        if response.status == 206:
            match = _CONTENT_RANGE.search(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                part.unlink()
                raise _DroppedConnection("server resumed at another offset; restarting")
            total = int(match.group(3)) if match.group(3) != "*" else None
            mode = "ab"
        else:
            # A plain 200 (e.g. a server without Range support) restarts from zero.
            have = 0
            total = remaining
            mode = "wb"
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                file=sys.stderr,
                mininterval=1.0,
            ) as bar,
        ):
            while block := response.read(chunk):
                out.write(block)
                bar.update(len(block))
                if remaining is not None:
                    remaining -= len(block)
        if remaining:
            raise _DroppedConnection(f"connection closed with {remaining} bytes still to come")


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    root: str | os.PathLike = "resources",
    chunk: int = 1 << 20,
    retries: int = 5,
    timeout: float = 60,
    *,
    backoff: float = 1.0,
    allow_http: bool = False,
) -> Path:
    """Download `url` to `dest` (inside `root`), resuming `dest.part` and verifying `sha256`.

    The file appears at `dest` only when complete and verified. A dropped connection
    is retried up to `retries` times, resuming with an HTTP Range request.
    `backoff` is the first wait between attempts in seconds (doubling, at most 30).
    `allow_http` is for tests only: it admits plain http:// to a loopback host.
    """
    _check_url(url, allow_http)
    expected = _check_sha256(sha256)
    target = _check_dest(dest, root)
    part = target.with_name(target.name + ".part")

    if target.exists():
        if expected is not None and (actual := sha256_file(target)) != expected:
            raise PipelineError(
                f"{target}: existing file has sha256 {actual}, expected {expected}; delete it to download again"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    opener = urllib.request.build_opener(_SafeRedirects(allow_http))
    last_error = "no attempt made"
    for attempt in range(1, max(1, retries) + 1):
        try:
            _fetch_once(url, part, chunk, timeout, opener)
            break
        except urllib.error.HTTPError as error:
            if error.code not in _RETRYABLE_STATUS:
                raise PipelineError(f"downloading {url} failed: HTTP {error.code} {error.reason}") from None
            last_error = f"HTTP {error.code} {error.reason}"
        except (_DroppedConnection, http.client.HTTPException, OSError) as error:
            # OSError covers URLError, resets, refused connections and timeouts.
            last_error = f"{type(error).__name__}: {error}"
        if attempt < retries:
            print(f"download of {url} interrupted ({last_error}); retrying", file=sys.stderr)
            time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
    else:
        kept = f"; partial file kept at {part} (run again to resume)" if part.exists() else ""
        raise PipelineError(f"could not download {url} after {max(1, retries)} attempts ({last_error}){kept}")

    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            raise PipelineError(
                f"{part}: sha256 mismatch for {url}: expected {expected}, got {actual}; "
                f"the file is kept for inspection (delete it to download again)"
            )
    os.replace(part, target)
    return target
