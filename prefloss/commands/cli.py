"""The ``prefloss`` command: ``prefloss train | check | bench | plan``.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their sub-command runs, so ``prefloss check`` can still set
``TRITON_INTERPRET`` before the kernels are imported and ``prefloss bench`` does not import
transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from prefloss.commands.cli_args import InputError

SUBCOMMANDS = {
    "train": (
        "prefloss.commands.train",
        "train a small model with alpha-DPO / epsilon-DPO / DPO / SimPO (default)",
    ),
    "check": ("prefloss.commands.check", "kernel-correctness harness: fused op vs the float64 reference"),
    "bench": ("prefloss.benchmark", "memory and speed of prefloss vs the alternatives"),
    "plan": (
        "prefloss.commands.plan",
        "a MODEL of one CUDA training step (GEMMs, bytes, memory, roofline), no GPU",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefloss", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,check,bench,plan}")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module_name)
        # Arguments are added lazily in main() for the chosen sub-command only.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        parser.error(f"unknown command {argv[0]!r}; expected one of {sorted(SUBCOMMANDS)}")
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"prefloss {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except InputError as exc:  # bad arguments or data, said in the message: no traceback
        print(f"prefloss {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
