"""The shipped front proxy (deploy/nginx/serving.conf), run by a real nginx: header limits that Ray
Serve's proxy lacks, and the headers Serve acts on taken out of clients' hands."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import PORT, Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "deploy" / "nginx" / "serving.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_nginx(prefix: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], str]:
    """The shipped config, with only its two addresses changed for the test."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(binary).exists(), "nginx is not installed; `make test` installs it (scripts/install-test-tools.sh)"
    port = free_port()
    text = CONFIG.read_text()
    assert "server 127.0.0.1:8000;" in text
    assert "listen 8443;" in text
    text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream_port};")
    text = text.replace("listen 8443;", f"listen 127.0.0.1:{port};")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(text)
    process = subprocess.Popen(
        [binary, "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", "daemon off;"], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else "nginx exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    pytest.fail("nginx did not start listening within 30 s")


class Echo(BaseHTTPRequestHandler):
    """An upstream that answers with the headers it received."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echo_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    process, url = start_nginx(tmp_path_factory.mktemp("nginx-echo"), upstream.server_address[1])
    yield url
    process.terminate()
    process.wait(timeout=30)
    upstream.shutdown()


def test_headers_that_ray_serve_acts_on_are_the_servers(echo_proxy: str) -> None:
    chosen = {
        "x-request-disconnect-disabled": "?1",
        "x-request-timeout-seconds": "0",
        "x-request-id": "chosen-by-the-client",
        "authorization": "Bearer demo-premium",
    }
    seen = httpx.get(f"{echo_proxy}/v1/models", headers=chosen).json()
    assert "x-request-disconnect-disabled" not in seen
    assert "x-request-timeout-seconds" not in seen
    assert seen["x-request-id"] != "chosen-by-the-client"
    assert len(seen["x-request-id"]) == 32  # nginx's own $request_id
    assert seen["authorization"] == "Bearer demo-premium"  # what the router needs passes


@pytest.mark.parametrize(
    "headers",
    [
        {f"x-h{i}": "v" for i in range(10_000)},  # many headers
        {"x-big": "a" * 1_000_000},  # one huge header
    ],
    ids=["10000-headers", "1MB-header"],
)
def test_oversized_headers_are_refused_at_the_proxy(echo_proxy: str, headers: dict[str, str]) -> None:
    answer = httpx.get(f"{echo_proxy}/v1/models", headers=headers, timeout=30)
    assert answer.status_code in (400, 431, 494), answer.status_code


def test_oversized_bodies_are_refused_at_the_proxy(echo_proxy: str) -> None:
    answer = httpx.post(f"{echo_proxy}/v1/chat/completions", content=b"x" * 2_000_000, timeout=30)
    assert answer.status_code == 413


def test_the_stack_behind_the_proxy_answers_and_streams(stack: Stack, tmp_path: Path) -> None:
    process, url = start_nginx(tmp_path / "nginx", PORT)
    try:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="demo-premium", max_retries=0, timeout=120)
        raw = api.chat.completions.with_raw_response.create(
            model="demo-chat",
            messages=[{"role": "user", "content": "We the people"}],
            max_tokens=4,
            extra_headers={"x-request-id": "chosen-by-the-client"},
        )
        assert raw.headers["x-served-variant"] == "fp16"
        assert "chosen-by-the-client" not in raw.parse().id
        chunks = list(
            api.chat.completions.create(
                model="demo-chat", messages=[{"role": "user", "content": "Four score"}], max_tokens=8, stream=True
            )
        )
        assert len(chunks) > 1
        assert httpx.get(f"{url}/v1/models", headers={"x-big": "a" * 100_000}).status_code in (400, 431, 494)
    finally:
        process.terminate()
        process.wait(timeout=30)
