#include "core/fragments.h"

#include <algorithm>
#include <utility>

#include "core/error.h"

namespace strait::core {

std::vector<std::vector<int64_t>> splitFragments(const std::vector<int64_t>& sizes, int64_t n) {
  if (n < 1) fail<InvalidArgument>("DiLoCo: fragments = ", n, ": must be >= 1");
  if (size_t(n) > sizes.size()) {
    fail<InvalidArgument>("DiLoCo: fragments = ", n, ", but the model has only ", sizes.size(),
                          " parameter tensors");
  }
  std::vector<int64_t> order(sizes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
  std::vector<std::vector<int64_t>> groups(n);
  std::vector<int64_t> load(n, 0);
  for (int64_t i : order) {
    int64_t best = 0;
    for (int64_t f = 1; f < n; ++f) {
      if (std::make_pair(load[f], groups[f].size()) < std::make_pair(load[best], groups[best].size())) best = f;
    }
    groups[best].push_back(i);
    load[best] += sizes[i];
  }
  for (auto& g : groups) std::sort(g.begin(), g.end());
  return groups;
}

}  // namespace strait::core
