"""The CUDA backend (cuda/) against the float64 oracle of tests/_oracle.py, strategy by strategy.

Every check draws fresh random inputs (_oracle.random_layer) and hands the kernel poisoned output buffers
(NaN / -7), so an element the kernel forgets to write shows. _oracle.check_forward compares routing per token
(near-ties may go either way) and y along the kernel's own path. The strategies and their ids come from the one
table, cuda/strategies.h, through hf_fff.backends.cuda.strategies().

Tests that need a GPU skip cleanly without one; the last few (import, fallback) also run on CPU.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_fff
from hf_fff import backends
from hf_fff.backends import cuda as cuda_backend
from hf_fff.backends import reference

from _oracle import check_forward, random_layer

HAS_CUDA = torch.cuda.is_available()


def needs_cuda(test):
    """Marks a test `gpu` and skips it without a CUDA GPU."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")(test))


STRATEGY = cuda_backend.strategies()  # name -> id, auto included (cuda/strategies.h)
SINGLE, GENERAL, SUBTREE, CLUSTER, STAGED, SORTED = (STRATEGY[name] for name in ("single", "general", "subtree", "cluster", "staged", "sorted"))
# thread-block clusters (the cluster strategy) need compute capability 9.0 or later
CLUSTERS = HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9
FEW = (SUBTREE,) + ((CLUSTER,) if CLUSTERS else ())  # the few-token strategies this GPU runs
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
def sorted_bytes(depth: int, split: int, hidden: int, element_size: int) -> int:
    """Shared memory of the sorted strategy's finishing block (sorted_smem_bytes in cuda/sorted.cuh)."""
    sub = 2 ** (depth - split + 1) - 1
    return (2 * sub + split) * hidden * element_size + 4 * sub + 4 * (2**split + 1)


def sorted_auto_split(depth: int, hidden: int, element_size: int) -> int:
    """The sorted strategy's automatic split: one level below the first whose rows fit (sorted_split in cuda/sorted.cuh)."""
    first = next(s for s in range(1, min(depth, 10) + 1) if sorted_bytes(depth, s, hidden, element_size) <= smem_limit())
    return min(first + 1, depth, 10)


def smem_limit() -> int:
    return getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", 227 * 1024)


@pytest.fixture(scope="module")
def ext():
    module = cuda_backend.load_module()
    assert module is not None, "the CUDA extension failed to build on a machine with a GPU (see the warning)"
    return module


def make_problem(tokens, hidden, depth, trees, dtype, generator=None):
    """A random layer on the GPU (_oracle.random_layer: x, weight_in, bias_in, weight_out), its seed drawn from
    `generator` (so that each call of a test gets fresh values) or 0."""
    seed = 0 if generator is None else int(torch.randint(2**31, (1,), generator=generator, device=generator.device))
    return random_layer(tokens, hidden, trees, depth, dtype, seed=seed, device="cuda")


def run_poisoned(ext, x, w_in, b_in, w_out, depth, strategy=0, split=0):
    trees = w_in.shape[0] // reference.nodes_per_tree(depth)
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    leaves_out = torch.full((x.shape[0], trees), -7, dtype=torch.long, device=x.device)
    y, leaves = ext.fff_forward(x, w_in, b_in, w_out, depth, strategy=strategy, split=split, out=out, leaves_out=leaves_out)
    assert y.data_ptr() == out.data_ptr() and leaves.data_ptr() == leaves_out.data_ptr()
    torch.cuda.synchronize()
    return y, leaves


