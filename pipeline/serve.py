"""Serve the ltta pipeline on a schedule from one long-lived process (Prefect ``flow.serve``).

    prefect server start &                        # the UI at http://127.0.0.1:4200
    python -m pipeline.serve --cron "0 3 * * *"   # nightly; trigger runs by hand from the UI too
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.flow import ltta_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description="Serve the ltta flow on a cron schedule.")
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: every day at 03:00)")
    parser.add_argument("--name", default="ltta-nightly", help="deployment name shown in the Prefect UI")
    parser.add_argument("--project-dir", default=".", help="project root holding dvc.yaml")
    args = parser.parse_args(argv)
    ltta_pipeline.serve(name=args.name, cron=args.cron, parameters={"project_dir": str(Path(args.project_dir).resolve())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
