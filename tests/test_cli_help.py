"""``--help`` of every (sub)command: every option has help text that shows its default, no
``%%`` or reStructuredText markup leaks into it, and docs/cli.md is what tools/cli_reference.py
writes from the same parser."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from fqexport.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("compress", "validate", "analyze", "sweep", "demo")
# What --help must not show: escaped percent signs, RST roles and inline literals.
LEAKED_MARKUP = re.compile(r"%%|``|`|:class:|:func:|:mod:|:data:|:meth:")


def _reference():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"fqexport": parser, **{name: sub.choices[name] for name in SUBCOMMANDS}}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def _shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return " ".join(parser._get_formatter()._expand_help(action).split())


def test_the_walk_sees_every_subcommand_and_its_options():
    parsers = _parsers()
    assert set(parsers) == {"fqexport", *SUBCOMMANDS}
    flags = {s for a in _options(parsers["compress"]) for s in a.option_strings}
    assert {"--budget-bits", "--learn-bits", "--loss", "--sampler", "--seed", "--block-size"} <= flags


@pytest.mark.parametrize("name", ["fqexport", *SUBCOMMANDS])
def test_every_option_has_help(name):
    parser = _parsers()[name]
    missing = [a.option_strings[0] for a in _options(parser) if not a.help]
    assert not missing, f"fqexport {name}: options without help: {missing}"
    # hidden only where the command refuses them with its own reason (survey 83: sweep offered the
    # fixed widths in --help, "default: 8", and refused them whenever given)
    hidden = [a.option_strings[0] for a in _options(parser) if a.help == argparse.SUPPRESS]
    assert hidden == (["--weight-bits", "--layer-bits"] if name == "sweep" else []), hidden


@pytest.mark.parametrize("name", ["fqexport", *SUBCOMMANDS])
def test_every_option_with_a_default_shows_it(name):
    """An option that takes a value and has a default says so in its help ("(default: 8)")."""
    parser = _parsers()[name]
    silent = []
    for a in _options(parser):
        default = a.default
        if a.required or a.nargs == 0 or default is None or default is argparse.SUPPRESS or default in ([], ()):
            continue
        if "default" not in _shown_help(parser, a):
            silent.append(a.option_strings[0])
    assert not silent, f"fqexport {name}: options whose help hides the default: {silent}"
    # and the shown default is the real one
    if name == "compress":
        by_flag = {a.option_strings[-1]: a for a in _options(parser)}
        assert "(default: 8)" in _shown_help(parser, by_flag["--weight-bits"])
        assert "(default: worst-group)" in _shown_help(parser, by_flag["--loss"])
        assert "(default: group-balanced)" in _shown_help(parser, by_flag["--sampler"])
        assert "(default: worst-group)" in _shown_help(parser, by_flag["--objective"])
        assert "(default: 2,4,8 for the search" in _shown_help(parser, by_flag["--bit-choices"])


@pytest.mark.parametrize("name", ["fqexport", *SUBCOMMANDS])
def test_no_markup_leaks_into_help(name):
    text = _parsers()[name].format_help()
    leaks = sorted({m.group(0) for m in LEAKED_MARKUP.finditer(text)})
    assert not leaks, f"fqexport {name} --help shows {leaks}"


def test_the_markup_check_catches_a_leak():
    p = argparse.ArgumentParser(description="``fqexport x``: 90%% of :class:`Y`")
    assert {m.group(0) for m in LEAKED_MARKUP.finditer(p.format_help())} == {"``", "%%", ":class:", "`"}


def test_docs_cli_md_is_up_to_date():
    reference = _reference()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == reference.render(), (
        "docs/cli.md is stale: run .venv/bin/python tools/cli_reference.py")


def test_a_flag_of_another_meaning_is_credited_only_where_its_command_is_named():
    reference = _reference()
    pages = {"a.md": "Gate a file in CI:\n\n    fqexport validate model.onnx --data test.npz --target x86-avx2\n",
             "b.md": "Write it for a CPU family with `compress --target x86-vnni`.\n\nSee also `validate`.\n"}
    assert reference._documented_in("--target", pages, "validate") == ["a.md"]
    assert reference._documented_in("--target", pages, "compress") == ["b.md"]
    assert reference._documented_in("--target", pages) == ["a.md", "b.md"]
    shared = reference._shared_flags(dict(reference._subparsers(build_parser())))
    assert "--target" in shared and "--task" in shared  # demo's --task is another option
    assert "--model" not in shared and "--debug" not in shared  # the same help everywhere


def test_docs_cli_md_lists_every_option_with_its_shown_help():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for name, parser in _parsers().items():
        for a in _options(parser):
            if a.help == argparse.SUPPRESS:  # not offered (test_every_option_has_help says which)
                continue
            row = f"| `{', '.join(a.option_strings)}` |"
            assert row in text, f"{name}: {row}"
            assert _shown_help(parser, a).replace("|", "\\|") in text


def test_console_tables_keep_a_group_name_with_a_line_break_on_one_row(capsys):
    """analyze, sweep and the fine-tuning tables printed the raw newline (survey 29)."""
    from fqexport.cli.common import cell_text, display_width, print_table

    print_table([{"group": "new\nline", "n": 1}, {"group": "tab\there\x1b[31m", "n": 2}, {"group": "東京", "n": 3}],
                ["group", "n"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == ["new\\nline          1", "tab\\there\\x1b[31m  2"]
    assert lines[4].startswith("東京 ") and display_width(lines[4]) == display_width(lines[3])  # aligned
    assert cell_text("a\u2028b\x85") == "a\\u2028b\\x85"
