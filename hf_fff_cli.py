"""`hf-fff`: the command-line front. All argument parsing lives here; the work lives in `hf_fff.tools`.

    hf-fff demo      load UltraFastBERT (cached Hub weights, else labelled random weights), fill-mask, timing
    hf-fff bench     FFF vs dense vs masked timings, and the whole encoder vs BertModel
    hf-fff convert   published crammedBERT checkpoint (or native) -> native folder with a model card
    hf-fff push      upload a native folder to the Hub with a model card
    hf-fff env       versions, compiler, kernel cache and the FFF backend of each device

This module sits beside the `hf_fff` package, not inside it, so that `hf-fff --help`, `--version` and a
usage error answer in the time Python starts: importing anything under `hf_fff` runs the package's
`__init__`, which registers UltraFastBERT with transformers' Auto classes and so loads transformers'
modeling code (5-7 s on a 2-core machine). Building the parser imports only argparse; each handler
imports its tool module (and with it the package) when it runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


# Choices spelled out here (not read from the tool modules) so that building the parser imports no torch.
BENCH_DTYPES = ("bfloat16", "float16", "float32")
CONVERT_DTYPES = ("bf16", "bfloat16", "float16", "float32", "fp16", "fp32", "half")
POOLING_MODES = ("mean", "cls", "none")  # hf_fff.tools.sentence_transformers.POOLING_MODES
HUB_MODEL_ID = "pbelcak/UltraFastBERT-1x11-long"


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=HUB_MODEL_ID, help="Hub id or local folder (crammedBERT or native layout)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--download", action="store_true", help="allow downloading from the Hub (default: local cache only)")
    parser.add_argument("--no-bench", action="store_true", help="skip the FFF vs dense timing")


def _demo(args: argparse.Namespace) -> int:
    from hf_fff.tools.demo import DemoError, run_demo

    try:
        return run_demo(args.model, device=args.device, download=args.download, bench=not args.no_bench)
    except (DemoError, OSError) as error:
        return _error("demo", error)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=BENCH_DTYPES, help="parameter and activation dtype (default: float32)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 4096], help="token counts for the layer benchmark (default: 1 128 4096)")
    parser.add_argument("--repeats", type=int, default=10, help="minimum side-by-side calls per implementation (default: 10)")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--plot", dest="plot_path", metavar="FILE.png", help="also draw a bar chart (needs matplotlib)")
    parser.add_argument("--no-encoder", dest="encoder", action="store_false", help="skip the whole-encoder comparison")
    parser.add_argument("--encoder-batch", type=int, default=8, help="sequences per whole-encoder call (default: 8)")
    parser.add_argument("--encoder-seq", type=int, default=128, help="tokens per sequence in the whole-encoder call (default: 128; 1 x 16 times latency)")
    parser.add_argument(
        "--train",
        action="store_true",
        help="time training instead: forward+backward+AdamW steps vs BERT-base (fp32 on cpu, bf16 autocast on cuda; "
        "--dtype, --tokens, --plot and the encoder options do not apply) and the FFF backward vs dense backwards",
    )
    parser.add_argument(
        "--compile",
        dest="compile_mode",
        nargs="?",
        const="default",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
        metavar="MODE",
        help="with --train: also time both models under torch.compile, in MODE (default: torch's default; reduce-overhead "
        "replays CUDA graphs); compile time is reported, not timed",
    )


def _bench(args: argparse.Namespace) -> int:
    if any(t < 0 for t in args.tokens) or args.repeats < 1 or args.encoder_batch < 1 or args.encoder_seq < 1:
        print("hf-fff bench: --tokens must be >= 0; --repeats, --encoder-batch and --encoder-seq >= 1", file=sys.stderr)
        return 2
    if args.compile_mode and not args.train:
        print("hf-fff bench: --compile applies to --train only", file=sys.stderr)
        return 2
    for path in (args.json_path, args.plot_path):
        problem = _unwritable(path)
        if problem:  # found now, not after a run of several minutes
            print(f"hf-fff bench: error: {problem}", file=sys.stderr)
            return 2
    from hf_fff.tools.bench import DTYPES, run_bench, run_train_bench

    try:
        if args.train:
            run_train_bench(device=args.device, repeats=args.repeats, json_path=args.json_path, compile_mode=args.compile_mode)
            return 0
        run_bench(
            device=args.device,
            dtype=DTYPES[args.dtype],
            tokens=tuple(args.tokens),
            repeats=args.repeats,
            encoder=args.encoder,
            encoder_batch=args.encoder_batch,
            encoder_seq=args.encoder_seq,
            json_path=args.json_path,
            plot_path=args.plot_path,
        )
    except (RuntimeError, ImportError) as error:
        print(f"hf-fff bench: {error}", file=sys.stderr)
        return 2
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert an UltraFastBERT checkpoint (Hub id or folder, in the published crammedBERT layout or already native) "
        "into a native transformers folder: config.json, model.safetensors, tokenizer files, README.md. The result is "
        "reloaded and compared with SRC before it is moved into place."
    )
    parser.add_argument("src", help="Hub repo id (e.g. pbelcak/UltraFastBERT-1x11-long) or local folder")
    parser.add_argument("dst", help="output folder: missing or empty (or a previous model folder with --overwrite)")
    parser.add_argument("--dtype", default="float32", choices=CONVERT_DTYPES, help="weights dtype of DST (default float32)")
    parser.add_argument("--revision", help="Hub revision of SRC")
    parser.add_argument("--token", help="Hub token for a private SRC; prefer HF_TOKEN or `hf auth login`")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous model folder at DST (after the new one passed its check; never other files)")
    parser.add_argument("--base-model", help="card base_model (default: SRC's Hub id)")
    parser.add_argument("--license", help="card license (default: carried over from SRC's card)")
    parser.add_argument("--remote-code", action="store_true", help="also write the trust_remote_code modeling files and auto_map")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids of the check")
    parser.add_argument(
        "--pooling", default="none", choices=POOLING_MODES,
        help="also write the sentence-transformers files with this pooling, so DST loads as SentenceTransformer(DST) (default: none)",
    )


def _convert(args: argparse.Namespace) -> int:
    from transformers.utils import logging as transformers_logging

    from hf_fff.tools.convert import ConversionError, convert

    transformers_logging.disable_progress_bar()  # the CLI prints its own summary
    try:
        report = convert(**_tool_arguments(args))
    except (ConversionError, ValueError, OSError) as error:
        return _error("convert", error, token=args.token)
    print(report.summary())
    return 0


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Upload a native UltraFastBERT folder (save_pretrained / Trainer.save_model / `hf-fff convert` output) "
        "to the Hugging Face Hub, with a rendered model card and the trust_remote_code modeling files. "
        "The token comes from HF_TOKEN or `hf auth login` (or --token); HF_ENDPOINT selects the Hub."
    )
    parser.add_argument("folder", help="folder holding config.json (model_type ultrafastbert) and model.safetensors")
    parser.add_argument("repo_id", help="target repository, namespace/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private (ignored if it exists)")
    parser.add_argument("--revision", help="branch to commit to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    parser.add_argument("--token", help="Hub token; prefer HF_TOKEN or `hf auth login`, which keep it out of shell history")
    parser.add_argument("--metrics", metavar="FILE.json", help='evaluation numbers for the card: {"metric": value} or {"task": {"metric": value}}')
    parser.add_argument("--bench", metavar="FILE.json", help="speed table for the card, as written by `hf-fff bench --json FILE`")
    parser.add_argument("--commit-message", help="commit (or pull request) title")
    parser.add_argument("--base-model", help="Hub id this model derives from (front matter base_model)")
    parser.add_argument("--license", help="license identifier for the card (default: carried over from the folder's card)")
    parser.add_argument("--tag", action="append", default=[], dest="tags", help="extra card tag (repeatable)")
    parser.add_argument("--no-remote-code", dest="remote_code", action="store_false", help="do not ship the trust_remote_code modeling files")
    parser.add_argument("--keep-card", dest="card", action="store_false", help="upload the folder's README.md as is instead of rendering one")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB",
                        help="also upload files matching GLOB that are not part of a model repo by default, e.g. pytorch_model.bin (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded and what is skipped, then stop (no token, no network)")


def _push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HfHubHTTPError

    from hf_fff.tools.hub import HubTokenError, PublishError, http_error_types, push_to_hub, scrub_secrets

    try:
        report = push_to_hub(
            args.folder, args.repo_id, announce=lambda text: print(scrub_secrets(text, args.token), flush=True),
            **_tool_arguments(args, positional=("folder", "repo_id")),
        )
    except (HubTokenError, PublishError, HfHubHTTPError, OSError, *http_error_types()) as error:
        return _error("push", error, token=args.token)
    print(scrub_secrets(report.summary(), args.token))
    return 0


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults()


def _env(args: argparse.Namespace) -> int:
    from hf_fff.tools.environment import describe

    rows = describe()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _unwritable(path: Optional[str]) -> Optional[str]:
    """Why `path` cannot be written (None if it can, or if no path was given); leaves no file behind."""
    import os
    from pathlib import Path

    if not path:
        return None
    target = Path(path).expanduser()
    if target.is_dir():
        return f"{path} is a folder; give a file name"
    existed = target.exists()
    try:
        with open(target, "a"):
            pass
    except OSError as error:
        return f"cannot write {path}: {error.strerror or error}"
    if not existed:
        os.unlink(target)
    return None


def _tool_arguments(args: argparse.Namespace, positional: Sequence[str] = ()) -> dict:
    """The parsed options as keyword arguments of the tool function: each option's `dest` is that function's
    parameter name, so a new option is one add_argument line, not a second list to keep in step."""
    return {name: value for name, value in vars(args).items() if name not in ("command", "handler", *positional)}


def _error(command: str, error: BaseException, token: Optional[str] = None) -> int:
    """Print `error` as one line on stderr, without any token in it, and return exit status 1."""
    message = str(error) or type(error).__name__
    try:
        from hf_fff.tools.hub import is_network_error, scrub_secrets, unreachable_message
    except ImportError:  # huggingface_hub missing: nothing of ours could have sent a token
        is_network_error = None
    if is_network_error is not None:
        if is_network_error(error) and "could not be reached" not in message:
            message = f"{unreachable_message()} ({type(error).__name__})"
        message = scrub_secrets(message, token)
    print(f"hf-fff {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


Handler = Callable[[argparse.Namespace], int]
# subcommand -> (add its arguments, run it, one-line help)
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {
    "demo": (_demo_arguments, _demo, "load UltraFastBERT, run fill-mask and time FFF vs dense on this device"),
    "bench": (_bench_arguments, _bench, "time the FFF layer and the whole encoder against dense baselines"),
    "convert": (_convert_arguments, _convert, "convert a crammedBERT (or native) checkpoint into a native folder"),
    "push": (_push_arguments, _push, "publish a native model folder to the Hugging Face Hub"),
    "env": (_env_arguments, _env, "show versions, the compiler, the kernel cache and the FFF backend of each device"),
}


def installed_version() -> str:
    """hf_fff's version from the installed distribution's metadata (no package import); from the package
    itself when running from a checkout that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("hf_fff")
    except metadata.PackageNotFoundError:
        from hf_fff import __version__

        return __version__


class _PrintVersion(argparse.Action):
    """--version, looked up only when asked for: from a checkout that was never installed, the lookup imports
    the package (and transformers), which every other command line must not pay for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help="show program's version number and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"hf-fff {installed_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-fff", description="UltraFastBERT (fast feedforward) tools for transformers")
    parser.add_argument("--version", action=_PrintVersion)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, handler, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"hf-fff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
