"""Publishing UltraFastBERT models: `push_to_hub(model_or_folder, repo_id, ...)` and `hf-fff push`.

It stages a folder (never modifying the user's), renders its card (model_card.py), adds the
trust_remote_code files (remote_code.py), creates the repo if needed and uploads through
huggingface_hub's HfApi. The Hub endpoint is huggingface_hub's (HF_ENDPOINT is honoured); the token
comes from the argument, HF_TOKEN or the stored login, and is never printed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .model_card import (  # noqa: F401  (re-exported: hf_fff.hub is the public home of publishing)
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

# Files that never belong in a published model repo: Trainer state, checkpoints, logs, caches.
IGNORE_PATTERNS = (
    "checkpoint-*",
    "runs",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    ".git",
    ".cache",
    "__pycache__",
    "*.lock",
)


class HubTokenError(RuntimeError):
    """No usable Hugging Face token (none found, or the Hub rejected it)."""


# ----------------------------------------------------------------------------------------------------
# Tokens
# ----------------------------------------------------------------------------------------------------


def resolve_token(token: Optional[str] = None) -> tuple[str, str]:
    """(token, where it came from) from the argument, HF_TOKEN, or huggingface_hub's stored login.

    Raises HubTokenError when there is none. The token itself never appears in any message.
    """
    if token:
        return token, "the token argument"
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise HubTokenError(
            "No Hugging Face token found, and publishing needs one with write access. Log in with "
            "`hf auth login`, or set the HF_TOKEN environment variable, or pass token=... (--token)."
        )
    env = (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip()
    return found, "the HF_TOKEN environment variable" if env and env == found else "the stored `hf auth login` token"


# ----------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------


@dataclass
class PushReport:
    repo_id: str
    repo_url: str
    commit_url: str
    revision: str
    pr_url: Optional[str]
    files: list[str] = field(default_factory=list)
    remote_code: bool = False

    def summary(self) -> str:
        lines = [f"pushed {len(self.files)} files to {self.repo_url} ({self.revision})", f"  commit: {self.commit_url}"]
        if self.pr_url:
            lines.append(f"  pull request: {self.pr_url}")
        if self.remote_code:
            lines.append("  loads with `import hf_fff` + Auto classes, or with trust_remote_code=True without hf_fff")
        return "\n".join(lines)


def _ignored(relative: Path) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(part, pattern) for part in relative.parts for pattern in IGNORE_PATTERNS) or relative.name.startswith("_")


def stage_folder(source: PathLike, staging: PathLike) -> list[str]:
    """Mirror the publishable files of `source` into `staging` (hard links where possible, else copies)."""
    source, staging = Path(source), Path(staging)
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or _ignored(relative):
            continue
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
        copied.append(relative.as_posix())
    return copied


def _check_native_folder(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PublishError(f"{folder} has no config.json; save the model with save_pretrained (or `hf-fff convert`) first")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type == "crammedBERT" or ("arch" in config and model_type is None):
        raise PublishError(f"{folder} holds the original crammedBERT layout; run `hf-fff convert {folder} NEW_FOLDER` and push that")
    if model_type != "ultrafastbert":
        raise PublishError(f"{config_path} has model_type {model_type!r}, not 'ultrafastbert'")
    if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise PublishError(f"{folder} has no model.safetensors (or model.safetensors.index.json)")
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
) -> list[str]:
    """Turn a staged native folder into the exact content of the repo: card and remote code added.

    An existing README.md is kept as the card when card=False; otherwise its front matter (license,
    base_model, datasets, language, model-index, tags) and an hf_fff "Provenance" section carry over.
    """
    folder = Path(folder)
    config = _check_native_folder(folder)
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
) -> PushReport:
    """Publish an UltraFastBERT model (a PreTrainedModel, or a folder written by save_pretrained,
    Trainer.save_model or `hf-fff convert`) to the Hub repo `repo_id`, creating it if needed.

    revision: branch to commit to (created from main if missing). create_pr: open a pull request
    against main instead of committing. metrics / bench: dicts or JSON files rendered into the card.
    remote_code: also ship the torch-only modeling code + auto_map (trust_remote_code=True loading).
    card: render README.md (False keeps the folder's own). The user's folder is never modified.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if create_pr and revision not in (None, "main"):
        raise PublishError("create_pr opens a pull request against main; do not combine it with revision")
    if "/" not in repo_id:
        raise PublishError(f"repo_id must be 'namespace/name', got {repo_id!r}")
    # Validate inputs before any network traffic.
    load_json_argument(metrics, "metrics")
    load_json_argument(bench, "bench")
    token, token_source = resolve_token(token)
    api = HfApi(token=token)
    try:
        api.whoami(token=token)  # fails fast, before staging, on a bad token
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubTokenError(f"The Hugging Face token from {token_source} was rejected by {api.endpoint} (HTTP {status}); "
                                "check that it is valid and has write access.") from None
        raise

    with tempfile.TemporaryDirectory(prefix="hf_fff-push-") as staging_dir:
        staging = Path(staging_dir) / "repo"
        staging.mkdir()
        if isinstance(model_or_folder, (str, os.PathLike)):
            source = Path(model_or_folder)
            if not source.is_dir():
                raise PublishError(f"{source} is not a folder")
            stage_folder(source, staging)
        elif hasattr(model_or_folder, "save_pretrained"):
            model_or_folder.save_pretrained(staging)
        else:
            raise PublishError(f"push_to_hub takes a model with save_pretrained or a folder, got {type(model_or_folder).__name__}")
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        files = prepare_repo_folder(
            staging, repo_id=repo_id, revision=None if create_pr else revision, metrics=metrics, bench=bench,
            base_model=base_model, license=license, tags=tags, remote_code=remote_code, card=card,
        )
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
    )


# ----------------------------------------------------------------------------------------------------
# CLI glue (hf_fff.cli builds the parser and calls these)
# ----------------------------------------------------------------------------------------------------


__all__ = [
    "HubTokenError",
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
]
