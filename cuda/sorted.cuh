// The sorted strategy (fp32, many tokens of one tree): tokens that reach the same node at level `split` (a bucket)
// share every row below it, so after routing the top levels and sorting tokens by bucket, a block finishes a bucket's
// tokens with the bucket's rows held in its shared memory, and the deep rows' L2 traffic of the one-warp walk is gone.
//   step 1  route_top_shared_kernel: route the top `split` levels (the top rows in shared memory), record each token's
//           bucket, rank and top GELU values; the counting sort runs in the same kernel behind two grid barriers (a
//           cooperative launch), or, where such a launch is refused, in a memset before and scatter_ranked_kernel after
//   step 2  the finishing kernel, one block per SM over a contiguous run of the sorted tokens: two tokens of a bucket
//           per warp (widths <= 768, depth <= 15), pipelined on Hopper (two buckets' rows in turn, refilled by tensor
//           copies while the warps work) or staged behind barriers elsewhere; one token per warp otherwise
// Same arithmetic and summation order per token as single: the same bits.
#pragma once

#include <cooperative_groups.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>

#include "launch.cuh"

namespace hf_fff_cuda {
namespace {

constexpr int kMaxSplit = 10;                 // the bucket histogram lives in shared memory (2^10 ints)
constexpr int kMaxRankedBlocksPerSm = 1;      // step-1 blocks per SM: block_base has num_sms rows

// ---------------------------------------------------------------------------------------------------
// The counting sort's pieces: scans of the bucket counts, and a block's run of sorted positions bucket by bucket.
// Exclusive prefix sums of counts[0, n) into offsets[0, n) by one warp (every lane calls it; n <= 1024):
// each lane sums a run of n / 32 counts, a warp scan offsets the runs. Returns this lane's inclusive sum,
// so lane 31 holds the total.
__device__ __forceinline__ int warp_exclusive_scan(const int* counts, int n, int* offsets, int lane) {
  const int per_lane = (n + 31) / 32;
  const int begin = min(lane * per_lane, n), end = min(begin + per_lane, n);
  int total = 0;
  for (int i = begin; i < end; ++i) total += counts[i];
  int inclusive = total;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int other = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  int running = inclusive - total;
  for (int i = begin; i < end; ++i) {
    offsets[i] = running;
    running += counts[i];
  }
  return inclusive;
}

// The bucket holding sorted position pos: the last b with offsets[b] <= pos (offsets ascending, n_buckets long).
__device__ __forceinline__ int bucket_at(const int* offsets, int n_buckets, int64_t pos) {
  int b = 0;
  for (int lo = 0, hi = n_buckets - 1; lo <= hi;) {
    const int mid = (lo + hi) >> 1;
    if (offsets[mid] <= pos) b = mid, lo = mid + 1;
    else hi = mid - 1;
  }
  return b;
}

// Bucket offsets (exclusive scan of the counts, and the total at [n_buckets]) into shared memory, by warp 0.
__device__ __forceinline__ void bucket_offsets(const Params& p, int n_buckets, int* offs) {
  if (threadIdx.x < 32) {
    const int total = warp_exclusive_scan(p.counts, n_buckets, offs, threadIdx.x);
    if (threadIdx.x == 31) offs[n_buckets] = total;
  }
}

// This block's run of positions: [begin, end), `run` positions per block.
struct Run {
  int64_t begin, end;
};
__device__ __forceinline__ Run block_run(const Params& p, int64_t run) {
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * run;
  return {begin, begin + run < p.tokens ? begin + run : p.tokens};
}

// A block's buckets, in order: positions [pos, end) of its run in bucket b (empty buckets skipped).
struct Segment {
  int b;
  int64_t pos, end;
};
// Past the run's end (pos >= r.end) a segment is empty, {b, r.end, r.end}, and stays so: offs is not read past it.
__device__ __forceinline__ Segment settle(const int* offs, const Run& r, int b, int64_t pos) {
  if (pos >= r.end) return {b, r.end, r.end};
  while (offs[b + 1] <= pos) ++b;  // ends at b < n_buckets: offs[n_buckets] = total >= r.end > pos
  return {b, pos, min(r.end, static_cast<int64_t>(offs[b + 1]))};
}
__device__ __forceinline__ Segment first_segment(const int* offs, int n_buckets, const Run& r) {
  return settle(offs, r, bucket_at(offs, n_buckets, r.begin), r.begin);
}
__device__ __forceinline__ Segment next_segment(const int* offs, const Run& r, const Segment& s) {
  return settle(offs, r, s.b + 1, s.end);
}

// The sort's scatter where step 1 could not be launched cooperatively: step 1 ranked each token within its bucket
// among its block's tokens, so order[offset[bucket] + block_base[block][bucket] + rank] = token, no atomics. Token m
// was routed by block (m / per) % blocks.
__global__ void __launch_bounds__(kThreads) scatter_ranked_kernel(const Params p, int64_t per, int64_t blocks) {
  extern __shared__ int offset[];
  const int n_buckets = 1 << p.split;
  if (threadIdx.x < 32) warp_exclusive_scan(p.counts, n_buckets, offset, threadIdx.x & 31);
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; m < p.tokens; m += stride) {
    const int b = p.bucket[m];
    p.order[offset[b] + p.block_base[(m / per) % blocks * n_buckets + b] + p.rank[m]] = static_cast<int>(m);
  }
}

// ---------------------------------------------------------------------------------------------------
// Step 1, with the top levels' rows in shared memory: one block of 1024 threads per SM stages the
// w_in rows and biases of levels [0, top) once (2^top - 1 rows, up to ~190 KB), then its warps route
// tokens through them; levels [top, split) still read rows through L1/L2. At fp32 the top 7 levels are
// 381 KB of rows that do not stay in L1, so step 1 was bound by L2 reads (21 KB per token).
template <typename T, int NV>
struct RouteSharedThreads {  // 64 registers per thread at 1024 threads: enough for x of 24 floats per lane
  static constexpr int value = NV * Elem<T>::kVec <= 24 ? 1024 : 512;
};
constexpr int64_t kRouteSharedBudget = 200 * 1024;  // below the 227 KB a block may have on H100

__host__ __device__ inline int64_t route_shared_bytes(int top, int split, int64_t hidden, int64_t element_size) {
  const int64_t rows = (int64_t{1} << top) - 1;
  return rows * hidden * element_size + 4 * rows + 2 * 4 * (int64_t{1} << split);  // rows, biases, hist, offsets
}

// kFusedSort (launched cooperatively, one block per SM): the counting sort's steps run in the same kernel behind two
// grid-wide barriers instead of a memset before and a scatter kernel after: block 0 zeroes the counts while the rows
// stage; after the first barrier every block adds its histogram to them (its first rank per bucket, kept in shared
// memory); after the second it scatters its own tokens. The barriers cost about what the two launches did, so the
// gain is small (H200, fp32 32768 tokens: -1.3 to -1.6 us).
template <typename T, int NV, bool kFull, bool kFusedSort>
__global__ void __launch_bounds__(RouteSharedThreads<T, NV>::value, 1) route_top_shared_kernel(const Params p, int top) {
  constexpr int V = Elem<T>::kVec;
  constexpr int kRouteSharedThreads = RouteSharedThreads<T, NV>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split;
  const int rows = (1 << top) - 1;
  const int n_buckets = 1 << split;
  T* rows_s = reinterpret_cast<T*>(smem);
  float* bias_s = reinterpret_cast<float*>(rows_s + static_cast<int64_t>(rows) * hidden);
  int* hist = reinterpret_cast<int*>(bias_s + rows);
  HF_FFF_TENSORS(T, p);
  const int tid = threadIdx.x, lane = tid & 31;
  const int nvec = row_vectors<T, NV, kFull>(hidden);
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  for (int i = tid; i < rows * nvec16; i += kRouteSharedThreads)  // the top rows are contiguous in w_in
    cp_async16(reinterpret_cast<uint4*>(rows_s) + i, reinterpret_cast<const uint4*>(w_in) + i, true);
  cp_async_commit();
  for (int i = tid; i < rows; i += kRouteSharedThreads) bias_s[i] = Elem<T>::load(b_in + i);
  for (int i = tid; i < n_buckets; i += kRouteSharedThreads) hist[i] = 0;
  if (kFusedSort && blockIdx.x == 0)
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads) p.counts[i] = 0;  // read after the first grid barrier
  cp_async_wait<0>();
  __syncthreads();
  // Each block routes one contiguous run of ceil(tokens / blocks) tokens, its warps taking every kW-th: the SMs get
  // equal shares (with warps striding over the whole grid, 100 of 132 blocks routed 256 tokens and 32 routed 224 at
  // 32768 tokens: -1.0 us measured on an H200).
  constexpr int kW = kRouteSharedThreads / 32;
  const int64_t per_block = (p.tokens + gridDim.x - 1) / gridDim.x;
  const int64_t run_begin = static_cast<int64_t>(blockIdx.x) * per_block;
  const int64_t run_end = run_begin + per_block < p.tokens ? run_begin + per_block : p.tokens;
  for (int64_t m = run_begin + (tid >> 5); m < run_end; m += kW) {
    float xf[NV][V];
    load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
    pin_x(xf);
    int n = 0, my_node = 0;
    float my_logit = 0.f;
    // The top levels: walk_levels' arithmetic with rows and biases from shared memory. (The finishing kernel's walk
    // is the same loop; as one shared function the compiler ordered a comparison's operands differently in 30 of
    // the kernels, so both stay written out and the machine code stays the measured one.)
    for (int level = 0; level < top; ++level) {
      Row<T, NV> r;
      load_row<T, NV, From::kShared>(r, rows_s + static_cast<int64_t>(n) * hidden, lane, nvec);
      const float logit = warp_sum(partial_dot<T, NV>(xf, r)) + bias_s[n];
      if (lane == level) {
        my_node = n;
        my_logit = logit;
      }
      if (level < p.depth) n = 2 * n + 1 + (logit > 0.f ? 1 : 0);
    }
    n = route<T, NV>(xf, w_in, b_in, nvec, lane, top, split, p.depth, n, my_node, my_logit);
    if (lane < split) p.g_top[m * split + lane] = gelu(my_logit);
    if (lane == 0) {
      const int b = n - (n_buckets - 1);
      p.bucket[m] = b;
      p.rank[m] = atomicAdd(&hist[b], 1);  // rank among this block's tokens of the bucket
    }
  }
  if constexpr (kFusedSort) {
    namespace cg = cooperative_groups;
    cg::grid_group grid = cg::this_grid();
    grid.sync();  // the counts are zero and every block's histogram complete
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads)  // hist becomes this block's first rank in each bucket
      hist[i] = hist[i] != 0 ? atomicAdd(&p.counts[i], hist[i]) : 0;
    grid.sync();  // the counts are final
    int* const offset = hist + n_buckets;
    if (tid < 32) warp_exclusive_scan(p.counts, n_buckets, offset, lane);
    __syncthreads();
    for (int64_t m = run_begin + tid; m < run_end; m += kRouteSharedThreads) {  // this block's tokens
      const int b = p.bucket[m];
      p.order[offset[b] + hist[b] + p.rank[m]] = static_cast<int>(m);
    }
  } else {
    __syncthreads();
    for (int i = tid; i < n_buckets; i += kRouteSharedThreads)  // this block's first rank in each bucket
      p.block_base[static_cast<int64_t>(blockIdx.x) * n_buckets + i] = hist[i] != 0 ? atomicAdd(&p.counts[i], hist[i]) : 0;
  }
}

