"""Publishing UltraFastBERT models: `push_to_hub(model_or_folder, repo_id, ...)` and `hf-fff push`.

It stages a folder (never modifying the user's), renders its card (model_card.py), adds the
trust_remote_code files (remote_code.py), creates the repo if needed and uploads through
huggingface_hub's HfApi. The Hub endpoint is huggingface_hub's (HF_ENDPOINT is honoured); the token
comes from the argument, HF_TOKEN or the stored login, is stripped of surrounding whitespace, refused
(without being echoed) when it could not go into an HTTP header, and scrubbed from every message.
Only a model repo's own files are staged (repo_files.plan_folder); the rest is listed as skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .model_card import (  # noqa: F401  (re-exported: hf_fff.tools.hub is the public home of publishing)
    PROJECT,
    PathLike,
    PublishError,
    card_section,
    load_json_argument,
    load_template,
    reference_card_for_published_model,
    render_bench,
    render_metrics,
    render_model_card,
    safetensors_headers,
    safetensors_parameter_count,
    split_front_matter,
)
from .remote_code import auto_map, export_remote_code, remote_code_sources, write_unlinked  # noqa: F401
from .repo_files import FolderPlan, plan_folder, read_config_object

logger = logging.getLogger(__name__)


class HubTokenError(RuntimeError):
    """No usable Hugging Face token (none found, or the Hub rejected it)."""


# ----------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------


def clean_token(token: str, source: str) -> str:
    """The token with surrounding whitespace removed (a Windows token file ends in \\r\\n); HubTokenError
    when what is left cannot go into an HTTP header. The message names where it came from, never the value."""
    token = token.strip()
    if not token:
        raise HubTokenError(f"The Hugging Face token from {source} is empty.")
    for position, character in enumerate(token, start=1):
        if not "\x21" <= character <= "\x7e":  # printable ASCII without space: what a header value may hold
            raise HubTokenError(
                f"The Hugging Face token from {source} is malformed (character {position} of {len(token)} is a space, "
                "a control character or not ASCII); it is not shown here. Copy it again from https://huggingface.co/settings/tokens."
            )
    return token


def resolve_token(token: Optional[str] = None) -> tuple[str, str]:
    """(token, where it came from) from the argument, HF_TOKEN, or huggingface_hub's stored login.

    The token is stripped and checked (`clean_token`). Raises HubTokenError when there is none or it is
    malformed. The token itself never appears in any message.
    """
    if token is not None:
        return clean_token(token, "the token argument"), "the token argument"
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubTokenError(
            "No Hugging Face token found, and publishing needs one with write access. Log in with "
            "`hf auth login`, or set the HF_TOKEN environment variable, or pass token=... (--token)."
        )
    env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    source = "the HF_TOKEN environment variable" if env and env == found.strip() else "the stored `hf auth login` token"
    return clean_token(found, source), source


_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9_]{6,}")


def known_tokens(*extra: Optional[str]) -> list[str]:
    """Every token this process could send: the given ones, HF_TOKEN / HUGGING_FACE_HUB_TOKEN and the stored login."""
    candidates = [*extra, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(Exception):  # a broken token file must not stop an error message from printing
        from huggingface_hub import get_token

        candidates.append(get_token())
    pieces = set()
    for candidate in candidates:
        if candidate:
            pieces.add(candidate)
            pieces.update(part.strip() for part in re.split(r"[\r\n]", candidate) if len(part.strip()) >= 6)
    return sorted(pieces, key=len, reverse=True)


def scrub_secrets(text: str, *tokens: Optional[str]) -> str:
    """`text` with every known token (and anything shaped like a Hugging Face token) replaced by ***."""
    for secret in known_tokens(*tokens):
        text = text.replace(secret, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


class HubUnreachableError(OSError):
    """The Hub could not be reached (no network, DNS, proxy, timeout, offline mode)."""


def network_error_types() -> tuple[type[BaseException], ...]:
    """The errors of the HTTP clients huggingface_hub may use (httpx2, httpx, requests) that mean the server
    was never reached: refused or timed-out connections, DNS and proxy failures, offline mode."""
    import importlib

    types_: list[type[BaseException]] = []
    connect = ("ConnectError", "ConnectTimeout", "ProxyError", "UnsupportedProtocol")
    for module_name, names in (("httpx2", connect), ("httpx", connect), ("requests", ("ConnectionError", "ConnectTimeout"))):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            types_ += [getattr(module, name) for name in names if hasattr(module, name)]
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (*types_, OfflineModeIsEnabled, ConnectionError, TimeoutError)


def http_error_types() -> tuple[type[BaseException], ...]:
    """Every error an HTTP call through huggingface_hub may raise (status errors included)."""
    import importlib

    types_: list[type[BaseException]] = list(network_error_types())
    for module_name, names in (("httpx2", ("HTTPError", "InvalidURL", "StreamError")), ("httpx", ("HTTPError", "InvalidURL", "StreamError")),
                               ("requests", ("RequestException",))):
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
            types_ += [getattr(module, name) for name in names if hasattr(module, name)]
    from huggingface_hub.errors import HfHubHTTPError

    return (*types_, HfHubHTTPError)


def is_network_error(error: BaseException) -> bool:
    """Whether `error`, or what caused it, is a failure to reach the server at all."""
    network = network_error_types()
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, network):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def unreachable_message(endpoint: Optional[str] = None) -> str:
    from huggingface_hub import constants

    return (
        f"the Hugging Face Hub could not be reached at {endpoint or constants.ENDPOINT} (no network, proxy or DNS problem?). "
        "To work offline, set HF_HUB_OFFLINE=1 (models already in the cache) or give a local folder"
    )


def validate_hub_repo_id(repo_id: str) -> None:
    """PublishError unless `repo_id` is a 'namespace/name' the Hub accepts (huggingface_hub's own validator)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PublishError(f"repo_id must be 'namespace/name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"the Hub would reject the repo id {repo_id!r}: {error}") from None