# ------------------------------------------------------------------------------------------------------
# correctness per dtype and shape class


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strategy", list(STRATEGY))
@pytest.mark.parametrize("tokens", [1, 37, 5000])
def test_bert_geometry(ext, dtype, strategy, tokens):
    """Width 768, depth 11, one tree: the UltraFastBERT layer, every strategy of the table, few to many tokens."""
    gen = torch.Generator(device="cuda").manual_seed(1000 + tokens + 7 * STRATEGY[strategy])
    args = make_problem(tokens, 768, 11, 1, dtype, gen)
    if strategy == "sorted" and dtype != torch.float32:
        with pytest.raises(RuntimeError, match="float32"):
            ext.fff_forward(*args, 11, strategy=SORTED)
        return
    if strategy == "cluster" and not CLUSTERS:
        with pytest.raises(RuntimeError, match="cluster"):
            ext.fff_forward(*args, 11, strategy=CLUSTER)
        return
    check_forward(*args, 11, *run_poisoned(ext, *args, 11, strategy=STRATEGY[strategy]))


def one_tree_strategies(dtype, trees, depth=2):
    """The many-token strategies a problem can be forced to: staged takes one tree, sorted one tree of float32."""
    return ((STAGED,) if trees == 1 else ()) + ((SORTED,) if trees == 1 and depth >= 2 and dtype == torch.float32 else ())


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trees", [1, 2, 3, 8])
@pytest.mark.parametrize("depth", [0, 1, 2, 5, 8])
def test_trees_and_depths(ext, dtype, trees, depth):
    gen = torch.Generator(device="cuda").manual_seed(trees * 100 + depth)
    args = make_problem(300, 256, depth, trees, dtype, gen)
    for strategy in (0, SINGLE, GENERAL, *FEW, *one_tree_strategies(dtype, trees, depth)):
        check_forward(*args, depth, *run_poisoned(ext, *args, depth, strategy=strategy))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("depth", [12, 15])
