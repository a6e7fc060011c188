"""FastDropout and the hashed CPU dropout kernel (cuda/dropout_cpu_kernel.h): the distribution, exact
scaling, determinism from the seed, the backward, and where torch's own dropout is used instead."""

from __future__ import annotations

import math

import pytest
import torch

import hf_fff
from hf_fff import backends, dropout

from _model_helpers import enable_checkpointing, tiny_config


@pytest.fixture(scope="module")
def kernel(cpp_module):
    return cpp_module.dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(kernel, p):
    n = 1 << 20
    kept = kernel(torch.ones(n), p, 1234) != 0
    rate = kept.double().mean().item()
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)  # six standard deviations of a binomial
    # neighbours and the same positions under the next seed are independent draws
    both = (kept[1:] & kept[:-1]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 0.005
    other = kernel(torch.ones(n), p, 1235) != 0
    assert abs((kept & other).double().mean().item() - (1 - p) ** 2) < 0.005


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 15, 17, 1001, 70_000])
def test_kept_elements_are_scaled_exactly_and_threads_do_not_matter(kernel, dtype, n):
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    y = kernel(x, 0.3, 99)
    kept = y != 0
    scale = 1.0 / 0.7
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (x.to(accumulate) * torch.tensor(scale, dtype=accumulate)).to(dtype)  # one rounding, in the accumulation type
    torch.testing.assert_close(y[kept], expected[kept], rtol=0, atol=0)
    assert torch.equal(kept, kernel(torch.ones(n), 0.3, 99) != 0)  # decisions depend on (seed, index) only
    for threads in (1, 2, 3):
        assert torch.equal(kernel(x, 0.3, 99, threads), y)


def test_seed_fixes_the_mask_and_p_zero_keeps_all(kernel):
    x = torch.randn(4, 33)
    assert torch.equal(kernel(x, 0.2, 5), kernel(x, 0.2, 5))
    assert not torch.equal(kernel(x, 0.2, 5), kernel(x, 0.2, 6))
    torch.testing.assert_close(kernel(x, 0.0, 5), x, rtol=0, atol=0)
    assert kernel(torch.empty(0, 3), 0.5, 1).shape == (0, 3)


@pytest.mark.parametrize("bad", [dict(p=1.0), dict(p=-0.1), dict(x=torch.ones(3, dtype=torch.long))])
def test_kernel_rejects_bad_arguments(kernel, bad):
    args = dict(x=torch.ones(3), p=0.5, seed=1) | bad
    with pytest.raises(RuntimeError, match="dropout"):
        kernel(args["x"], args["p"], args["seed"])


def test_backward_is_the_same_mask():
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    y = dropout.hashed_dropout(x, 0.4, 77)
    mask_scale = y.detach() / x.detach()
    grad = torch.randn_like(y)
    y.backward(grad)
    torch.testing.assert_close(x.grad, grad * mask_scale)
    assert torch.autograd.gradcheck(lambda t: dropout.hashed_dropout(t, 0.4, 77), (x.detach().requires_grad_(),))


def _spy(monkeypatch):
    calls = []
    original = dropout.hashed_dropout
    monkeypatch.setattr(dropout, "hashed_dropout", lambda *args: calls.append(args) or original(*args))
    return calls


def test_module_uses_the_kernel_when_training_on_cpu(monkeypatch):
    calls = _spy(monkeypatch)
    layer = dropout.FastDropout(0.25)
    x = torch.randn(64, 48, requires_grad=True)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)  # torch.manual_seed reproduces the mask
    assert len(calls) == 2 and calls[0][1] == 0.25
    kept = (first != 0).double().mean().item()
    assert 0.6 < kept < 0.9
    first.sum().backward()
    torch.testing.assert_close(x.grad, (first != 0).float() / 0.75)
    assert len(calls) == 3 and calls[2][1:] == calls[0][1:]  # the backward: the kernel again, same p and seed
    layer.eval()
    assert torch.equal(layer(x), x)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "case",
    ["eval", "p0", "p1", "inplace", "reference backend", "compiled"],
)
def test_module_falls_back_to_torch_dropout(monkeypatch, case):
    calls = _spy(monkeypatch)
    layer = dropout.FastDropout({"p0": 0.0, "p1": 1.0}.get(case, 0.5), inplace=case == "inplace")
    layer.train(case != "eval")
    x = torch.randn(8, 16)
    if case == "reference backend":
        monkeypatch.setenv(backends.ENV_VAR, "reference")
    if case == "compiled":
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    else:
        y = layer(x.clone())
    assert calls == []
    if case in ("eval", "p0"):
        assert torch.equal(y, x)
    elif case == "p1":
        assert torch.equal(y, torch.zeros_like(x))
    else:
        assert set(torch.unique(y[y != 0] / x[y != 0]).round(decimals=4).tolist()) == {2.0}


def test_model_dropouts_are_fast_dropouts_and_checkpointing_recomputes_the_same_masks():
    config = tiny_config(hidden_dropout_prob=0.3, embedding_dropout_prob=0.3, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(0)
    model = hf_fff.UltraFastBertForSequenceClassification(config).train()
    assert all(isinstance(m, dropout.FastDropout) for m in model.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randint(0, config.vocab_size, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            enable_checkpointing(model)
        torch.manual_seed(1)
        model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_cpu_training_attention_dropout_goes_through_the_kernel(monkeypatch):
    """With attention dropout on, CPU SDPA would fall back to its explicit math path with torch's Bernoulli;
    the model takes the same math (eager_attention_forward) with the hashed dropout instead."""
    calls = _spy(monkeypatch)
    config = tiny_config(hidden_dropout_prob=0.0, embedding_dropout_prob=0.0, attention_probs_dropout_prob=0.2, num_labels=2)
    model = hf_fff.UltraFastBertForSequenceClassification._from_config(config, attn_implementation="sdpa").train()
    x = torch.randint(0, config.vocab_size, (2, 12))
    model(input_ids=x, labels=torch.tensor([0, 1])).loss.backward()
    heads = config.num_attention_heads
    forward = [args for args in calls if args[0].shape == (2, heads, 12, 12)]
    assert len(forward) == 2 * config.num_hidden_layers  # each layer's probabilities, forward and backward
    assert all(args[1] == 0.2 for args in forward)
    calls.clear()
    model.eval()
    model(input_ids=x)
    assert calls == []
