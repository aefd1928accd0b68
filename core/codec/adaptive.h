#pragma once
// Adaptive compression (`compression.adaptive` in the job config): a site
// leader's choice of `topk(density) -> int<bits>` for each step (every-step
// mode) or each sync (DiLoCo), so that the exchange hides behind compute.
//
// Each step brings two measurements: how long the leader waited for the
// step's rounds (`wait`) and the compute time since the previous exchange
// ended (`compute`). The part of the wait that bytes can change is
// `wait - latency`, latency being the smallest wait seen (a round trip no
// compression shortens). Above a tenth of compute for `patience` steps in a
// row, the next step sends less (one level sparser or fewer bits); below a
// fortieth as long, more. (Without the patience it flipped between two
// neighbouring levels on the end-to-end benchmark: 106 changes in 200
// steps.) It never goes below min_density or min_bits. Payloads describe
// themselves, so each site decides alone and every site still decodes the
// same bits. Not thread-safe.

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace strait::core {

class AdaptiveCompression {
 public:
  // Throws InvalidArgument unless 0 < min_density <= max_density <= 1 and
  // min_bits is 2, 4 or 8.
  AdaptiveCompression(double min_density = 0.001, double max_density = 0.1, int min_bits = 4, double hide = 0.1,
                      int patience = 3);

  // The pipeline of the current level, e.g. "topk(0.08) -> int8".
  std::string pipeline() const;
  // Feeds one step's measurements (seconds); a sentence describing the
  // decision if the level changed.
  std::optional<std::string> update(double wait_s, double compute_s);

  // (density, bits) from the most bytes to the fewest.
  const std::vector<std::pair<double, int>>& levels() const { return levels_; }
  size_t level() const { return level_; }
  void setLevel(size_t level);

 private:
  std::vector<std::pair<double, int>> levels_;
  size_t level_ = 0;
  double hide_;
  int patience_;
  std::optional<double> latency_;
  int over_ = 0, under_ = 0;  // consecutive steps above / below the thresholds
};

}  // namespace strait::core
