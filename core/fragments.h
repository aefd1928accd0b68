#pragma once
// Streaming DiLoCo's fragments (Douillard et al. 2025): how a model's
// parameter tensors are split into groups that sync in turn. It depends
// only on the tensors' sizes, which every site checks are the same, so
// every site forms the same fragments. Pure function; thread-safe.

#include <cstdint>
#include <vector>

namespace strait::core {

// `n` groups of indices into `sizes` (the tensors' sizes, in model order)
// of about equal total size — largest tensor first, to the lightest group
// (then the one with fewer tensors, then the lower index) — each in model
// order. Throws InvalidArgument unless 1 <= n <= sizes.size().
std::vector<std::vector<int64_t>> splitFragments(const std::vector<int64_t>& sizes, int64_t n);

}  // namespace strait::core
