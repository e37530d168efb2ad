"""The `memformer` command. Each sub-command lives in `memformer/cli/<name>.py`."""
from __future__ import annotations

import argparse
import importlib
import sys

from memformer.cli import COMMANDS, EVALS


def _register(name: str, sub) -> None:
    try:
        module = importlib.import_module(f"memformer.cli.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"memformer.cli.{name}":
            raise
        return  # a command not written yet
    module.register(sub)


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: a removed flag (`--rag`) must fail, not match a longer one."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memformer", description="long-term kNN memory for frozen LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        _register(name, sub)
    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval", required=True)
    for name in EVALS:
        _register(name, ev)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from memformer.fileio import BusyError
    from memformer.persistence import MemoryFileError
    from memformer.qa.documents import DocumentError
    try:
        return args.func(args)
    except (OSError, MemoryFileError, DocumentError, BusyError) as e:
        # a file that cannot be read or written, or a folder another process is writing (they
        # name it): a message, not a traceback
        prog = " ".join(filter(None, ["memformer", args.command, getattr(args, "memory_command", None)]))
        print(f"{prog}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
