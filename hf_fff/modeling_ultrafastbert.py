"""UltraFastBERT for transformers: a pre-norm BERT whose feedforward layers are fast feedforward trees.

Reading order: FastFeedForward, embeddings, attention, layer, encoder, PreTrainedModel (+ loading of
the published crammedBERT layout), base model, heads. What is computed is exactly the published model
(shared docs, crammed_model.md); the only difference is that each FFF layer computes the depth + 1
visited nodes per tree instead of all of them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_ultrafastbert import UltraFastBertConfig
from .ops import FastDropout, check_fff_arguments, fast_dropout, leaves_like, run_fff, takes_hashed_dropout

# The published model masks padded keys by adding this to their scores (not -inf): an all-padding row
# then attends uniformly instead of producing NaN, and unpadded rows are bit-for-bit the original.
MASKED_SCORE = -10000.0
IGNORE_INDEX = -100  # a label that takes no loss (torch's and transformers' convention)


# Parameters of one FastFeedForward past which construction is refused outright (about 1 TB in float32).
MAX_FFF_PARAMETERS = 2**38


def check_layer_sizes(hidden_size: int, depth: int, trees: int) -> None:
    """Refuse FastFeedForward sizes that are not ints (bool included) or whose weights cannot fit in the
    memory of the device the parameters would be created on, before allocating anything."""
    for name, value, low in (("hidden_size", hidden_size, 1), ("depth", depth, 0), ("trees", trees, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"FastFeedForward {name} must be an int >= {low}, got {value!r}")
    parameters = trees * (2 ** (depth + 1) - 1) * (2 * hidden_size + 1)
    dtype = torch.get_default_dtype()
    needed = parameters * dtype.itemsize
    device = torch.get_default_device()
    available = None if device.type == "meta" else _memory_bytes(device)
    if parameters > MAX_FFF_PARAMETERS or (available is not None and needed > available):
        where = f"{available / 2**30:.1f} GiB of {device.type} memory" if available is not None else f"the limit of {MAX_FFF_PARAMETERS:.2e} parameters"
        raise ValueError(
            f"FastFeedForward(hidden_size={hidden_size}, depth={depth}, trees={trees}) needs {parameters:.3g} parameters "
            f"({needed / 2**30:.1f} GiB in {dtype}), more than {where}; each level of depth doubles the size"
        )


def _memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory of `device` in bytes (physical RAM for the CPU), or None where it cannot be told."""
    try:
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.mem_get_info(device)[1]
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


