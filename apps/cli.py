"""The `moelite` command: one argparse parser with a subcommand per module (chat, run, convert, plan,
analyze, serve, perplexity, cache). User errors print one line `moelite: error: ...` and exit 2 (bad usage) or 1 (the
model or the machine failed); any other exception is a bug: one line that says so and asks for a report, exit 1.
`--verbose` shows the traceback (and the native libraries' own stderr lines, hidden otherwise). Warnings are
one line `moelite: warning: ...`."""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import Any, NoReturn

from ..errors import MoeliteError, UsageError

PROG = "moelite"


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> Parser:
    from . import analyze_cmd, cache_cmd, chat, convert_cmd, perplexity_cmd, plan, run_cmd, serve

    p = Parser(
        prog=PROG,
        description="Run Mixture-of-Experts models whose experts do not fit in memory.",
        epilog="Documentation: README.md and docs/ in moelite's source tree; docs/USAGE.md has every command and "
        "option, docs/ARCHITECTURE.md how it works.",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for mod in (chat, run_cmd, serve, perplexity_cmd, convert_cmd, plan, analyze_cmd, cache_cmd):
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        sp.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and extra diagnostics")
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.main)
    return p


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    warnings.showwarning = _show_warning
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moelite run ... | head`
        sys.stderr.close()
        return 0
    except MoeliteError as e:
        return _fail(args, e, 2 if isinstance(e, UsageError) else 1)
    except OSError as e:  # port in use, unwritable cache dir, ...
        return _fail(args, e, 1)
    except Exception as e:  # a bug in moelite: say so in one line
        return _fail(args, e, 1, bug=True)


def _fail(args: argparse.Namespace, e: BaseException, code: int, bug: bool = False) -> int:
    if getattr(args, "verbose", False):
        traceback.print_exc()
    msg = " ".join(str(e).split()) or type(e).__name__
    if bug:
        msg = f"internal error ({type(e).__name__}: {msg}); please report it with the command line" + (
            "" if getattr(args, "verbose", False) else " and the output of --verbose"
        )
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
