"""Grafana dashboards as code: the generator of the JSON under deploy/grafana/, and a preview renderer.

    python -m serving.dashboards            # regenerate deploy/grafana/*.json
    python -m serving.dashboards --check    # fail if the committed JSON and the generator disagree
    python -m serving.dashboards preview deploy/grafana/overview.json --prometheus URL --minutes 30 --out x.png

Every query reads only metrics of the contract (serving/metrics.py) or the ray_* engine metrics that
Ray's own Serve LLM dashboard reads; tests/unit/test_dashboards.py holds the generator to that.
"""
