"""The command line: argument parsing, printing and exit codes — the only place that prints."""

from fqexport.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
