// randomk: a random subset of exactly k values; the indices are not sent, only
// the 64-bit seed that regenerates them.
//
// The subset is stratified: [0, n) is cut into k strides of n/k values and one
// index is drawn uniformly from each, so the k indices are distinct, sorted,
// generated in O(k) by both sides, and every value is chosen with probability
// about k/n. Values are sent unscaled: with error feedback (the intended use)
// what is not sent stays in the residual (Stich et al. 2018, "Sparsified SGD
// with Memory").

#include <algorithm>
#include <cmath>

#include "core/codec/impl/kernels.h"
#include "core/random.h"
#include "core/codec/impl/stages.h"

namespace strait::core::codec_impl {

namespace {

// Generates the k stratified indices over n values in order. Stride j is
// [floor(j n / k), floor((j + 1) n / k)), stepped without a division per
// index (Bresenham-style: the quotient plus a carry from the remainder).
class StratifiedIndices {
 public:
  StratifiedIndices(uint64_t seed, uint64_t n, uint64_t k)
      : key_(random::blockKey(seed, 0x7a4d)), k_(k), step_(k ? n / k : 0), rem_(k ? n % k : 0) {}

  uint32_t next() {
    uint64_t hi = lo_ + step_;
    acc_ += rem_;
    if (acc_ >= k_) {
      acc_ -= k_;
      ++hi;
    }
    const uint64_t r = random::mix32(key_ + j_ * 0x9e3779b9U);
    const uint32_t index = static_cast<uint32_t>(lo_ + ((r * (hi - lo_)) >> 32));
    lo_ = hi;
    ++j_;
    return index;
  }

 private:
  uint32_t key_;
  uint64_t k_, step_, rem_;
  uint64_t lo_ = 0, acc_ = 0;
  uint32_t j_ = 0;
};

class RandomK final : public Structure {
 public:
  explicit RandomK(SparseAmount amount) : amount_(amount) {}

  std::string text() const override { return "randomk(" + amount_.text() + ")"; }
  StructureKind kind() const override { return StructureKind::kRandomK; }

  size_t maxBodyBytes(size_t n, const ValueCodec& values) const override {
    return 16 + values.sectionBytes(amount_.kFor(n));
  }

  void encode(const float* in, size_t n, const TensorShape&, CodecState& st,
              const ValueCodec& values, std::vector<uint8_t>& out) const override {
    if (n > kMaxSparseValues) {
      fail<InvalidArgument>("randomk: tensor of ", n, " values exceeds the sparse limit of ",
                            kMaxSparseValues, "; split it into smaller tensors");
    }
    // Values that are not sent would sit in the residual: refuse NaN/Inf anywhere.
    if (absMaxBits(in, n) >= kernels::kExpMask) failNonFinite(in, n, 0);
    const size_t k = amount_.kFor(n);
    const uint64_t seed = st.nextSeed();
    StratifiedIndices indices(seed, n, k);
    st.values.resize(k);
    for (size_t j = 0; j < k; ++j) st.values[j] = in[indices.next()];
    ByteWriter w(out);
    w.put<uint64_t>(k);
    w.put<uint64_t>(seed);
    appendValues(values, st.values.data(), k, seed, out, 0);
  }

 private:
  SparseAmount amount_;
};

}  // namespace

void decodeRandomKBody(ByteReader& r, const DecodeTarget& t) {
  const uint64_t k = r.get<uint64_t>("randomk k");
  const uint64_t seed = r.get<uint64_t>("randomk seed");
  checkSparseCounts(k, t.n, "randomk");
  const ValueSection values = ValueSection::read(r, k);
  r.expectEnd("randomk payload");
  values.validate();
  if (!t.accumulate) std::fill(t.data, t.data + t.n, 0.0f);
  StratifiedIndices indices(seed, t.n, k);
  constexpr size_t kStep = 256;
  float v[kStep];
  for (uint64_t first = 0; first < k; first += kStep) {
    const size_t len = static_cast<size_t>(std::min<uint64_t>(kStep, k - first));
    values.decode(first, len, v);
    for (size_t j = 0; j < len; ++j) {
      const uint32_t i = indices.next();
      if (t.accumulate) t.data[i] += t.weight * v[j]; else t.data[i] = v[j];
    }
  }
}

std::shared_ptr<const Structure> makeRandomK(const StageArgs& args) {
  ArgReader a(args);
  const SparseAmount amount = SparseAmount::read(a);
  a.finish();
  return std::make_shared<RandomK>(amount);
}

}  // namespace strait::core::codec_impl