def test_deep_trees(ext, dtype, depth):
    gen = torch.Generator(device="cuda").manual_seed(depth)
    args = make_problem(700, 64, depth, 1, dtype, gen)
    for strategy in (0, SINGLE, GENERAL, *FEW, *one_tree_strategies(dtype, 1, depth)):
        check_forward(*args, depth, *run_poisoned(ext, *args, depth, strategy=strategy))
    args = make_problem(65, 36, depth, 2, dtype, gen)  # two trees; width 36 is off the 16-bit fast path
    check_forward(*args, depth, *run_poisoned(ext, *args, depth))


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 3, 7, 8, 12, 100, 255, 256, 264, 520, 769, 1024, 2048, 2056, 3001])
def test_hidden_sizes(ext, dtype, hidden):
    """Fast path (multiples of the 16-byte vector, up to 8 vectors per lane) and the general path."""
    gen = torch.Generator(device="cuda").manual_seed(hidden)
    args = make_problem(133, hidden, 4, 2, dtype, gen)
    check_forward(*args, 4, *run_poisoned(ext, *args, 4))
    check_forward(*args, 4, *run_poisoned(ext, *args, 4, strategy=GENERAL))
    if hidden % (16 // args[0].element_size()) == 0 and hidden <= 256 * (16 // args[0].element_size()):
        for strategy in FEW:
            check_forward(*args, 4, *run_poisoned(ext, *args, 4, strategy=strategy))
        one_tree = make_problem(133, hidden, 4, 1, dtype, gen)
        for strategy in one_tree_strategies(dtype, 1, 4):
            check_forward(*one_tree, 4, *run_poisoned(ext, *one_tree, 4, strategy=strategy))


@needs_cuda
@pytest.mark.parametrize("split", [1, 2, 3, 6, 10])
def test_sorted_splits(ext, split):
    """Every bucket level the sorted strategy takes (2 .. min(depth, 10)) whose rows fit; split 1 is refused (step 1
    holds the top two levels' rows in shared memory)."""
    gen = torch.Generator(device="cuda").manual_seed(split)
    args = make_problem(4500, 128, 10, 1, torch.float32, gen)
    if split < 2:
        with pytest.raises(RuntimeError, match="split must be in"):
            ext.fff_forward(*args, 10, strategy=SORTED, split=split)
    elif sorted_bytes(10, split, 128, 4) > smem_limit():
        with pytest.raises(RuntimeError, match="shared memory"):
            ext.fff_forward(*args, 10, strategy=SORTED, split=split)
    else:
        check_forward(*args, 10, *run_poisoned(ext, *args, 10, strategy=SORTED, split=split))


def staged_levels(depth: int, hidden: int, element_size: int) -> int:
    """Top levels the staged strategy holds per matrix (staged_levels in cuda/staged.cuh)."""
    levels = 0
    while levels < min(depth + 1, 24) and 2 * (2 ** (levels + 1) - 1) * hidden * element_size <= smem_limit():
        levels += 1
    return levels


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "tokens, hidden, depth, trees",
    [(20001, 768, 11, 1), (3000, 1024, 8, 2), (900, 256, 4, 1), (12000, 1000, 11, 1), (9000, 64, 15, 1), (5, 768, 3, 1),
     (10001, 512, 5, 1), (4097, 72, 9, 1)],
)
def test_staged_levels(ext, dtype, tokens, hidden, depth, trees):
    """The staged strategy reads the top levels' rows from shared memory: right for every number of staged levels
    (0 = as many as fit; widths 1000 and 72 leave partial vectors), and a request past what fits is refused, as is
    more than one tree. It takes two tokens per warp (summed together by pair_sum), so the cases run several rounds of
    pairs and an odd last token. At fp32 it runs single's arithmetic in single's order, so y and the leaves equal the
    single walk's bit for bit; 16-bit types route with tensor-core dot products (another fp32 summation order), so
    they are held to the float64 check alone."""
    gen = torch.Generator(device="cuda").manual_seed(tokens + hidden + depth + trees)
    args = make_problem(tokens, hidden, depth, trees, dtype, gen)
    if trees > 1:
        with pytest.raises(RuntimeError, match="one tree"):
            ext.fff_forward(*args, depth, strategy=STAGED)
        return
    y_single, leaves_single = ext.fff_forward(*args, depth, strategy=SINGLE)
    fit = staged_levels(depth, hidden, args[0].element_size())
    for levels in sorted({0, min(1, fit), fit // 2, fit}):
        y, leaves = run_poisoned(ext, *args, depth, strategy=STAGED, split=levels)
        check_forward(*args, depth, y, leaves)
        if dtype == torch.float32:
            assert torch.equal(leaves, leaves_single) and torch.equal(y, y_single), levels
    with pytest.raises(RuntimeError, match="staged strategy holds at most"):
        ext.fff_forward(*args, depth, strategy=STAGED, split=fit + 1)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skewed_routing(ext, dtype):
    """All tokens in one bucket (a large bias at the top): the counting sort's worst case."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x, w_in, b_in, w_out = make_problem(6000, 256, 11, 1, dtype, gen)
    b_in[:127] = 30.0  # every token goes right through the first 6 levels
    for strategy in (0, SINGLE, *one_tree_strategies(dtype, 1, 11)):
        check_forward(x, w_in, b_in, w_out, 11, *run_poisoned(ext, x, w_in, b_in, w_out, 11, strategy=strategy))


@needs_cuda
def test_sorted_small_buckets(ext):
    """Routing far from uniform, as in a real encoder: one bucket takes most tokens and the rest spread thinly, so the
    sorted strategy's runs cross many buckets of a few tokens, each staged (or, pipelined, refilled) in turn. Same
    arithmetic as single: the output must equal the single walk's bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(21)
    x, w_in, b_in, w_out = make_problem(20000, 256, 10, 1, torch.float32, gen)
    x[:19700] += 4 * w_in[0].sign()  # a large logit at the root and a common path below it
    y, leaves = run_poisoned(ext, x, w_in, b_in, w_out, 10, strategy=SORTED)
    check_forward(x, w_in, b_in, w_out, 10, y, leaves)
    y_single, leaves_single = ext.fff_forward(x, w_in, b_in, w_out, 10, strategy=SINGLE)
    assert torch.equal(leaves, leaves_single) and torch.equal(y, y_single)
    split = sorted_auto_split(10, 256, x.element_size())
    buckets = torch.bincount(leaves[:, 0] >> (10 - split), minlength=2**split)
    small = ((buckets > 0) & (buckets < 32)).sum().item()
    assert buckets.max() >= 1000 and small >= 2**split // 2, buckets.tolist()  # one large bucket and many small ones


@needs_cuda
@pytest.mark.parametrize(
    "hidden, depth, tokens, all_right",
    [(768, 11, 20001, False), (768, 11, 333, False), (768, 11, 9001, True), (512, 9, 3001, False), (96, 7, 1001, False),
     (4, 5, 77, False), (1000, 10, 4097, False), (1024, 11, 2050, False), (768, 11, 5000, False), (100, 11, 3001, False),
     (256, 9, 7001, False), (4, 15, 3001, False), (4, 16, 3001, False)],
)
def test_sorted_pairs_match_single_walk_fp32(ext, hidden, depth, tokens, all_right):
    """At fp32 with x of at most 24 floats per lane (width <= 768) the sorted strategy finishes two tokens of one
    bucket per warp and reads a row the two share once (always the ancestors' rows, deeper ones when their paths
    agree; with every bias large, all paths agree to the leaf). Every split whose rows fit, odd bucket segments (an
    unpaired last token) and widths 1000 / 1024 (the one-token kernel) must give the single walk's bits. On Hopper
    the widths that are multiples of 32 run the pipelined kernel at the splits whose rows fit twice (two buckets'
    rows in turn, refilled by tensor copies while the warps finish; many small buckets per run at 5000 tokens, the
    last block's run a few tokens long; biases from registers up to 32 subtree nodes, from global memory beyond, e.g.
    width 96 at split 2), the others the barrier-staged kernel. Full rows (widths 256, 512, 768) and partial ones (4,
    96, 100); depth 15 uses every lane of the pair kernels' shared GELU evaluation, and depth 16 (one level more than
    they take) goes to the one-token kernel."""
    gen = torch.Generator(device="cuda").manual_seed(hidden + depth + tokens)
    x, w_in, b_in, w_out = make_problem(tokens, hidden, depth, 1, torch.float32, gen)
    if all_right:
        b_in += 100.0
    y_single, leaves_single = ext.fff_forward(x, w_in, b_in, w_out, depth, strategy=SINGLE)
    tried = 0
    for split in range(2, min(depth, 10) + 1):
        if sorted_bytes(depth, split, hidden, 4) > smem_limit():
            continue
        y, leaves = run_poisoned(ext, x, w_in, b_in, w_out, depth, strategy=SORTED, split=split)
        assert torch.equal(leaves, leaves_single) and torch.equal(y, y_single), split
        tried += 1
    assert tried >= 2
    check_forward(x, w_in, b_in, w_out, depth, y, leaves)
    if all_right:
        assert (leaves == 2**depth - 1).all()


@needs_cuda
def test_plan_matches_measured_choices(ext):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    smem = smem_limit()
    assert ext.plan(1, 768, 11, 1, "bfloat16", sms, smem, 9)[0] == CLUSTER
    assert ext.plan(1, 768, 11, 1, "bfloat16", sms, smem, 8)[0] == SUBTREE  # no clusters before Hopper
    assert ext.plan(100, 768, 11, 1, "bfloat16", sms, smem)[0] == SUBTREE
    assert ext.plan(4096, 768, 11, 1, "bfloat16", sms, smem)[0] == SINGLE
    assert ext.plan(32768, 768, 11, 1, "bfloat16", sms, smem) == (STAGED, 6)  # 6 levels of each matrix: 189 KB
    assert ext.plan(16384, 768, 11, 1, "float16", sms, smem) == (STAGED, 6)
    assert ext.plan(2048, 768, 11, 1, "float32", sms, smem)[0] == SINGLE
    assert ext.plan(8192, 768, 11, 1, "float32", sms, smem) == (STAGED, 5)
    assert ext.plan(32768, 768, 11, 1, "float32", sms, smem) == (SORTED, 8)  # one level below the first that fits
    assert ext.plan(32768, 768, 11, 2, "float32", sms, smem)[0] == SINGLE
    assert ext.plan(32768, 768, 4, 1, "bfloat16", sms, smem)[0] == SINGLE  # shallow trees: not measured
    assert ext.plan(32768, 769, 11, 1, "float32", sms, smem)[0] == GENERAL


@needs_cuda
def test_zero_tokens(ext):
    for dtype in DTYPES:
        x, w_in, b_in, w_out = make_problem(0, 768, 11, 2, dtype, None)
        y, leaves = ext.fff_forward(x, w_in, b_in, w_out, 11)
        assert y.shape == (0, 768) and leaves.shape == (0, 2) and leaves.dtype == torch.long
        y, leaves = hf_fff.fast_feedforward(torch.empty(3, 0, 768, device="cuda", dtype=dtype), w_in, b_in, w_out, 11)
        assert y.shape == (3, 0, 768) and leaves.shape == (3, 0, 2)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(ext, dtype):
    gen = torch.Generator(device="cuda").manual_seed(11)
    _, w_in, b_in, w_out = make_problem(1, 768, 7, 1, dtype, gen)
    wide = torch.randn(500, 2 * 768, device="cuda", generator=gen).to(dtype)
    cases = {  # name: (x, strategies besides auto that apply)
        "row slice (row stride 1536)": (
            wide[:, 768:],
            (SINGLE, GENERAL, *FEW, *one_tree_strategies(dtype, 1, 7)),
        ),
        "column stride 2 (copied first)": (wide[:, ::2], (SINGLE, GENERAL)),
        "transposed (copied first)": (torch.randn(768, 500, device="cuda", generator=gen).to(dtype).t(), (SINGLE, GENERAL)),
        "rows not 16-byte aligned": (wide[:, 1:769], (GENERAL,)),  # auto picks the general path here
    }
    for name, (x, strategies) in cases.items():
        assert not x.is_contiguous(), name
        for strategy in (0, *strategies):
            check_forward(x, w_in, b_in, w_out, 7, *ext.fff_forward(x, w_in, b_in, w_out, 7, strategy=strategy))
    # the public function over a 3-D non-contiguous view, through the op and the registry
    x3 = torch.randn(4, 768, 50, device="cuda", generator=gen).to(dtype).transpose(1, 2)
    y3, leaves3 = hf_fff.fast_feedforward(x3, w_in, b_in, w_out, 7)
    assert y3.shape == (4, 50, 768) and leaves3.shape == (4, 50, 1)
    check_forward(x3.reshape(-1, 768), w_in, b_in, w_out, 7, y3.reshape(-1, 768), leaves3.reshape(-1, 1))


@needs_cuda
def test_rejects_bad_arguments(ext):
    x, w_in, b_in, w_out = make_problem(4, 64, 3, 1, torch.float32, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.fff_forward(x.double(), w_in.double(), b_in.double(), w_out.double(), 3)
    with pytest.raises(RuntimeError, match="weight_in"):
        ext.fff_forward(x, w_in, b_in, w_out, 4)
    with pytest.raises(RuntimeError, match="CUDA"):
        ext.fff_forward(x.cpu(), w_in, b_in, w_out, 3)
    with pytest.raises(RuntimeError, match="share one dtype"):
        ext.fff_forward(x.half(), w_in, b_in, w_out, 3)
    two = make_problem(4, 64, 3, 2, torch.float32, None)
    with pytest.raises(RuntimeError, match="one tree"):
        ext.fff_forward(*two, 3, strategy=STAGED)
    with pytest.raises(RuntimeError, match="one tree"):
        ext.fff_forward(*two, 3, strategy=SORTED)
    with pytest.raises(RuntimeError, match="float32"):
        ext.fff_forward(*(t.bfloat16() for t in (x, w_in, b_in, w_out)), 3, strategy=SORTED)
    with pytest.raises(RuntimeError, match="unknown strategy"):
        ext.fff_forward(x, w_in, b_in, w_out, 3, strategy=max(STRATEGY.values()) + 1)
    with pytest.raises(RuntimeError, match="hidden"):
        odd = make_problem(4, 63, 3, 1, torch.float32, None)
        ext.fff_forward(*odd, 3, strategy=SINGLE)


@needs_cuda
def test_float64_goes_to_the_torch_path():
    gen = torch.Generator(device="cuda").manual_seed(3)
    args = make_problem(20, 48, 3, 2, torch.float64, gen)
    with hf_fff.use_backend("cuda"):
        y, leaves = hf_fff.fast_feedforward(*args, 3)
    y_ref, leaves_ref = reference.fff_forward(*args, 3)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(leaves, leaves_ref)


# ------------------------------------------------------------------------------------------------------
# 64-bit indexing: more than 2^31 elements in x and y


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if HAS_CUDA else 0


@needs_cuda
@pytest.mark.skipif(_free_gpu_bytes() < 24 * 2**30, reason="needs 24 GiB of free GPU memory")
def test_past_2_pow_31_elements(ext):
    hidden = 768
    tokens = 2**31 // hidden + 4097  # x and y each hold more than 2^31 elements (4.3 GB at bf16)
    gen = torch.Generator(device="cuda").manual_seed(31)
    _, w_in, b_in, w_out = make_problem(1, hidden, 11, 1, torch.bfloat16, gen)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen, dtype=torch.bfloat16)
    # the tokens checked: the very last ones (offsets past 2^31) and a random sample
    check = torch.cat([torch.arange(tokens - 3000, tokens, device="cuda"), torch.randint(0, tokens, (3000,), device="cuda", generator=gen)])
    for strategy in (0, SINGLE, GENERAL, STAGED, *FEW):  # bf16: sorted takes float32 only
        y, leaves = run_poisoned(ext, x, w_in, b_in, w_out, 11, strategy=strategy)
        assert not torch.isnan(y[-4096:]).any()
        check_forward(x[check], w_in, b_in, w_out, 11, y[check], leaves[check])
        del y, leaves
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------
# the op, the module, torch.compile, CUDA graphs


def make_layer(dtype, depth=11, trees=1, hidden=768):
    torch.manual_seed(0)
    layer = hf_fff.FastFeedForward(hidden, depth, trees).to(device="cuda", dtype=dtype)
    with torch.no_grad():  # logits of order 1, as in a trained model
        layer.weight_in.normal_(0, hidden**-0.5)
        layer.weight_out.normal_(0, hidden**-0.5)
        layer.bias_in.normal_(0, 0.1)
    return layer


@needs_cuda
def test_module_dispatches_cuda_tensors_to_the_kernel(ext):
    assert backends.resolve("cuda")[0] == "cuda"
    layer = make_layer(torch.bfloat16)
    x = torch.randn(2, 128, 768, device="cuda", dtype=torch.bfloat16)
    y, leaves = layer(x, return_leaves=True)
    y_kernel, leaves_kernel = ext.fff_forward(x.view(-1, 768), layer.weight_in, layer.bias_in, layer.weight_out, 11)
    assert torch.equal(y.view(-1, 768), y_kernel) and torch.equal(leaves.view(-1, 1), leaves_kernel)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_compile_fullgraph(dtype):
    torch._dynamo.reset()
    layer = make_layer(dtype)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    for tokens in (1, 300, 5000):
        x = torch.randn(tokens, 768, device="cuda", dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@needs_cuda
def test_torch_compile_dynamic_and_reduce_overhead():
    torch._dynamo.reset()
    layer = make_layer(torch.bfloat16)
    dynamic = torch.compile(layer, fullgraph=True, dynamic=True)
    graphed = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for tokens in (7, 4096, 6000):
            x = torch.randn(2, tokens, 768, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(dynamic(x), layer(x), rtol=0, atol=0)
        x = torch.randn(4, 128, 768, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):  # record, then replay
            torch.testing.assert_close(graphed(x).clone(), layer(x), rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("tokens", [1001, 20000])
def test_sorted_without_cooperative_launch(ext, tokens, monkeypatch):
    """The sorted strategy's counting sort as separate launches (memset, routing kernel, scatter kernel), taken where a
    cooperative launch of one block per SM is refused (MPS, green contexts): the same outputs as the fused sort."""
    gen = torch.Generator(device="cuda").manual_seed(77 + tokens)
    x, w_in, b_in, w_out = make_problem(tokens, 768, 11, 1, torch.float32, gen)
    y_fused, leaves_fused = run_poisoned(ext, x, w_in, b_in, w_out, 11, strategy=SORTED)
    monkeypatch.setenv("HF_FFF_CUDA_NO_COOPERATIVE", "1")
    y, leaves = run_poisoned(ext, x, w_in, b_in, w_out, 11, strategy=SORTED)
    assert torch.equal(y, y_fused) and torch.equal(leaves, leaves_fused)
    check_forward(x, w_in, b_in, w_out, 11, y, leaves)


@needs_cuda
@pytest.mark.parametrize("tokens", [3, 20000])  # a cluster launch; sorted (a cooperative launch + the finishing kernel)
def test_cuda_graph_capture(tokens):
    layer = make_layer(torch.float32)
    static_x = torch.randn(tokens, 768, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = layer(static_x)
    for _ in range(3):
        x = torch.randn(tokens, 768, device="cuda")
        static_x.copy_(x)
        graph.replay()
        with torch.no_grad():
            torch.testing.assert_close(static_y, layer(x), rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    gen = torch.Generator(device="cuda").manual_seed(8)
    x, w_in, b_in, w_out = make_problem(40, 64, 5, 2, dtype, gen)
    for t in (x, w_in, b_in, w_out):
        t.requires_grad_(dtype == torch.float32)
    torch.library.opcheck(torch.ops.hf_fff.fff_forward.default, (x, w_in, b_in, w_out, 5))


@needs_cuda
def test_gradients_match_reference_backend():
    """Gradients through the cuda backend (its fused backward by default) equal the reference backend's."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    args = make_problem(64, 96, 6, 2, torch.float32, gen)
    grads = {}
    for name in ("cuda", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in args]
        with hf_fff.use_backend(name):
            y, _ = hf_fff.fast_feedforward(*leaves, 6)
        (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["cuda"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_whole_model_on_gpu(ext, monkeypatch, dtype):
    """The encoder in bf16 / fp16 runs every FFF layer through the kernel, eager and under torch.compile.

    Outputs are compared with the torch reference backend token by token: the two differ by rounding
    (and, rarely, by a routing near-tie that then propagates), so nearly every token must agree closely.
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = hf_fff.UltraFastBertConfig(num_hidden_layers=2, vocab_size=1000)
    model = hf_fff.UltraFastBertModel(config).to(device="cuda", dtype=dtype).eval()
    ids = torch.randint(5, 1000, (8, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    backends.resolve("cuda")
    native = backends._NATIVE["cuda"]
    calls = []
    kernels = native._kernels

    def counting(*args):
        calls.append(args[0].shape)
        return kernels.forward(*args)

    monkeypatch.setattr(native, "_kernels", dataclasses.replace(kernels, forward=counting))

    def agree(a, b):  # fraction of tokens whose hidden state agrees to 0.1 everywhere
        return ((a.float() - b.float()).abs().amax(-1) <= 0.1).float().mean().item()

    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert len(calls) == config.num_hidden_layers and calls[0] == (8 * 128, 768)
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask).last_hidden_state
        assert len(calls) > config.num_hidden_layers, "the compiled model did not call the kernel"
        with hf_fff.use_backend("reference"):
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(eager).all() and torch.isfinite(compiled).all()
    assert agree(eager, ref) >= 0.98 and agree(compiled, eager) >= 0.98


# ------------------------------------------------------------------------------------------------------
# loading: no build on import or for CPU tensors; a failed build warns once and falls back to torch


@pytest.mark.slow  # builds or runs a fresh process: more than ~5 s
def test_import_builds_nothing():
    """Importing hf_fff and running CPU tensors never loads (or builds) the CUDA extension."""
    script = textwrap.dedent(
        """
        import torch, hf_fff
        from hf_fff import backends
        y, _ = hf_fff.fast_feedforward(torch.randn(3, 8), torch.randn(7, 8), torch.randn(7), torch.randn(7, 8), 2)
        print("cuda" in backends.available_backends(), backends._NATIVE["cuda"]._tried)
        """
    )
    env = dict(os.environ, HF_FFF_BACKEND="reference", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"], result.stdout + result.stderr


def test_strategy_environment(monkeypatch):
    """HF_FFF_CUDA_STRATEGY takes auto and every name of cuda/strategies.h (any case, spaces trimmed), with
    HF_FFF_CUDA_SPLIT beside it; anything else is a clear error naming the choices."""
    monkeypatch.setenv(cuda_backend.SPLIT_ENV, "5")
    monkeypatch.setenv(cuda_backend.STRATEGY_ENV, "sorted")
    assert cuda_backend.forced_strategy() == (SORTED, 5)
    monkeypatch.delenv(cuda_backend.SPLIT_ENV)
    for name, value in STRATEGY.items():
        monkeypatch.setenv(cuda_backend.STRATEGY_ENV, f" {name.title()} ")
        assert cuda_backend.forced_strategy() == (value, 0)
    for removed in ("bucketed", "tensor_core", "sorted_pipelined", "fastest"):
        monkeypatch.setenv(cuda_backend.STRATEGY_ENV, removed)
        with pytest.raises(ValueError, match="HF_FFF_CUDA_STRATEGY"):
            cuda_backend.forced_strategy()


@needs_cuda
def test_failed_build_warns_once_and_falls_back(tmp_path):
    script = textwrap.dedent(
        """
        import warnings
        import torch
        import hf_fff
        from hf_fff import backends
        from hf_fff.backends import reference
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            x = torch.randn(50, 64, device="cuda")
            w_in, w_out = torch.randn(15, 64, device="cuda"), torch.randn(15, 64, device="cuda")
            b_in = torch.randn(15, device="cuda")
            for _ in range(3):
                y, leaves = hf_fff.fast_feedforward(x, w_in, b_in, w_out, 3)
            name = backends.resolve("cuda")[0]
        y_ref, leaves_ref = reference.fff_forward(x, w_in, b_in, w_out, 3)
        ours = [w for w in caught if "fff_cuda" in str(w.message)]
        print("backend", name, "warnings", len(ours), "equal", bool(torch.equal(y, y_ref) and torch.equal(leaves, leaves_ref)))
        print(ours[0].message if ours else "")
        """
    )
    env = dict(os.environ, HF_FFF_FORCE_BUILD_FAILURE="1", HF_FFF_CACHE=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == "backend reference warnings 1 equal True", result.stdout + result.stderr
    assert "plain torch" in result.stdout


@needs_cuda
def test_binding_exposes_the_table(ext):
    """The compiled module's STRATEGIES (generated from cuda/strategies.h) is what the Python side parsed."""
    assert dict(ext.STRATEGIES) == STRATEGY
