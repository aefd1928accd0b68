// Streaming DiLoCo's fragments (core/fragments.h): how the parameter tensors
// are split.

#include <gtest/gtest.h>

#include <algorithm>

#include "core/error.h"
#include "core/fragments.h"

namespace strait::core {
namespace {

TEST(Fragments, EveryTensorIsInExactlyOneFragmentInModelOrder) {
  const std::vector<int64_t> sizes = {5, 100, 7, 64, 64, 3, 1000, 2};
  const auto groups = splitFragments(sizes, 3);
  std::vector<int64_t> all;
  for (const auto& g : groups) {
    EXPECT_FALSE(g.empty());
    EXPECT_TRUE(std::is_sorted(g.begin(), g.end()));
    all.insert(all.end(), g.begin(), g.end());
  }
  std::sort(all.begin(), all.end());
  EXPECT_EQ(all, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(Fragments, FragmentsAreBalancedBySize) {
  const std::vector<int64_t> sizes = {4096, 64, 4096, 64, 4096, 64, 4096, 64};  // four layers
  for (const auto& g : splitFragments(sizes, 4)) {
    int64_t load = 0;
    for (int64_t i : g) load += sizes[i];
    EXPECT_EQ(load, 4160);
  }
}

TEST(Fragments, OneFragmentIsTheWholeModelAndEmptyTensorsFillFragments) {
  EXPECT_EQ(splitFragments({3, 1, 2}, 1), (std::vector<std::vector<int64_t>>{{0, 1, 2}}));
  EXPECT_EQ(splitFragments({5, 0, 0}, 3), (std::vector<std::vector<int64_t>>{{0}, {1}, {2}}));
}

TEST(Fragments, MoreFragmentsThanTensorsIsAClearError) {
  try {
    splitFragments({3, 1, 2}, 4);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "DiLoCo: fragments = 4, but the model has only 3 parameter tensors");
  }
  EXPECT_THROW(splitFragments({3}, 0), InvalidArgument);
}

}  // namespace
}  // namespace strait::core
