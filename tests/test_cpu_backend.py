"""The C++ CPU backend ("cpp") against the plain-torch oracle, on fresh random inputs.

A token whose logit at some visited node is within rounding of 0 may legally go either way, so the
checks are in two parts: (1) the kernel's routing is right at every node where the sign of the exact
(float64) logit is beyond rounding doubt, and (2) its output is the FFF sum along the path it took.
Tokens with no doubtful node must also match reference.fff_forward's leaves and output.
"""

from __future__ import annotations

import os
import random
import shutil
import zlib

import pytest
import torch

import hf_fff
from hf_fff import backends
from hf_fff.backends import cpu, reference

# (dtype, atol, rtol) of y against the float64 sum along the kernel's path. The float64 answer is
# rounded once into the output dtype, so low precision is allowed one or two units in the last place.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
    (torch.bfloat16, 2e-2, 1.6e-2),
    (torch.float16, 2e-3, 2e-3),
]
# Fresh inputs every session; set HF_FFF_TEST_SEED to replay a failure (the seed is in its message).
SESSION_SEED = int(os.environ.get("HF_FFF_TEST_SEED", random.randrange(2**31)))
ACCUMULATION_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float16: 2.0**-24, torch.float64: 2.0**-53}

# (tokens, hidden, trees, depth): trees 1..8, depth 0..11, odd widths, 0 and 1 tokens, BERT's size.
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
]


@pytest.fixture(scope="session")
def cpp_module():
    """The compiled extension, built once per session (and reused from the on-disk cache after that)."""
    module = cpu.load_module()
    if module is None:
        if shutil.which("c++") is None:
            pytest.skip("no C++ compiler here; the fallback is covered by test_extension.py")
        pytest.fail("a C++ compiler is available but the fff_cpu extension did not build (see the warning)")
    return module


@pytest.fixture
def cpp_backend(cpp_module):
    with hf_fff.use_backend("cpp"):
        yield


def random_layer(tokens, hidden, trees, depth, dtype, seed):
    """Fresh inputs scaled so that y is O(1) whatever the width and depth (tolerances stay meaningful)."""
    generator = torch.Generator().manual_seed(seed)
    rows = trees * reference.nodes_per_tree(depth)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    x = normal(tokens, hidden)
    weight_in = normal(rows, hidden, scale=hidden**-0.5)
    bias_in = normal(rows, scale=0.1)
    weight_out = normal(rows, hidden, scale=(trees * (depth + 1)) ** -0.5)
    return x, weight_in, bias_in, weight_out


def path_logits(x, weight_in, bias_in, leaves, depth):
    """(float64 logits, float64 rounding bounds, went_right) at every node on the paths to `leaves`, each (M, T, L)."""
    rows = reference.path_rows(leaves, depth)
    x64, w64, b64 = x.double(), weight_in.double()[rows], bias_in.double()[rows]
    logits = torch.einsum("mh,mtlh->mtl", x64, w64) + b64
    # Worst-case accumulated rounding of a dot product in the kernel's accumulation type, with margin.
    eps = ACCUMULATION_EPS[x.dtype]
    bound = 4 * eps * (x.shape[1] + 2) * (torch.einsum("mh,mtlh->mtl", x64.abs(), w64.abs()) + b64.abs())
    in_tree = rows - (torch.arange(rows.shape[1]) * reference.nodes_per_tree(depth)).view(1, -1, 1)
    went_right = in_tree[..., 1:] == 2 * in_tree[..., :-1] + 2
    return logits, bound, went_right


def y_along(x, weight_in, bias_in, weight_out, leaves, depth):
    """The FFF output in float64 along the given paths."""
    rows = reference.path_rows(leaves, depth)
    logits = torch.einsum("mh,mtlh->mtl", x.double(), weight_in.double()[rows]) + bias_in.double()[rows]
    return torch.einsum("mtl,mtlh->mh", torch.nn.functional.gelu(logits), weight_out.double()[rows])


