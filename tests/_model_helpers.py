"""Shared by the model tests: fixture paths, tiny configs, a tokenizer trained on the spot, and an
independent functional implementation of the published crammedBERT forward pass (crammed_model.md),
written from the spec on the raw crammed state dict, to check the full-size conversion against."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# The small reference fixtures ship with the tests (tests/fixtures/README.md says where they come from).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Large optional references live outside the repository: HF_FFF_SHARED/fixtures (default ../shared beside the checkout).
SHARED_FIXTURES = Path(os.environ.get("HF_FFF_SHARED", REPO.parent / "shared")) / "fixtures"
TINY_FIXTURES = ("crammed-tiny-1x3", "crammed-tiny-4x2")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "paris is the capital of france and berlin is the capital of germany",
    "fast feedforward networks route each token down a binary tree",
    "a tree of depth eleven has four thousand and ninety five nodes",
    "transformers load models with from pretrained and pipelines run them",
    "the cat sat on the mat while the dog slept by the door",
    "what is the capital of france ? the capital of france is paris .",
]


# Every dropout of the model off (attention's is a functional argument, not an nn.Dropout module): for runs that
# must match each other or a reference step for step.
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, embedding_dropout_prob=0.0, classifier_dropout=0.0)


def tiny_config(**overrides):
    from hf_fff import UltraFastBertConfig

    settings = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, fff_depth=3, fff_trees=2, classifier_head_dim=16)
    settings.update(overrides)
    return UltraFastBertConfig(**settings)


def enable_checkpointing(model) -> None:
    """Non-reentrant gradient checkpointing, by the current transformers name (older 5.x releases only have the old one)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def training_args(output_dir, device: str = "cpu", **overrides):
    """Trainer settings of the training tests: constant learning rate 3e-3, a loss logged every step, nothing
    saved or reported, seed 0; `overrides` replace any of them."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        num_train_epochs=1,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=device == "cpu",
        seed=0,
        dataloader_pin_memory=False,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def train_tokenizer(vocab_size: int = 128):
    """A WordPiece BertTokenizerFast trained on CORPUS (the real tokenizer cannot be downloaded here)."""
    from hf_fff.tools.demo import train_wordpiece_tokenizer

    return train_wordpiece_tokenizer(CORPUS * 4, vocab_size)


def random_crammed_checkpoint(folder: Path, layout: dict, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Write config.json + model.safetensors in the published layout with random, non-trivial weights."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    arch = layout["arch"]
    hidden = arch["hidden_size"]
    state = {}
    for key, shape in layout["keys"].items():
        if key.endswith("norm_factor"):
            heads = arch["attention"]["num_attention_heads"]
            state[key] = torch.tensor((hidden // heads) ** -0.5)
        elif key.endswith("scale_factor"):
            state[key] = torch.tensor([0.11])
        elif "norm" in key and key.endswith("weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith("bias"):
            state[key] = 0.05 * torch.randn(shape, generator=generator)
        elif key == "decoder.weight":
            continue
        else:
            state[key] = std * torch.randn(shape, generator=generator)
    state["decoder.weight"] = state["encoder.embedding.word_embedding.weight"].clone()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"arch": arch, "architectures": ["ScriptableLMForPreTraining"], "model_type": "crammedBERT", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return state


def full_size_layout() -> dict:
    """{"arch": ..., "keys": {name: shape}} of UltraFastBERT-1x11-long, from the layout file in tests/fixtures."""
    raw = json.loads((FIXTURES / "ultrafastbert-1x11-long_layout.json").read_text())
    return {"arch": raw["config_arch"], "keys": {k: tuple(v) for k, v in raw["keys"].items()}}


def crammed_forward(state: dict[str, torch.Tensor], arch: dict, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """The published eval-mode forward pass, straight from crammed_model.md, with the dense masked FFF.

    Deliberately shares no code with hf_fff: it reads the crammed keys and layouts directly.
    Returns last_hidden_state (B, S, H) in float64.
    """
    sd = {k: v.double() for k, v in state.items()}
    hidden, heads = arch["hidden_size"], arch["attention"]["num_attention_heads"]
    depth, trees, eps = arch["intermed_depth"], arch["intermed_size"], arch.get("norm_eps", 1e-12)
    hd, n_nodes = hidden // heads, 2 ** (arch["intermed_depth"] + 1) - 1
    batch, seq = input_ids.shape

    def norm(x, name):
        return F.layer_norm(x, (hidden,), sd[name + ".weight"], sd[name + ".bias"], eps)

    pos = torch.arange(seq, dtype=torch.float64)[:, None]
    pe = torch.zeros(seq, hidden, dtype=torch.float64)
    div = torch.pow(10000.0, torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos / div), torch.cos(pos / div)
    h = sd["encoder.embedding.word_embedding.weight"][input_ids] + sd["encoder.embedding.pos_embedding.scale_factor"] * pe
    h = norm(h, "encoder.embedding.norm")
    additive = 0.0 if attention_mask is None else ((1.0 - attention_mask.double()) * -10000.0)[:, None, None, :]
    for i in range(arch["num_transformer_layers"]):
        p = f"encoder.layers.{i}."
        x = norm(h, p + "norm1")
        qkv = (x @ sd[p + "attn.self_attention.query_key_value.weight"].t()).view(batch, seq, heads, 3, hd)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))  # (B, heads, S, hd)
        scores = q @ k.transpose(-1, -2) * sd[p + "attn.self_attention.norm_factor"] + additive
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        h = h + context @ sd[p + "attn.dense.weight"].t()
        x = norm(h, p + "norm2")
        logits = (x @ sd[p + "ffn.linear_in.weight"].t() + sd[p + "ffn.linear_in.bias"]).view(batch, seq, trees, n_nodes)
        mask = torch.zeros_like(logits)
        node = torch.zeros(batch, seq, trees, 1, dtype=torch.long)
        for _ in range(depth + 1):
            mask.scatter_(-1, node, 1.0)
            node = 2 * node + 1 + (logits.gather(-1, node) > 0).long()
        act = (0.5 * logits * (1 + torch.erf(logits / math.sqrt(2))) * mask).view(batch, seq, trees * n_nodes)
        h = h + act @ sd[p + "ffn.linear_out.weight"].t()
    return norm(h, "encoder.final_norm")


class LabelledIds(torch.utils.data.Dataset):
    """Label = whether token 5 appears at position 3: learnable in a few steps."""

    def __init__(self, n: int = 64, seq_len: int = 12, vocab: int = 128, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, vocab, (n, seq_len), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)
        self.ids[self.labels == 1, 3] = 5

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}
