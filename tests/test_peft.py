"""PEFT LoRA on UltraFastBERT: the attention projections (`qkv`, `out_proj`) take the adapters, the task
head is trained in full (`modules_to_save`), the FFF trees stay frozen. Trains, saves, reloads, merges.
Skips without peft."""

from __future__ import annotations

import pytest
import torch

import hf_fff

from _model_helpers import tiny_config

peft = pytest.importorskip("peft", reason="peft is not installed (pip install hf_fff[peft])")

# The nn.Linear layers of UltraFastBertSelfAttention (modeling_ultrafastbert.py); FastFeedForward has none.
LORA_TARGETS = ["qkv", "out_proj"]
VOCAB = 64


def random_batch(generator, batch=4, seq=12):
    input_ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[0, 9:] = 0  # one padded row
    return input_ids, attention_mask


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def train(model, steps, loss_of_batch, lr=1e-2):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of_batch(model, *random_batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def qa_loss(model, input_ids, attention_mask):
    # A learnable toy target: the answer span starts and ends at the position of the smallest token id.
    position = input_ids.argmin(dim=1)
    return model(input_ids=input_ids, attention_mask=attention_mask, start_positions=position, end_positions=position).loss


def classification_loss(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=(input_ids[:, 0] % 2)).loss


def outputs(model, input_ids, attention_mask):
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=attention_mask)
    return [output.start_logits, output.end_logits] if hasattr(output, "start_logits") else [output.logits]


@pytest.fixture
def base_folder(tmp_path):
    torch.manual_seed(0)
    hf_fff.UltraFastBertForQuestionAnswering(tiny_config(vocab_size=VOCAB)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_config(**overrides):
    settings = dict(task_type="QUESTION_ANS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
    settings.update(overrides)
    return peft.LoraConfig(**settings)


def test_lora_wraps_the_attention_projections_and_nothing_else(base_folder):
    model = peft.get_peft_model(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder), lora_config())
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(LORA_TARGETS)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "qa_outputs.modules_to_save" in name for name in trainable)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".ffn." in name)


def held_out_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return qa_loss(model, *batch).item()


def test_training_changes_only_the_adapters_and_the_head(base_folder):
    model = peft.get_peft_model(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder), lora_config())
    before = snapshot(model)
    # Judged on a fixed held-out batch without dropout: single training-batch losses of this toy task rise and
    # fall by more than 25 steps of learning move them.
    held_out = random_batch(torch.Generator().manual_seed(123), batch=64)
    loss_before = held_out_loss(model, held_out)
    model, _ = train(model, 25, qa_loss)
    assert held_out_loss(model, held_out) < loss_before
    moved = changed(before, snapshot(model))
    assert moved and all("lora_" in name or "qa_outputs.modules_to_save" in name for name in moved)
    assert any("lora_B" in name for name in moved) and any("modules_to_save" in name for name in moved)
    # The frozen original head and every FFF tree are bit-for-bit the base model's.
    base = snapshot(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder))
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name and "modules_to_save" not in name:
            plain = name.replace(".base_layer", "").replace("qa_outputs.original_module", "qa_outputs")
            assert torch.equal(tensor, base[plain]), name


def test_save_reload_and_merge_give_the_same_outputs(base_folder, tmp_path):
    model = peft.get_peft_model(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder), lora_config())
    model, _ = train(model, 10, qa_loss)
    inputs = random_batch(torch.Generator().manual_seed(1))
    expected = outputs(model, *inputs)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < (base_folder / "model.safetensors").stat().st_size
    reloaded = peft.PeftModel.from_pretrained(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder), tmp_path / "adapter").eval()
    for got, want in zip(outputs(reloaded, *inputs), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    merged = reloaded.merge_and_unload()
    assert type(merged) is hf_fff.UltraFastBertForQuestionAnswering
    assert not any(isinstance(module, peft.tuners.lora.LoraLayer) for module in merged.modules())
    for got, want in zip(outputs(merged, *inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # The merged model is a plain checkpoint again: it saves and loads without peft.
    merged.save_pretrained(tmp_path / "merged")
    plain = hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(tmp_path / "merged").eval()
    for got, want in zip(outputs(plain, *inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sequence_classification_saves_the_whole_head(tmp_path):
    """The classification head is dense -> tanh -> classifier. peft's SEQ_CLS task type adds modules named
    `classifier` to modules_to_save by itself, which nests inside `head` and breaks reloading; without a
    task type, modules_to_save=["head"] trains and saves the whole head."""
    torch.manual_seed(0)
    base = hf_fff.UltraFastBertForSequenceClassification(tiny_config(vocab_size=VOCAB, num_labels=2))
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, lora_config(task_type=None, modules_to_save=["head"]))
    before = snapshot(model)
    model, losses = train(model, 10, classification_loss)
    moved = changed(before, snapshot(model))
    assert any("head.modules_to_save.default.dense" in name for name in moved)
    assert any("head.modules_to_save.default.classifier" in name for name in moved)
    assert all("lora_" in name or "head.modules_to_save" in name for name in moved)
    inputs = random_batch(torch.Generator().manual_seed(1))
    expected = outputs(model, *inputs)
    model.save_pretrained(tmp_path / "adapter")
    fresh = hf_fff.UltraFastBertForSequenceClassification.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().eval()
    torch.testing.assert_close(outputs(merged, *inputs)[0], expected[0], rtol=1e-5, atol=1e-6)


def test_the_fff_trees_can_be_trained_in_full_beside_the_adapters(base_folder, tmp_path):
    """FastFeedForward has no nn.Linear for LoRA; modules_to_save=["ffn"] trains copies of the trees."""
    model = peft.get_peft_model(hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder), lora_config(modules_to_save=["ffn"]))
    before = snapshot(model)
    model, _ = train(model, 5, qa_loss)
    moved = changed(before, snapshot(model))
    assert {name.split(".modules_to_save")[0] for name in moved if ".ffn.modules_to_save" in name} == {
        f"base_model.model.ultrafastbert.encoder.layers.{i}.ffn" for i in range(2)
    }
    assert all("lora_" in name or "modules_to_save" in name for name in moved)
    inputs = random_batch(torch.Generator().manual_seed(1))
    expected = outputs(model, *inputs)
    model.save_pretrained(tmp_path / "adapter")
    fresh = hf_fff.UltraFastBertForQuestionAnswering.from_pretrained(base_folder)
    merged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").merge_and_unload().eval()
    assert all(type(layer.ffn) is hf_fff.FastFeedForward for layer in merged.ultrafastbert.encoder.layers)
    for got, want in zip(outputs(merged, *inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
