"""Command-line entry point: ``culturemert <command> ...``.

Each command lives in its own module ``culturemert.cli.<command>`` exposing ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``culturemert --help`` is fast.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from types import ModuleType

# command name -> one-line help. Order is the pipeline order.
COMMANDS: dict[str, str] = {
    "convert": "convert an HF / fairseq / culturemert checkpoint to a safetensors export",
    "corpus": "render the offline multi-cultural corpus from symbolic music",
    "prepare": "decode audio into 24 kHz shards and compute teacher targets",
    "pretrain": "(continual) pre-training from a recipe, resumable, torchrun-ready",
    "merge": "merge models in weight space (task arithmetic, TIES, DARE, breadcrumbs, DELLA, TSV, Iso-C/CTS, linear)",
    "embed": "extract cached per-layer embeddings for a dataset",
    "probe": "MARBLE-protocol probing from a config",
    "evaluate": "embed + probe one or more models on datasets",
    "report": "tables and plots (paper layout, layer curves, transfer matrix) from runs",
    "quickstart": "the whole workflow offline on the embedded corpus",
}


def _command_module(name: str) -> ModuleType:
    """The module of command ``name``, imported only now (some commands pull in torch, which costs seconds)."""
    if name == "convert":
        from culturemert.cli import convert as module
    elif name == "corpus":
        from culturemert.cli import corpus as module
    elif name == "prepare":
        from culturemert.cli import prepare as module
    elif name == "pretrain":
        from culturemert.cli import pretrain as module
    elif name == "merge":
        from culturemert.cli import merge as module
    elif name == "embed":
        from culturemert.cli import embed as module
    elif name == "probe":
        from culturemert.cli import probe as module
    elif name == "evaluate":
        from culturemert.cli import evaluate as module
    elif name == "report":
        from culturemert.cli import report as module
    elif name == "quickstart":
        from culturemert.cli import quickstart as module
    else:
        raise KeyError(name)
    return module


#: storage errors reported as one line instead of a traceback
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="culturemert",
        description="Adapt MERT music foundation models to the world's musical traditions.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-V", "--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _build_parser()
    verbose = False
    while argv and argv[0] in ("-v", "--verbose"):
        verbose = True
        argv.pop(0)
    if argv and argv[0] in ("-V", "--version"):
        from culturemert import __version__

        print(f"culturemert {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help") and argv[0] not in COMMANDS:
            top.print_usage(sys.stderr)
            print(f"culturemert: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        top.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    help_text = COMMANDS[name]
    module = _command_module(name)
    parser = argparse.ArgumentParser(prog=f"culturemert {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    from culturemert.errors import UserError

    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"culturemert {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"culturemert {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # disk full, quota, read-only or permission denied: the writers leave only temp files (cleaned on the
        # next run) and complete files, so one line naming the path is all the user needs
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(
            f"culturemert {name}: error: {exc.strerror or exc}{where}; nothing partial was kept - "
            "free space or fix permissions, then re-run the same command to resume",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