class FastFeedForward(nn.Module):
    """A fast feedforward layer: `trees` binary trees of depth `depth` over width `hidden_size`.

    Maps (..., hidden_size) -> (..., hidden_size) for any leading shape (also 0 tokens). Each token
    walks each tree from the root, going right when its node's logit is > 0, and sums
    GELU(logit) * output-row over the depth + 1 visited nodes; only those rows are read.

    Parameters (row t * N + n is node n of tree t, N = 2**(depth + 1) - 1):
        weight_in (trees * N, hidden_size), bias_in (trees * N,): node logits.
        weight_out (trees * N, hidden_size): node output directions (the transpose of the published
            `linear_out.weight`, so that one node's row is contiguous for the kernels).
    """

    def __init__(self, hidden_size: int, depth: int, trees: int = 1):
        super().__init__()
        check_layer_sizes(hidden_size, depth, trees)
        self.hidden_size, self.depth, self.trees = hidden_size, depth, trees
        rows = trees * (2 ** (depth + 1) - 1)
        self.weight_in = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias_in = nn.Parameter(torch.empty(rows))
        self.weight_out = nn.Parameter(torch.empty(rows, hidden_size))
        self._checked_signature: Optional[tuple] = None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight_in, std=std)
        nn.init.zeros_(self.bias_in)
        nn.init.normal_(self.weight_out, std=std)

    def forward(self, x: torch.Tensor, return_leaves: bool = False):
        """x (..., H) -> y (..., H); with return_leaves also the leaf reached per tree, (..., trees) int64."""
        # A one-token call costs ~10 us, a few of them the kernel's: the body is written out (no helper calls,
        # no generator, no tuple unpacking), each of which costs 0.1-0.3 us here.
        weight_in, bias_in, weight_out = self._weights()
        if x.dtype != weight_in.dtype:  # e.g. bf16 activations over fp32 weights: compute in x's dtype, like autocast
            weight_in, bias_in, weight_out = weight_in.to(x.dtype), bias_in.to(x.dtype), weight_out.to(x.dtype)
        # dtype and device of each tensor, every size check_fff_arguments looks at, and the depth (an attribute
        # anyone may change after a call)
        signature = (
            self.depth, x.shape[-1], x.dtype, x.device,
            weight_in.shape, bias_in.shape, weight_out.shape,
            weight_in.dtype, bias_in.dtype, weight_out.dtype,
            weight_in.device, bias_in.device, weight_out.device,
        )  # fmt: skip
        if self._checked_signature != signature:
            self._check_call(x, (weight_in, bias_in, weight_out))  # full checks once per shape/dtype/device/depth, not per call
            self._checked_signature = signature
        y, leaves = run_fff(x, weight_in, bias_in, weight_out, self.depth)
        return (y, leaves_like(x, leaves, self.trees)) if return_leaves else y

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # One dict read instead of three nn.Module.__getattr__ calls (~2 us of a one-token call). Anything
        # that moves the parameters out of _parameters (torch.nn.utils.parametrize, ...) takes getattr.
        parameters = self._parameters
        try:
            return parameters["weight_in"], parameters["bias_in"], parameters["weight_out"]
        except KeyError:
            return self.weight_in, self.bias_in, self.weight_out

    def _check_call(self, x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> None:
        trees = check_fff_arguments(x, *weights, self.depth)
        if trees != self.trees:  # depth changed after construction in a way the row count happens to divide
            raise ValueError(
                f"FastFeedForward holds {weights[0].shape[0]} rows, which at depth {self.depth} are {trees} trees, not the "
                f"{self.trees} it was built with; was layer.depth changed after construction?"
            )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, depth={self.depth}, trees={self.trees}"


def sinusoidal_positions(length: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The classic table PE[p, 2j] = sin(p / 10000^(2j/H)), PE[p, 2j+1] = cos(...), for any length.

    Computed on the fly rather than stored: no buffer to come back as garbage from meta-device loading,
    and no maximum length (the original allocates 128 positions and fails past them).
    """
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    angles = position * inv_freq  # (S, ceil(H/2))
    table = torch.empty(length, width, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : width // 2])
    return table.to(dtype)


class UltraFastBertEmbeddings(nn.Module):
    """word embedding + learned scale * sinusoidal positions, then LayerNorm and dropout."""

    def __init__(self, config: UltraFastBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_scale = nn.Parameter(torch.full((1,), config.hidden_size**-0.5))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = FastDropout(config.embedding_dropout_prob)

    def forward(self, input_ids: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len, width = inputs_embeds.shape[-2:]
        positions = sinusoidal_positions(seq_len, width, inputs_embeds.device, inputs_embeds.dtype)
        return self.dropout(self.norm(inputs_embeds + self.position_scale * positions))


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention; returns the probabilities too (for output_attentions)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, S, S)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1)
    context = torch.matmul(fast_dropout(probs, dropout, module.training), value)
    return context.transpose(1, 2).contiguous(), probs  # (B, S, nh, hd)


class UltraFastBertSelfAttention(nn.Module):
    """Bidirectional multi-head attention without biases; q/k/v come from one fused projection.

    `qkv.weight` rows are [q of all heads; k of all heads; v of all heads] (the converter reorders the
    published per-head grouping into this standard layout).
    """

    def __init__(self, config: UltraFastBertConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = config.attention_scale if config.attention_scale is not None else self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor], output_attentions: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, seq_len, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, S, hd)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        attention_fn: Callable = eager_attention_forward
        # SDPA cannot return probabilities, and transformers' SDPA wrapper cannot reshape an empty batch.
        # With dropout on the CPU, SDPA leaves its fused kernel for the same explicit math as
        # eager_attention_forward, whose dropout is the hashed CPU kernel (hf_fff.dropout; 40x torch's).
        # Everything else goes through the attention interface.
        if not output_attentions and hidden_states.numel() > 0 and not takes_hashed_dropout(hidden_states, dropout, self.training):
            attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, probs = attention_fn(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=dropout,
            is_causal=False,
        )
        context = context.reshape(batch, seq_len, self.num_heads * self.head_dim)
        return self.out_proj(context), probs


class UltraFastBertLayer(GradientCheckpointingLayer):
    """Pre-norm block: h + Attn(LN(h)), then h + FFF(LN(h))."""

    def __init__(self, config: UltraFastBertConfig, layer_idx: int = 0):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = UltraFastBertSelfAttention(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FastFeedForward(config.hidden_size, config.fff_depth, config.fff_trees)
        self.dropout = FastDropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        output_attentions: bool = False,
        output_router_paths: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns (hidden_states, attention probabilities or None, leaves (B, S, trees) or None)."""
        attended, probs = self.attention(self.attention_norm(hidden_states), attention_mask, output_attentions)
        hidden_states = hidden_states + self.dropout(attended)
        normed = self.ffn_norm(hidden_states)
        leaves = None
        if output_router_paths:
            transformed, leaves = self.ffn(normed, return_leaves=True)
        else:  # shaping the leaves costs a view (~2.5 us per layer and call) that nobody reads
            transformed = self.ffn(normed)
        hidden_states = hidden_states + self.dropout(transformed)
        return hidden_states, probs, leaves


class UltraFastBertEncoder(nn.Module):
    def __init__(self, config: UltraFastBertConfig):
        super().__init__()
        self.layers = nn.ModuleList(UltraFastBertLayer(config, i) for i in range(config.num_hidden_layers))


@dataclass
class UltraFastBertModelOutput(BaseModelOutput):
    """BaseModelOutput plus `router_paths`: per layer, the leaf each token reached in each tree,
    (batch, seq_len, fff_trees) int64, when called with output_router_paths=True."""

    router_paths: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class UltraFastBertMaskedLMOutput(MaskedLMOutput):
    router_paths: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class UltraFastBertSequenceClassifierOutput(SequenceClassifierOutput):
    router_paths: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class UltraFastBertTokenClassifierOutput(TokenClassifierOutput):
    router_paths: Optional[tuple[torch.Tensor, ...]] = None


@dataclass
class UltraFastBertQuestionAnsweringOutput(QuestionAnsweringModelOutput):
    router_paths: Optional[tuple[torch.Tensor, ...]] = None


class UltraFastBertPreTrainedModel(PreTrainedModel):
    config: UltraFastBertConfig
    config_class = UltraFastBertConfig
    base_model_prefix = "ultrafastbert"
    supports_gradient_checkpointing = True
    _no_split_modules = ["UltraFastBertEmbeddings", "UltraFastBertLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False  # the additive -10000 mask needs eager or SDPA semantics
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, FastFeedForward):
            init.normal_(module.weight_in, std=std)
            init.zeros_(module.bias_in)
            init.normal_(module.weight_out, std=std)
        elif isinstance(module, UltraFastBertEmbeddings):
            init.constant_(module.position_scale, self.config.hidden_size**-0.5)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained, plus the published crammedBERT layout (Hub id or local folder),
        which is converted in memory, strictly (a missing or misshapen tensor raises, naming it)."""
        from . import crammed

        if pretrained_model_name_or_path is not None and kwargs.get("state_dict") is None and not kwargs.get("gguf_file"):
            hub_kwargs = {k: kwargs[k] for k in crammed.HUB_KWARG_NAMES if kwargs.get(k) is not None}
            config_dict = crammed.read_config_dict(pretrained_model_name_or_path, hub_kwargs)
            if config_dict is not None and crammed.is_crammed_config(config_dict):
                config = kwargs.pop("config", None)
                if not isinstance(config, UltraFastBertConfig):
                    config, kwargs = UltraFastBertConfig.from_dict(config_dict, return_unused_kwargs=True, **kwargs)
                raw = crammed.load_crammed_state_dict(pretrained_model_name_or_path, hub_kwargs)
                state_dict = crammed.native_state_dict_from_crammed(raw, config)
                if "decoder.weight" not in (getattr(cls, "_tied_weights_keys", None) or {}):
                    state_dict.pop("decoder.weight")  # only the masked-LM head has a decoder
                config._name_or_path = str(pretrained_model_name_or_path)
                # transformers takes either a name or a state dict; the files are already resolved above.
                model = super().from_pretrained(None, *model_args, config=config, state_dict=state_dict, **kwargs)
                (model[0] if isinstance(model, tuple) else model).name_or_path = str(pretrained_model_name_or_path)
                return model
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def check_input_ids(input_ids: torch.Tensor) -> None:
    """Refuse ids of a dtype or shape nn.Embedding cannot take (their range is checked in `inspect_inputs`)."""
    if input_ids.dtype not in (torch.int64, torch.int32):  # what nn.Embedding indexes with
        raise TypeError(f"input_ids must be integer token ids of dtype int64 (torch.long) or int32, got {input_ids.dtype}; convert them with input_ids.long()")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")


def _can_read_values(tensor: torch.Tensor) -> bool:
    """Whether a tensor's values may be read on the host now: not while torch.compile/export or torch.jit
    traces (the answer would be baked into the graph), nor while a CUDA graph is being captured (no host
    sync is allowed then; the eager warm-up before the capture saw the same inputs)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def inspect_inputs(input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], vocab_size: int) -> Optional[torch.Tensor]:
    """Range-check the ids and drop a mask that masks nothing; returns the mask to use.

    Out-of-range ids would index past the embedding (a device-side assert on CUDA): they get a clear error.
    An all-ones mask adds 0 to every score, so leaving it out computes the same function and lets SDPA take
    its fused mask-free kernels (flash attention on CUDA), as transformers does for BERT. Both facts come
    back in one host transfer: on CUDA each transfer waits for the queued work.
    """
    read_ids = input_ids is not None and input_ids.numel() > 0 and _can_read_values(input_ids)
    read_mask = attention_mask is not None and attention_mask.numel() > 0 and _can_read_values(attention_mask)
    if not (read_ids or read_mask):
        return attention_mask
    device = input_ids.device if read_ids else attention_mask.device  # where the facts are gathered
    facts = list(torch.aminmax(input_ids)) if read_ids else []
    if read_mask:
        facts.append(attention_mask.eq(1).all().to(device))
    values = torch.stack([fact.to(torch.int64) for fact in facts]).tolist()
    if read_ids and (values[0] < 0 or values[1] >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (vocab_size), got values in [{values[0]}, {values[1]}]")
    return None if read_mask and values[-1] == 1 else attention_mask


def check_attention_mask(attention_mask: Optional[torch.Tensor], shape: tuple[int, int]) -> None:
    """A (B, S) mask, 1/True = attend, of any bool/int/float dtype."""
    if attention_mask is None:
        return
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask must have shape {shape} (batch, seq_len), got {tuple(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float, got {attention_mask.dtype}")


def additive_attention_mask(attention_mask: Optional[torch.Tensor], dtype: torch.dtype, device) -> Optional[torch.Tensor]:
    """(B, S) mask, checked by check_attention_mask -> (B, 1, 1, S) additive mask in `dtype`."""
    if attention_mask is None:
        return None
    keep = attention_mask.to(device=device, dtype=dtype)
    return ((1.0 - keep) * MASKED_SCORE)[:, None, None, :]


class UltraFastBertModel(UltraFastBertPreTrainedModel):
    """The encoder: embeddings, layers, final LayerNorm. `last_hidden_state` is after the final norm;
    `hidden_states` holds the embedding output and each layer's output (before the final norm)."""

    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self.embeddings = UltraFastBertEmbeddings(config)
        self.encoder = UltraFastBertEncoder(config)
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_paths: bool = False,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        """token_type_ids is accepted for tokenizer/pipeline compatibility and ignored: the model has no segment embedding."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_input_ids(input_ids)
            batch_seq = tuple(input_ids.shape)
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, seq_len, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}")
            batch_seq = tuple(inputs_embeds.shape[:2])

        check_attention_mask(attention_mask, batch_seq)
        attention_mask = inspect_inputs(input_ids, attention_mask, self.config.vocab_size)
        hidden_states = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        mask = additive_attention_mask(attention_mask, hidden_states.dtype, hidden_states.device)
        all_hidden, all_attentions, all_paths = [], [], []
        for layer in self.encoder.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, probs, leaves = layer(hidden_states, mask, output_attentions, output_router_paths)
            if output_attentions:
                all_attentions.append(probs)
            if output_router_paths:
                all_paths.append(leaves)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = UltraFastBertModelOutput(
            last_hidden_state=self.final_norm(hidden_states),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            router_paths=tuple(all_paths) if output_router_paths else None,
        )
        return output if return_dict else output.to_tuple()


def _encode(model: UltraFastBertPreTrainedModel, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, output_router_paths):
    return model.ultrafastbert(
        input_ids=input_ids,
        attention_mask=attention_mask,
        inputs_embeds=inputs_embeds,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        output_router_paths=output_router_paths,
        return_dict=True,
    )


class UltraFastBertForMaskedLM(UltraFastBertPreTrainedModel):
    """Masked LM: logits = last_hidden_state @ decoder.weight^T (tied to the word embedding, no bias,
    no transform head: the published `skip_head_transform`). Logits keep their (batch, seq_len, vocab) shape,
    except in training with labels and `config.sparse_prediction`: then only the labelled positions are decoded
    and the logits are (labelled positions, vocab), in row-major position order."""

    _tied_weights_keys = {"decoder.weight": "ultrafastbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self.ultrafastbert = UltraFastBertModel(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels: Optional[torch.Tensor] = None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_paths: bool = False,
        return_dict=None,
        **kwargs,
    ):
        """labels (batch, seq_len): token ids to predict, -100 where no loss is taken."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = _encode(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, output_router_paths)
        hidden = encoded.last_hidden_state
        if labels is not None and self.training and self.config.sparse_prediction:
            hidden, labels = labelled_positions(hidden, labels)
        logits = self.decoder(hidden)
        loss = None
        if labels is not None:
            loss = token_cross_entropy(logits, labels, self.config.vocab_size, kwargs.get("num_items_in_batch"))
        output = UltraFastBertMaskedLMOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions, router_paths=encoded.router_paths
        )
        return output if return_dict else output.to_tuple()


class UltraFastBertClassificationHead(nn.Module):
    """Published head: Linear(H, head_dim) with bias, Tanh, dropout, Linear(head_dim, num_labels)."""

    def __init__(self, config: UltraFastBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.classifier_head_dim)
        self.dropout = FastDropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.classifier_head_dim, config.num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.dense(features))))