# ----------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------


@dataclass
class PushReport:
    repo_id: str
    repo_url: str
    commit_url: Optional[str]
    revision: str
    pr_url: Optional[str]
    files: list[str] = field(default_factory=list)
    remote_code: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path in the folder, why it stays behind)
    dry_run: bool = False

    def summary(self) -> str:
        if self.dry_run:
            return f"dry run: nothing was uploaded; `hf-fff push` without --dry-run uploads these {len(self.files)} files to {self.repo_id}"
        lines = [f"pushed {len(self.files)} files to {self.repo_url} ({self.revision})", f"  commit: {self.commit_url}"]
        if self.pr_url:
            lines.append(f"  pull request: {self.pr_url}")
        if self.remote_code:
            lines.append("  loads with `import hf_fff` + Auto classes, or with trust_remote_code=True without hf_fff")
        return "\n".join(lines)


def describe_upload(repo_id: str, files: Sequence[str], skipped: Sequence[tuple[str, str]]) -> str:
    """The lines printed before an upload: every file that goes up, every file that stays behind and why."""
    lines = [f"uploading {len(files)} files to {repo_id}:"] + [f"  {name}" for name in files]
    if skipped:
        lines.append(f"skipped {len(skipped)} (not uploaded):")
        lines += [f"  {name}  ({reason})" for name, reason in skipped]
    return "\n".join(lines)


def stage_folder(source: PathLike, staging: PathLike, include: Sequence[str] = ()) -> FolderPlan:
    """Mirror what of `source` belongs to a model repo (repo_files.plan_folder) into `staging`: hard links
    where possible, else copies; a link inside the folder is staged as the file it points at."""
    source, staging = Path(source), Path(staging)
    plan = plan_folder(source, include)
    for relative in plan.files:
        path, target = source / relative, staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)
    return plan


