"""Fine-tuning: Trainer lowers the loss; FFF gradients are exactly the masked layer's; round-trips."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

import hf_fff
from hf_fff.backends import reference

import _oracle
from _model_helpers import LabelledIds, logged_losses, tiny_config, training_args


@pytest.mark.parametrize("trees, depth, hidden", [(1, 0, 5), (1, 4, 16), (3, 3, 13), (2, 6, 24)])
def test_fff_gradients_equal_the_masked_layer_and_touch_only_visited_rows(trees, depth, hidden):
    """Autograd through FastFeedForward (the custom op's backward) in float64: the shared oracle's float64 path
    check (exact zeros on unvisited rows included), and the same gradients as autograd through the published
    dense-and-mask layer, an independent derivation."""
    x, weight_in, bias_in, weight_out = _oracle.random_layer(18, hidden, trees, depth, torch.float64, seed=trees * 100 + depth)
    layer = hf_fff.FastFeedForward(hidden, depth, trees).double()
    with torch.no_grad():
        for parameter, value in zip((layer.weight_in, layer.bias_in, layer.weight_out), (weight_in, bias_in, weight_out)):
            parameter.copy_(value)
    x = x.view(2, 9, hidden).requires_grad_(True)
    y, leaves = layer(x, return_leaves=True)
    upstream = _oracle.random_layer(18, hidden, 1, 0, torch.float64, seed=7)[0].view_as(y)
    (y * upstream).sum().backward()

    flat = (x.detach().view(-1, hidden), weight_in, bias_in, weight_out)
    _oracle.check_forward(*flat, depth, y.detach().view(-1, hidden), leaves.view(-1, trees))
    grads = (x.grad.view(-1, hidden), layer.weight_in.grad, layer.bias_in.grad, layer.weight_out.grad)
    _oracle.check_backward(grads, upstream.view(-1, hidden), *flat, depth, leaves.view(-1, trees))

    inputs = [t.detach().clone().requires_grad_(True) for t in flat]
    y_masked, _ = reference.fff_forward_masked(*inputs, depth)
    (y_masked * upstream.view(-1, hidden)).sum().backward()
    for got, masked in zip(grads, inputs):
        torch.testing.assert_close(got, masked.grad, rtol=1e-10, atol=1e-12)


def test_trainer_fine_tunes_sequence_classification(tmp_path):
    torch.manual_seed(0)
    model = hf_fff.UltraFastBertForSequenceClassification(tiny_config(vocab_size=64, num_labels=2, classifier_dropout=0.0))
    data = LabelledIds(vocab=64)
    args = training_args(tmp_path, num_train_epochs=15)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) >= 20
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hf_fff.UltraFastBertForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    model.eval()
    batch = data[0:8]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits, model(input_ids=batch["input_ids"]).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_class", [hf_fff.UltraFastBertForMaskedLM, hf_fff.UltraFastBertForTokenClassification])
def test_save_and_load_round_trip(tmp_path, dtype, model_class):
    torch.manual_seed(1)
    model = model_class(tiny_config(num_labels=3)).to(dtype).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    reloaded = model_class.from_pretrained(tmp_path, dtype=dtype).eval()
    assert reloaded.dtype == dtype and reloaded.config.model_type == "ultrafastbert"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
