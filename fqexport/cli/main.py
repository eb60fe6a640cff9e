"""Command line: ``fqexport compress | validate | analyze | sweep | demo``.

The CLI only parses arguments and calls the API. Exit codes: 0 ok, 1 a validation limit
broken, 2 bad input (any other fqexport error), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from fqexport.cli.analyze import add_analyze_parser
from fqexport.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED
from fqexport.cli.compress import add_compress_parser
from fqexport.cli.demo import add_demo_parser
from fqexport.cli.sweep import add_sweep_parser
from fqexport.cli.validate import add_validate_parser
from fqexport.errors import FqexportError, ValidationFailed
from fqexport.version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``fqexport`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fqexport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fqexport {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_compress_parser(sub)
    add_validate_parser(sub)
    add_analyze_parser(sub)
    add_sweep_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, map errors to exit codes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ValidationFailed as err:
        print(f"FAIL: {err}", file=sys.stderr)
        return EXIT_FAILED
    except FqexportError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
