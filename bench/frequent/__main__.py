"""`python -m bench.frequent`: see bench/frequent/__init__.py."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.frequent import __doc__ as DOC
from bench.frequent.measure import ROOT, say
from bench.frequent.report import markdown
from bench.frequent.rounds import WORK_MARKER, Bench
from bench.frequent.site import UPLOADS


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frequent", description=(DOC or "").split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench" / "work" / "frequent",
                        help="the database's uploads, the backups and the repositories (default bench/work/frequent)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where frequent.{json,md} go")
    parser.add_argument("--runs", type=int, default=3, help="rounds of measurements (default 3); medians are reported")
    parser.add_argument("--uploads-mb", type=int, default=60, help=f"total size of the {UPLOADS} uploads (default 60 MiB)")
    parser.add_argument("--reference", action="store_true",
                        help="the reference set instead of the small site: a copy of bench.run's 1.2 GB database "
                             "(bench.generate, made once and reused) with every files row's upload (~1.3 GB)")
    parser.add_argument("--compression", choices=["6", "0", "zstd-stream"],
                        help="BACKUP_COMPRESSION for the product's runs (default: the product's, -Z6)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (the database is dropped all the same)")
    args = parser.parse_args()
    if args.runs < 1 or args.uploads_mb < 1:
        parser.error("--runs and --uploads-mb must be at least 1")
    if shutil.which("restic") is None or shutil.which("pg_dump") is None:
        print("[ERROR] bench.frequent needs restic and pg_dump on PATH", file=sys.stderr)
        return 2
    bench = Bench(args, args.work_dir.resolve())
    try:
        results = bench.main()
    finally:
        bench.site.drop()
        if not args.keep and (bench.work / WORK_MARKER).exists():
            shutil.rmtree(bench.work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frequent.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "frequent.md").write_text(markdown(results))
    print(markdown(results))
    say(f"wrote {args.out / 'frequent.json'} and {args.out / 'frequent.md'}")
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