def _read_folder_config(folder: Path) -> dict[str, Any]:
    return read_config_object(
        folder, PublishError, f"{folder} has no config.json; save the model with save_pretrained (or `hf-fff convert`) first"
    )


def _check_native_folder(folder: Path, shown_as: Optional[PathLike] = None) -> dict[str, Any]:
    """The folder's config, after checking that it is a native UltraFastBERT folder with sane settings.
    shown_as: the name to use in messages (the user's folder, when `folder` is a staging copy)."""
    from ..configuration_ultrafastbert import UltraFastBertConfig

    shown = Path(shown_as) if shown_as is not None else folder
    config = _read_folder_config(folder)
    model_type = config.get("model_type")
    if model_type == "crammedBERT" or ("arch" in config and model_type is None):
        raise PublishError(f"{shown} holds the original crammedBERT layout; run `hf-fff convert {shown} NEW_FOLDER` and push NEW_FOLDER")
    if model_type != "ultrafastbert":
        raise PublishError(f"{shown / 'config.json'} has model_type {model_type!r}, not 'ultrafastbert'")
    try:
        UltraFastBertConfig.from_dict(config)
    except (ValueError, TypeError) as error:
        raise PublishError(f"{shown / 'config.json'} is not a usable UltraFastBERT config: {error}") from None
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise PublishError(f"{shown} has no model.safetensors (or model.safetensors.index.json)")
    return config


