// Plackett-Luce NLL: the layout checks of one call's (lists, items) tensors and their raw strided views, shared
// by the CPU kernels (plackett_luce_cpu.cpp) and the CUDA glue (plackett_luce_cuda_glue.cpp), so both accept
// and reject the same calls with the same messages. Values are checked per list by the kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "plackett_luce_math.h"

namespace prefrank {
namespace pl {

// How each list's order is given (`mode`) and the optional per-item tensors as base pointer + strides.
struct ItemArgs {
  int64_t mode = kByPlace;
  const int64_t* order = nullptr;  // ranking or groups, per `mode`
  int64_t order_sb = 0, order_sk = 0;
  const bool* mask = nullptr;
  int64_t mask_sb = 0, mask_sk = 0;
};

// `t` (dtype `dtype`, shaped like and on the device of `scores`) as base pointer and (list, item) strides.
template <typename T>
void strided_view(const at::Tensor& t, const at::Tensor& scores, at::ScalarType dtype, const char* what,
                  const T** data, int64_t* list_stride, int64_t* item_stride) {
  TORCH_CHECK(t.scalar_type() == dtype && t.sizes() == scores.sizes() && t.device() == scores.device(),
              "plackett_luce: ", what, " must be ", dtype, " shaped like scores");
  *data = t.const_data_ptr<T>();
  *list_stride = t.stride(0);
  *item_stride = t.stride(1);
}

inline ItemArgs item_args(const at::Tensor& scores, const std::optional<at::Tensor>& ranking,
                          const std::optional<at::Tensor>& groups, const std::optional<at::Tensor>& mask,
                          int64_t ties) {
  TORCH_CHECK(scores.dim() == 2, "plackett_luce: scores must be (lists, items)");
  // item indices are int32 in the kernels' scratch
  TORCH_CHECK(scores.size(1) < (int64_t(1) << 31), "plackett_luce: lists longer than 2^31 items are not supported");
  TORCH_CHECK(!(ranking && groups), "plackett_luce: ranking and groups are exclusive");
  TORCH_CHECK(ties == kBreslow || ties == kEfron, "plackett_luce: unknown ties code ", ties);
  ItemArgs a;
  if (ranking || groups) {
    strided_view(ranking ? *ranking : *groups, scores, at::kLong, "ranking/groups", &a.order, &a.order_sb,
                 &a.order_sk);
    a.mode = ranking ? kByRanking : kByGroups;
  }
  if (mask) strided_view(*mask, scores, at::kBool, "mask", &a.mask, &a.mask_sb, &a.mask_sk);
  return a;
}

}  // namespace pl
}  // namespace prefrank
