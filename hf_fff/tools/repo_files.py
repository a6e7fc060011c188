"""Which files make up a model repo: the allow-list behind `hf-fff push` and `hf-fff convert --overwrite`.

push uploads only these files, and convert --overwrite replaces a folder only when everything in it is one
of them, so neither ever publishes nor deletes a file the user did not mean as part of the model (a key in
a dotfile, editor or OS litter, a training pickle, whatever a symlink points at outside the folder).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Sequence

from .model_card import REMOTE_CODE_FILES, REMOTE_OPS_FILE, PathLike

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "README.md",
    "LICENSE",
    "LICENSE.md",
    "LICENSE.txt",
    # sentence-transformers' own files at the top level
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    *TOKENIZER_FILES,
    *REMOTE_CODE_FILES,
    REMOTE_OPS_FILE,
)
# Weights in safetensors, single or sharded (model-00001-of-00002.safetensors + its index).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
# sentence-transformers module folders ("1_Pooling", "2_Dense", "3_Normalize"): their config and weights.
_MODULE_FOLDER = re.compile(r"^[0-9]+_[A-Za-z][A-Za-z0-9]*$")
_MODULE_FOLDER_FILES = ("config.json", "model.safetensors")

# Never uploaded, whatever include= says: not the model, and often private.
_LITTER = ("*~", "*.swp", "*.swo", "*.tmp", "*.bak", "*.orig", "*.rej", "Thumbs.db", "desktop.ini", "Icon\r", "*.pyc")
_LITTER_FOLDERS = ("__pycache__", "__MACOSX")
# Training state a Trainer leaves next to the model.
_TRAINING_STATE = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json", "training_args.bin")
_TRAINING_FOLDERS = ("checkpoint-*", "runs", "wandb", "mlruns", "logs")
# Pickle-based formats: loading one runs arbitrary code, so they go up only when asked for by name.
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.npy", "*.npz")


@dataclass
class FolderPlan:
    """What of a folder belongs to a model repo: `files` (posix paths relative to the folder) and
    `skipped`, each with the reason it stays behind."""

    folder: Path
    files: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_config_object(folder: Path, error: type[Exception], missing: str, shown: str = "") -> dict:
    """A model folder's config.json as a dict, or `error` saying what is wrong with it.

    missing: the message when there is no config.json; shown: a prefix naming the folder's role ("SRC ").
    """
    path = folder / "config.json"
    if not path.is_file():
        raise error(missing)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as problem:
        raise error(f"{shown}{path} is not valid JSON ({problem})") from None
    if not isinstance(config, dict):
        raise error(f"{shown}{path} must hold a JSON object, not a {type(config).__name__}")
    return config


def is_model_file(relative: str) -> bool:
    """Whether a posix path relative to a model folder is one of a model repo's own files."""
    parts = PurePosixPath(relative).parts
    if len(parts) == 1:
        name = parts[0]
        return name in MODEL_FILES or any(fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)
    return len(parts) == 2 and bool(_MODULE_FOLDER.match(parts[0])) and parts[1] in _MODULE_FOLDER_FILES


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def _skip_reason(relative: str, include: Sequence[str]) -> str | None:
    """Why `relative` (a regular file, or a link to one inside the folder) stays out of the repo; None if it goes."""
    parts = PurePosixPath(relative).parts
    if any(part.startswith(".") for part in parts):
        return "hidden file or folder"
    if any(_matches(part, _LITTER_FOLDERS) for part in parts[:-1]) or _matches(parts[-1], _LITTER):
        return "editor, OS or cache litter"
    if any(_matches(part, _TRAINING_FOLDERS) for part in parts[:-1]) or _matches(parts[-1], _TRAINING_STATE):
        return "training state, not part of the model"
    if is_model_file(relative):
        return None
    if any(fnmatch(relative, pattern) for pattern in include):
        return None
    if _matches(parts[-1], _PICKLES):
        return "pickle-based file (loading it runs code); pass include=[...] / --include to upload it"
    return "not a model repo file; pass include=[...] / --include to upload it"


def plan_folder(folder: PathLike, include: Sequence[str] = ()) -> FolderPlan:
    """Sort every entry of `folder` into what a model repo is made of and what stays behind (with why).

    include: extra glob patterns (on the path relative to the folder) for files outside the allow-list,
    e.g. "pytorch_model.bin"; hidden files, litter, training state and links leaving the folder are
    skipped even then. Symlinked folders are never followed.
    """
    folder = Path(folder)
    root = folder.resolve()
    plan = FolderPlan(folder)
    for directory, subdirectories, names in os.walk(folder):
        base = Path(directory)
        for name in sorted(subdirectories):
            if (base / name).is_symlink():
                plan.skipped.append(((base / name).relative_to(folder).as_posix() + "/", "symlinked folder, not followed"))
        subdirectories[:] = sorted(d for d in subdirectories if not (base / d).is_symlink())
        for name in sorted(names):
            path = base / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root):
                    plan.skipped.append((relative, "symlink pointing outside the folder"))
                    continue
            if not path.is_file():
                plan.skipped.append((relative, "not a regular file"))
                continue
            reason = _skip_reason(relative, include)
            if reason is None:
                plan.files.append(relative)
            else:
                plan.skipped.append((relative, reason))
    plan.files.sort()
    plan.skipped.sort()
    return plan


__all__ = ["FolderPlan", "MODEL_FILES", "TOKENIZER_FILES", "is_model_file", "plan_folder"]
