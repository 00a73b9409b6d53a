"""python -m serving.dashboards [--check] | preview DASHBOARD --prometheus URL [--minutes N] --out PNG"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from serving.dashboards import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.dashboards", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="fail if the committed JSON is not what the generator makes"
    )
    commands = parser.add_subparsers(dest="command")
    preview = commands.add_parser("preview", help="draw a dashboard's panels from a Prometheus into a PNG")
    preview.add_argument("dashboard", type=Path)
    preview.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    preview.add_argument("--minutes", type=float, default=30.0, help="the time range, ending now")
    preview.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "preview":
        from serving.dashboards import preview as previews  # matplotlib only when drawing

        end = time.time()
        report = previews.render_file(args.dashboard, args.prometheus, end - args.minutes * 60, end, args.out)
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1
    if args.check:
        stale = build.stale()
        for path in stale:
            print(f"{path} differs from the generator; run `make dashboards`", file=sys.stderr)
        return 1 if stale else 0
    for path in build.write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
