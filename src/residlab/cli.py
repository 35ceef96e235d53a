"""The ``residlab`` command. Its flags come from each command's options model
(:mod:`residlab.commands`); heavy imports happen inside commands so ``--help`` is instant.

A :class:`~residlab.errors.UsageError` (bad input) or an ``OSError`` (the environment: a full
disk, a folder we may not write) becomes one line on stderr and exit status 2. Anything else is
a bug: it is shown with its traceback and exit status 1. ``-v`` shows tracebacks always.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from residlab.commands import COMMANDS, Command
from residlab.errors import UsageError
from residlab.options import add_flags

__all__ = ["build_parser", "main", "run_module"]

log = logging.getLogger("residlab")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree, one sub-parser per :class:`Command`, flags from its options."""
    parser = _Parser(prog="residlab", description="Residual-stream experiments on chat models.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and full tracebacks")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command", required=True, parser_class=_Parser)}
    for command in COMMANDS:
        for depth in range(1, len(command.path)):
            prefix = command.path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = sub.add_subparsers(dest=f"sub{depth}", required=True,
                                                    parser_class=_Parser)
        sub = groups[command.path[:-1]].add_parser(command.path[-1], help=command.help,
                                                   description=command.help)
        add_flags(sub, command.options)
        settings = command.options.settings_model
        if settings is not None:
            add_flags(sub, settings, group_title="config keys (override the --config file)")
        sub.set_defaults(_command=command)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _os_error(error: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> a line that says what to do."""
    where = f" ({error.filename})" if error.filename else ""
    reason = error.strerror or _one_line(error)
    return f"{reason}{where}; free space or choose a writable output folder and run again"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    command: Command = args._command
    try:
        command.run(command.options.from_flags(args))
    except UsageError as error:
        if args.verbose:
            traceback.print_exc()
        print(f"residlab: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # the environment, not the program: full disk, permissions
        if args.verbose:
            traceback.print_exc()
        print(f"residlab: error: {_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("residlab: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: keep the traceback, say where to report it
        traceback.print_exc()
        print("residlab: internal error (a bug, not your input); the traceback above says "
              "where", file=sys.stderr)
        return 1
    return 0


def run_module(*path: str) -> int:
    """``python -m residlab.<stage>`` entry points: ``residlab <path> <argv...>``."""
    return main([*path, *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
