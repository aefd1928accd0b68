#include "core/codec/adaptive.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/error.h"

namespace strait::core {

namespace {

std::string fmt(const char* f, double v) {
  char text[64];
  std::snprintf(text, sizeof text, f, v);
  return text;
}

}  // namespace

AdaptiveCompression::AdaptiveCompression(double min_density, double max_density, int min_bits, double hide,
                                         int patience)
    : hide_(hide), patience_(patience) {
  if (!(0 < min_density && min_density <= max_density && max_density <= 1)) {
    fail<InvalidArgument>("adaptive: need 0 < min_density (", min_density, ") <= max_density (", max_density,
                          ") <= 1");
  }
  if (min_bits != 2 && min_bits != 4 && min_bits != 8) {
    fail<InvalidArgument>("adaptive: min_bits = ", min_bits, ": must be 2, 4 or 8");
  }
  std::vector<double> densities;
  for (double d = max_density; d > min_density * (1 + 1e-9); d /= 2) densities.push_back(d);
  densities.push_back(min_density);
  for (double d : densities) {
    for (int b : {8, 4, 2}) {
      if (b >= min_bits) levels_.emplace_back(d, b);
    }
  }
  // From the most bytes to the fewest: value bits plus about log2(1/d) + 2
  // bits of index per kept value. Stable: equal costs keep their order.
  auto cost = [](const std::pair<double, int>& l) { return l.first * (l.second + std::log2(1 / l.first) + 2); };
  std::stable_sort(levels_.begin(), levels_.end(), [&](const auto& a, const auto& b) { return cost(a) > cost(b); });
}

std::string AdaptiveCompression::pipeline() const {
  return "topk(" + fmt("%.6g", levels_[level_].first) + ") -> int" + std::to_string(levels_[level_].second);
}

void AdaptiveCompression::setLevel(size_t level) {
  if (level >= levels_.size()) fail<InvalidArgument>("adaptive: level ", level, " of ", levels_.size());
  level_ = level;
}

std::optional<std::string> AdaptiveCompression::update(double wait_s, double compute_s) {
  latency_ = latency_ ? std::min(*latency_, wait_s) : wait_s;
  const double exposed = wait_s - *latency_;
  const std::string before = pipeline();
  over_ = exposed > hide_ * compute_s ? over_ + 1 : 0;
  under_ = exposed < hide_ * compute_s / 4 ? under_ + 1 : 0;
  bool sparser;
  if (over_ >= patience_ && level_ + 1 < levels_.size()) {
    ++level_;
    sparser = true;
  } else if (under_ >= patience_ && level_ > 0) {
    --level_;
    sparser = false;
  } else {
    return std::nullopt;
  }
  over_ = under_ = 0;
  return before + " -> " + pipeline() + " (exchange beyond latency " + fmt("%.1f", exposed * 1000) + " ms, " +
         (sparser ? "more than a tenth" : "under a fortieth") + " of compute " + fmt("%.1f", compute_s * 1000) +
         " ms for " + std::to_string(patience_) + " steps)";
}

}  // namespace strait::core
