"""`hf-fff convert SRC DST`: a crammedBERT (or native) UltraFastBERT checkpoint -> a native folder.

DST receives config.json (model_type "ultrafastbert"), model.safetensors in the requested dtype, the
tokenizer files and a README.md model card. Everything is written into a hidden temporary folder next
to DST; the folder is reloaded with transformers and its outputs compared with SRC's on random token
ids, and only then renamed to DST. A failed check, a damaged SRC, SIGINT or SIGTERM leave no DST and no
partial folder behind. convert never deletes what it did not write: DST must be missing or empty, or
(with overwrite) a previous model folder holding only a model repo's own files.

The check compares DST with SRC computed in DST's dtype (the conversion must be exact up to rounding)
and, for bf16/fp16, also reports how far DST is from the float32 source (informational, with a loose
bound on the median token so that an overflowing fp16 conversion is refused).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from .repo_files import TOKENIZER_FILES, is_model_file, read_config_object

PathLike = Union[str, os.PathLike]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
# DST against SRC run in DST's dtype: the same computation on the same weights, so only rounding may differ.
ROUNDTRIP_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Median per-token relative error of a half-precision DST against the float32 SRC. Generous: rare tokens
# whose FFF routing flips under rounding are expected; this only catches a conversion gone wrong
# (overflow, a broken cast), which moves every token.
HALF_PRECISION_MEDIAN_BOUND = {torch.bfloat16: 0.1, torch.float16: 0.05}

# What is fetched from the Hub for a repo id SRC: configs, weights, tokenizer, card (not the training logs' binaries).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "README.md"]
NATIVE_ARCHITECTURES = (
    "UltraFastBertModel",
    "UltraFastBertForMaskedLM",
    "UltraFastBertForSequenceClassification",
    "UltraFastBertForTokenClassification",
    "UltraFastBertForQuestionAnswering",
)


class ConversionError(RuntimeError):
    """SRC cannot be converted (missing, damaged, not UltraFastBERT) or DST failed its reload check."""


@dataclass
class ConvertReport:
    src: str
    dst: str
    source_layout: str  # "crammedBERT" or "ultrafastbert"
    architecture: str
    dtype: str
    num_parameters: int
    max_rel_error: float  # DST vs SRC in DST's dtype (max |a - b| / max |b|, over all outputs)
    tolerance: float
    max_rel_error_vs_float32: Optional[float] = None  # half-precision DST vs the float32 SRC
    median_token_rel_error_vs_float32: Optional[float] = None
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"converted {self.src} ({self.source_layout} layout) -> {self.dst} [{self.dtype}]",
            f"  {self.architecture}, {self.num_parameters / 1e6:.2f}M parameters",
            f"  reload check: max relative error {self.max_rel_error:.3e} (tolerance {self.tolerance:.0e})",
        ]
        if self.max_rel_error_vs_float32 is not None:
            lines.append(
                f"  vs the float32 source: max relative error {self.max_rel_error_vs_float32:.3e}, "
                f"median per token {self.median_token_rel_error_vs_float32:.3e}"
            )
        lines.append("  files: " + ", ".join(self.files))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def resolve_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in ROUNDTRIP_TOLERANCE:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of fp32/float32, bf16/bfloat16, fp16/float16; got {dtype!r}")
    return DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------
# Reading SRC
# ----------------------------------------------------------------------------------------------------


def _local_source(src: PathLike, revision: Optional[str], token: Optional[str], cache_dir: Optional[PathLike]) -> tuple[Path, Optional[str]]:
    """(local folder, Hub id or None): a local folder as is, a Hub id through the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path, None
    text = str(src)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text:
        raise ConversionError(f"SRC {src} is not a folder (and does not look like a Hub repo id)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from .hub import HubTokenError, clean_token, http_error_types, is_network_error, unreachable_message

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ConversionError(f"SRC {src} is not a folder, nor a repo id the Hub accepts ({error})") from None
    if token is not None:
        try:
            token = clean_token(token, "--token")
        except HubTokenError as error:
            raise ConversionError(str(error)) from None
    try:
        folder = snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, *http_error_types()) as error:
        if is_network_error(error):
            raise ConversionError(f"cannot download {text}: {unreachable_message()}") from error
        raise ConversionError(f"cannot download {text} from the Hub: {error}") from None
    return Path(folder), text


