"""The published crammedBERT layout (pbelcak/UltraFastBERT-*) -> the native UltraFastBERT layout.

Three things differ from the native model (see shared docs, crammed_model.md):
- config: every setting is nested under "arch" with crammedBERT names;
- state-dict keys: `encoder.layers.i.attn.self_attention.query_key_value.weight` etc.;
- layouts: q/k/v rows are grouped per head ((heads, 3, head_dim) instead of (3, heads, head_dim)), and
  `ffn.linear_out.weight` is (H, k*N) where the kernels want one contiguous row per node (k*N, H).

Conversion is strict: every trunk tensor must be present with the exact shape, otherwise a
`CrammedCheckpointError` names it. A published model never loads with silently random weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

CRAMMED_MODEL_TYPE = "crammedBERT"
NATIVE_PREFIX = "ultrafastbert."


class CrammedCheckpointError(ValueError):
    """A crammedBERT checkpoint that cannot be converted faithfully (missing/misshapen tensor, unsupported arch)."""


def is_crammed_config(config_dict: dict[str, Any]) -> bool:
    return config_dict.get("model_type") == CRAMMED_MODEL_TYPE or (
        "arch" in config_dict and "model_type" not in config_dict
    )


# Architecture switches of crammedBERT that UltraFastBERT implements, with the only value we support.
# Anything else computes a different function, so it is refused rather than approximated.
_REQUIRED_ARCH = {
    "intermed_type": "fff",
    "norm": "LayerNorm",
    "norm_scheme": "pre",
    "nonlin": "GELU",
    "use_bias": False,
    "final_norm": True,
    "skip_head_transform": True,
    "decoder_bias": False,
}
_REQUIRED_EMBEDDING = {"pos_embedding": "scaled-sinusoidal", "normalization": True}
_REQUIRED_ATTENTION = {"qkv_bias": False, "causal_attention": False, "rotary_embedding": False, "skip_output_projection": False}


def _require(section: dict[str, Any], required: dict[str, Any], where: str) -> None:
    for key, expected in required.items():
        if key in section and section[key] != expected:
            raise CrammedCheckpointError(
                f"crammedBERT {where}{key}={section[key]!r} is not supported (UltraFastBERT needs {expected!r})"
            )


def native_config_kwargs_from_crammed(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Flatten a crammedBERT config.json into UltraFastBertConfig fields."""
    arch = config_dict.get("arch")
    if not isinstance(arch, dict):
        raise CrammedCheckpointError('crammedBERT config.json has no "arch" dictionary')
    embedding, attention = arch.get("embedding", {}), arch.get("attention", {})
    head = arch.get("classification_head", {}) or {}
    for where, section in (("arch.embedding", embedding), ("arch.attention", attention), ("arch.classification_head", head)):
        if not isinstance(section, dict):
            raise CrammedCheckpointError(f"crammedBERT config.json {where} must be a dictionary, got {type(section).__name__}")
    if "hidden_size" not in arch:
        raise CrammedCheckpointError("crammedBERT config.json lacks arch setting 'hidden_size'")
    _require(arch, _REQUIRED_ARCH, "arch.")
    _require(embedding, _REQUIRED_EMBEDDING, "arch.embedding.")
    _require(attention, _REQUIRED_ATTENTION, "arch.attention.")
    if arch.get("ffn_layer_frequency", 1) != 1:
        raise CrammedCheckpointError("crammedBERT arch.ffn_layer_frequency != 1 is not supported")
    if embedding.get("embedding_dim", arch["hidden_size"]) != arch["hidden_size"]:
        raise CrammedCheckpointError("crammedBERT embedding_dim != hidden_size is not supported")
    if head and (head.get("pooler", "avg") != "avg" or head.get("nonlin", "Tanh") != "Tanh" or not head.get("include_ff_layer", True)):
        raise CrammedCheckpointError(f"crammedBERT classification_head {head} is not supported (needs avg pooler, Tanh, ff layer)")
    try:
        kwargs = {
            "vocab_size": embedding["vocab_size"],
            "hidden_size": arch["hidden_size"],
            "num_hidden_layers": arch["num_transformer_layers"],
            "num_attention_heads": attention["num_attention_heads"],
            "fff_depth": arch["intermed_depth"],
            "fff_trees": arch["intermed_size"],
        }
    except KeyError as missing:
        raise CrammedCheckpointError(f"crammedBERT config.json lacks arch setting {missing}") from None
    kwargs.update(
        max_position_embeddings=embedding.get("max_seq_length", 128),
        layer_norm_eps=arch.get("norm_eps", 1e-12),
        hidden_dropout_prob=arch.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=attention.get("dropout_prob", 0.1),
        embedding_dropout_prob=embedding.get("dropout_prob", 0.1),
        classifier_head_dim=head.get("head_dim", 1024),
        classifier_dropout=head.get("classifier_dropout", 0.1),
        pad_token_id=embedding.get("pad_token_id", 0),
        tie_word_embeddings=arch.get("tie_weights", True),
        initializer_range=arch.get("init", {}).get("std", 0.02),
        architectures=["UltraFastBertForMaskedLM"],
    )
    if arch.get("num_labels"):
        kwargs["num_labels"] = arch["num_labels"]
    for carried in ("torch_dtype", "dtype", "transformers_version"):
        if carried in config_dict:
            kwargs[carried] = config_dict[carried]
    return kwargs


