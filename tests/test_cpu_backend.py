"""The C++ CPU backend ("cpp"): forward and fused backward against the float64 oracle (tests/_oracle.py).

The oracle checks the kernel's routing wherever the exact logit's sign is beyond rounding doubt and its
output and gradients along the paths the kernel took, on fresh random inputs (set HF_FFF_TEST_SEED to
replay a failure; the seed is in the message). The kernel core is also tested without torch for every
instruction set by tests/test_cpu_isa.py.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import torch

import hf_fff
from hf_fff import backends
from hf_fff.backends import cpu, reference

from _oracle import DTYPES, check_backward, check_forward, near_ties, random_layer

# Fresh inputs every session; set HF_FFF_TEST_SEED to replay a failure.
SESSION_SEED = int(os.environ.get("HF_FFF_TEST_SEED", random.randrange(2**31)))

# (tokens, hidden, trees, depth): trees 1..8, depth 0..13, odd widths, 0 and 1 tokens, BERT's size, and
# enough tokens for the chunked and subtree-sorted routing (more than one chunk, a split tree).
SHAPES = [
    (0, 13, 2, 3),
    (1, 768, 1, 11),
    (1, 1, 1, 0),
    (5, 7, 8, 0),
    (3, 15, 7, 1),
    (200, 24, 4, 2),
    (64, 100, 3, 5),
    (9, 129, 5, 8),
    (50, 63, 6, 10),
    (17, 37, 8, 11),
    (33, 770, 1, 11),
    (130, 768, 2, 7),
    (300, 31, 1, 13),
    (700, 768, 1, 11),
]
DTYPE_IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.fixture
def cpp_backend(cpp_module):
    with hf_fff.use_backend("cpp"):
        yield


def seeded(*key) -> int:
    return zlib.crc32(repr((SESSION_SEED, *key)).encode())


def replay(failure: AssertionError) -> AssertionError:
    return AssertionError(f"{failure}\n(replay with HF_FFF_TEST_SEED={SESSION_SEED})")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens, hidden, trees, depth", SHAPES)
def test_forward_matches_the_oracle(cpp_module, tokens, hidden, trees, depth, dtype):
    args = random_layer(tokens, hidden, trees, depth, dtype, seed=seeded(tokens, hidden, trees, depth, str(dtype)))
    y, leaves = cpp_module.fff_forward(*args, depth)
    try:
        check_forward(*args, depth, y, leaves)
    except AssertionError as failure:
        raise replay(failure) from None
    if tokens >= 10:
        # Tokens without a near-tie must take the reference's path exactly: the tie allowance must not hide a wrong walk.
        clear = ~near_ties(*args[:3], leaves, depth)
        _, leaves_ref = reference.fff_forward(*args, depth)
        assert clear.float().mean() >= 0.75
        assert torch.equal(leaves[clear], leaves_ref[clear])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens, hidden, trees, depth", SHAPES)
def test_backward_matches_the_oracle(cpp_module, tokens, hidden, trees, depth, dtype):
    x, weight_in, bias_in, weight_out = random_layer(tokens, hidden, trees, depth, dtype, seed=seeded(tokens, hidden, trees, depth, str(dtype)))
    _, leaves = cpp_module.fff_forward(x, weight_in, bias_in, weight_out, depth)
    generator = torch.Generator().manual_seed(seeded("grad", tokens, hidden))
    grad_y = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64).to(dtype)
    grads = cpp_module.fff_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
    try:
        check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, depth, leaves)
    except AssertionError as failure:
        raise replay(failure) from None


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens, hidden, trees, depth", [(700, 768, 1, 11), (300, 70, 3, 6), (257, 33, 2, 9), (3, 40, 2, 4)])
def test_thread_count_never_changes_results(cpp_module, tokens, hidden, trees, depth, dtype):
    """Forward and backward with 1, 2 and 3 threads forced, and on torch's own count: bit-equal."""
    args = random_layer(tokens, hidden, trees, depth, dtype, seed=seeded("threads", tokens))
    grad_y = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seeded("gy", tokens)), dtype=torch.float64).to(dtype)
    results = []
    for threads in (1, 2, 3, 0):
        y, leaves = cpp_module.fff_forward(*args, depth, threads=threads)
        grads = cpp_module.fff_backward(grad_y, *args, depth, leaves, threads=threads)
        results.append((y, leaves, *grads))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_torch_thread_setting_does_not_change_results(cpp_module):
    args = random_layer(600, 96, 2, 8, torch.float32, seed=seeded("torch-threads"))
    grad_y = torch.randn(600, 96)
    previous = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, max(2, previous)):
            torch.set_num_threads(threads)
            y, leaves = cpp_module.fff_forward(*args, 8)
            outputs.append((y, leaves, *cpp_module.fff_backward(grad_y, *args, 8, leaves)))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_results_are_deterministic_and_independent_of_the_batch(cpp_module):
    """A token's output is the same alone, in any batch, and on every call (bf16: widening paths too)."""
    for dtype in (torch.float32, torch.bfloat16):
        x, *weights = random_layer(600, 770, 1, 11, dtype, seed=seeded("batch", str(dtype)))
        y, leaves = cpp_module.fff_forward(x, *weights, 11)
        y_again, leaves_again = cpp_module.fff_forward(x, *weights, 11)
        assert torch.equal(y, y_again) and torch.equal(leaves, leaves_again)
        pieces = [cpp_module.fff_forward(x[i : i + 9].contiguous(), *weights, 11) for i in range(0, 600, 9)]
        assert torch.equal(y, torch.cat([piece[0] for piece in pieces]))
        assert torch.equal(leaves, torch.cat([piece[1] for piece in pieces]))
        grad_y = torch.randn(600, 770).to(dtype)
        grads = cpp_module.fff_backward(grad_y, x, *weights, 11, leaves)
        assert all(torch.equal(a, b) for a, b in zip(grads, cpp_module.fff_backward(grad_y, x, *weights, 11, leaves)))


