"""UltraFastBertConfig: the flat, documented settings of an UltraFastBERT model.

Defaults are the published UltraFastBERT-1x11-long. Checkpoints in the original crammedBERT layout
(settings nested under "arch") are read by `from_dict`, so `AutoConfig.from_pretrained` works on them
unchanged and always returns this class.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


# Far past any UltraFastBERT (the published ones have ~0.1 billion parameters), but small enough that a
# damaged or hostile config.json is refused before anything is allocated.
MAX_PARAMETERS = 50_000_000_000
_UPPER_BOUNDS = {
    "vocab_size": 2**24,
    "hidden_size": 2**16,
    "num_hidden_layers": 4096,
    "num_attention_heads": 2**12,
    "fff_trees": 2**16,
    "classifier_head_dim": 2**16,
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


class UltraFastBertConfig(PreTrainedConfig):
    r"""Configuration of an UltraFastBERT model: a pre-norm BERT whose feedforward layers are fast
    feedforward (FFF) trees.

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream (H).
        num_hidden_layers: number of transformer layers.
        num_attention_heads: attention heads; `hidden_size` must be divisible by it.
        fff_depth: depth d of each FFF tree; a token visits d + 1 of its 2^(d+1) - 1 nodes.
        fff_trees: number of parallel trees k per layer; their outputs are summed.
        max_position_embeddings: the sequence length the model was trained at (128 for the published
            model). Positions are sinusoidal and computed for any length, so longer inputs run, but
            quality past this length is untested.
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_dropout_prob: dropout on the attention and FFF outputs before the residual add.
        attention_probs_dropout_prob: dropout on attention probabilities.
        embedding_dropout_prob: dropout after the embedding LayerNorm.
        attention_scale: multiplier of q.k; None means 1/sqrt(head_dim), as published.
        classifier_head_dim: width of the classification head's hidden layer (1024 published).
        classifier_dropout: dropout inside the classification head.
        classifier_pooling: "avg" (mean over all positions, padding included: the published head) or
            "masked_avg" (mean over attended positions only).
        initializer_range: standard deviation of the normal initialiser.
        pad_token_id: padding token id (its embedding row is kept at zero).
        tie_word_embeddings: share the masked-LM decoder with the word embedding (published: True).
        sparse_prediction: in training, compute the masked-LM logits only at the positions whose label is not
            -100 (the crammed-BERT recipe's sparse prediction; ModernBERT's setting of the same name). The loss
            and gradients are the same; the decoder's matmul and the logits shrink to the labelled positions, and
            `logits` is then (labelled positions, vocab_size). Evaluation and inference always return
            (batch, seq_len, vocab_size).
    """

    model_type = "ultrafastbert"

    vocab_size: int = 32768
    hidden_size: int = 768
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    fff_depth: int = 11
    fff_trees: int = 1
    max_position_embeddings: int = 128
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    embedding_dropout_prob: float = 0.1
    attention_scale: float | None = None
    classifier_head_dim: int = 1024
    classifier_dropout: float = 0.1
    classifier_pooling: str = "avg"
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True
    sparse_prediction: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_geometry()

    def validate_geometry(self) -> None:
        """Reject settings no model can be built from, with the field named, before anything is allocated:
        wrong types (bool is not an int here), out-of-range values, and sizes past `MAX_PARAMETERS`."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "fff_trees", "classifier_head_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"UltraFastBertConfig.{name} must be a positive int, got {value!r}")
            if value > _UPPER_BOUNDS[name]:
                raise ValueError(f"UltraFastBertConfig.{name} = {value} is past any sensible model (at most {_UPPER_BOUNDS[name]})")
        if not _is_int(self.fff_depth) or not 0 <= self.fff_depth <= 20:
            raise ValueError(f"UltraFastBertConfig.fff_depth must be an int in [0, 20], got {self.fff_depth!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.classifier_pooling not in ("avg", "masked_avg"):
            raise ValueError(f"classifier_pooling must be 'avg' or 'masked_avg', got {self.classifier_pooling!r}")
        if self.pad_token_id is not None and (not _is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size):
            raise ValueError(f"pad_token_id ({self.pad_token_id!r}) must be a token id below vocab_size ({self.vocab_size})")
        if not _is_int(self.max_position_embeddings) or self.max_position_embeddings < 1:
            raise ValueError(f"UltraFastBertConfig.max_position_embeddings must be a positive int, got {self.max_position_embeddings!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob", "classifier_dropout"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value <= 1:
                raise ValueError(f"UltraFastBertConfig.{name} must be a probability in [0, 1], got {value!r}")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"UltraFastBertConfig.{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.sparse_prediction, bool):
            raise ValueError(f"UltraFastBertConfig.sparse_prediction must be True or False, got {self.sparse_prediction!r}")
        if self.attention_scale is not None and not _is_real(self.attention_scale):
            raise ValueError(f"UltraFastBertConfig.attention_scale must be a number or None, got {self.attention_scale!r}")
        parameters = self.approximate_parameter_count()
        if parameters > MAX_PARAMETERS:
            raise ValueError(
                f"this UltraFastBertConfig describes about {parameters:.3g} parameters (num_hidden_layers={self.num_hidden_layers}, "
                f"hidden_size={self.hidden_size}, fff_depth={self.fff_depth}, fff_trees={self.fff_trees}, vocab_size={self.vocab_size}); "
                f"refusing more than {MAX_PARAMETERS:.0e} (a damaged config.json?)"
            )

    def approximate_parameter_count(self) -> int:
        """Parameters of the masked-LM model this config builds (embeddings, layers, norms), from the sizes alone."""
        hidden, rows = self.hidden_size, self.fff_trees * self.fff_nodes_per_tree
        per_layer = 4 * hidden * hidden + 4 * hidden + rows * (2 * hidden + 1)
        return self.vocab_size * hidden + self.num_hidden_layers * per_layer + 4 * hidden + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def fff_nodes_per_tree(self) -> int:
        return 2 ** (self.fff_depth + 1) - 1

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # The published checkpoint's config.json is crammedBERT's ({"arch": {...}}): translate it here so
        # that every entry point (AutoConfig, from_pretrained of any class, pipeline) accepts it as is.
        from .crammed import is_crammed_config, native_config_kwargs_from_crammed

        if not isinstance(config_dict, dict):
            raise ValueError(f"an UltraFastBERT config must be a JSON object, got a {type(config_dict).__name__}")
        if is_crammed_config(config_dict):
            config_dict = native_config_kwargs_from_crammed(config_dict)
        return super().from_dict(config_dict, **kwargs)


class CrammedBertConfig(UltraFastBertConfig):
    """Registered under model_type "crammedBERT" so that AutoConfig can read the published layout;
    `from_dict` always returns an `UltraFastBertConfig`, never an instance of this class."""

    model_type = "crammedBERT"

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        return UltraFastBertConfig.from_dict(config_dict, **kwargs)


__all__ = ["UltraFastBertConfig", "CrammedBertConfig"]