@dataclass(frozen=True)
class _TensorRule:
    source: str
    shape: tuple[int, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


def _qkv_per_head_to_stacked(heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(heads, 3, hd) row grouping -> (3, heads, hd): q rows of all heads, then k, then v."""

    def permute(weight: torch.Tensor) -> torch.Tensor:
        hidden = weight.shape[1]
        return weight.reshape(heads, 3, head_dim, hidden).transpose(0, 1).reshape(3 * heads * head_dim, hidden)

    return permute


def _conversion_table(config) -> dict[str, _TensorRule]:
    """native key (with the `ultrafastbert.` prefix) -> where it comes from in a crammedBERT state dict."""
    hidden, vocab = config.hidden_size, config.vocab_size
    fff_rows = config.fff_trees * config.fff_nodes_per_tree
    qkv = _qkv_per_head_to_stacked(config.num_attention_heads, config.head_dim)
    p = NATIVE_PREFIX
    table = {
        p + "embeddings.word_embeddings.weight": _TensorRule("encoder.embedding.word_embedding.weight", (vocab, hidden)),
        p + "embeddings.position_scale": _TensorRule("encoder.embedding.pos_embedding.scale_factor", (1,)),
        p + "embeddings.norm.weight": _TensorRule("encoder.embedding.norm.weight", (hidden,)),
        p + "embeddings.norm.bias": _TensorRule("encoder.embedding.norm.bias", (hidden,)),
        p + "final_norm.weight": _TensorRule("encoder.final_norm.weight", (hidden,)),
        p + "final_norm.bias": _TensorRule("encoder.final_norm.bias", (hidden,)),
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}encoder.layers.{i}."
        table.update(
            {
                dst + "attention_norm.weight": _TensorRule(src + "norm1.weight", (hidden,)),
                dst + "attention_norm.bias": _TensorRule(src + "norm1.bias", (hidden,)),
                dst + "attention.qkv.weight": _TensorRule(src + "attn.self_attention.query_key_value.weight", (3 * hidden, hidden), qkv),
                dst + "attention.out_proj.weight": _TensorRule(src + "attn.dense.weight", (hidden, hidden)),
                dst + "ffn_norm.weight": _TensorRule(src + "norm2.weight", (hidden,)),
                dst + "ffn_norm.bias": _TensorRule(src + "norm2.bias", (hidden,)),
                dst + "ffn.weight_in": _TensorRule(src + "ffn.linear_in.weight", (fff_rows, hidden)),
                dst + "ffn.bias_in": _TensorRule(src + "ffn.linear_in.bias", (fff_rows,)),
                dst + "ffn.weight_out": _TensorRule(src + "ffn.linear_out.weight", (hidden, fff_rows), lambda t: t.t()),
            }
        )
    return table


def _norm_factor_keys(config) -> list[str]:
    return [f"encoder.layers.{i}.attn.self_attention.norm_factor" for i in range(config.num_hidden_layers)]


def _check_tensor(state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state_dict:
        raise CrammedCheckpointError(f"crammedBERT checkpoint is missing tensor {key!r} (expected shape {shape})")
    tensor = state_dict[key]
    if tuple(tensor.shape) != tuple(shape):
        raise CrammedCheckpointError(f"crammedBERT tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if not tensor.is_floating_point():
        raise CrammedCheckpointError(f"crammedBERT tensor {key!r} has dtype {tensor.dtype}, expected a floating-point dtype")
    if not torch.isfinite(tensor).all():
        raise CrammedCheckpointError(f"crammedBERT tensor {key!r} contains NaN or infinite values")
    return tensor


def native_state_dict_from_crammed(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Map a crammedBERT state dict onto native keys (prefixed `ultrafastbert.`, plus `decoder.weight`).

    Updates `config` in place where the checkpoint itself decides a setting: the attention scale
    (stored per layer as `norm_factor`) and whether the decoder is really tied to the embedding.
    """
    native = {}
    for key, rule in _conversion_table(config).items():
        native[key] = rule.transform(_check_tensor(state_dict, rule.source, rule.shape)).contiguous()

    factors = {float(_check_tensor(state_dict, k, ())) for k in _norm_factor_keys(config) if k in state_dict}
    if len(factors) > 1:
        raise CrammedCheckpointError(f"crammedBERT layers disagree on attention norm_factor: {sorted(factors)}")
    if factors:
        factor = factors.pop()
        if not math.isclose(factor, config.head_dim**-0.5, rel_tol=1e-6):
            config.attention_scale = factor

    embedding = native[NATIVE_PREFIX + "embeddings.word_embeddings.weight"]
    decoder = state_dict.get("decoder.weight")
    if decoder is not None:
        decoder = _check_tensor(state_dict, "decoder.weight", tuple(embedding.shape))
        if not torch.equal(decoder, embedding):
            config.tie_word_embeddings = False  # the stored copy is the truth for the MLM head
        native["decoder.weight"] = decoder.contiguous()
    else:
        native["decoder.weight"] = embedding
    if "decoder.bias" in state_dict:
        raise CrammedCheckpointError("crammedBERT tensor 'decoder.bias' is present but UltraFastBERT's decoder has no bias")

    known = {rule.source for rule in _conversion_table(config).values()} | set(_norm_factor_keys(config)) | {"decoder.weight"}
    # Strict: a tensor we do not map (a fine-tuned crammed head, say) would otherwise vanish silently.
    unexpected = sorted(k for k in state_dict if k not in known)
    if unexpected:
        raise CrammedCheckpointError(
            f"crammedBERT checkpoint has tensors this architecture does not use: {unexpected[:5]}"
            + (" ..." if len(unexpected) > 5 else "")
        )
    return native


def read_config_dict(path_or_repo: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Optional[dict[str, Any]]:
    """config.json of a local folder or Hub repo as a dict, or None when there is none to read."""
    from transformers.utils import cached_file

    subfolder = hub_kwargs.get("subfolder", "") or ""
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, subfolder, "config.json")
        if not os.path.isfile(path):
            return None
    else:
        path = cached_file(path_or_repo, "config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_crammed_state_dict(path_or_repo: str | os.PathLike, hub_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read model.safetensors of a crammedBERT checkpoint (local folder or Hub repo, through the HF cache)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    subfolder = hub_kwargs.get("subfolder", "") or ""
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, subfolder, "model.safetensors")
        if not os.path.isfile(path):
            raise CrammedCheckpointError(f"crammedBERT checkpoint {path_or_repo} has no model.safetensors")
    else:
        path = cached_file(path_or_repo, "model.safetensors", **hub_kwargs)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CrammedCheckpointError(f"crammedBERT weights {path} cannot be read: {error}") from None


HUB_KWARG_NAMES = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
