"""The ``reparam`` console script.

Every module in this package that defines ``register(subparsers)`` adds one
sub-command; ``register`` must attach the handler with
``parser.set_defaults(handler=fn)`` where ``fn(args) -> int`` returns the exit
status. Modules are discovered, so commands live in their own files.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence


def _version() -> str:
    """The installed distribution's version, else the source tree's ``reparam.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("reparam")
    except metadata.PackageNotFoundError:
        from reparam import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reparam",
        description="Prove, convert and measure reparameterization (branched blocks vs spatial gradient scaling).",
    )
    parser.add_argument("--version", action="version", version=f"reparam {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
