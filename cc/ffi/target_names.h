// Names of the XLA custom-call targets, shared by the handlers' registration
// and the TensorFlow XLA lowering that calls them. Plain C++: no XLA headers.
#pragma once

namespace fused_xent {
namespace ffi_targets {

inline constexpr const char kSparseForward[] = "fused_xent_sparse_forward";
inline constexpr const char kSparseBackward[] = "fused_xent_sparse_backward";
// Vocabulary-parallel shards of the sparse ones (ffi/xent_handlers.h: Shard).
inline constexpr const char kSparseForwardShard[] = "fused_xent_sparse_forward_shard";
inline constexpr const char kSparseBackwardShard[] = "fused_xent_sparse_backward_shard";
inline constexpr const char kDenseForward[] = "fused_xent_dense_forward";
inline constexpr const char kDenseBackward[] = "fused_xent_dense_backward";
inline constexpr const char kDenseForwardShard[] = "fused_xent_dense_forward_shard";
inline constexpr const char kDenseBackwardShard[] = "fused_xent_dense_backward_shard";

}  // namespace ffi_targets
}  // namespace fused_xent
