"""The plain-torch FFF (the oracle) against the authors' layer outputs, the masked layer, and torch.library checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import hf_fff
from hf_fff.backends import reference

import _oracle
from _model_helpers import FIXTURES, SHARED_FIXTURES


def original_layer_reference(name: str) -> dict[str, torch.Tensor]:
    """The original layer's inputs and output: the small one ships in tests/fixtures, the full-size one is optional."""
    path = FIXTURES / f"{name}.safetensors"
    if not path.exists():
        path = SHARED_FIXTURES / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"optional large reference {name}.safetensors not found: set HF_FFF_SHARED to a folder whose fixtures/ holds it (looked in {SHARED_FIXTURES})")
    return load_file(str(path))


@pytest.mark.parametrize("name, depth", [("fff-768-1x11", 11), ("fff-64-4x2", 2)])
@pytest.mark.parametrize("forward", [reference.fff_forward, reference.fff_forward_masked], ids=["visited-only", "masked"])
def test_matches_the_original_layer(name, depth, forward):
    ref = original_layer_reference(name)
    y, leaves = forward(ref["x"], ref["linear_in.weight"], ref["linear_in.bias"], ref["linear_out.weight"].t().contiguous(), depth)
    assert ((y - ref["y"]).norm() / ref["y"].norm()).item() < 1e-5
    assert leaves.shape == (ref["x"].shape[0], ref["linear_in.weight"].shape[0] // (2 ** (depth + 1) - 1))


def random_layer64(tokens, hidden, trees, depth, seed=0):
    return _oracle.random_layer(tokens, hidden, trees, depth, torch.float64, seed=seed)


@pytest.mark.parametrize("tokens, hidden, trees, depth", [(0, 8, 1, 3), (1, 5, 1, 0), (17, 13, 3, 4), (64, 24, 8, 2), (9, 7, 1, 11)])
def test_visited_only_equals_masked_in_float64(tokens, hidden, trees, depth):
    args = random_layer64(tokens, hidden, trees, depth)
    y, leaves = reference.fff_forward(*args, depth)
    y_masked, leaves_masked = reference.fff_forward_masked(*args, depth)
    torch.testing.assert_close(y, y_masked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaves, leaves_masked, rtol=0, atol=0)


def test_path_rows_recover_the_walk():
    x, w_in, b_in, w_out = random_layer64(50, 6, 2, 5)
    _, leaves = reference.fff_forward(x, w_in, b_in, w_out, 5)
    rows = reference.path_rows(leaves, 5)  # (M, T, L)
    logits = torch.einsum("mh,mtlh->mtl", x, w_in[rows]) + b_in[rows]
    in_tree = rows - torch.arange(2).view(1, 2, 1) * reference.nodes_per_tree(5)
    went_right = in_tree[..., 1:] == 2 * in_tree[..., :-1] + 2
    assert torch.equal(went_right, logits[..., :-1] > 0)


def test_opcheck_and_gradcheck():
    x, w_in, b_in, w_out = random_layer64(6, 5, 2, 2)
    torch.library.opcheck(torch.ops.hf_fff.fff_forward.default, (x, w_in, b_in, w_out, 2))
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, w_in, b_in, w_out))
    with hf_fff.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: hf_fff.fast_feedforward(*a, 2)[0], inputs)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y, leaves = torch.ops.hf_fff.fff_forward(torch.empty(11, 9), torch.empty(3 * 31, 9), torch.empty(3 * 31), torch.empty(3 * 31, 9), 4)
    assert y.shape == (11, 9) and leaves.shape == (11, 3) and leaves.dtype == torch.long


def test_eager_inference_skips_the_dispatcher_but_autograd_and_modes_use_the_op(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = hf_fff.FastFeedForward(8, depth=2, trees=2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = layer(x)
        with OpRecorder() as recorder:
            seen = layer(x)
    assert any("hf_fff.fff_forward" in op for op in recorder.ops)  # profilers and flop counters see the op
    torch.testing.assert_close(seen, expected, rtol=0, atol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("the registered op was called")

    monkeypatch.setattr(hf_fff.ops, "fff_forward", refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)  # plain eager inference: straight to the backend
    with pytest.raises(AssertionError, match="registered op"):
        layer(x)  # parameters require grad: autograd needs the op


@pytest.mark.parametrize("dtype", _oracle.DTYPES, ids=str)
@pytest.mark.parametrize(
    "tokens, hidden, trees, depth",
    [(0, 13, 2, 3), (1, 1, 1, 0), (37, 65, 3, 4), pytest.param(64, 768, 1, 11, marks=pytest.mark.slow, id="64-768-1-11")],
)
def test_reference_passes_the_shared_oracle(tokens, hidden, trees, depth, dtype):
    """The oracle's float64 checks accept the reference itself, forward and backward, zero tokens included."""
    x, weight_in, bias_in, weight_out = _oracle.random_layer(tokens, hidden, trees, depth, dtype, seed=tokens + depth)
    y, leaves = reference.fff_forward(x, weight_in, bias_in, weight_out, depth)
    _oracle.check_forward(x, weight_in, bias_in, weight_out, depth, y, leaves)
    grad_y = _oracle.random_layer(tokens, hidden, 1, 0, dtype, seed=99)[0]
    grads = reference.fff_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
    _oracle.check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, depth, leaves)


def test_oracle_rejects_a_wrong_gradient():
    x, weight_in, bias_in, weight_out = _oracle.random_layer(50, 32, 1, 4, torch.float32, seed=2)
    y, leaves = reference.fff_forward(x, weight_in, bias_in, weight_out, 4)
    grad_y = torch.randn_like(x)
    grads = list(reference.fff_backward(grad_y, x, weight_in, bias_in, weight_out, 4, leaves))
    grads[3] = grads[3] * 1.001
    with pytest.raises(AssertionError, match="grad_weight_out"):
        _oracle.check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, 4, leaves)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("tokens, hidden, trees, depth", [(0, 5, 1, 2), (23, 17, 3, 3), (64, 64, 1, 6)])
def test_masked_backward_is_the_same_function_densely(tokens, hidden, trees, depth, dtype):
    """The published computation's backward (dense, masked) gives the reference gradients."""
    x, weight_in, bias_in, weight_out = _oracle.random_layer(tokens, hidden, trees, depth, dtype, seed=tokens + 7)
    _, leaves = reference.fff_forward(x, weight_in, bias_in, weight_out, depth)
    grad_y = _oracle.random_layer(tokens, hidden, 1, 0, dtype, seed=5)[0]
    grads = reference.fff_backward_masked(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
    _oracle.check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, depth, leaves)


def test_backward_runs_on_the_backend_of_its_forward_in_any_thread(monkeypatch):
    """A forward inside `use_backend("masked")` gets the masked backward, also when another thread (as
    autograd's device threads do for CUDA tensors) runs the backward outside the block."""
    import threading

    from hf_fff import backends

    seen = []
    masked = backends._TORCH_BACKENDS["masked"]
    monkeypatch.setitem(
        backends._TORCH_BACKENDS, "masked",
        dataclasses.replace(masked, backward=lambda *args: seen.append("masked") or masked.backward(*args)),
    )
    layer = hf_fff.FastFeedForward(16, 3, 2).double()
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    with hf_fff.use_backend("masked"):
        y = layer(x)
    worker = threading.Thread(target=lambda: y.sum().backward())
    worker.start()
    worker.join()
    assert seen == ["masked"] and x.grad is not None and layer.weight_in.grad is not None
