// Plackett-Luce NLL CUDA kernels: one thread per list running the shared per-list math
// (plackett_luce_math.h, the same code the CPU kernels run and the CPU tests check), with the canonical order
// built in a global scratch buffer laid out item-major ([K][B]): element p of every list of a warp sits in
// consecutive addresses, so the scratch traffic (the bulk of the memory accesses) is coalesced. Scores,
// ranking, groups and mask are read in place with their strides (no copies).
//
// Known limit (issue #12): a warp still walks 32 separate rows of the scores; a warp-cooperative kernel with
// a shared-memory tile of the rows would coalesce those loads too. Not measured: no GPU was available.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "plackett_luce_cuda.h"
#include "plackett_luce_math.h"

namespace prefrank {
namespace cuda {
namespace {

// __launch_bounds__(kThreads, 1): with the default bounds ptxas spilled 8-16 bytes in the fp64 kernels
constexpr int kThreads = 128;

template <typename acc_t>
struct Scratch {  // item-major per-list buffers carved out of one allocation
  int32_t* item;
  int32_t* count;  // per level (the level path of plackett_luce_math.h)
  int64_t* key;
  uint8_t* seen;
  acc_t* acc;  // 3 (forward) or 4 (backward) buffers of K entries per list

  static constexpr int64_t kSeenOffset = 16;  // bytes per (list, item) before the seen marks
  static int64_t acc_buffers(bool backward) { return backward ? 4 : 3; }
  static int64_t bytes(int64_t B, int64_t K, bool backward) {
    const int64_t n = B * K;
    return acc_offset(n) + acc_buffers(backward) * n * int64_t(sizeof(acc_t));
  }
  __host__ __device__ static int64_t acc_offset(int64_t n) { return (n * (kSeenOffset + 1) + 15) / 16 * 16; }
  __host__ __device__ static Scratch carve(void* base, int64_t B, int64_t K) {
    const int64_t n = B * K;
    char* p = static_cast<char*>(base);
    Scratch s;
    s.key = reinterpret_cast<int64_t*>(p);  // allocation is 256-byte aligned
    s.item = reinterpret_cast<int32_t*>(p + n * 8);
    s.count = reinterpret_cast<int32_t*>(p + n * 12);
    s.seen = reinterpret_cast<uint8_t*>(p + n * kSeenOffset);
    s.acc = reinterpret_cast<acc_t*>(p + acc_offset(n));
    return s;
  }
};

// Thread b's strided views of the scratch (element p of list b at p·B + b: a warp's accesses coalesce).
template <typename acc_t>
struct ListScratch {
  pl::Strided<int32_t> item, count;
  pl::Strided<int64_t> key;
  pl::Strided<uint8_t> seen;
  acc_t* acc_base;
  int64_t B, n_all;

  __device__ ListScratch(const Scratch<acc_t>& s, int64_t B_, int64_t K, int64_t b)
      : item{s.item + b, B_}, count{s.count + b, B_}, key{s.key + b, B_}, seen{s.seen + b, B_},
        acc_base(s.acc + b), B(B_), n_all(B_ * K) {}
  // the i-th accumulator buffer (K entries per list)
  __device__ pl::Strided<acc_t> acc(int64_t i) const { return {acc_base + i * n_all, B}; }
};

template <typename scalar_t>
__device__ pl::ListInputs<scalar_t> list_of(const Lists& l, int64_t b) {
  return {static_cast<const scalar_t*>(l.scores) + b * l.score_sb, l.score_sk,
          l.order ? l.order + b * l.order_sb : nullptr, l.order_sk, l.mask ? l.mask + b * l.mask_sb : nullptr,
          l.mask_sk, l.K, l.mode};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) nll_fwd_kernel(Lists lists, acc_t* __restrict__ nll, void* workspace) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= lists.B) return;
  const ListScratch<acc_t> t(Scratch<acc_t>::carve(workspace, lists.B, lists.K), lists.B, lists.K, b);
  const auto list = list_of<scalar_t>(lists, b);
  const pl::Canonical c = pl::canonical_list(list, t.item, t.key, t.seen);
  nll[b] = pl::list_nll<acc_t>(list, t.item, t.key, c, lists.top_k, lists.ties, t.count, t.acc(0), t.acc(1),
                               t.acc(2));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) nll_bwd_kernel(Lists lists, const acc_t* __restrict__ grad_nll,
                                                           int64_t grad_nll_stride, scalar_t* __restrict__ grad,
                                                           void* workspace) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (b >= lists.B) return;
  const ListScratch<acc_t> t(Scratch<acc_t>::carve(workspace, lists.B, lists.K), lists.B, lists.K, b);
  const auto list = list_of<scalar_t>(lists, b);
  const pl::Canonical c = pl::canonical_list(list, t.item, t.key, t.seen);
  pl::list_nll_backward<acc_t>(grad_nll[b * grad_nll_stride], list, t.item, t.key, c, lists.top_k, lists.ties,
                               grad + b * lists.K, 1, t.count, t.acc(0), t.acc(1), t.acc(2), t.acc(3));
}

