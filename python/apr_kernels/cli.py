"""The ``apr-kernels`` command line (also ``python -m apr_kernels``).

Each command lives in the module that owns its concern; this file only routes. A command module
exposes ``register(subparsers)``, which adds its sub-parser and sets ``func(args) -> int``.
Command modules are imported only when listed here, and missing ones are skipped, so a broken or
absent optional piece never takes the whole CLI down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> what it provides (in help order)
COMMAND_MODULES = (
    "apr_kernels.train.cli",    # demo, train, tokenize
    "apr_kernels.train.evaluation",  # eval
    "apr_kernels.train.generation",  # generate, chat
    "apr_kernels.train.preference",  # dpo
    "apr_kernels.train.kto",    # kto
    "apr_kernels.train.reward", # reward
    "apr_kernels.train.grpo",   # grpo
    "apr_kernels.train.gkd",    # gkd
    "apr_kernels.train.online_dpo",  # online-dpo
    "apr_kernels.train.rloo",   # rloo
    "apr_kernels.convert.cli",  # convert, export, inspect, validate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr-kernels",
        description="Load, convert, inspect and train Llama/Qwen2 models stored as APR v2 files.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the command module itself is not written (yet)
                continue
            raise
        module.register(sub)
    for command in sub.choices.values():  # (read by cli_config.expand before parsing; listed for --help)
        command.add_argument("--config", metavar="FILE",
                             help="this command's options from a YAML, JSON or TOML file (name: value); options "
                                  "given here override them")
    return parser


def _version() -> str:
    from apr_kernels import __version__

    return f"apr-kernels {__version__}"


def main(argv: list[str] | None = None) -> int:
    from . import cli_config

    parser = build_parser()
    try:  # a command's --config FILE: its options first, the command line's after them
        argv = cli_config.expand(parser, sys.argv[1:] if argv is None else list(argv))
    except ValueError as exc:
        print(f"apr-kernels: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `apr-kernels inspect big.apr | head`: the reader left; stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's exit flush must not fail)
        return 141  # 128 + SIGPIPE, what a shell tool killed by it reports
    except (ValueError, OSError, RuntimeError) as exc:  # AprFormatError is a ValueError
        # One clear line for the user; APR_KERNELS_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("APR_KERNELS_DEBUG"):
            raise
        print(f"apr-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
