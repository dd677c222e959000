"""``vladkit demo``: the built-in near-duplicate benchmark (:mod:`vladkit.app.demo`) and its table."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import EXIT_OK


def cmd_demo(args):
    import time

    from ..demo import format_table, run_demo

    start = time.perf_counter()
    log = (lambda message: None) if args.quiet else (lambda message: print(f"vladkit demo: {message}", file=sys.stderr))
    results = run_demo(args.output, seed=args.seed, log=log)
    print(format_table(results))
    print()
    print("seconds (encoding, or whitening/quantizer training + indexing): "
          + ", ".join(f"{r.encoding} {r.seconds:.1f}" for r in results))
    print(f"total {time.perf_counter() - start:.0f} s; report: {Path(args.output) / 'report.html'}")
    return EXIT_OK