def check_against_oracle(x, weight_in, bias_in, weight_out, depth, y, leaves, atol, rtol):
    tokens, trees = x.shape[0], weight_in.shape[0] // reference.nodes_per_tree(depth)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert leaves.shape == (tokens, trees) and leaves.dtype == torch.int64
    assert ((0 <= leaves) & (leaves < 2**depth)).all()

    logits, bound, went_right = path_logits(x, weight_in, bias_in, leaves, depth)
    doubtful = logits.abs() <= bound
    routed_by_sign = went_right == (logits[..., :-1] > 0)
    assert (routed_by_sign | doubtful[..., :-1]).all(), "the kernel took a branch against a clear logit sign"

    y_path = y_along(x, weight_in, bias_in, weight_out, leaves, depth)
    scale = y_path.abs().max().item() if tokens else 1.0
    torch.testing.assert_close(y.double(), y_path, atol=atol * max(scale, 1.0), rtol=rtol)

    # Where no visited node is in doubt, both implementations must take the same path and agree.
    y_ref, leaves_ref = reference.fff_forward(x, weight_in, bias_in, weight_out, depth)
    clear = ~doubtful.flatten(1).any(dim=1)
    assert torch.equal(leaves[clear], leaves_ref[clear])
    torch.testing.assert_close(y[clear].double(), y_ref[clear].double(), atol=2 * atol * max(scale, 1.0), rtol=2 * rtol)
    return clear


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES, ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None)
@pytest.mark.parametrize("tokens, hidden, trees, depth", SHAPES)
def test_kernel_matches_reference(cpp_module, tokens, hidden, trees, depth, dtype, atol, rtol):
    seed = zlib.crc32(repr((SESSION_SEED, tokens, hidden, trees, depth, str(dtype))).encode())
    args = random_layer(tokens, hidden, trees, depth, dtype, seed)
    y, leaves = cpp_module.fff_forward(*args, depth)
    try:
        clear = check_against_oracle(*args, depth, y, leaves, atol, rtol)
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n(replay with HF_FFF_TEST_SEED={SESSION_SEED})") from None
    if tokens >= 10:  # the doubtful-token split must not hide the comparison
        # About 0.1% of tokens have a near-tie at fp32 (400 seeds of the 17 x 8-tree case: mean 99.87% clear), so
        # 90% failed whenever 2 of 17 tokens were in doubt (seed 678745046); 75% still catches a vacuous check.
        assert clear.float().mean() >= 0.75, f"too many doubtful tokens (HF_FFF_TEST_SEED={SESSION_SEED})"


def test_fp32_relative_error_over_a_big_random_layer(cpp_module):
    x, weight_in, bias_in, weight_out = random_layer(512, 768, 1, 11, torch.float32, seed=1234)
    y, leaves = cpp_module.fff_forward(x, weight_in, bias_in, weight_out, 11)
    y_path = y_along(x, weight_in, bias_in, weight_out, leaves, 11)
    relative = (y.double() - y_path).norm(dim=1) / y_path.norm(dim=1)
    assert relative.max().item() <= 1e-5


@pytest.mark.parametrize(
    "tokens, hidden, depth, dtype",
    [(600, 768, 11, torch.float32), (300, 770, 10, torch.bfloat16), (160, 40, 11, torch.float64)],
)
def test_subtree_sorted_walk_equals_the_token_order_walk(cpp_module, tokens, hidden, depth, dtype):
    """Many tokens through one tree take the sorted-by-subtree strategy; small batches do not.

    Every token's arithmetic is the same in both, so the results must be identical bit for bit.
    """
    args = random_layer(tokens, hidden, 1, depth, dtype, seed=SESSION_SEED)
    y, leaves = cpp_module.fff_forward(*args, depth)
    x, rest = args[0], args[1:]
    pieces = [cpp_module.fff_forward(x[i : i + 8].contiguous(), *rest, depth) for i in range(0, tokens, 8)]
    assert torch.equal(y, torch.cat([piece[0] for piece in pieces]))
    assert torch.equal(leaves, torch.cat([piece[1] for piece in pieces]))
    check_against_oracle(*args, depth, y, leaves, *next((a, r) for d, a, r in DTYPE_TOLERANCES if d == dtype))


def test_doubtful_tokens_are_handled_not_hidden(cpp_module):
    """Force logits to be exactly zero at the root: either branch is fine, the output must follow it."""
    x, weight_in, bias_in, weight_out = random_layer(20, 16, 2, 3, torch.float32, seed=7)
    weight_in[0].zero_()
    bias_in[0] = 0.0  # the root of tree 0: logit 0 for every token, so every token goes left (<= 0)
    y, leaves = cpp_module.fff_forward(x, weight_in, bias_in, weight_out, 3)
    assert (leaves[:, 0] < 4).all()  # left half of the leaves
    check_against_oracle(x, weight_in, bias_in, weight_out, 3, y, leaves, 1e-5, 1e-5)


def test_thread_count_does_not_change_results(cpp_module):
    args = random_layer(300, 70, 2, 6, torch.float32, seed=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, leaves1 = cpp_module.fff_forward(*args, 6)
        torch.set_num_threads(max(2, previous))
        y2, leaves2 = cpp_module.fff_forward(*args, 6)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(y1, y2) and torch.equal(leaves1, leaves2)  # per-token work is the same code in any thread


def test_chosen_automatically_for_cpu_tensors(cpp_module, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.resolve("cpu")[0] == "cpp"


@pytest.mark.parametrize("layout", ["3d", "transposed-x", "strided-weights", "single-token-3d"])
def test_public_function_with_any_layout(cpp_backend, layout):
    x, weight_in, bias_in, weight_out = random_layer(24, 40, 3, 4, torch.float32, seed=SESSION_SEED)
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
    x2d = x.reshape(-1, 40)
    check_against_oracle(x2d, weight_in, bias_in, weight_out, 4, y.reshape(-1, 40), leaves.reshape(-1, 3), 1e-5, 1e-5)
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
