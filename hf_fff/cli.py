"""`hf-fff`: the command-line front. Parsing only; each subcommand's work lives in its own module.

    hf-fff demo      load UltraFastBERT (cached Hub weights, else labelled random weights), fill-mask, timing
    hf-fff bench     FFF vs dense vs masked timings, and the whole encoder vs BertModel
    hf-fff convert   published crammedBERT checkpoint (or native) -> native folder with a model card
    hf-fff push      upload a native folder to the Hub with a model card
    hf-fff env       which FFF backends load here
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# subcommand -> (module implementing add_cli_arguments/cli_main, one-line help)
SUBCOMMANDS = {
    "demo": ("hf_fff.demo", "load UltraFastBERT, run fill-mask and time FFF vs dense on this device"),
    "bench": ("hf_fff.bench", "time the FFF layer and the whole encoder against dense baselines"),
    "convert": ("hf_fff.convert", "convert a crammedBERT (or native) checkpoint into a native folder"),
    "push": ("hf_fff.hub", "publish a native model folder to the Hugging Face Hub"),
    "env": ("hf_fff.environment", "show which FFF backends are available here"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fff", description="UltraFastBERT (fast feedforward) tools for transformers")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(sub)
        sub.set_defaults(handler=module.cli_main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