unsigned blocks_for(int64_t B) { return static_cast<unsigned>((B + kThreads - 1) / kThreads); }

template <typename scalar_t, typename acc_t>
cudaError_t launch_fwd(const Lists& lists, void* nll, void* workspace, cudaStream_t stream) {
  nll_fwd_kernel<scalar_t, acc_t>
      <<<blocks_for(lists.B), kThreads, 0, stream>>>(lists, static_cast<acc_t*>(nll), workspace);
  return cudaGetLastError();
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_bwd(const Lists& lists, const void* grad_nll, int64_t gs, void* grad, void* workspace,
                       cudaStream_t stream) {
  nll_bwd_kernel<scalar_t, acc_t><<<blocks_for(lists.B), kThreads, 0, stream>>>(
      lists, static_cast<const acc_t*>(grad_nll), gs, static_cast<scalar_t*>(grad), workspace);
  return cudaGetLastError();
}

}  // namespace

int64_t plackett_luce_workspace_bytes(const Lists& lists, bool backward) {
  return lists.dtype == Dtype::kDouble ? Scratch<double>::bytes(lists.B, lists.K, backward)
                                       : Scratch<float>::bytes(lists.B, lists.K, backward);
}

cudaError_t plackett_luce_nll_fwd(const Lists& lists, void* nll, void* workspace, cudaStream_t stream) {
  if (lists.B == 0) return cudaSuccess;
  // the kernels expect the "seen" marks zeroed (ranking mode); they leave them zeroed
  const int64_t n = lists.B * lists.K;
  cudaError_t err = cudaMemsetAsync(static_cast<char*>(workspace) + n * Scratch<float>::kSeenOffset, 0, n, stream);
  if (err != cudaSuccess) return err;
  switch (lists.dtype) {
    case Dtype::kFloat: return launch_fwd<float, float>(lists, nll, workspace, stream);
    case Dtype::kDouble: return launch_fwd<double, double>(lists, nll, workspace, stream);
    case Dtype::kHalf: return launch_fwd<__half, float>(lists, nll, workspace, stream);
    case Dtype::kBFloat16: return launch_fwd<__nv_bfloat16, float>(lists, nll, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t plackett_luce_nll_bwd(const Lists& lists, const void* grad_nll, int64_t gs, void* grad, void* workspace,
                                  cudaStream_t stream) {
  if (lists.B == 0) return cudaSuccess;
  const int64_t n = lists.B * lists.K;
  cudaError_t err = cudaMemsetAsync(static_cast<char*>(workspace) + n * Scratch<float>::kSeenOffset, 0, n, stream);
  if (err != cudaSuccess) return err;
  switch (lists.dtype) {
    case Dtype::kFloat: return launch_bwd<float, float>(lists, grad_nll, gs, grad, workspace, stream);
    case Dtype::kDouble: return launch_bwd<double, double>(lists, grad_nll, gs, grad, workspace, stream);
    case Dtype::kHalf: return launch_bwd<__half, float>(lists, grad_nll, gs, grad, workspace, stream);
    case Dtype::kBFloat16: return launch_bwd<__nv_bfloat16, float>(lists, grad_nll, gs, grad, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace prefrank
