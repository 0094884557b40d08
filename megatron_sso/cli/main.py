"""``megatron-sso``: one command line for the project's jobs."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import demo


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-sso", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a tiny GPT on CPU with SSO (no Megatron needed)")
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=demo.run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
