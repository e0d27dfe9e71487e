"""Resumable, verified downloads against a local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading

import pytest

from shadowquant.inputs import download as dl
from shadowquant.errors import PipelineError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves PAYLOAD at /data.jsonl.zst with Range support; the first `drops` responses stop half way."""

    daemon_threads = True

    def __init__(self, drops: int = 1, ranges: bool = True):
        super().__init__(("127.0.0.1", 0), FlakyHandler)
        self.drops = drops
        self.ranges = ranges
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/data.jsonl.zst"


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        range_header = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append({"path": self.path, "range": range_header})
            drop = self.server.drops > 0 and self.path == "/data.jsonl.zst"
            self.server.drops -= drop
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://example.com/data.jsonl.zst")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/data.jsonl.zst":
            self.send_error(404)
            return
        start = 0
        if range_header and self.server.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:
            # Announce the whole body, send part of it, then drop the connection.
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def start(**options) -> FlakyServer:
        server = FlakyServer(**options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def fetch(server, root, name="data.jsonl.zst", **options):
    options.setdefault("backoff", 0)
    return dl.download(server.url, root / "datasets" / name, root=root, allow_http=True, **options)


def test_dropped_connection_resumes_with_range_and_verifies(serve, tmp_path):
    server = serve(drops=1)
    path = fetch(server, tmp_path, sha256=PAYLOAD_SHA256.upper())
    assert path.read_bytes() == PAYLOAD
    assert dl.sha256_file(path) == PAYLOAD_SHA256
    assert not path.with_name(path.name + ".part").exists()
    first, second = server.requests
    assert first["range"] is None
    assert second["range"] == f"bytes={len(PAYLOAD) // 3}-"


def test_server_without_range_support_restarts_from_zero(serve, tmp_path):
    server = serve(drops=2, ranges=False)
    path = fetch(server, tmp_path, sha256=PAYLOAD_SHA256)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_complete_part_file_is_finished_by_a_416(serve, tmp_path):
    server = serve(drops=0)
    part = tmp_path / "datasets" / "data.jsonl.zst.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)
    path = fetch(server, tmp_path, sha256=PAYLOAD_SHA256)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [{"path": "/data.jsonl.zst", "range": f"bytes={len(PAYLOAD)}-"}]


def test_wrong_sha256_keeps_the_part_file_and_never_creates_dest(serve, tmp_path):
    server = serve(drops=0)
    wrong = "0" * 64
    with pytest.raises(
        PipelineError, match=rf"data\.jsonl\.zst\.part: sha256 mismatch .*expected {wrong}, got {PAYLOAD_SHA256}"
    ):
        fetch(server, tmp_path, sha256=wrong)
    dest = tmp_path / "datasets" / "data.jsonl.zst"
    assert not dest.exists()
    assert dest.with_name(dest.name + ".part").read_bytes() == PAYLOAD


def test_existing_dest_is_reused_or_rejected_by_its_hash(serve, tmp_path):
    server = serve(drops=0)
    fetch(server, tmp_path)
    fetch(server, tmp_path, sha256=PAYLOAD_SHA256)
    assert len(server.requests) == 1
    with pytest.raises(PipelineError, match="existing file has sha256"):
        fetch(server, tmp_path, sha256="f" * 64)


def test_gives_up_after_the_retries_and_keeps_the_partial_file(serve, tmp_path):
    server = serve(drops=10)
    with pytest.raises(PipelineError, match=r"after 2 attempts .*partial file kept at .*\.part"):
        fetch(server, tmp_path, retries=2)
    assert len(server.requests) == 2
    part = tmp_path / "datasets" / "data.jsonl.zst.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    assert not part.with_suffix("").exists()


def test_http_errors_are_reported_without_retrying(serve, tmp_path):
    server = serve(drops=0)
    with pytest.raises(PipelineError, match="HTTP 404"):
        dl.download(server.url.replace("data", "missing"), tmp_path / "x.jsonl", root=tmp_path, allow_http=True)
    assert len(server.requests) == 1


def test_redirect_to_another_host_over_http_is_refused(serve, tmp_path):
    server = serve(drops=0)
    with pytest.raises(PipelineError, match="only https://"):
        dl.download(server.url.replace("data.jsonl.zst", "moved"), tmp_path / "x.jsonl", root=tmp_path, allow_http=True)
    assert [request["path"] for request in server.requests] == ["/moved"]


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:1/data.jsonl", "ftp://example.com/data.jsonl", "file:///etc/passwd", "data.jsonl", "https://"],
)
def test_only_https_urls_are_accepted(tmp_path, url):
    with pytest.raises(PipelineError, match="only https:// URLs"):
        dl.download(url, tmp_path / "data.jsonl", root=tmp_path)


def test_allow_http_is_limited_to_loopback(tmp_path):
    with pytest.raises(PipelineError, match="only https:// URLs"):
        dl.download("http://example.com/data.jsonl", tmp_path / "data.jsonl", root=tmp_path, allow_http=True)


def test_destination_must_stay_inside_root(tmp_path):
    root = tmp_path / "resources"
    root.mkdir()
    for dest in (root / ".." / "escaped.jsonl", tmp_path / "elsewhere.jsonl", root):
        with pytest.raises(PipelineError, match="outside"):
            dl.download("https://example.com/data.jsonl", dest, root=root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PipelineError, match=r"link/data\.jsonl.*outside"):
        dl.download("https://example.com/data.jsonl", root / "link" / "data.jsonl", root=root)


def test_malformed_sha256_is_rejected(tmp_path):
    with pytest.raises(PipelineError, match="not 64 hexadecimal digits"):
        dl.download("https://example.com/d.jsonl", tmp_path / "d.jsonl", sha256="abc", root=tmp_path)


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert dl.sha256_file(path, chunk=1) == hashlib.sha256(b"abc").hexdigest()


def test_dataset_cache_path_is_deterministic_and_collision_free():
    a = dl.dataset_cache_path("https://example.com/a/train.jsonl.zst")
    b = dl.dataset_cache_path("https://example.org/b/train.jsonl.zst")
    assert a == dl.dataset_cache_path("https://example.com/a/train.jsonl.zst")
    assert a != b
    assert re.fullmatch(r"resources/datasets/[0-9a-f]{12}-train\.jsonl\.zst", a)
    odd = dl.dataset_cache_path("https://example.com/x/my%20data%3F%20(v2).jsonl?download=1")
    assert re.fullmatch(r"resources/datasets/[0-9a-f]{12}-my_data___v2_\.jsonl", odd)
    assert dl.dataset_cache_path("https://example.com/").endswith("-dataset")
    assert dl.dataset_cache_path("https://example.com/../..").endswith("-dataset")