def _read_config(folder: Path) -> dict[str, Any]:
    return read_config_object(folder, ConversionError, f"SRC {folder} has no config.json", shown="SRC ")


def _model_class(config: dict[str, Any], folder: Path):
    from .. import crammed, modeling_ultrafastbert

    if crammed.is_crammed_config(config):
        return "crammedBERT", modeling_ultrafastbert.UltraFastBertForMaskedLM
    if config.get("model_type") == "ultrafastbert":
        architecture = (config.get("architectures") or ["UltraFastBertModel"])[0]
        if architecture not in NATIVE_ARCHITECTURES:
            raise ConversionError(f"SRC {folder} has unknown architecture {architecture!r}; expected one of {NATIVE_ARCHITECTURES}")
        return "ultrafastbert", getattr(modeling_ultrafastbert, architecture)
    raise ConversionError(
        f"SRC {folder} is not an UltraFastBERT checkpoint: config.json has model_type {config.get('model_type')!r} "
        "(expected 'crammedBERT' or 'ultrafastbert')"
    )


def _check_native_shapes(model_class, folder: Path, what: str) -> None:
    """Compare the stored tensors' names and shapes (safetensors headers only) with what the config builds."""
    from ..configuration_ultrafastbert import UltraFastBertConfig
    from .model_card import safetensors_headers

    try:
        config = UltraFastBertConfig.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"{what} has an invalid config.json: {error}") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
    try:
        stored = {k: tuple(v["shape"]) for k, v in safetensors_headers(folder).items()}
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as error:
        raise ConversionError(f"{what} is damaged: its safetensors weights cannot be read ({type(error).__name__}: {error})") from None
    for key, shape in stored.items():
        if key in expected and expected[key] != shape:
            raise ConversionError(f"{what} is damaged: tensor {key!r} has shape {shape}, expected {expected[key]}")


def _load_strict(model_class, folder: Path, dtype: torch.dtype, what: str, native: bool = True):
    """from_pretrained that refuses missing, unexpected or misshapen tensors and non-finite weights."""
    from .. import crammed

    if native:
        _check_native_shapes(model_class, folder, what)
    try:
        model, info = model_class.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except crammed.CrammedCheckpointError as error:
        raise ConversionError(f"{what} is damaged: {error}") from None
    except Exception as error:  # safetensors, transformers and torch each raise their own types for damaged files
        raise ConversionError(f"{what} cannot be loaded: {type(error).__name__}: {error}") from None
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        entries = sorted(str(e) for e in (info.get(kind) or []))
        if entries:
            problems.append(f"{kind.replace('_', ' ')}: {entries[:5]}" + (" ..." if len(entries) > 5 else ""))
    if problems:
        raise ConversionError(f"{what} is damaged: " + "; ".join(problems))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConversionError(f"{what} is damaged: tensor {name!r} contains NaN or infinite values")
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------------


