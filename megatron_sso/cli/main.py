"""``megatron-sso``: one command line for the project's jobs.

``pretrain`` (Megatron-Bridge from a YAML recipe), ``prepare-data`` (text folder -> Megatron
indexed dataset) and ``demo`` (plain PyTorch, no Megatron). Input errors print one line and
exit with code 2 before any heavy work.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence



def main(argv: Optional[Sequence[str]] = None) -> int:
    from .quiet import quiet_known_noise

    quiet_known_noise()  # before anything imports torch (the package itself does not)
    from . import demo, prepare_data, pretrain

    parser = argparse.ArgumentParser(prog="megatron-sso", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train a tiny GPT on CPU with SSO (no Megatron needed)")
    demo.add_arguments(p_demo)
    p_demo.set_defaults(func=demo.run)
    p_pre = sub.add_parser("pretrain", help="Megatron-Bridge pretrain() from a YAML recipe (configs/)")
    pretrain.add_arguments(p_pre)
    p_pre.set_defaults(func=pretrain.main_safe)
    p_data = sub.add_parser("prepare-data", help="text files -> Megatron indexed dataset (byte-level tokens)")
    prepare_data.add_arguments(p_data)
    p_data.set_defaults(func=prepare_data.main_safe)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
