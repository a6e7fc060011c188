// The one table of CUDA strategies. Every strategy computes the same function; they differ in speed only.
//
// Read by: the enum Strategy (fff_cuda.h), the planning and launch dispatch (dispatch.cuh), the binding's STRATEGIES
// attribute (fff_cuda.cpp), hf_fff/backends/cuda.py (which parses this file, so that the names are known without a
// build), the tests and the table in docs/cuda_design.md (tests/test_cuda_build.py checks that they agree).
//
// A row: X(enumerator, name, id, "purpose"). `name` is what HF_FFF_CUDA_STRATEGY takes; `id` what fff_forward's
// `strategy` argument takes (0 is auto: choose_strategy in dispatch.cuh). Adding a strategy: a row here and its kernel
// file, which specialises StrategyImpl<enumerator> (plan, bind, launch; see walk.cuh) and is included by dispatch.cuh.
// Keep each row on one line: the Python side reads the rows with a regular expression.
#pragma once

#define HF_FFF_STRATEGIES(X) \
  X(kSingle, single, 1, "one warp per token walks every level of every tree; the default between the few-token and many-token strategies") \
  X(kGeneral, general, 2, "any width, row stride or alignment: scalar loads, nothing held in registers") \
  X(kSubtree, subtree, 3, "few tokens: a block per token computes 5 levels of logits at once, then routes through them in shared memory") \
  X(kCluster, cluster, 4, "few tokens, Hopper: a cluster of 8 blocks per token computes 6 levels of logits per round over distributed shared memory") \
  X(kStaged, staged, 5, "one tree, many tokens: the one-warp walk with the top levels' rows in shared memory and two tokens per warp") \
  X(kSorted, sorted, 6, "fp32, one tree, many tokens: route the top levels, sort tokens by bucket, finish each bucket from shared memory")