// ---------------------------------------------------------------------------------------------------
// The one-token finishing kernel (fp32 rows wider than 768, or trees deeper than 16 levels): the bucket's rows live
// in shared memory. Every token of bucket b went through the same `split` nodes above it and goes on inside the
// subtree below b, so a block that finishes a run of b's tokens needs only
//   w_in and b_in of the subtree (sub = 2^(depth - split + 1) - 1 rows), and
//   w_out of the subtree and of the split ancestors,
// 212 KB at fp32, width 768, depth 11, split 7. One block per SM stages them once per bucket with cp.async, then its
// warps walk tokens with every row read from shared memory: x is the only global read per token (prefetched one
// token ahead where registers allow) and y the only write. Blocks take contiguous runs of the sorted order (one or
// two buckets each under uniform routing).
template <typename T, int NV>
struct SortedThreads {  // 85 registers per thread while x is at most 24 floats per lane, else 128
  static constexpr int value = NV * Elem<T>::kVec <= 24 ? 768 : 512;
};
// Loading the next token's x while the current one is computed costs 4 NV registers; wide rows need them.
template <int NV>
struct SortedPrefetch {
  static constexpr bool value = NV <= 4;
};

__host__ __device__ inline int64_t sorted_subtree_rows(int depth, int split) { return (int64_t{2} << (depth - split)) - 1; }

// Copy bucket `root`'s rows into shared memory with the whole block: rows_in holds the subtree's w_in rows (sub,
// heap order below the bucket node), then its w_out rows (sub), then the w_out rows of the split ancestors (level
// order); bias_s the subtree's biases. The caller puts a barrier before (the previous rows are no longer read) and
// after.
template <typename T>
__device__ __forceinline__ void stage_bucket_rows(T* rows_in, float* bias_s, const T* __restrict__ w_in,
                                                  const T* __restrict__ b_in, const T* __restrict__ w_out, int root,
                                                  int sub, int split, int hidden) {
  const int nvec16 = static_cast<int>(hidden * sizeof(T) / 16);
  const int staged = 2 * sub + split;
  for (int i = threadIdx.x; i < staged * nvec16; i += blockDim.x) {
    const int r = i / nvec16, c = i - r * nvec16;
    const T* src;
    if (r < sub) src = w_in + static_cast<int64_t>(subtree_node(root, r)) * hidden;
    else if (r < 2 * sub) src = w_out + static_cast<int64_t>(subtree_node(root, r - sub)) * hidden;
    else src = w_out + static_cast<int64_t>(((root + 1) >> (split - (r - 2 * sub))) - 1) * hidden;  // ancestor
    cp_async16(reinterpret_cast<uint4*>(rows_in) + i, reinterpret_cast<const uint4*>(src) + c, true);
  }
  cp_async_commit();
  for (int i = threadIdx.x; i < sub; i += blockDim.x) bias_s[i] = Elem<T>::load(b_in + subtree_node(root, i));
  cp_async_wait<0>();
}

