"""The fused CUDA backward (cuda/backward.cuh) against the float64 reference, and its CPU model.

The first group runs everywhere: tests/_chunked_backward.py replays the kernels' chunk and partial-slot
bookkeeping in plain torch, with chunks small enough that nodes span many of them, against
reference.fff_backward. The GPU group (marker `gpu`, skipped without CUDA) checks the kernel itself on fresh
random inputs over a shape grid with tests/_oracle.py's float64 check, with the caching allocator's memory
poisoned so that any element the kernels leave unwritten shows as NaN, plus determinism, the float64 path,
gradcheck, torch.compile and a whole masked-LM training step.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import hf_fff
from hf_fff import backends
from hf_fff.backends import reference

from _chunked_backward import chunked_backward
from _model_helpers import NO_DROPOUT
from _oracle import backward_float64, check_backward, random_layer

HAS_CUDA = torch.cuda.is_available()
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def random_leaves(tokens, trees, depth, seed, device="cpu", crowded=False):
    """Leaves in [0, 2^depth): uniform, or `crowded` (most tokens on a few leaves, so runs span many chunks)."""
    generator = torch.Generator().manual_seed(seed)
    leaves = torch.randint(0, 2**depth, (tokens, trees), generator=generator)
    if crowded and tokens:
        popular = torch.randint(0, 2**depth, (3,), generator=generator)
        pick = torch.randint(0, 4, (tokens, trees), generator=generator)
        leaves = torch.where(pick < 3, popular[pick.clamp(max=2)], leaves)
    return leaves.to(device)


def random_problem(tokens, hidden, trees, depth, dtype, seed, device="cpu", crowded=False):
    x, weight_in, bias_in, weight_out = random_layer(tokens, hidden, trees, depth, dtype, seed=seed, device=device)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_y = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    leaves = random_leaves(tokens, trees, depth, seed + 2, device, crowded)
    return grad_y, x, weight_in, bias_in, weight_out, depth, leaves


# ------------------------------------------------------------------------------------------------------
# CPU: the bookkeeping model


@pytest.mark.parametrize(
    "tokens, hidden, trees, depth, chunk, crowded",
    [
        (0, 5, 1, 2, 4, False),
        (1, 3, 1, 0, 4, False),
        (37, 7, 2, 3, 4, False),
        (37, 7, 2, 3, 4, True),
        (100, 4, 1, 0, 8, False),  # depth 0: one node per tree spanning every chunk
        (150, 5, 3, 5, 16, True),
        (300, 2, 1, 8, 32, False),  # many leaves, nodes shorter than a chunk at deep levels
        (64, 3, 2, 4, 16, False),  # tokens a multiple of the chunk
        (257, 6, 1, 11, 192, True),  # the kernel's largest chunk
        (257, 6, 1, 11, 256, True),  # the shared-memory bound of a chunk
        (257, 6, 1, 11, 32, True),  # its smallest (small calls)
    ],
)
def test_chunk_model_matches_reference(tokens, hidden, trees, depth, chunk, crowded):
    problem = random_problem(tokens, hidden, trees, depth, torch.float64, seed=tokens + 7 * depth + trees, crowded=crowded)
    grads = chunked_backward(*problem, chunk=chunk)
    check_backward(grads, *problem)


def test_chunk_model_float32_all_tokens_on_one_leaf():
    grad_y, x, weight_in, bias_in, weight_out, depth, _ = random_problem(90, 5, 2, 3, torch.float32, seed=3)
    leaves = torch.full((90, 2), 5, dtype=torch.long)
    grads = chunked_backward(grad_y, x, weight_in, bias_in, weight_out, depth, leaves, chunk=8)
    check_backward(grads, grad_y, x, weight_in, bias_in, weight_out, depth, leaves)


# ------------------------------------------------------------------------------------------------------
# GPU: the kernel


@pytest.fixture(scope="module")
def kernels():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    from hf_fff.backends import cuda as cuda_backend

    with pytest.MonkeyPatch.context() as patch:  # the default (fused) for this module only
        patch.delenv(cuda_backend.BACKWARD_ENV, raising=False)
        backends._reset_for_tests()
        loaded = cuda_backend.load_kernels()
        assert loaded is not None and loaded.backward is not None, "the CUDA extension failed to build (see the warning)"
        yield loaded
    backends._reset_for_tests()


def poison_allocator(nbytes: int) -> None:
    """Fill freed blocks of torch's caching allocator with NaN, so that the next allocations (the kernel's
    outputs and scratch) start as NaN wherever the kernels do not write."""
    block = torch.empty(max(nbytes, 1 << 20) // 4, dtype=torch.float32, device="cuda")
    block.fill_(float("nan"))
    del block


def run_checked(kernels, problem):
    grad_y, x, weight_in, bias_in, weight_out, depth, leaves = problem
    poison_allocator(4 * (x.numel() * (depth + 3) + 4 * weight_in.numel()) + (1 << 22))
    grads = kernels.backward(*problem)
    torch.cuda.synchronize()
    check_backward(grads, *problem)
    if x.shape[0]:  # a visited row the kernels forgot would be exactly zero (checked above only norm-wise)
        expected = backward_float64(*problem)
        smallest = torch.finfo(x.dtype).tiny  # a row whose true gradient is below this may round to zero
        visited = torch.zeros(weight_in.shape[0], dtype=torch.bool, device=x.device)
        visited[reference.path_rows(leaves, depth).reshape(-1)] = True
        for name, grad, want in (("grad_weight_in", grads[1], expected[1]), ("grad_weight_out", grads[3], expected[3])):
            representable = visited & (want.abs().amax(-1) >= smallest)
            assert grad[representable].abs().amax(-1).gt(0).all(), f"{name}: a visited row is all zeros"
    return grads


TOKENS, HIDDEN, TREES = (0, 1, 37, 1000, 5000), (1, 7, 64, 768, 1000), (1, 2, 4)
# Depths reaching each register bound of the weight pass (kMaxLevels 4, 8, 16, 32 for depth + 1 levels).
DEPTHS = (0, 1, 3, 6, 11, 13, 20)
# Every (dtype, trees, depth) with every token count, the widths cycled along (a width's index moves with both
# the depth's and the token count's, so that each width meets every depth and tree count) ...
GRID = [
    (dtype, tokens, HIDDEN[(d + 2 * t + 3 * r) % len(HIDDEN)], trees, depth)
    for dtype in KERNEL_DTYPES
    for r, trees in enumerate(TREES)
    for d, depth in enumerate(DEPTHS)
    for t, tokens in enumerate(TOKENS)
    if trees * 2 ** (depth + 1) * HIDDEN[(d + 2 * t + 3 * r) % len(HIDDEN)] <= 2**27  # weights up to 512 MB in fp32
]
# ... and every (tokens, hidden) at the model's shapes: one tree of depth 11, two trees of depth 6.
GRID += [(dtype, tokens, hidden, trees, depth) for dtype in KERNEL_DTYPES for tokens in TOKENS for hidden in HIDDEN for trees, depth in ((1, 11), (2, 6))]
GRID = list(dict.fromkeys(GRID))  # without repeats, in order


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tokens, hidden, trees, depth", GRID)
def test_backward_matches_float64(kernels, dtype, tokens, hidden, trees, depth):
    seed = tokens * 31 + hidden * 7 + trees * 3 + depth
    run_checked(kernels, random_problem(tokens, hidden, trees, depth, dtype, seed, device="cuda", crowded=seed % 2 == 0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("hidden, depth", [(768, 11), (2050, 3), (33, 16)])  # 2050: the any-width token pass; 16: the 32-level sums
def test_backward_long_runs_and_wide_rows(kernels, dtype, hidden, depth):
    """All tokens on one leaf (every node's run spans all chunks), then crowded leaves on wide rows."""
    grad_y, x, weight_in, bias_in, weight_out, _, leaves = random_problem(3000, hidden, 2, depth, dtype, 11, device="cuda", crowded=True)
    run_checked(kernels, (grad_y, x, weight_in, bias_in, weight_out, depth, leaves))
    one_leaf = torch.full_like(leaves, 2**depth - 1)
    run_checked(kernels, (grad_y, x, weight_in, bias_in, weight_out, depth, one_leaf))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backward_at_the_largest_chunk(kernels, dtype):
    """Enough tokens that the weight pass takes its largest chunk (past 21120 at width 768 on 132 SMs; a batch-256
    training step has 32768)."""
    run_checked(kernels, random_problem(30000, 768, 1, 11, dtype, seed=6, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backward_is_deterministic(kernels, dtype):
    problem = random_problem(20000, 768, 1, 11, dtype, seed=5, device="cuda", crowded=True)
    first = kernels.backward(*problem)
    for _ in range(2):
        again = kernels.backward(*problem)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "two calls on the same inputs gave different bits"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_float64_takes_the_reference_path(kernels, monkeypatch):
    problem = random_problem(50, 9, 2, 3, torch.float64, seed=8, device="cuda")
    calls = []
    exact = reference.fff_backward

    def spy(*args):
        calls.append(1)
        return exact(*args)

    monkeypatch.setattr(reference, "fff_backward", spy)
    got = kernels.backward(*problem)
    assert calls == [1]
    # index_add_ on CUDA sums in no fixed order: two reference calls may differ in the last bits
    for g, want in zip(got, exact(*problem)):
        assert g.dtype == torch.float64 and torch.allclose(g, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gradcheck_float64_through_the_op(kernels):
    x, weight_in, bias_in, weight_out = random_layer(6, 5, 2, 2, torch.float64, seed=9, device="cuda")
    inputs = [t.clone().requires_grad_() for t in (x, weight_in, bias_in, weight_out)]
    with hf_fff.use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda *a: hf_fff.ops.fast_feedforward(*a, 2)[0], inputs, eps=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_forward_and_backward(kernels, monkeypatch, dtype):
    """torch.compile(fullgraph=True) of forward + backward calls the CUDA backward and agrees with eager."""
    torch._dynamo.reset()
    native = backends._NATIVE["cuda"]
    with hf_fff.use_backend("cuda"):
        backends.resolve("cuda")
        calls = []
        loaded = native._kernels

        def counting(*args):
            calls.append(args[1].shape)
            return loaded.backward(*args)

        monkeypatch.setattr(native, "_kernels", dataclasses.replace(loaded, backward=counting))
        problem = random_problem(300, 64, 2, 5, dtype, seed=10, device="cuda")
        grad_y, x, weight_in, bias_in, weight_out, depth, _ = problem

        def step(x, weight_in, bias_in, weight_out):
            y, _ = hf_fff.ops.fast_feedforward(x, weight_in, bias_in, weight_out, depth)
            return (y.float() * grad_y.float()).sum()

        results = []
        for fn in (step, torch.compile(step, fullgraph=True)):
            inputs = [t.clone().requires_grad_() for t in (x, weight_in, bias_in, weight_out)]
            fn(*inputs).backward()
            results.append([t.grad for t in inputs])
        assert len(calls) == 2, "the CUDA backward did not run in both the eager and the compiled step"
        for eager, compiled in zip(*results):
            assert torch.equal(eager, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_masked_lm_training_step_matches_reference_backward(kernels, monkeypatch, dtype, tol):
    """A whole UltraFastBertForMaskedLM step: the same forward, the CUDA backward or the reference one."""
    torch.manual_seed(0)
    # No dropout anywhere: the two steps must differ in nothing but the FFF backward.
    config = hf_fff.UltraFastBertConfig(num_hidden_layers=2, vocab_size=1000, fff_trees=2, fff_depth=6, **NO_DROPOUT)
    model = hf_fff.UltraFastBertForMaskedLM(config).to(device="cuda", dtype=dtype).train()
    ids = torch.randint(5, 1000, (8, 128), device="cuda")
    labels = torch.where(torch.rand(ids.shape, device="cuda") < 0.15, ids, torch.full_like(ids, -100))
    native = backends._NATIVE["cuda"]
    with hf_fff.use_backend("cuda"):
        backends.resolve("cuda")
        loaded = native._kernels
        grads = {}
        for name, backward in (("cuda", loaded.backward), ("reference", reference.fff_backward)):
            calls = []

            def counting(*args, backward=backward):
                calls.append(1)
                return backward(*args)

            monkeypatch.setattr(native, "_kernels", dataclasses.replace(loaded, backward=counting))
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            assert len(calls) == config.num_hidden_layers
            grads[name] = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["cuda"].keys() == grads["reference"].keys()
    for name, want in grads["reference"].items():
        err = (grads["cuda"][name] - want).norm().item()
        assert err <= tol * want.norm().item() + 1e-12, f"{name}: relative error {err / max(want.norm().item(), 1e-30):.3g}"


# ------------------------------------------------------------------------------------------------------
# CPU: the backend wiring


def test_cuda_backend_declares_the_backward_sources():
    from hf_fff.backends import cuda as cuda_backend

    assert {"fff_cuda_backward.cpp", "fff_cuda_backward.cu"} <= set(cuda_backend.SOURCES)
    assert {"backward.h", "backward.cuh"} <= set(cuda_backend.HEADERS)


def test_fused_backward_switch(monkeypatch):
    """On by default; HF_FFF_CUDA_BACKWARD=reference turns it off; a typo is an error."""
    from hf_fff.backends import cuda as cuda_backend

    monkeypatch.delenv(cuda_backend.BACKWARD_ENV, raising=False)
    assert cuda_backend.fused_backward_enabled()
    monkeypatch.setenv(cuda_backend.BACKWARD_ENV, " Reference ")
    assert not cuda_backend.fused_backward_enabled()
    monkeypatch.setenv(cuda_backend.BACKWARD_ENV, " Fused ")
    assert cuda_backend.fused_backward_enabled()
    monkeypatch.setenv(cuda_backend.BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match="HF_FFF_CUDA_BACKWARD"):
        cuda_backend.fused_backward_enabled()