def random_inputs(config, seed: int, batch: int = 2, max_len: int = 32) -> dict[str, torch.Tensor]:
    """Random ids over the whole vocabulary, with the second row padded for its last third."""
    generator = torch.Generator().manual_seed(seed)
    length = max(2, min(max_len, int(config.max_position_embeddings)))
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        attention_mask[1, length - length // 3:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    return [t.float() for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """max |a - b| / max |b| over the outputs (scale-relative, so that near-zero entries do not blow it up)."""
    worst = 0.0
    for a, b in zip(actual, expected, strict=True):
        if not torch.isfinite(a).all():
            return float("inf")
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst


def median_token_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Median over tokens of ||a - b|| / ||b|| on the last dimension of the first output."""
    a, b = actual[0], expected[0]
    if a.dim() < 2:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    per_token = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    return per_token.flatten().median().item()


# ----------------------------------------------------------------------------------------------------
# Writing DST
# ----------------------------------------------------------------------------------------------------


def _copy_tokenizer(src: Path, dst: Path, warnings: list[str]) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if not copied:
        warnings.append(f"SRC {src} has no tokenizer files; DST holds the model only")
        return copied
    config_path = dst / "tokenizer_config.json"
    if (dst / "tokenizer.json").is_file():
        settings = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if not settings.get("tokenizer_class"):
            # Without it AutoTokenizer needs the model type's mapping, which only `import hf_fff` registers: the folder
            # must also load with plain transformers (trust_remote_code, other tools).
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
            warnings.append("tokenizer_config.json named no tokenizer_class; set it to PreTrainedTokenizerFast")
            copied = sorted(set(copied) | {"tokenizer_config.json"})
    return copied


def _check_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer("fast feedforward")
    except Exception as error:  # any failure here means DST's tokenizer is unusable
        raise ConversionError(f"the tokenizer files copied from SRC do not load: {type(error).__name__}: {error}") from None


def _source_card(folder: Path) -> dict[str, Any]:
    from .model_card import PublishError, split_front_matter

    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        metadata, _ = split_front_matter(readme.read_text(encoding="utf-8"))
    except PublishError:
        return {}
    return metadata


# ----------------------------------------------------------------------------------------------------
# DST: what may be replaced, and the final move
# ----------------------------------------------------------------------------------------------------


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that are not a model folder's own files (what --overwrite must never delete)."""
    foreign = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            foreign.append(relative)
        elif path.is_file() and not is_model_file(relative):
            foreign.append(relative)
        elif path.is_dir() and not any(is_model_file(f"{relative}/{name}") for name in ("config.json", "model.safetensors")):
            foreign.append(relative + "/")
    return foreign


def check_destination(dst: Path, source: Optional[Path], overwrite: bool) -> None:
    """Refuse a DST whose replacement could delete something convert did not write.

    Never: SRC itself, a folder containing SRC, the current directory, the home directory, a filesystem
    root, a symlink. A missing or empty DST is fine; a non-empty one needs overwrite, and then must be a
    previous model folder (a config.json, and only a model repo's own files, see repo_files.is_model_file).
    """
    resolved = dst.resolve()
    if resolved.parent == resolved:
        raise ConversionError(f"DST {dst} is a filesystem root; choose a new folder")
    for special, what in ((Path.cwd, "the current directory"), (Path.home, "your home directory")):
        try:
            place = special().resolve()
        except (OSError, RuntimeError):  # a deleted working directory, no HOME: nothing to compare with
            continue
        if resolved == place:
            raise ConversionError(f"DST {dst} is {what}; choose a new folder")
    if source is not None:
        source = source.resolve()
        if resolved == source:
            raise ConversionError(f"DST {dst} is SRC; write the converted model to a new folder")
        if source.is_relative_to(resolved):
            raise ConversionError(f"DST {dst} contains SRC {source}; write the converted model to a new folder")
    if dst.is_symlink():
        raise ConversionError(f"DST {dst} is a symlink; give the real folder")
    if not dst.exists():
        return
    if not dst.is_dir():
        raise ConversionError(f"DST {dst} already exists and is not a folder")
    if not any(dst.iterdir()):
        return
    if not overwrite:
        raise ConversionError(f"DST {dst} already exists and is not empty; pass overwrite=True (--overwrite) to replace a previous model folder")
    foreign = _foreign_entries(dst)
    if foreign or not (dst / "config.json").is_file():
        listed = ", ".join(foreign[:8]) + (" ..." if len(foreign) > 8 else "")
        raise ConversionError(
            f"DST {dst} is not a previous model folder"
            + (f": it holds files convert does not write ({listed})" if foreign else " (it has no config.json)")
            + "; --overwrite replaces only a model folder's own files. Move those files or choose another DST"
        )


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _normal_permissions(folder: Path) -> None:
    """rw-r--r-- style files and rwxr-xr-x style folders under the user's umask (mkdtemp's 0700 and a
    library's private 0600 temp files would otherwise become DST's modes)."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def _terminate_raises_exit() -> Iterator[None]:
    """Turn SIGTERM (timeout, docker stop, k8s) into SystemExit(143) so that cleanup runs; by default it
    kills the process on the spot and leaves the partial folder behind. SIGINT already raises
    KeyboardInterrupt. Only in the main thread, and only where nobody installed a handler of their own."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_cleanly(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during the final renames, which must not stop half-way (the handler runs after)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove_model_folder(folder: Path, warnings: list[str]) -> None:
    """Delete a previous model folder that was moved aside: only its model files, then the empty folders."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and not path.is_symlink() and is_model_file(relative):
            path.unlink()
        elif path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()
    try:
        folder.rmdir()
    except OSError:
        warnings.append(f"the previous DST was kept at {folder}: files appeared in it that convert did not write")


def _publish_dir(tmp: Path, dst: Path, source: Path, overwrite: bool, warnings: list[str]) -> None:
    """Move the checked folder into place. DST is checked again now (a conversion takes a while), and the
    move itself is a rename that fails on a non-empty folder, so a DST that appears in between (another
    convert, another program) is never replaced; a previous model folder is set aside and deleted only
    once the new one is in place."""
    with _signals_deferred():
        check_destination(dst, source, overwrite)
        old = None
        if dst.is_dir() and any(dst.iterdir()):
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dst, old)
            if _foreign_entries(old):  # written between the check and the rename
                _put_back(old, dst)
                raise ConversionError(f"DST {dst} changed while it was being replaced; it was left as it is")
        try:
            os.rename(tmp, dst)  # POSIX: replaces a missing or empty folder, fails on a non-empty one
        except OSError as error:
            if old is not None:
                _put_back(old, dst)
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise ConversionError(f"DST {dst} appeared while converting (another program or convert?); it was left as it is") from None
            raise
        if old is not None:
            _remove_model_folder(old, warnings)


def _put_back(old: Path, dst: Path) -> None:
    try:
        os.rename(old, dst)
    except OSError:
        raise ConversionError(f"DST {dst} was replaced by another program meanwhile; its previous content is kept at {old}") from None


def convert(
    src: PathLike,
    dst: PathLike,
    *,
    dtype: Union[str, torch.dtype] = "float32",
    revision: Optional[str] = None,
    token: Optional[str] = None,
    overwrite: bool = False,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    remote_code: bool = False,
    seed: int = 0,
    cache_dir: Optional[PathLike] = None,
    pooling: Optional[str] = None,
) -> ConvertReport:
    """Convert SRC (Hub id or folder; crammedBERT layout or already native) into a native folder DST.

    dtype: weights dtype of DST (float32/bf16/fp16). revision/token/cache_dir: for a Hub SRC.
    overwrite: replace a previous model folder at DST (only after the new one passed its check; a DST
    holding anything else is refused, see `check_destination`). base_model/license:
    card metadata (default: SRC's Hub id, and whatever SRC's own card says). remote_code: also add the
    trust_remote_code files (push_to_hub adds them anyway). pooling: "mean" or "cls" also writes the
    sentence-transformers files (DST then loads with SentenceTransformer(DST)); None/"none" does not.
    Raises ConversionError; DST is then untouched.
    SIGTERM and SIGINT (KeyboardInterrupt) during the conversion leave no partial folder behind; files are
    written with the usual permissions under the umask.
    """
    from .model_card import render_model_card
    from .remote_code import export_remote_code
    from .sentence_transformers import SENTENCE_TRANSFORMERS_TAGS, check_pooling, write_sentence_transformers_files

    pooling = check_pooling(pooling)

    target_dtype = resolve_dtype(dtype)
    dst = Path(dst).expanduser().absolute()
    local_src = Path(src).expanduser()
    check_destination(dst, local_src if local_src.is_dir() else None, overwrite)
    folder, hub_id = _local_source(src, revision, token, cache_dir)
    config_dict = _read_config(folder)
    layout, model_class = _model_class(config_dict, folder)
    what = f"SRC {src}"
    source = _load_strict(model_class, folder, torch.float32, what, native=layout == "ultrafastbert")
    architecture = type(source).__name__
    warnings: list[str] = []

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp: Optional[Path] = None
    with _terminate_raises_exit():
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
            expected_model = source if target_dtype == torch.float32 else copy.deepcopy(source).to(target_dtype)
            expected_model.save_pretrained(tmp)
            tokenizer_files = _copy_tokenizer(folder, tmp, warnings)
            if tokenizer_files:
                _check_tokenizer(tmp)

            reloaded = _load_strict(model_class, tmp, target_dtype, f"the converted model in {tmp}")
            inputs = random_inputs(source.config, seed)
            got = _outputs(reloaded, inputs)
            max_rel = max_relative_error(got, _outputs(expected_model, inputs))
            tolerance = ROUNDTRIP_TOLERANCE[target_dtype]
            if not max_rel <= tolerance:
                raise ConversionError(
                    f"the converted model's outputs differ from SRC's: max relative error {max_rel:.3e} > {tolerance:.0e}"
                )
            vs_fp32 = median = None
            if target_dtype != torch.float32:
                reference = _outputs(source, inputs)
                vs_fp32 = max_relative_error(got, reference)
                median = median_token_relative_error(got, reference)
                bound = HALF_PRECISION_MEDIAN_BOUND[target_dtype]
                if not median <= bound:
                    raise ConversionError(
                        f"in {_dtype_name(target_dtype)} the model no longer computes what SRC computes: median per-token "
                        f"relative error {median:.3e} > {bound} against the float32 source (try float32 or bfloat16)"
                    )

            carried = _source_card(folder)
            card_base = base_model or hub_id or carried.get("base_model")
            origin = (
                f"[`{hub_id}`](https://huggingface.co/{hub_id})" + (f" (revision `{revision}`)" if revision else "")
                if hub_id
                else "a local folder"
            )
            action = "Converted from the published crammedBERT layout of" if layout == "crammedBERT" else "Re-exported from the native checkpoint"
            provenance = (
                f"{action} {origin} with `hf-fff convert` (hf_fff), weights in {_dtype_name(target_dtype)}. The converted folder was reloaded "
                f"and compared with the source on random token ids: max relative error {max_rel:.2e}"
                + (f" (in {_dtype_name(target_dtype)}; {vs_fp32:.2e} against the float32 source)" if vs_fp32 is not None else "")
                + "."
            )
            num_parameters = sum(p.numel() for p in reloaded.parameters())
            if remote_code:
                export_remote_code(tmp)
            write_sentence_transformers_files(tmp, pooling)
            saved_config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            card = render_model_card(
                saved_config,
                repo_id=dst.name,
                base_model=card_base,
                license=license or carried.get("license"),
                remote_code=remote_code,
                parameters=num_parameters,
                provenance=provenance,
                tags=SENTENCE_TRANSFORMERS_TAGS if pooling != "none" else (),
                extra_metadata={k: v for k, v in carried.items() if k not in ("base_model", "license", "model-index")},
            )
            (tmp / "README.md").write_text(card, encoding="utf-8")
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            _normal_permissions(tmp)
            _publish_dir(tmp, dst, folder, overwrite, warnings)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    return ConvertReport(
        src=str(src),
        dst=str(dst),
        source_layout=layout,
        architecture=architecture,
        dtype=_dtype_name(target_dtype),
        num_parameters=num_parameters,
        max_rel_error=max_rel,
        tolerance=tolerance,
        max_rel_error_vs_float32=vs_fp32,
        median_token_rel_error_vs_float32=median,
        files=files,
        warnings=warnings,
    )


__all__ = ["ConversionError", "ConvertReport", "check_destination", "convert", "resolve_dtype"]
