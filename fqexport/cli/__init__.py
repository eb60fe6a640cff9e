"""The command line: argument parsing, printing and exit codes — the only place that prints."""

try:
    from fqexport.cli.main import build_parser, main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: an interrupt's exit code, no traceback
    import sys

    print("interrupted by SIGINT while fqexport started; nothing was written", file=sys.stderr)
    raise SystemExit(130) from None

__all__ = ["build_parser", "main"]
