"""The ``vladkit`` command. It composes the library and holds no algorithm."""

from __future__ import annotations

import argparse
import sys

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vladkit",
        description=(
            "Local-feature encodings for images: SIFT / dense SIFT descriptors aggregated "
            "into Bag-of-Features, VLAD and Fisher vectors."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vladkit {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