def pool_sequence(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """(B, S, H) -> (B, H). "avg" averages all positions, padding included, as the published head does."""
    if pooling == "masked_avg" and attention_mask is not None:
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return hidden.mean(dim=1)


def _mean_over_items(loss_sum: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """A summed loss divided by Trainer's item count across all gradient-accumulation micro-batches.

    Our forwards take **kwargs, so Trainer passes `num_items_in_batch` and, trusting the model to use it, no
    longer divides by the accumulation steps itself: ignoring it would scale every gradient by that count.
    """
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of hidden (..., H) whose label (...) is not -100, and those labels: (n, H) and (n,).

    Sparse prediction: a masked-LM batch labels ~15% of its positions, so decoding only those takes the
    (positions, vocab) matmul and logits down to that share. The loss ignores the other positions anyway.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the input's (batch, seq_len) {tuple(hidden.shape[:-1])}")
    flat_labels = labels.to(hidden.device).reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    return hidden.reshape(-1, hidden.shape[-1])[keep], flat_labels[keep]


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, classes: int, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over every position whose label is not -100 (masked LM, token classification)."""
    flat_logits, flat_labels = logits.view(-1, classes).float(), labels.to(logits.device).view(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
    return _mean_over_items(F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"), num_items_in_batch)


def sequence_classification_loss(config: UltraFastBertConfig, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """BERT's convention: regression for 1 label, single-label for integer labels, multi-label otherwise.

    With `num_items_in_batch` (Trainer, gradient accumulation) the summed loss is divided by it instead of averaged.
    """
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    reduction = "mean" if num_items_in_batch is None else "sum"
    if config.problem_type == "regression":
        if config.num_labels == 1:
            loss = F.mse_loss(logits.squeeze(-1).float(), labels.squeeze(-1).float() if labels.dim() > 1 else labels.float(), reduction=reduction)
        else:
            loss = F.mse_loss(logits.float(), labels.float(), reduction=reduction)
    elif config.problem_type == "single_label_classification":
        loss = F.cross_entropy(logits.view(-1, config.num_labels).float(), labels.view(-1), reduction=reduction)
    else:
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction=reduction)
    return loss if num_items_in_batch is None else _mean_over_items(loss, num_items_in_batch)


class UltraFastBertForSequenceClassification(UltraFastBertPreTrainedModel):
    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ultrafastbert = UltraFastBertModel(config)
        self.head = UltraFastBertClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels: Optional[torch.Tensor] = None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_paths: bool = False,
        return_dict=None,
        **kwargs,
    ):
        """labels (batch,) class ids, (batch,) floats for regression, or (batch, num_labels) multi-hot."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = _encode(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, output_router_paths)
        logits = self.head(pool_sequence(encoded.last_hidden_state, attention_mask, self.config.classifier_pooling))
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, labels.to(logits.device), kwargs.get("num_items_in_batch"))
        output = UltraFastBertSequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions, router_paths=encoded.router_paths
        )
        return output if return_dict else output.to_tuple()


