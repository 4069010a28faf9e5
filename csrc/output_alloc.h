// Output allocation for every CPU/CUDA op. With PREFRANK_POISON_OUTPUTS set (the test suite sets it),
// outputs start as NaN, so an element a kernel forgets to write fails the reference comparison instead of
// passing on whatever the allocator happened to return.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace prefrank {

// A large fresh CPU output is paid for at its first touch: one page fault (and the kernel zeroing the page)
// per 4 KiB page. That is most of the out-of-place backward of sequence_logprobs (its 500 MB gradient at
// 4096 tokens x 32000 logits: ~100 ms of faults against ~40 ms of writing). Asking for transparent huge
// pages on the 2 MiB-aligned interior makes it 512x fewer faults. A hint only: where THP is "never" the
// kernel ignores it, and the memory is the caching-free CPU allocator's, freed as usual. (torch's own
// THP_MEM_ALLOC_ENABLE=1 does the same for every CPU tensor of a process.)
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  if (!t.is_cpu() || t.nbytes() < 2 * kHugePage) return;
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (first + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (first + t.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // failure: 4 KiB pages
#else
  (void)t;
#endif
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = std::getenv("PREFRANK_POISON_OUTPUTS") != nullptr;
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);  // before anything touches it
  if (poison) out.fill_(NAN);
  return out;
}

}  // namespace prefrank
