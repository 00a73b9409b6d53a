"""The preview renderer, against a fake Prometheus over real HTTP (a local http.server answering
query_range), never the real stack."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from serving.dashboards import build, preview

START, END = 1_700_000_000.0, 1_700_001_800.0  # 30 minutes


@dataclass
class FakePrometheus:
    url: str = ""
    queries: list[str] = field(default_factory=list)
    refuse: str = "no such text"  # queries containing this get Prometheus's error answer


def answer(fake: FakePrometheus, query: str, start: float, end: float, step: float) -> tuple[int, dict[str, object]]:
    if fake.refuse in query:
        return 400, {"status": "error", "errorType": "bad_data", "error": "parse error: unexpected thing"}
    values = [[start + i * step, str(0.1 + 0.01 * i)] for i in range(int((end - start) / step) + 1)]
    series = {"metric": {"tier": "batch", "variant": "awq", "reason": "score_drift"}, "values": values}
    return 200, {"status": "success", "data": {"resultType": "matrix", "result": [series]}}


@pytest.fixture
def prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked = urlparse(self.path)
            assert asked.path == "/api/v1/query_range"
            params = {k: v[0] for k, v in parse_qs(asked.query).items()}
            fake.queries.append(params["query"])
            status, body = answer(fake, params["query"], *(float(params[k]) for k in ("start", "end", "step")))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", list(build.DASHBOARDS))
def test_every_panel_is_queried_and_drawn(prometheus: FakePrometheus, tmp_path: Path, name: str) -> None:
    dashboard = build.OUT / f"{name}.json"
    out = tmp_path / f"{name}.png"
    report = preview.render_file(dashboard, prometheus.url, START, END, out)
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert out.stat().st_size > 20_000  # panels with lines, not an empty canvas
    assert report.ok
    assert report.empty == []
    data = json.loads(dashboard.read_text())
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert [p.title for p in report.panels] == [p["title"] for p in panels]
    targets = sum(len(p["targets"]) for p in panels) + len(data["annotations"]["list"])
    assert len(prometheus.queries) == targets
    assert not any("$" in q.replace('"$1"', "") for q in prometheus.queries), "a variable was left unexpanded"
    assert report.annotations == {"Rollbacks": 1, "Promotions": 1}


def test_a_refused_query_is_reported_by_panel_and_the_rest_still_drawn(
    prometheus: FakePrometheus, tmp_path: Path
) -> None:
    prometheus.refuse = "ray_vllm_"
    out = tmp_path / "overview.png"
    report = preview.render_file(build.OUT / "overview.json", prometheus.url, START, END, out)
    assert not report.ok
    failed = {p.title for p in report.panels if p.errors}
    assert failed == {"Engine requests running and waiting", "Engine KV cache use"}
    assert "parse error" in " ".join(e for p in report.panels for e in p.errors)
    assert out.exists()
    assert any("query error" not in line and "series" in line for line in report.lines())


def test_an_unreachable_prometheus_is_a_query_error() -> None:
    fetch = preview.prometheus("http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(preview.QueryError, match="cannot query"):
        fetch("up", START, END, 60)


def test_empty_results_are_listed_not_failed(tmp_path: Path) -> None:
    data = json.loads((build.OUT / "quality.json").read_text())
    report = preview.render(data, lambda *_: [], START, END, tmp_path / "q.png")
    assert report.ok
    assert len(report.empty) == len(report.panels)
    queries = sum(len(p["targets"]) for p in data["panels"] if p["type"] != "row")
    assert len(report.empty_queries) == queries  # every query is named, not just every panel


def test_legends_follow_grafana_s_format() -> None:
    assert preview.legend("{{tier}}: {{ primary }} vs {{shadow}}", {"tier": "batch", "primary": "awq"}) == (
        "batch: awq vs "
    )