// A finishing block's shared memory: the bucket's rows in stage_bucket_rows' layout, the subtree's biases and the
// n_buckets + 1 bucket offsets (exclusive prefix sums of the counts; sorted_smem_bytes below).
template <typename T>
struct SortedSmem {
  T* rows_in;   // sub subtree w_in rows
  T* rows_out;  // sub subtree w_out rows, then the split ancestors'
  float* bias;  // sub
  int* offs;    // n_buckets + 1
  __device__ SortedSmem(unsigned char* smem, int sub, int split, int hidden)
      : rows_in(reinterpret_cast<T*>(smem)),
        rows_out(rows_in + static_cast<int64_t>(sub) * hidden),
        bias(reinterpret_cast<float*>(rows_out + static_cast<int64_t>(sub + split) * hidden)),
        offs(reinterpret_cast<int*>(bias + sub)) {}
};

// Go through this block's run of the sorted tokens bucket by bucket: stage the bucket's rows (behind a barrier,
// since the previous bucket's are no longer read, and before one), then finish(pos, seg_end, root) for the run's
// positions [pos, seg_end) in that bucket, whose node is `root`. s.offs must be filled.
template <typename T, typename Finish>
__device__ __forceinline__ void for_each_staged_bucket(const Params& p, const Run& r, const SortedSmem<T>& s, int sub,
                                                       Finish finish) {
  const int n_buckets = 1 << p.split;
  for (Segment seg = first_segment(s.offs, n_buckets, r); seg.pos < r.end; seg = next_segment(s.offs, r, seg)) {
    const int root = n_buckets - 1 + seg.b;  // heap index of the bucket node
    __syncthreads();
    stage_bucket_rows<T>(s.rows_in, s.bias, static_cast<const T*>(p.w_in), static_cast<const T*>(p.b_in),
                         static_cast<const T*>(p.w_out), root, sub, p.split, p.hidden);
    __syncthreads();
    finish(seg.pos, seg.end, root);
  }
}

