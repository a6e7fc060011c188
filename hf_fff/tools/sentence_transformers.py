"""The sentence-transformers files that make a native UltraFastBERT folder load as an embedding model.

    write_sentence_transformers_files(folder, pooling="mean")

writes modules.json (module 0: the transformer, kept in the folder root; module 1: pooling),
sentence_bert_config.json, config_sentence_transformers.json and 1_Pooling/config.json, so that

    import hf_fff
    from sentence_transformers import SentenceTransformer
    SentenceTransformer(folder).encode(["a sentence"])

runs UltraFastBertModel (and its FFF kernels) and pools its last hidden state. The files use the
long-standing sentence-transformers 2.x-5.x layout (`sentence_transformers.models.Transformer` /
`...Pooling`), which sentence-transformers 6 still reads, so one published folder serves every version.
Plain JSON writing: sentence-transformers itself need not be installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

POOLING_MODES = ("mean", "cls", "none")  # "none": no sentence-transformers files
POOLING_DIRECTORY = "1_Pooling"
# Front-matter tags of a folder that carries these files (the Hub lists it among embedding models).
SENTENCE_TRANSFORMERS_TAGS = ("sentence-transformers", "sentence-similarity", "feature-extraction")
_POOLING_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
_FLAG_OF_MODE = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}


def check_pooling(pooling: Optional[str]) -> str:
    """None -> "none"; anything outside POOLING_MODES -> ValueError naming the choices."""
    pooling = "none" if pooling is None else pooling
    if pooling not in POOLING_MODES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {pooling!r}")
    return pooling


def _model_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: write the model (save_pretrained) before the sentence-transformers files")
    config = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(config.get("hidden_size"), int):
        raise ValueError(f"{path} has no integer hidden_size: not a native UltraFastBERT (or BERT-like) config")
    return config


def _installed_versions() -> dict[str, str]:
    """What wrote the files, in sentence-transformers' own `__version__` block (pytorch is spelled so)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for key, distribution in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"), ("pytorch", "torch")):
        try:
            versions[key] = version(distribution)
        except PackageNotFoundError:
            continue
    return versions


def sentence_transformers_files(config: dict, pooling: str, max_seq_length: Optional[int] = None) -> dict[str, dict | list]:
    """{relative path: JSON content} for a model config (a dict of config.json) and a pooling mode."""
    if check_pooling(pooling) == "none":
        return {}
    # The published UltraFastBERT was trained on 128-token sequences (max_position_embeddings); longer
    # inputs run (sinusoidal positions) but were never seen in training, so encode truncates there.
    max_seq_length = max_seq_length if max_seq_length is not None else config.get("max_position_embeddings", 512)
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise ValueError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    pooling_config = {"word_embedding_dimension": config["hidden_size"], **{flag: flag == _FLAG_OF_MODE[pooling] for flag in _POOLING_FLAGS}}
    pooling_config["include_prompt"] = True
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": POOLING_DIRECTORY, "type": "sentence_transformers.models.Pooling"},
        ],
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "config_sentence_transformers.json": {
            "__version__": _installed_versions(),
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
        f"{POOLING_DIRECTORY}/config.json": pooling_config,
    }


def write_sentence_transformers_files(folder: PathLike, pooling: Optional[str] = "mean", max_seq_length: Optional[int] = None) -> list[str]:
    """Write the sentence-transformers files into a saved model folder; returns their relative paths.

    pooling: "mean" (average of the unpadded tokens' last hidden states), "cls" (the first token's) or
    "none" (write nothing). max_seq_length: where encode() truncates (default: the config's
    max_position_embeddings, the length the model was trained at).
    """
    folder = Path(folder)
    files = sentence_transformers_files(_model_config(folder), check_pooling(pooling), max_seq_length)
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return sorted(files)


__all__ = ["POOLING_MODES", "SENTENCE_TRANSFORMERS_TAGS", "check_pooling", "sentence_transformers_files", "write_sentence_transformers_files"]