def test_doubtful_tokens_are_handled_not_hidden(cpp_module):
    """Force logits to be exactly zero at the root: either branch is fine, the output must follow it."""
    x, weight_in, bias_in, weight_out = random_layer(20, 16, 2, 3, torch.float32, seed=7)
    weight_in[0].zero_()
    bias_in[0] = 0.0  # the root of tree 0: logit 0 for every token, so every token goes left (<= 0)
    y, leaves = cpp_module.fff_forward(x, weight_in, bias_in, weight_out, 3)
    assert (leaves[:, 0] < 4).all()  # left half of the leaves
    check_forward(x, weight_in, bias_in, weight_out, 3, y, leaves)


def test_gradients_of_unvisited_rows_are_exact_zeros_even_in_reused_memory(cpp_module):
    """The weight gradients are allocated uninitialised: every row no token visited must still be written."""
    args = random_layer(2, 24, 3, 6, torch.float32, seed=11)
    _, leaves = cpp_module.fff_forward(*args, 6)
    for _ in range(3):  # fresh allocations may reuse freed, nonzero memory
        grads = cpp_module.fff_backward(torch.randn(2, 24), *args, 6, leaves)
        visited = torch.zeros(args[1].shape[0], dtype=torch.bool)
        visited[reference.path_rows(leaves, 6).reshape(-1)] = True
        assert visited.sum() < visited.numel()  # most rows unvisited
        for grad in grads[1:]:
            assert not grad[~visited].any()


def test_reports_the_instruction_set_it_was_built_for(cpp_module):
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    expected = "avx512" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else None
    if expected is None:
        pytest.skip("neither AVX-512 nor AVX2+FMA here")
    assert cpp_module.isa == expected
    assert cpp_module.vector_bytes == (64 if expected == "avx512" else 32)


def test_backend_provides_its_own_backward(cpp_module):
    kernels = cpu.load_kernels()
    assert kernels is not None and kernels.backward is not None
    with hf_fff.use_backend("cpp"):
        name, backward = backends.resolve_backward("cpu")
    assert name == "cpp" and backward is not reference.fff_backward