template <typename T, int NV>
__global__ void __launch_bounds__(SortedThreads<T, NV>::value, 1) sorted_finish_kernel(const Params p, int64_t chunk) {
  constexpr int V = Elem<T>::kVec;
  constexpr int kThr = SortedThreads<T, NV>::value, kW = kThr / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int hidden = p.hidden, split = p.split, depth = p.depth;
  const int sub = static_cast<int>(sorted_subtree_rows(depth, split));
  const int n_buckets = 1 << split;
  const SortedSmem<T> s(smem, sub, split, hidden);
  const T* rows_in = s.rows_in;
  const T* rows_out = s.rows_out;
  const float* bias_s = s.bias;
  HF_FFF_TENSORS(T, p);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nvec = hidden / V;
  const int64_t first_leaf = (int64_t{1} << depth) - 1;

  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, n_buckets, s.offs);
  __syncthreads();
  for_each_staged_bucket(p, r, s, sub, [&](int64_t pos, int64_t seg_end, int root) {
    constexpr bool kPrefetch = SortedPrefetch<NV>::value;
    int64_t q = pos + warp;
    uint4 x_next[kPrefetch ? NV : 1];
    if constexpr (kPrefetch) {
      if (q < seg_end) load_x_raw<T, NV>(x_next, x + static_cast<int64_t>(p.order[q]) * p.ldx, lane, nvec);
    }
    for (; q < seg_end; q += kW) {
      const int64_t m = p.order[q];
      float xf[NV][V];
      if constexpr (kPrefetch) {
#pragma unroll
        for (int c = 0; c < NV; ++c) Elem<T>::unpack(x_next[c], xf[c]);
        if (q + kW < seg_end) load_x_raw<T, NV>(x_next, x + static_cast<int64_t>(p.order[q + kW]) * p.ldx, lane, nvec);
      } else {
        load_x<T, NV>(xf, x + m * p.ldx, lane, nvec);
      }
      pin_x(xf);
      // lane l keeps level l's row slot in rows_out and its GELU value; the top levels come from step 1
      int my_slot = 0;
      float my_g = 0.f, my_logit = 0.f;
      if (lane < split) {
        my_slot = sub + lane;
        my_g = p.g_top[m * split + lane];
      }
      int j = 0;
      for (int level = split; level <= depth; ++level) {  // as step 1's top levels (route_top_shared_kernel)
        Row<T, NV> row;
        load_row<T, NV, From::kShared>(row, rows_in + static_cast<int64_t>(j) * hidden, lane, nvec);
        const float logit = warp_sum(partial_dot<T, NV>(xf, row)) + bias_s[j];
        if (lane == level) {
          my_slot = j;
          my_logit = logit;
        }
        if (level < depth) j = 2 * j + 1 + (logit > 0.f ? 1 : 0);
      }
      if (lane >= split) my_g = gelu(my_logit);
      float yf[NV][V];
      zero(yf);
      for (int level = 0; level <= depth; ++level) {
        const int slot = __shfl_sync(kFullMask, my_slot, level);
        const float g = __shfl_sync(kFullMask, my_g, level);
        Row<T, NV> row;
        load_row<T, NV, From::kShared>(row, rows_out + static_cast<int64_t>(slot) * hidden, lane, nvec);
        axpy_row<T, NV>(yf, g, row);
      }
      store_y<T, NV>(y + m * hidden, yf, lane, nvec);
      if (lane == 0) p.leaves[m] = subtree_node(root, j) - first_leaf;
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The finishing step with two tokens of one bucket per warp (fp32, width <= 768). The one-token finishing
// kernel is latency-bound at fp32 (Nsight Compute, H200, split 8, 32768 tokens: 0.47 warp instructions issued per
// scheduler cycle with 0.8 of 3.9 warps eligible, DRAM at 53%) and reads 16 rows of shared memory per token (depth
// 11, split 8: 4 w_in rows of the subtree, 12 w_out rows). Two tokens of one bucket share every row above their first
// different branch: the split ancestors' w_out rows and the bucket node's rows always, a row one level down half
// the time, and so on, so a warp reads such a row once for both (the test is warp-uniform: both tokens' nodes are
// the same in every lane): about 20 rows per pair instead of 32. The pair's two chains also overlap their
// latencies (pair_sum: both warp sums in 6 shuffles). Measured on an H200: the
// finishing step 92.1 -> 82.8 us at split 8, fp32 32768 tokens 154.7 -> 145.7 us.
// Each warp takes the next two positions of the bucket's run; an odd run's last token pairs with itself.
// Arithmetic per token is the one-token kernel's (CUDA-core dot, warp_sum's bits, the same output order): the same bits.
template <typename T, int NV>
struct SortedPair {
  static constexpr bool value = std::is_same<T, float>::value && NV <= 6;
};
constexpr int kSortedPairThreads = 512;  // 128 registers: x or y of two tokens (48) and two rows in flight
constexpr int kPairMaxDepth = 15;        // levels 0..15 in lanes 0..15 (token a) and 16..31 (token b)

// x . row of both tokens (summed over the warp) for rows na and nb of a shared-memory copy: a coinciding row is read
// once.
template <typename T, int NV>
__device__ __forceinline__ void pair_dots(const float (&xa)[NV][Elem<T>::kVec], const float (&xb)[NV][Elem<T>::kVec],
                                          const uint4* w_lane, int na, int nb, int lane, int nvec, float& la,
                                          float& lb) {
  Row<T, NV> ra;
  load_lane_row<NV, From::kShared>(ra.v, lane_row(w_lane, na, nvec), lane, nvec);
  la = partial_dot<T, NV>(xa, ra);
  if (na == nb) {
    lb = partial_dot<T, NV>(xb, ra);
  } else {
    Row<T, NV> rb;
    load_lane_row<NV, From::kShared>(rb.v, lane_row(w_lane, nb, nvec), lane, nvec);
    lb = partial_dot<T, NV>(xb, rb);
  }
  pair_sum(la, lb, lane);
}

// Both rows' loads in flight together: an empty asm that takes every register of both (the compiler would otherwise
// load the second row into the first one's registers once they are consumed, one shared-memory wait per row).
template <int NV>
__device__ __forceinline__ void pin_rows(uint4 (&a)[NV], uint4 (&b)[NV]) {
#pragma unroll
  for (int c = 0; c < NV; ++c)
    asm volatile("" : "+r"(a[c].x), "+r"(a[c].y), "+r"(a[c].z), "+r"(a[c].w), "+r"(b[c].x), "+r"(b[c].y), "+r"(b[c].z),
                 "+r"(b[c].w));
}

// bias(a) in the pair walk: the bias of subtree node a (heap order below the bucket node), from the staged copy in
// shared memory (SharedBias), from registers (ShuffledBias) or from global memory (GlobalBias); the pipelined kernel
// uses the last two, its buffers holding rows only.
struct SharedBias {
  const float* s;
  __device__ __forceinline__ float operator()(int a) const { return s[a]; }
};
// ShuffledBias: lane j holds the bias of subtree node j (sub <= 32), loaded once per bucket; every lane must call it
// (warp-uniform a), as the pair walk does.
struct ShuffledBias {
  float mine;
  __device__ __forceinline__ float operator()(int a) const { return __shfl_sync(kFullMask, mine, a); }
};
template <typename T>
struct GlobalBias {
  const T* __restrict__ b_in;
  int root;
  __device__ __forceinline__ float operator()(int a) const { return Elem<T>::load(b_in + subtree_node(root, a)); }
};

// The finishing step for two tokens of one bucket per warp, the bucket's rows in shared memory: the subtree's w_in rows and
// biases, and the w_out rows of the subtree and of the split ancestors. x of both tokens is in registers already and
// g_a / g_b hold their top levels' GELU values in lanes < split.
// out_ready() is called between the walk and the output (the pipelined kernel waits there for the output rows).
template <typename T, int NV, typename Bias, typename OutReady>
__device__ __forceinline__ void finish_pair_staged(const Params& p, int64_t ma, int64_t mb,
                                                   const float (&xa)[NV][Elem<T>::kVec],
                                                   const float (&xb)[NV][Elem<T>::kVec], float g_a, float g_b,
                                                   const T* rows_in, const T* rows_out, int out_first, int top_slot,
                                                   const Bias& bias, int root, int lane, int nvec,
                                                   const OutReady& out_ready) {
  constexpr int V = Elem<T>::kVec;
  const int split = p.split, depth = p.depth;
  // lane l keeps level l's row slot in rows_out and its GELU value; the top levels come from step 1. Slots count rows
  // of rows_out: out_first is the subtree's first w_out row, top_slot this lane's split ancestor's (lanes < split).
  int slot_a = top_slot, slot_b = top_slot;
  float logit_a = 0.f, logit_b = 0.f;
  int ja = 0, jb = 0;
  const uint4* in_lane = reinterpret_cast<const uint4*>(rows_in) + lane;
  const auto logits = [&](int a, int b, float& la, float& lb) {
    pair_dots<T, NV>(xa, xb, in_lane, a, b, lane, nvec, la, lb);
    la += bias(a);
    lb += bias(b);
  };
  walk_pair_levels(logits, lane, split, depth + 1, depth, ja, jb, slot_a, logit_a, slot_b, logit_b);
  out_ready();
  float ya[NV][V], yb[NV][V];
  zero(ya);
  zero(yb);
  const uint4* out_lane = reinterpret_cast<const uint4*>(rows_out) + lane;
  // One GELU evaluation for both tokens: lane l < 16 takes token a's level l, lane 16 + l token b's (depth <= 15,
  // kPairMaxDepth: launch_sorted_finish sends deeper trees to the one-token kernel);
  // the top levels' values come from step 1 in lanes < split, moved the same way for token b.
  const bool upper = lane >= 16;
  const int level_of_lane = lane & 15;
  const float logit_b_up = __shfl_up_sync(kFullMask, logit_b, 16), g_b_up = __shfl_up_sync(kFullMask, g_b, 16);
  float g = gelu(upper ? logit_b_up : logit_a);
  if (level_of_lane < split) g = upper ? g_b_up : g_a;
  if (lane >= split) {
    slot_a += out_first;
    slot_b += out_first;
  }
  // The split ancestors' rows are the same for both tokens (one bucket): read once, no test. Two levels per step:
  // x is dead here, which leaves the registers for both rows' reads to be in flight together (the level order of
  // the sums is kept: same bits). Measured on an H200: fp32 32768 tokens 137.8 -> 137.0 us.
  int level0 = 0;
  for (; level0 + 2 <= split; level0 += 2) {
    const int s0 = __shfl_sync(kFullMask, slot_a, level0), s1 = __shfl_sync(kFullMask, slot_a, level0 + 1);
    const float ga0 = __shfl_sync(kFullMask, g, level0), gb0 = __shfl_sync(kFullMask, g, level0 + 16);
    const float ga1 = __shfl_sync(kFullMask, g, level0 + 1), gb1 = __shfl_sync(kFullMask, g, level0 + 17);
    Row<T, NV> r0, r1;
    load_lane_row<NV, From::kShared>(r0.v, lane_row(out_lane, s0, nvec), lane, nvec);
    load_lane_row<NV, From::kShared>(r1.v, lane_row(out_lane, s1, nvec), lane, nvec);
    pin_rows(r0.v, r1.v);  // both reads issued before the first use (else the compiler reuses r0's registers)
    axpy_row<T, NV>(ya, ga0, r0);
    axpy_row<T, NV>(yb, gb0, r0);
    axpy_row<T, NV>(ya, ga1, r1);
    axpy_row<T, NV>(yb, gb1, r1);
  }
  for (int level = level0; level < split; ++level) {
    const int sa = __shfl_sync(kFullMask, slot_a, level);
    const float ga = __shfl_sync(kFullMask, g, level), gb = __shfl_sync(kFullMask, g, level + 16);
    Row<T, NV> ra;
    load_lane_row<NV, From::kShared>(ra.v, lane_row(out_lane, sa, nvec), lane, nvec);
    axpy_row<T, NV>(ya, ga, ra);
    axpy_row<T, NV>(yb, gb, ra);
  }
  for (int level = split; level <= depth; ++level) {
    const int sa = __shfl_sync(kFullMask, slot_a, level), sb = __shfl_sync(kFullMask, slot_b, level);
    const float ga = __shfl_sync(kFullMask, g, level), gb = __shfl_sync(kFullMask, g, level + 16);
    Row<T, NV> ra;
    load_lane_row<NV, From::kShared>(ra.v, lane_row(out_lane, sa, nvec), lane, nvec);
    axpy_row<T, NV>(ya, ga, ra);
    if (sa == sb) {
      axpy_row<T, NV>(yb, gb, ra);
    } else {
      Row<T, NV> rb;
      load_lane_row<NV, From::kShared>(rb.v, lane_row(out_lane, sb, nvec), lane, nvec);
      axpy_row<T, NV>(yb, gb, rb);
    }
  }
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t first_leaf = (int64_t{1} << depth) - 1;
  store_y<T, NV>(y + ma * p.hidden, ya, lane, nvec);
  if (mb != ma) store_y<T, NV>(y + mb * p.hidden, yb, lane, nvec);
  if (lane == 0) {
    p.leaves[ma] = subtree_node(root, ja) - first_leaf;
    p.leaves[mb] = subtree_node(root, jb) - first_leaf;
  }
}

// No wait: the barrier-staged kernel's rows are in before its warps start a bucket.
struct RowsReady {
  __device__ __forceinline__ void operator()() const {}
};

// The pair at sorted positions q and q + 1 of a bucket segment ending at seg_end (an odd segment's last token pairs
// with itself): its tokens' x and top levels' GELU values, then finish_pair_staged. in_ready() is called once those
// loads are issued and before the first row is read, out_ready() before the first output row: the pipelined kernel
// waits there for the bucket's rows, so that the x loads are in flight while the rows still arrive.
template <typename T, int NV, typename Bias, typename InReady = RowsReady, typename OutReady = RowsReady>
__device__ __forceinline__ void finish_pair_at(const Params& p, int64_t q, int64_t seg_end, const T* rows_in,
                                               const T* rows_out, int out_first, int top_slot, const Bias& bias,
                                               int root, int lane, int nvec, const InReady& in_ready = {},
                                               const OutReady& out_ready = {}) {
  constexpr int V = Elem<T>::kVec;
  const int64_t ma = p.order[q], mb = q + 1 < seg_end ? p.order[q + 1] : ma;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  float xa[NV][V], xb[NV][V];
  load_x<T, NV>(xa, x + ma * p.ldx, lane, nvec);
  load_x<T, NV>(xb, x + mb * p.ldx, lane, nvec);
  pin_x(xa);
  pin_x(xb);
  const float ga = lane < p.split ? p.g_top[ma * p.split + lane] : 0.f;
  const float gb = lane < p.split ? p.g_top[mb * p.split + lane] : 0.f;
  in_ready();
  finish_pair_staged<T, NV>(p, ma, mb, xa, xb, ga, gb, rows_in, rows_out, out_first, top_slot, bias, root, lane, nvec,
                            out_ready);
}

// The finishing step with two tokens per warp, one bucket's rows at a time (sorted_finish_kernel's staging: the whole
// block waits at a barrier while they are copied), where the pipelined kernel below cannot run (before Hopper, or
// where two buckets' rows do not fit). Each warp takes the next two positions of the bucket's run. Every bucket is
// staged, small ones too: passing small buckets to a second pass through L1/L2 cost the fp32 loop registers and time
// (174 -> 186 us at 32768 tokens with it compiled in).
template <typename T, int NV, bool kFull>
__global__ void __launch_bounds__(kSortedPairThreads, 1) sorted_pair_finish_kernel(const Params p, int64_t chunk) {
  constexpr int kW = kSortedPairThreads / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int sub = static_cast<int>(sorted_subtree_rows(p.depth, p.split));
  const SortedSmem<T> s(smem, sub, p.split, p.hidden);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nvec = row_vectors<T, NV, kFull>(p.hidden);
  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, 1 << p.split, s.offs);
  __syncthreads();
  for_each_staged_bucket(p, r, s, sub, [&](int64_t pos, int64_t seg_end, int root) {
    for (int64_t q = pos + 2 * warp; q < seg_end; q += 2 * kW)
      finish_pair_at<T, NV>(p, q, seg_end, s.rows_in, s.rows_out, 0, sub + lane, SharedBias{s.bias}, root, lane, nvec);
  });
}

// ---------------------------------------------------------------------------------------------------
// The finishing step, pipelined (fp32, two tokens per warp; Hopper, where the layout below fits: fp32 width 768
// at split 8 takes 226 KB, and the rows can be copied by tensor copies; elsewhere the barrier-staged kernel above).
// That kernel idles every warp while a bucket's rows are copied (115 KB from L2 at fp32 split 8, ~2.9 times per block)
// and while the last pairs of a bucket finish: Nsight Compute put its barrier stall at 0.91 of ~8.7 cycles per
// instruction. Here two buffers take turns: while the warps finish bucket k from one, bucket k + 1's rows are already
// in the other, and the warp that finishes bucket k last refills its buffer with bucket k + 2's (one tensor copy per
// row, completing on the buffer's `full` and `full_out` mbarriers), so no warp waits on a copy unless it runs a whole
// bucket ahead. Warps take the pairs of a bucket dynamically (a shared counter), so the ones that finish early go on to
// the next bucket instead of idling, and a warp issues its pair's x loads before it waits for the rows (which matters
// at the start, where every block's first fill comes cold from memory). Same arithmetic per pair: same bits. Measured
// on an H200: fp32 32768 tokens 141.0 -> 138.2 us, then 136.4 ->
// 132.2 us for the waits after the x loads.
// Why tensor copies (cp.async.bulk.tensor with a tensor map), and nothing written to shared memory by the threads
// after the start (the biases come from registers, the counters only grow): compute-sanitizer racecheck does not take
// mbarrier phases as ordering, so it reports hazards for any shared-memory write that only an mbarrier orders against
// the reads, whether by plain stores, cp.async or raw bulk copies; tensor copies it reports clean (a probe of all
// five ways on an H200).
//
// Shared memory, in rows of `hidden` elements: row 0 the root's w_out row (every bucket's level-0 ancestor), then per
// buffer the subtree's w_in rows (sub), its w_out rows (sub) and the w_out rows of ancestor levels 1..split-1; then the
// bucket offsets, four pair counters (taken in turn by successive buckets) and per buffer a done counter, and per
// buffer the `full` (w_in rows), `empty` and `full_out` (w_out rows) mbarriers.
struct PipelinedLayout {
  int64_t buffer_rows, offs, counters, barriers, bytes;  // offsets in bytes (buffer_rows in rows)
};
__host__ __device__ inline PipelinedLayout pipelined_layout(int depth, int split, int64_t hidden, int64_t element_size) {
  const int64_t sub = (int64_t{2} << (depth - split)) - 1;
  PipelinedLayout l;
  l.buffer_rows = 2 * sub + split - 1;
  l.offs = (1 + 2 * l.buffer_rows) * hidden * element_size;
  l.counters = l.offs + 4 * ((int64_t{1} << split) + 1);
  l.barriers = (l.counters + 24 + 7) / 8 * 8;  // past taken[4] and done[2]: full[2], empty[2], full_out[2]
  l.bytes = l.barriers + 48;
  return l;
}


// Fill a buffer (`rows`) with bucket `root`'s rows, one tensor copy per row issued by the warp's lanes; root_row (the
// first fill only, else null): also copy the root's w_out row there. Two barriers, so that a warp can walk its pair
// while the output rows still arrive: bar_in completes when the subtree's w_in rows are in (what the walk reads),
// bar_out when the w_out rows are (the root's, the subtree's and the ancestors': what the output reads).
template <typename T>
__device__ __forceinline__ void fill_bucket_buffer(const Params& p, T* rows, uint64_t* bar_in, uint64_t* bar_out,
                                                   int root, int sub, T* root_row, int lane, const CUtensorMap* map_in,
                                                   const CUtensorMap* map_out) {
  const int split = p.split, hidden = p.hidden;
  const unsigned row_bytes = static_cast<unsigned>(hidden * sizeof(T));
  // copies c = 0.. of the list: the subtree's w_in rows, [the root's w_out row], its w_out rows, the ancestors'
  const int first = root_row != nullptr ? 1 : 0;
  const int n_out = first + sub + split - 1;
  if (lane == 0) {
    fence_proxy_async();
    mbarrier_expect(bar_in, row_bytes * static_cast<unsigned>(sub));
    mbarrier_expect(bar_out, row_bytes * static_cast<unsigned>(n_out));
  }
  __syncwarp();  // the expected bytes are set before any copy can complete
  for (int c = lane; c < sub + n_out; c += 32) {
    if (c < sub) {
      tensor_row_copy(rows + c * static_cast<int64_t>(hidden), map_in, subtree_node(root, c), bar_in);
      continue;
    }
    if (c < sub + first) {
      tensor_row_copy(root_row, map_out, 0, bar_out);
      continue;
    }
    const int r = c - first;
    T* const dst = rows + r * static_cast<int64_t>(hidden);
    if (r < 2 * sub) tensor_row_copy(dst, map_out, subtree_node(root, r - sub), bar_out);
    else tensor_row_copy(dst, map_out, ((root + 1) >> (split - (r - 2 * sub + 1))) - 1, bar_out);  // ancestor
  }
  __syncwarp();
  if (lane == 0) {
    mbarrier_arrive(bar_in);
    mbarrier_arrive(bar_out);
  }
}

template <typename T, int NV, bool kFull>
__global__ void __launch_bounds__(kSortedPairThreads, 1)
    sorted_pipelined_finish_kernel(const Params p, int64_t chunk, const __grid_constant__ CUtensorMap map_in,
                                   const __grid_constant__ CUtensorMap map_out) {
  constexpr int kW = kSortedPairThreads / 32;
  extern __shared__ __align__(128) unsigned char smem[];  // tensor copies land on 128-byte boundaries
  const int split = p.split, n_buckets = 1 << split, hidden = p.hidden;
  const int sub = static_cast<int>(sorted_subtree_rows(p.depth, split));
  const PipelinedLayout L = pipelined_layout(p.depth, split, hidden, sizeof(T));
  T* const rows = reinterpret_cast<T*>(smem);
  const auto buffer = [&](int s) { return rows + (1 + s * L.buffer_rows) * static_cast<int64_t>(hidden); };
  int* const offs = reinterpret_cast<int*>(smem + L.offs);
  int* const taken = reinterpret_cast<int*>(smem + L.counters);  // [4] pair tickets of bucket k, in taken[k % 4]
  int* const done = taken + 4;                                    // [2] done tickets, per buffer
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + L.barriers);  // [2] the buffer's w_in rows are in
  uint64_t* const empty = full + 2;                                       // [2] every warp is done with the buffer
  uint64_t* const full_out = empty + 2;                                   // [2] the buffer's w_out rows are in
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nvec = row_vectors<T, NV, kFull>(hidden);
  const T* __restrict__ b_in = static_cast<const T*>(p.b_in);
  const Run r = block_run(p, chunk);
  if (r.begin >= r.end) return;  // block-uniform
  bucket_offsets(p, n_buckets, offs);
  if (threadIdx.x == 0) {
    mbarrier_init(&full[0], 1);
    mbarrier_init(&full[1], 1);
    mbarrier_init(&empty[0], kW);
    mbarrier_init(&empty[1], kW);
    mbarrier_init(&full_out[0], 1);
    mbarrier_init(&full_out[1], 1);
    taken[0] = taken[1] = taken[2] = taken[3] = done[0] = done[1] = 0;
#if HF_FFF_HOPPER
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#else
    __trap();
#endif
  }
  __syncthreads();  // the last plain shared-memory writes: from here on only tensor copies and atomics write
  Segment seg = first_segment(offs, n_buckets, r);
  const auto fill = [&](int buf, const Segment& which, T* root_row) {
    fill_bucket_buffer<T>(p, buffer(buf), &full[buf], &full_out[buf], n_buckets - 1 + which.b, sub, root_row, lane,
                          &map_in, &map_out);
  };
  // The first two buckets; the second once the first is in (all blocks start at once, cold). The first fill also copies
  // the root's w_out row, which every bucket reads: every warp waits for bucket 0's rows (full_out[0] included) before
  // it goes on to bucket 1, so it sees that row whichever buffer it reads next.
  if (warp == 0) {
    fill(0, seg, rows);
    const Segment second = next_segment(offs, r, seg);
    mbarrier_wait(&full[0], 0);
    mbarrier_wait(&full_out[0], 0);
    if (second.pos < r.end) fill(1, second, nullptr);
  }
  // The pair and done counters only grow (a reset would be a plain store that only the mbarriers order): a bucket of
  // `pairs` pairs draws pairs + kW pair tickets (every warp draws one past the end) and kW done tickets of its buffer.
  // A warp draws bucket k's first ticket before it waits for the bucket's rows, so it may draw while slower warps still
  // draw bucket k - 2's (same buffer) but not bucket k - 4's (it waited for bucket k - 2's rows, which the refill
  // copies only after every warp is done with bucket k - 4): four pair counters, in turn. before[j]: the tickets drawn
  // from bucket k + j's counter before it (four scalars turned at each bucket: an indexed array would live in memory).
  int before_0 = 0, before_1 = 0, before_2 = 0, before_3 = 0;
  for (int k = 0; seg.pos < r.end; ++k, seg = next_segment(offs, r, seg)) {
    const int buf = k & 1;
    const int root = n_buckets - 1 + seg.b;
    const T* rows_in = buffer(buf);
    const int out_first = 1 + buf * L.buffer_rows + sub;  // the subtree's first w_out row, in rows of `rows`
    const int top_slot = lane == 0 ? 0 : out_first + sub + lane - 1;  // ancestor of level `lane` (lanes < split)
    // The biases from registers (lane j: subtree node j), loaded once per bucket: read from global memory at every
    // level they cost 10 us at 32768 tokens (a bucket's lines do not stay in L1 beside the x stream).
    const float bias_of_lane = lane < sub ? Elem<T>::load(b_in + subtree_node(root, lane)) : 0.f;
    // A warp waits for the bucket's rows only once its pair's x loads are issued: for the w_in rows before the walk,
    // for the w_out rows before the output (a phase stays complete until every warp is done with the buffer, so the
    // waits after the first return at once). Measured on an H200 against waiting for all rows before drawing a pair:
    // fp32 32768 tokens 136.4 -> 132.2 us, the finishing kernel 79.9 -> 75.1 us under an L2 flush; each block has
    // only ~3 buckets, so their cold first fills weigh.
    const unsigned parity = (k >> 1) & 1;
    const auto in_ready = [&] { mbarrier_wait(&full[buf], parity); };
    const auto out_ready = [&] { mbarrier_wait(&full_out[buf], parity); };
    for (;;) {
      int i = 0;
      if (lane == 0) i = atomicAdd(&taken[k & 3], 1) - before_0;
      const int64_t q = seg.pos + 2 * static_cast<int64_t>(__shfl_sync(kFullMask, i, 0));
      if (q >= seg.end) break;
      if (sub <= 32)
        finish_pair_at<T, NV>(p, q, seg.end, rows_in, rows, out_first, top_slot, ShuffledBias{bias_of_lane}, root,
                              lane, nvec, in_ready, out_ready);
      else
        finish_pair_at<T, NV>(p, q, seg.end, rows_in, rows, out_first, top_slot, GlobalBias<T>{b_in, root}, root, lane,
                              nvec, in_ready, out_ready);
    }
    // A warp that drew no pair of this bucket has not waited for its rows: it waits before it arrives on `empty`, so
    // that it cannot arrive again for the bucket two ahead (whose fill follows this phase) before every other warp
    // arrived for this one.
    in_ready();
    out_ready();
    const int tickets = static_cast<int>((seg.end - seg.pos + 1) / 2) + kW;
    const int next_use = before_0 + tickets;  // bucket k + 4's counter
    before_0 = before_1;
    before_1 = before_2;
    before_2 = before_3;
    before_3 = next_use;
    // The last warp done with this bucket refills its buffer with the bucket two ahead. Every warp arrives on the
    // buffer's `empty` barrier once its lanes stopped reading the buffer (release), and the refilling warp waits for
    // that phase (acquire) before it copies: the done counter only elects which warp refills.
    __syncwarp();
    int last = 0;
    if (lane == 0) {
      mbarrier_arrive(&empty[buf]);
      last = atomicAdd(&done[buf], 1) % kW == kW - 1;
    }
    if (__shfl_sync(kFullMask, last, 0)) {
      mbarrier_wait(&empty[buf], (k >> 1) & 1);  // complete already: every warp arrived before its count
      const Segment ahead = next_segment(offs, r, next_segment(offs, r, seg));
      if (ahead.pos < r.end) fill(buf, ahead, nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host: plan and launch.

// Dynamic shared memory of the barrier-staged finishing block: the bucket's rows (w_in of its subtree, w_out of its
// subtree and of the split ancestors), the subtree's biases and the bucket offsets.
inline int64_t sorted_smem_bytes(int depth, int split, int64_t hidden, int64_t element_size) {
  const int64_t sub = sorted_subtree_rows(depth, split);
  return (2 * sub + split) * hidden * element_size + 4 * sub + 4 * ((int64_t{1} << split) + 1);
}

// The automatic split: one level below the shallowest split whose bucket rows fit in one block's shared memory (that
// one fills it to the brim, 203-212 KB at width 768, leaving L1 ~40 KB of the SM's 256 for x, y and the rows being
// staged; a level deeper halves the rows), or the shallowest itself when it is the deepest allowed, or 0 when none
// fits. Measured at width 768, depth 11, 32768 tokens, fp32: split 8 (115 KB) 145.7 us against 151.6 for split 7
// (208 KB) on an H200 (167.3 against 170.7 on an H100).
inline int sorted_split(int depth, int64_t hidden, int64_t element_size, int64_t smem_limit) {
  const int deepest = std::min(depth, kMaxSplit);
  for (int split = 1; split <= deepest; ++split)
    if (sorted_smem_bytes(depth, split, hidden, element_size) <= smem_limit) return std::min(split + 1, deepest);
  return 0;
}

// The driver's cuTensorMapEncodeTiled, through the runtime (no link against libcuda); null where unavailable.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encoder = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encoder;
}

// A float32 (rows, hidden) matrix as the 3-D tensor (inner, hidden / inner, rows) with a box of one whole row, for
// tensor_row_copy (common.cuh): a box side holds at most 256 elements and its innermost extent a multiple of 16 bytes, so inner
// is the largest multiple of 4 up to 256 that divides hidden. False where no such view or encoder exists.
inline bool tensor_row_map(CUtensorMap* map, const void* base, int64_t rows, int64_t hidden) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr || hidden % 4 != 0 || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  int64_t inner = 0;
  for (int64_t d = 4; d <= 256 && d <= hidden; d += 4)
    if (hidden % d == 0) inner = d;
  if (inner == 0 || hidden / inner > 256) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(hidden / inner),
                              static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(inner * 4), static_cast<cuuint64_t>(hidden * 4)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(inner), static_cast<cuuint32_t>(hidden / inner), 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<void*>(base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Step 1's scatter, after a ranking step 1 whose block (m / per) % blocks routed token m.
inline void launch_scatter_ranked(const Params& p, int64_t per, int64_t blocks, cudaStream_t stream) {
  const int64_t grid = (p.tokens + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(p.num_sms) * 8;
  scatter_ranked_kernel<<<grid < cap ? grid : cap, kThreads, sizeof(int) * (size_t{1} << p.split), stream>>>(p, per, blocks);
  check_launch();
}

// Step 1: route the top `split` levels (their rows in shared memory as far as they fit), then the counting sort:
// fused into step 1 (a cooperative launch, one block per SM) where the device can launch it so, else a memset before
// step 1 and a scatter kernel after. plan() keeps split >= 2, and two levels of fp32 rows of width <= 1024 fit the
// budget, so top >= 2.
template <typename T, int NV>
void launch_route_and_sort(const Params& p, cudaStream_t stream) {
  const int n_buckets = 1 << p.split;
  const size_t hist_bytes = sizeof(int) * n_buckets;
  int top = p.split;  // the deepest top block of levels whose rows fit beside the histogram
  while (top > 0 && route_shared_bytes(top, p.split, p.hidden, sizeof(T)) > kRouteSharedBudget) --top;
  if (top < 2) fail("the sorted strategy needs the top two levels' rows in shared memory");
  const size_t route_smem = static_cast<size_t>(route_shared_bytes(top, p.split, p.hidden, sizeof(T)));
  const int64_t wanted = (p.tokens + 31) / 32;
  const int64_t blocks = wanted < p.num_sms ? wanted : p.num_sms;  // <= num_sms rows of block_base
  const int threads = RouteSharedThreads<T, NV>::value;
  with_full<T, NV>(p, [&](auto full) {
    constexpr bool kFull = decltype(full)::value;
    const auto fused_sort_kernel = route_top_shared_kernel<T, NV, kFull, true>;
    static PersistentLaunch fused_cache;
    // HF_FFF_CUDA_NO_COOPERATIVE (tests): take the separate launches, which a full GPU never needs otherwise
    if (std::getenv("HF_FFF_CUDA_NO_COOPERATIVE") == nullptr &&
        persistent_blocks_per_sm(fused_sort_kernel, threads, route_smem, fused_cache) >= 1) {  // one block per SM fits
      const cudaError_t err = launch_cooperative(fused_sort_kernel, blocks, threads, route_smem, stream, p, top);
      if (err == cudaSuccess) return;
      // Fewer SMs at hand than the device has (MPS, green contexts): the blocks cannot all be resident at once,
      // so the separate launches below. Any other error is raised.
      if (err != cudaErrorCooperativeLaunchTooLarge) check_cuda(err);
      (void)cudaGetLastError();  // clears it
    }
    check_cuda(cudaMemsetAsync(p.counts, 0, 2 * hist_bytes, stream));
    const auto route_kernel = route_top_shared_kernel<T, NV, kFull, false>;
    static int route_done[64] = {};
    allow_smem(route_kernel, route_smem, route_done);
    route_kernel<<<blocks, threads, route_smem, stream>>>(p, top);
    check_launch();
    launch_scatter_ranked(p, (p.tokens + blocks - 1) / blocks, blocks, stream);  // step 1's runs per block
  });
}

// Contiguous runs of the sorted tokens, at least 64 per block so that staging a bucket's rows pays off.
inline int64_t sorted_chunk(const Params& p, int per_sm) {
  const int64_t max_blocks = static_cast<int64_t>(per_sm) * p.num_sms;
  const int64_t wanted = (p.tokens + 63) / 64;
  const int64_t blocks = wanted < max_blocks ? wanted : max_blocks;
  return (p.tokens + blocks - 1) / blocks;
}

// The finishing step: one block per SM (the bucket's rows fill its shared memory), each a contiguous run of the sorted
// tokens; the kernel takes (p, chunk, extra...).
template <typename Kernel, typename... Extra>
void launch_sorted_kernel(Kernel finish, int threads, size_t smem, PersistentLaunch& cache, const Params& p,
                          cudaStream_t stream, const Extra&... extra) {
  const int per_sm = persistent_blocks_per_sm(finish, threads, smem, cache);
  if (per_sm <= 0) fail("the sorted strategy's rows do not fit in shared memory; use a deeper split");
  const int64_t chunk = sorted_chunk(p, per_sm);
  finish<<<(p.tokens + chunk - 1) / chunk, threads, smem, stream>>>(p, chunk, extra...);
  check_launch();
}

// The finishing step: two tokens per warp where SortedPair says so and the tree is at most 16 levels deep
// (finish_pair_staged evaluates both tokens' GELU values in one pass, token b's level l in lane 16 + l), pipelined on
// Hopper where two buckets' rows fit and tensor maps of the weights can be made, else staged behind barriers; one
// token per warp otherwise (every depth the binding takes, <= 30).
template <typename T, int NV>
void launch_sorted_finish(const Params& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(sorted_smem_bytes(p.depth, p.split, p.hidden, sizeof(T)));
  if constexpr (SortedPair<T, NV>::value) {
    if (p.depth <= kPairMaxDepth) {
      const int64_t pipelined = pipelined_layout(p.depth, p.split, p.hidden, sizeof(T)).bytes;
      const bool pipeline = p.major >= 9 && pipelined <= p.smem_limit;
      with_full<T, NV>(p, [&](auto full) {
        constexpr bool kFull = decltype(full)::value;
        CUtensorMap map_in = {}, map_out = {};
        const int64_t n_rows = static_cast<int64_t>(p.trees) * ((int64_t{2} << p.depth) - 1);
        if (pipeline && p.hidden % 32 == 0 &&  // rows on 128-byte boundaries
            tensor_row_map(&map_in, p.w_in, n_rows, p.hidden) && tensor_row_map(&map_out, p.w_out, n_rows, p.hidden)) {
          static PersistentLaunch cache;
          launch_sorted_kernel(sorted_pipelined_finish_kernel<T, NV, kFull>, kSortedPairThreads,
                               static_cast<size_t>(pipelined), cache, p, stream, map_in, map_out);
        } else {
          static PersistentLaunch cache;
          launch_sorted_kernel(sorted_pair_finish_kernel<T, NV, kFull>, kSortedPairThreads, smem, cache, p, stream);
        }
      });
      return;
    }
  }
  static PersistentLaunch cache;
  launch_sorted_kernel(sorted_finish_kernel<T, NV>, SortedThreads<T, NV>::value, smem, cache, p, stream);
}

template <>
struct StrategyImpl<kSorted> {
  // problem.option: the bucket level (0: sorted_split). Scratch: bucket, order and rank (tokens each), counts and
  // cursors (2 * 2^split), block_base (num_sms * 2^split) as int32; the top levels' GELU values (tokens * split) as
  // float32.
  static Plan plan(Params& p, const Problem& problem) {
    require_fast(p, problem);
    if (p.trees != 1) fail("the sorted strategy takes one tree, got " + std::to_string(p.trees));
    if (problem.element_size != 4) fail("the sorted strategy takes float32 (staged is faster at 16 bits)");
    p.split = problem.option > 0 ? static_cast<int>(problem.option)
                                 : sorted_split(p.depth, p.hidden, problem.element_size, p.smem_limit);
    if (p.split < 2 || p.split > p.depth || p.split > kMaxSplit)
      fail("split must be in [2, min(depth, " + std::to_string(kMaxSplit) + ")], got " + std::to_string(p.split) +
           " (or no split's rows fit in shared memory)");
    const int64_t smem = sorted_smem_bytes(p.depth, p.split, p.hidden, problem.element_size);
    if (smem > p.smem_limit)
      fail("with split " + std::to_string(p.split) + " the sorted strategy needs " + std::to_string(smem) +
           " bytes of shared memory per block, more than the device's " + std::to_string(p.smem_limit) +
           "; use a deeper split");
    const int64_t n_buckets = int64_t{1} << p.split;
    return {3 * p.tokens + 2 * n_buckets + int64_t{kMaxRankedBlocksPerSm} * p.num_sms * n_buckets, p.tokens * p.split,
            p.split};
  }
  static void bind(Params& p, int* ints, float* floats) {
    p.bucket = ints;
    p.order = p.bucket + p.tokens;
    p.rank = p.order + p.tokens;
    p.counts = p.rank + p.tokens;
    p.block_base = p.counts + 2 * (int64_t{1} << p.split);
    p.g_top = floats;
  }
  template <typename T>
  static void launch(const Params& p, cudaStream_t stream) {
    if constexpr (std::is_same<T, float>::value) {
      with_vectors(p, [&](auto nv) {
        launch_route_and_sort<T, decltype(nv)::value>(p, stream);
        launch_sorted_finish<T, decltype(nv)::value>(p, stream);
      });
    } else {
      fail("the sorted strategy takes float32");
    }
  }
};

}  // namespace
}  // namespace hf_fff_cuda