class UltraFastBertForTokenClassification(UltraFastBertPreTrainedModel):
    """Per-position classification through the published head shape (dense, Tanh, dropout, classifier)."""

    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.ultrafastbert = UltraFastBertModel(config)
        self.head = UltraFastBertClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        labels: Optional[torch.Tensor] = None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_paths: bool = False,
        return_dict=None,
        **kwargs,
    ):
        """labels (batch, seq_len) class ids, -100 where no loss is taken."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = _encode(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, output_router_paths)
        logits = self.head(encoded.last_hidden_state)
        loss = None
        if labels is not None:
            loss = token_cross_entropy(logits, labels, self.num_labels, kwargs.get("num_items_in_batch"))
        output = UltraFastBertTokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=encoded.hidden_states, attentions=encoded.attentions, router_paths=encoded.router_paths
        )
        return output if return_dict else output.to_tuple()


class UltraFastBertForQuestionAnswering(UltraFastBertPreTrainedModel):
    """Extractive QA: a Linear(H, 2) gives start and end logits per position, as in BERT."""

    def __init__(self, config: UltraFastBertConfig):
        super().__init__(config)
        self.ultrafastbert = UltraFastBertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        inputs_embeds=None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_paths: bool = False,
        return_dict=None,
        **kwargs,
    ):
        """start_positions / end_positions (batch,): answer span; positions outside the sequence are ignored."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        encoded = _encode(self, input_ids, attention_mask, inputs_embeds, output_attentions, output_hidden_states, output_router_paths)
        start_logits, end_logits = self.qa_outputs(encoded.last_hidden_state).split(1, dim=-1)
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            ignored = start_logits.size(1)  # BERT's convention: clamp out-of-range targets to S, then ignore them
            start = start_positions.to(start_logits.device).view(-1).clamp(0, ignored)
            end = end_positions.to(end_logits.device).view(-1).clamp(0, ignored)
            loss = (
                F.cross_entropy(start_logits.float(), start, ignore_index=ignored)
                + F.cross_entropy(end_logits.float(), end, ignore_index=ignored)
            ) / 2
        output = UltraFastBertQuestionAnsweringOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=encoded.hidden_states,
            attentions=encoded.attentions,
            router_paths=encoded.router_paths,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "FastFeedForward",
    "UltraFastBertPreTrainedModel",
    "UltraFastBertModel",
    "UltraFastBertForMaskedLM",
    "UltraFastBertForSequenceClassification",
    "UltraFastBertForTokenClassification",
    "UltraFastBertForQuestionAnswering",
]