def test_chosen_automatically_for_cpu_tensors(cpp_module, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("cpu")[0] == "cpp"


@pytest.mark.parametrize("layout", ["3d", "transposed-x", "strided-weights", "single-token-3d"])
def test_public_function_with_any_layout(cpp_backend, layout):
    x, weight_in, bias_in, weight_out = random_layer(24, 40, 3, 4, torch.float32, seed=seeded("layout"))
    if layout == "3d":
        x = x.view(4, 6, 40)
    elif layout == "transposed-x":
        x = x.t().contiguous().t()  # same values, column-major storage
        assert not x.is_contiguous()
    elif layout == "strided-weights":
        weight_in = torch.cat([weight_in, weight_in], dim=1)[:, ::2]  # every other column of a wider matrix
        weight_out = weight_out.t().contiguous().t()
        bias_in = torch.stack([bias_in, bias_in], dim=1)[:, 0]
        assert not any(t.is_contiguous() for t in (weight_in, weight_out, bias_in))
    else:
        x = x[:1].view(1, 1, 40)
    y, leaves = hf_fff.fast_feedforward(x, weight_in, bias_in, weight_out, 4)
    with hf_fff.use_backend("reference"):
        y_ref, leaves_ref = hf_fff.fast_feedforward(x, weight_in, bias_in, weight_out, 4)
    assert y.shape == x.shape and leaves.shape == (*x.shape[:-1], 3)
    check_forward(x.reshape(-1, 40).contiguous(), weight_in.contiguous(), bias_in.contiguous(), weight_out.contiguous(), 4,
                  y.reshape(-1, 40), leaves.reshape(-1, 3))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(leaves, leaves_ref)


def test_fast_feed_forward_module_uses_the_kernel(cpp_backend):
    layer = hf_fff.FastFeedForward(48, depth=5, trees=2)
    x = torch.randn(3, 7, 48)
    with torch.inference_mode():
        y, leaves = layer(x, return_leaves=True)
        with hf_fff.use_backend("reference"):
            y_ref, leaves_ref = layer(x, return_leaves=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(leaves, leaves_ref)


def test_gradients_flow_through_the_op(cpp_backend):
    x, weight_in, bias_in, weight_out = random_layer(30, 20, 2, 3, torch.float32, seed=5)
    leaves_by_backend, grads_by_backend = [], []
    for name in ("cpp", "reference"):
        inputs = [t.clone().requires_grad_(True) for t in (x, weight_in, bias_in, weight_out)]
        with hf_fff.use_backend(name):
            y, leaves = hf_fff.fast_feedforward(*inputs, 3)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        leaves_by_backend.append(leaves)
        grads_by_backend.append([t.grad for t in inputs])
    assert torch.equal(*leaves_by_backend)  # same paths, so the same (path-wise) gradients
    for grad_cpp, grad_ref in zip(*grads_by_backend):
        assert grad_cpp is not None and grad_cpp.abs().sum() > 0
        torch.testing.assert_close(grad_cpp, grad_ref, atol=1e-5, rtol=1e-5)


def test_opcheck_with_the_cpp_backend(cpp_backend):
    x, weight_in, bias_in, weight_out = random_layer(6, 5, 2, 2, torch.float64, seed=9)
    assert backends.resolve("cpu")[0] == "cpp"
    torch.library.opcheck(torch.ops.hf_fff.fff_forward.default, (x, weight_in, bias_in, weight_out, 2))
    inputs = tuple(t.clone().requires_grad_(True) for t in (x, weight_in, bias_in, weight_out))
    assert torch.autograd.gradcheck(lambda *a: hf_fff.fast_feedforward(*a, 2)[0], inputs)


def good_args(dtype=torch.float32):
    return random_layer(4, 8, 2, 2, dtype, seed=0)


def good_backward_args():
    x, weight_in, bias_in, weight_out = good_args()
    leaves = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 1]])
    return torch.randn(4, 8), x, weight_in, bias_in, weight_out, 2, leaves


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: (a[0].t(), *a[1:]), "contiguous"),
        (lambda a: (a[0].view(2, 2, 8), *a[1:]), "2-D"),
        (lambda a: (a[0].double(), *a[1:]), "dtype"),
        (lambda a: (a[0], a[1][:-1], *a[2:]), "rows"),
        (lambda a: (a[0], a[1], a[2][:-1], a[3]), "bias_in"),
        (lambda a: (a[0], a[1], a[2], a[3][:-1]), "weight_out"),
        (lambda a: (a[0][:, :-1].contiguous(), *a[1:]), "width"),
        (lambda a: (a[0].int(), *a[1:]), "dtype"),
    ],
    ids=["non-contiguous", "3-D", "mixed-dtype", "bad-rows", "bad-bias", "bad-weight-out", "bad-width", "integer"],
)
def test_kernel_rejects_bad_input_with_a_python_error(cpp_module, mutate, message):
    args = mutate(good_args())
    with pytest.raises(RuntimeError, match=message):
        cpp_module.fff_forward(*args, 2)


@pytest.mark.parametrize("depth", [-1, 31])
def test_kernel_rejects_bad_depth(cpp_module, depth):
    with pytest.raises(RuntimeError, match="depth"):
        cpp_module.fff_forward(*good_args(), depth)


def test_integer_inputs_of_one_dtype_are_rejected_not_crashed(cpp_module):
    args = tuple(t.to(torch.int32) for t in good_args())
    with pytest.raises(RuntimeError):
        cpp_module.fff_forward(*args, 2)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: (a[0][:, :-1].contiguous(), *a[1:]), "grad_y"),
        (lambda a: (a[0].double(), *a[1:]), "dtype"),
        (lambda a: (*a[:6], a[6].int()), "int64"),
        (lambda a: (*a[:6], a[6][:, :1].contiguous()), "shape"),
        (lambda a: (*a[:6], a[6] + 1), "leaves must be in"),
        (lambda a: (*a[:6], a[6] - 1), "leaves must be in"),
        (lambda a: (a[0].t().contiguous().t(), *a[1:]), "contiguous"),
    ],
    ids=["grad-width", "grad-dtype", "leaves-int32", "leaves-shape", "leaf-too-big", "leaf-negative", "grad-non-contiguous"],
)
def test_backward_rejects_bad_input_with_a_python_error(cpp_module, mutate, message):
    with pytest.raises(RuntimeError, match=message):
        cpp_module.fff_backward(*mutate(good_backward_args()))


def test_opcheck_of_the_backward_op(cpp_backend):
    x, weight_in, bias_in, weight_out = random_layer(6, 5, 2, 2, torch.float32, seed=9)
    _, leaves = hf_fff.fast_feedforward(x, weight_in, bias_in, weight_out, 2)
    torch.library.opcheck(torch.ops.hf_fff.fff_backward.default, (torch.randn(6, 5), x, weight_in, bias_in, weight_out, 2, leaves))