def prepare_repo_folder(
    folder: PathLike,
    *,
    repo_id: str,
    revision: Optional[str] = None,
    metrics=None,
    bench=None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
    remote_code: bool = True,
    card: bool = True,
    shown_as: Optional[PathLike] = None,
) -> list[str]:
    """Turn a staged native folder into the exact content of the repo: card and remote code added.

    An existing README.md is kept as the card when card=False; otherwise its front matter (license,
    base_model, datasets, language, model-index, tags) and an hf_fff "Provenance" section carry over.
    """
    folder = Path(folder)
    config = _check_native_folder(folder, shown_as)
    if remote_code:
        export_remote_code(folder)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if card:
        if (folder / "modules.json").is_file():  # written by `hf-fff convert --pooling`: an embedding model
            from .sentence_transformers import SENTENCE_TRANSFORMERS_TAGS

            tags = (*tags, *SENTENCE_TRANSFORMERS_TAGS)
        readme = folder / "README.md"
        carried, provenance = {}, None
        if readme.is_file():
            carried, body = split_front_matter(readme.read_text(encoding="utf-8"))
            if "hf_fff" in (carried.get("tags") or []):
                provenance = card_section(body, "Provenance")
        text = render_model_card(
            config,
            repo_id=repo_id,
            revision=revision,
            base_model=base_model or carried.get("base_model"),
            license=license or carried.get("license"),
            tags=tags,
            metrics=metrics,
            bench=bench,
            remote_code=remote_code,
            parameters=safetensors_parameter_count(folder),
            provenance=provenance,
            extra_metadata={k: v for k, v in carried.items() if k not in ("base_model", "license")},
        )
        write_unlinked(readme, text)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def push_to_hub(
    model_or_folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    create_pr: bool = False,
    token: Optional[str] = None,
    metrics=None,
    bench=None,
    commit_message: Optional[str] = None,
    tokenizer=None,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    tags: Sequence[str] = (),
    remote_code: bool = True,
    card: bool = True,
    include: Sequence[str] = (),
    dry_run: bool = False,
    announce: Optional[Callable[[str], None]] = None,
) -> PushReport:
    """Publish an UltraFastBERT model (a PreTrainedModel, or a folder written by save_pretrained,
    Trainer.save_model or `hf-fff convert`) to the Hub repo `repo_id`, creating it if needed.

    revision: branch to commit to (created from main if missing). create_pr: open a pull request
    against main instead of committing. metrics / bench: dicts or JSON files rendered into the card.
    remote_code: also ship the torch-only modeling code + auto_map (trust_remote_code=True loading).
    card: render README.md (False keeps the folder's own). The user's folder is never modified.

    Only what a model repo is made of is uploaded (repo_files.plan_folder: config, safetensors weights
    and index, tokenizer, card, remote code, sentence-transformers files); dotfiles, hidden folders,
    editor/OS litter, training state, pickles and links leaving the folder stay behind. include: glob
    patterns of further files to upload (e.g. "pytorch_model.bin"). Before uploading, the list of files
    and of skipped files with the reason goes to `announce` (default: the logger, at INFO). dry_run:
    stop there; no token and no network needed. The token is never printed (see resolve_token).
    """
    if create_pr and revision not in (None, "main"):
        raise PublishError("create_pr opens a pull request against main; do not combine it with revision")
    validate_hub_repo_id(repo_id)  # before the token and before staging: a typo costs nothing
    load_json_argument(metrics, "metrics")
    load_json_argument(bench, "bench")
    source: Optional[Path] = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        source = Path(model_or_folder)
        if not source.is_dir():
            raise PublishError(f"{source} is not a folder")
        _check_native_folder(source)
    elif not hasattr(model_or_folder, "save_pretrained"):
        raise PublishError(f"push_to_hub takes a model with save_pretrained or a folder, got {type(model_or_folder).__name__}")
    api = None
    if not dry_run:
        token, token_source = resolve_token(token)
        api = _authenticated_api(token, token_source)

    with tempfile.TemporaryDirectory(prefix="hf_fff-push-") as staging_dir:
        staging = Path(staging_dir) / "repo"
        staging.mkdir()
        skipped: list[tuple[str, str]] = []
        if source is not None:
            skipped = stage_folder(source, staging, include).skipped
        else:
            model_or_folder.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = prepare_repo_folder(
            staging, repo_id=repo_id, revision=None if create_pr else revision, metrics=metrics, bench=bench,
            base_model=base_model, license=license, tags=tags, remote_code=remote_code, card=card,
            shown_as=source,
        )
        if announce is not None:
            announce(describe_upload(repo_id, files, skipped))
        else:  # library use: the skipped files are worth a warning, the plain list is not
            (logger.warning if skipped else logger.info)(describe_upload(repo_id, files, skipped))
        if dry_run:
            return PushReport(repo_id, repo_url="", commit_url=None, revision=revision or "main", pr_url=None,
                              files=files, remote_code=remote_code, skipped=skipped, dry_run=True)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        target = revision or "main"
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        message = commit_message or f"Upload UltraFastBERT model with {PROJECT}"
        info = api.upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message=message, revision=None if create_pr else revision,
            create_pr=create_pr,
        )
    return PushReport(
        repo_id=repo_id,
        repo_url=str(repo_url),
        commit_url=info.commit_url,
        revision=getattr(info, "pr_revision", None) or target,
        pr_url=info.pr_url,
        files=files,
        remote_code=remote_code,
        skipped=skipped,
    )


def _authenticated_api(token: str, token_source: str):
    """An HfApi for `token`, checked with whoami (fails fast, before staging, on a bad token or no network)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.whoami(token=token)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubTokenError(f"The Hugging Face token from {token_source} was rejected by {api.endpoint} (HTTP {status}); "
                                "check that it is valid and has write access.") from None
        raise
    except network_error_types() as error:
        raise HubUnreachableError(unreachable_message(api.endpoint) + "; `hf-fff push --dry-run` shows what would be uploaded without it") from error
    return api


__all__ = [
    "HubTokenError",
    "HubUnreachableError",
    "PublishError",
    "PushReport",
    "auto_map",
    "export_remote_code",
    "load_template",
    "prepare_repo_folder",
    "push_to_hub",
    "remote_code_sources",
    "render_bench",
    "render_metrics",
    "render_model_card",
    "resolve_token",
    "scrub_secrets",
    "validate_hub_repo_id",
]
