// topk: the k values of largest magnitude, indices delta-coded and bit-packed.
//
// Selection is exact either way; the two methods differ in cost:
//   radix  - a 2048-bin histogram of the top bits of |x| finds the bin that
//            holds the k-th magnitude, a second pass collects that bin and
//            everything above it.
//   sample - the threshold is estimated from a strided sample (65,536 values)
//            with a safety margin, so one pass collects a small superset of
//            the top k; if the sample was unlucky and fewer than k values pass,
//            it falls back to radix. (Sampled thresholds for top-k are used by
//            e.g. Shi et al. 2019, "Understanding Top-k Sparsification".)
// Both then pick exactly k from the candidates: the k-th largest key by
// nth_element, everything above it, and ties at it in increasing index order.
// So among equal magnitudes the lower index wins, whichever method ran.
//
// Chunk-wise (chunk=C, SparseLoCo: Sarfi et al. 2025): the tensor is cut
// into flat chunks of C values (the last one shorter) and each keeps its own
// k = kFor(chunk length) values, selected as above within the chunk. The
// payload is an ordinary topk payload (all kept indices, in order), so every
// decoder reads it as it reads any other.
//
// Index coding: deltas d0 = i0, dj = ij - i(j-1) - 1 in blocks of 128, each
// block bit-packed at the width of its largest delta (one width byte per
// block). At density p the deltas average ~1/p, so ~log2(1/p)+1 bits an index.

#include <algorithm>
#include <cmath>

#include "core/codec/impl/kernels.h"
#include "core/random.h"
#include "core/codec/impl/stages.h"

namespace strait::core::codec_impl {

namespace {

using kernels::floatBits;
using kernels::kExpMask;

constexpr size_t kIndexBlock = 128;
constexpr uint8_t kIndexFormatDeltaBlocks = 1;
constexpr int kHistShift = 20;                       // 2048 bins over the 31 magnitude bits
constexpr size_t kHistBins = size_t{1} << (31 - kHistShift);
constexpr size_t kSampleSize = 65536;

STRAIT_INLINE uint32_t keyOf(float v) { return floatBits(v) & 0x7fffffffU; }

size_t ceilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

int bitWidth(uint32_t v) { return v == 0 ? 0 : 32 - __builtin_clz(v); }

[[noreturn]] void failFirstNonFinite(const float* x, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (keyOf(x[i]) >= kExpMask) failNonFinite(x + i, 1, i);
  }
  fail<InvalidArgument>("non-finite input");
}

// Appends to out the index of every value with key >= threshold, in order.
// At low density most 16-value groups hold no candidate: a vectorised OR
// skips them; a group with a hit is written branch-free (each index is
// stored, the count advances only on a hit).
STRAIT_INLINE void collectAtLeastBody(const float* x, size_t n, uint32_t threshold,
                                      std::vector<uint32_t>* out) {
  constexpr size_t kGroup = 16;
  size_t count = out->size();
  out->resize(std::max<size_t>(count + kGroup, out->capacity()));
  size_t i = 0;
  for (; i + kGroup <= n; i += kGroup) {
    uint32_t any = 0;
    for (size_t j = 0; j < kGroup; ++j) any |= static_cast<uint32_t>(keyOf(x[i + j]) >= threshold);
    if (any == 0) continue;
    if (count + kGroup > out->size()) out->resize(2 * out->size());
    uint32_t* o = out->data();
    for (size_t j = 0; j < kGroup; ++j) {
      o[count] = static_cast<uint32_t>(i + j);
      count += keyOf(x[i + j]) >= threshold;
    }
  }
  if (count + kGroup > out->size()) out->resize(count + kGroup);
  for (; i < n; ++i) {
    (*out)[count] = static_cast<uint32_t>(i);
    count += keyOf(x[i]) >= threshold;
  }
  out->resize(count);
}
STRAIT_DISPATCH(void, collectAtLeast,
                (const float* x, size_t n, uint32_t threshold, std::vector<uint32_t>* out),
                (x, n, threshold, out))

// Keeps exactly k of the candidates (in index order): the k largest keys,
// ties at the k-th key broken towards lower indices. Result in st.indices.
void finishSelection(const float* x, size_t k, CodecState& st) {
  std::vector<uint32_t>& cand = st.candidates;
  st.indices.clear();
  if (cand.size() == k) {
    st.indices.swap(cand);
    return;
  }
  std::vector<uint32_t>& keys = st.keys;
  keys.resize(cand.size());
  for (size_t i = 0; i < cand.size(); ++i) keys[i] = keyOf(x[cand[i]]);
  std::nth_element(keys.begin(), keys.begin() + static_cast<ptrdiff_t>(k - 1), keys.end(),
                   std::greater<uint32_t>());
  const uint32_t kth = keys[k - 1];
  size_t above = 0;
  for (uint32_t key : keys) above += key > kth;
  size_t ties = k - above;
  st.indices.reserve(k);
  for (uint32_t i : cand) {
    const uint32_t key = keyOf(x[i]);
    if (key > kth || (key == kth && ties > 0)) {
      if (key == kth) --ties;
      st.indices.push_back(i);
    }
  }
}

void selectRadix(const float* x, size_t n, size_t k, CodecState& st) {
  // Four interleaved histograms, so runs of equal bins do not serialise on
  // one counter.
  std::vector<uint32_t>& hist = st.keys;
  hist.assign(4 * kHistBins, 0);
  uint32_t* h0 = hist.data();
  uint32_t* h1 = h0 + kHistBins;
  uint32_t* h2 = h1 + kHistBins;
  uint32_t* h3 = h2 + kHistBins;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    ++h0[keyOf(x[i]) >> kHistShift];
    ++h1[keyOf(x[i + 1]) >> kHistShift];
    ++h2[keyOf(x[i + 2]) >> kHistShift];
    ++h3[keyOf(x[i + 3]) >> kHistShift];
  }
  for (; i < n; ++i) ++h0[keyOf(x[i]) >> kHistShift];
  for (size_t b = 0; b < kHistBins; ++b) h0[b] += h1[b] + h2[b] + h3[b];
  // Bins from the exponent mask up hold only NaN and Inf.
  for (size_t b = kExpMask >> kHistShift; b < kHistBins; ++b) {
    if (h0[b] != 0) failFirstNonFinite(x, n);
  }
  size_t seen = 0;
  size_t bin = kHistBins;
  while (bin > 0) {
    --bin;
    seen += h0[bin];
    if (seen >= k) break;
  }
  const uint32_t lo = static_cast<uint32_t>(bin) << kHistShift;
  st.candidates.clear();
  st.candidates.reserve(seen);
  collectAtLeast(x, n, lo, &st.candidates);
  finishSelection(x, k, st);
}

void selectSample(const float* x, size_t n, size_t k, CodecState& st, uint64_t seed) {
  if (n <= 4 * kSampleSize) return selectRadix(x, n, k, st);
  // Stratified sample: one value from each of kSampleSize equal strides.
  std::vector<uint32_t>& sample = st.keys;
  sample.resize(kSampleSize);
  const uint32_t key = random::blockKey(seed, 0x70b);
  for (size_t s = 0; s < kSampleSize; ++s) {
    const uint64_t lo = s * n / kSampleSize;
    const uint64_t hi = (s + 1) * n / kSampleSize;
    const uint64_t pick = lo + ((static_cast<uint64_t>(random::mix32(key + static_cast<uint32_t>(s))) *
                                 (hi - lo)) >> 32);
    sample[s] = keyOf(x[pick]);
  }
  // Rank of the threshold in the sample: the expected count above the true
  // k-th value plus 20% and three standard deviations, so the superset misses
  // with negligible probability.
  const double expect = static_cast<double>(kSampleSize) * static_cast<double>(k) / n;
  const size_t rank = static_cast<size_t>(expect * 1.2 + 3.0 * std::sqrt(expect) + 8.0);
  if (rank >= kSampleSize) return selectRadix(x, n, k, st);
  std::nth_element(sample.begin(), sample.begin() + static_cast<ptrdiff_t>(rank), sample.end(),
                   std::greater<uint32_t>());
  const uint32_t threshold = sample[rank];
  std::vector<uint32_t>& cand = st.candidates;
  cand.clear();
  cand.reserve(std::min(n, 2 * k + 1024));
  collectAtLeast(x, n, threshold, &cand);
  if (cand.size() < k) return selectRadix(x, n, k, st);
  for (uint32_t j : cand) {
    if (keyOf(x[j]) >= kExpMask) failNonFinite(x + j, 1, j);
  }
  finishSelection(x, k, st);
}

// Exact selection of the k largest keys of x[0, n) (ties towards lower
// indices), appended to out offset by `base`, for one chunk: nth_element
// over the chunk's keys, then one pass.
void selectChunk(const float* x, size_t n, size_t k, uint32_t base, std::vector<uint32_t>& keys,
                 std::vector<uint32_t>& order, std::vector<uint32_t>& out) {
  keys.resize(n);
  for (size_t i = 0; i < n; ++i) keys[i] = keyOf(x[i]);
  order.assign(keys.begin(), keys.end());  // nth_element reorders
  std::nth_element(order.begin(), order.begin() + static_cast<ptrdiff_t>(k - 1), order.end(),
                   std::greater<uint32_t>());
  const uint32_t kth = order[k - 1];
  size_t above = 0;
  for (size_t i = 0; i < k; ++i) above += order[i] > kth;
  size_t ties = k - above;
  for (size_t i = 0; i < n; ++i) {
    if (keys[i] >= kExpMask) failFirstNonFinite(x, n);
    if (keys[i] > kth || (keys[i] == kth && ties > 0)) {
      if (keys[i] == kth) --ties;
      out.push_back(base + static_cast<uint32_t>(i));
    }
  }
}

// ------------------------------------------------------------ index coding ---

size_t maxIndexBytes(size_t k) {
  return 1 + ceilDiv(k, kIndexBlock) + ceilDiv(k * 32, 8);
}

void appendIndices(const std::vector<uint32_t>& idx, std::vector<uint8_t>& out) {
  ByteWriter w(out);
  w.put<uint8_t>(kIndexFormatDeltaBlocks);
  const size_t k = idx.size();
  const size_t nblocks = ceilDiv(k, kIndexBlock);
  uint32_t deltas[kIndexBlock];
  // Widths first, then the packed blocks: compute each block's deltas twice
  // (cheap: k is small) rather than buffering them.
  const size_t widths_at = w.size();
  w.extend(nblocks);
  uint32_t prev_plus_one = 0;
  for (size_t b = 0; b < nblocks; ++b) {
    const size_t len = std::min(kIndexBlock, k - b * kIndexBlock);
    uint32_t maxd = 0;
    for (size_t j = 0; j < len; ++j) {
      const uint32_t i = idx[b * kIndexBlock + j];
      deltas[j] = i - prev_plus_one;
      prev_plus_one = i + 1;
      maxd |= deltas[j];
    }
    const int width = bitWidth(maxd);
    out[widths_at + b] = static_cast<uint8_t>(width);
    uint8_t* p = w.extend(ceilDiv(len * static_cast<size_t>(width), 8));
    uint64_t acc = 0;
    int fill = 0;
    for (size_t j = 0; j < len; ++j) {
      acc |= static_cast<uint64_t>(deltas[j]) << fill;
      fill += width;
      while (fill >= 8) {
        *p++ = static_cast<uint8_t>(acc);
        acc >>= 8;
        fill -= 8;
      }
    }
    if (fill > 0) *p = static_cast<uint8_t>(acc);
  }
}

// The index section of a payload, length-checked; iterate() validates.
struct IndexSection {
  const uint8_t* widths = nullptr;
  const uint8_t* packed = nullptr;
  size_t k = 0;
  uint64_t n = 0;

  static IndexSection read(ByteReader& r, size_t k, uint64_t n) {
    IndexSection s;
    s.k = k;
    s.n = n;
    const uint8_t format = r.get<uint8_t>("index format");
    if (format != kIndexFormatDeltaBlocks) {
      fail<ProtocolError>("topk: unknown index format ", int(format), " (this build knows 1)");
    }
    const size_t nblocks = ceilDiv(k, kIndexBlock);
    s.widths = r.take(nblocks, "index block widths");
    size_t bytes = 0;
    for (size_t b = 0; b < nblocks; ++b) {
      if (s.widths[b] > 32) {
        fail<ProtocolError>("topk: index block ", b, " has width ", int(s.widths[b]),
                            " bits, at most 32 allowed");
      }
      const size_t len = std::min(kIndexBlock, k - b * kIndexBlock);
      bytes += ceilDiv(len * s.widths[b], 8);
    }
    s.packed = r.take(bytes, "packed index deltas");
    return s;
  }

  // Calls fn(first_position, indices, len) per block of decoded indices;
  // throws ProtocolError if an index reaches n.
  template <typename Fn>
  void forEachBlock(Fn&& fn) const {
    uint32_t idx[kIndexBlock];
    const uint8_t* p = packed;
    uint64_t next = 0;  // previous index + 1
    const size_t nblocks = ceilDiv(k, kIndexBlock);
    for (size_t b = 0; b < nblocks; ++b) {
      const size_t len = std::min(kIndexBlock, k - b * kIndexBlock);
      const int width = widths[b];
      const uint64_t mask = width == 0 ? 0 : (~uint64_t{0} >> (64 - width));
      uint64_t acc = 0;
      int fill = 0;
      for (size_t j = 0; j < len; ++j) {
        while (fill < width) {
          acc |= static_cast<uint64_t>(*p++) << fill;
          fill += 8;
        }
        const uint64_t delta = acc & mask;
        acc = width == 0 ? acc : acc >> width;
        fill -= width;
        const uint64_t i = next + delta;
        if (i >= n) {
          fail<ProtocolError>("topk: index ", i, " at position ", b * kIndexBlock + j,
                              " is out of range for ", n, " values");
        }
        idx[j] = static_cast<uint32_t>(i);
        next = i + 1;
      }
      fn(b * kIndexBlock, idx, len);
    }
  }
};

class TopK final : public Structure {
 public:
  TopK(SparseAmount amount, bool sample, uint64_t chunk) : amount_(amount), sample_(sample), chunk_(chunk) {}

  std::string text() const override {
    if (chunk_ > 0) return "topk(" + amount_.text() + ", chunk=" + std::to_string(chunk_) + ")";
    return "topk(" + amount_.text() + (sample_ ? ", method=sample)" : ", method=radix)");
  }
  StructureKind kind() const override { return StructureKind::kTopK; }

  size_t maxBodyBytes(size_t n, const ValueCodec& values) const override {
    const size_t k = keptFor(n);
    return 8 + maxIndexBytes(k) + values.sectionBytes(k);
  }

  // How many values a tensor of n keeps: per chunk with chunk=.
  size_t keptFor(size_t n) const {
    if (chunk_ == 0 || n <= chunk_) return amount_.kFor(n);
    const size_t full = n / chunk_, rest = n % chunk_;
    return full * amount_.kFor(chunk_) + (rest > 0 ? amount_.kFor(rest) : 0);
  }

  bool topkShape(size_t n, uint64_t* chunk, uint64_t* k_chunk, uint64_t* k_rest, uint64_t* k) const override {
    checkSize(n);
    *k = keptFor(n);
    // One selection over everything, as encode() does, unless chunks apply.
    *chunk = chunk_ > 0 && *k < n && n > chunk_ ? chunk_ : 0;
    *k_chunk = *chunk > 0 ? amount_.kFor(chunk_) : *k;
    *k_rest = *chunk > 0 && n % chunk_ > 0 ? amount_.kFor(n % chunk_) : 0;
    return true;
  }

  static void checkSize(size_t n) {
    if (n > kMaxSparseValues) {
      fail<InvalidArgument>("topk: tensor of ", n, " values exceeds the sparse limit of ",
                            kMaxSparseValues, "; split it into smaller tensors");
    }
  }

  void encode(const float* in, size_t n, const TensorShape&, CodecState& st,
              const ValueCodec& values, std::vector<uint8_t>& out) const override {
    checkSize(n);
    const size_t k = keptFor(n);
    const uint64_t seed = st.nextSeed();
    st.indices.clear();
    if (chunk_ > 0 && k < n) {
      st.indices.reserve(k);
      for (size_t at = 0; at < n; at += chunk_) {
        const size_t len = std::min<size_t>(chunk_, n - at);
        selectChunk(in + at, len, amount_.kFor(len), static_cast<uint32_t>(at), st.keys, st.candidates,
                    st.indices);
      }
    } else if (k == n) {
      // Everything is kept: still check the input, then take every index.
      if (absMaxBits(in, n) >= kExpMask) failFirstNonFinite(in, n);
      st.indices.resize(n);
      for (size_t i = 0; i < n; ++i) st.indices[i] = static_cast<uint32_t>(i);
    } else if (sample_) {
      selectSample(in, n, k, st, seed);
    } else {
      selectRadix(in, n, k, st);
    }
    st.values.resize(k);
    for (size_t j = 0; j < k; ++j) st.values[j] = in[st.indices[j]];
    ByteWriter(out).put<uint64_t>(k);
    appendIndices(st.indices, out);
    appendValues(values, st.values.data(), k, seed, out, 0);
  }

 private:
  SparseAmount amount_;
  bool sample_;
  uint64_t chunk_;  // 0: the whole tensor is one selection
};

}  // namespace

void checkSparseCounts(uint64_t k, uint64_t n, const char* what) {
  if (n > kMaxSparseValues) {
    fail<ProtocolError>(what, ": ", n, " values exceeds the sparse limit of ", kMaxSparseValues);
  }
  if (k > n) fail<ProtocolError>(what, ": k = ", k, " exceeds the value count ", n);
}

void decodeTopKBody(ByteReader& r, const DecodeTarget& t) {
  const uint64_t k = r.get<uint64_t>("topk k");
  checkSparseCounts(k, t.n, "topk");
  const IndexSection idx = IndexSection::read(r, static_cast<size_t>(k), t.n);
  const ValueSection values = ValueSection::read(r, k);
  r.expectEnd("topk payload");
  // Validate everything before the target is touched.
  idx.forEachBlock([](size_t, const uint32_t*, size_t) {});
  values.validate();
  if (!t.accumulate) std::fill(t.data, t.data + t.n, 0.0f);
  float v[kIndexBlock];
  idx.forEachBlock([&](size_t first, const uint32_t* ind, size_t len) {
    values.decode(first, len, v);
    if (t.accumulate) {
      for (size_t j = 0; j < len; ++j) t.data[ind[j]] += t.weight * v[j];
    } else {
      for (size_t j = 0; j < len; ++j) t.data[ind[j]] = v[j];
    }
  });
}

void appendTopKIndices(const std::vector<uint32_t>& idx, std::vector<uint8_t>& out) { appendIndices(idx, out); }

ValueSection readTopKForDevice(ByteReader& r, uint64_t n, std::vector<uint32_t>& indices) {
  const uint64_t k = r.get<uint64_t>("topk k");
  checkSparseCounts(k, n, "topk");
  const IndexSection idx = IndexSection::read(r, static_cast<size_t>(k), n);
  const ValueSection values = ValueSection::read(r, k);
  r.expectEnd("topk payload");
  indices.resize(static_cast<size_t>(k));
  idx.forEachBlock([&](size_t first, const uint32_t* ind, size_t len) {
    std::copy(ind, ind + len, indices.begin() + static_cast<std::ptrdiff_t>(first));
  });
  values.validate();
  return values;
}

std::shared_ptr<const Structure> makeTopK(const StageArgs& args) {
  ArgReader a(args);
  const SparseAmount amount = SparseAmount::read(a);
  const bool sample = a.choice("method", "sample", {"sample", "radix"}) == "sample";
  const uint64_t chunk = static_cast<uint64_t>(a.integer("chunk", 0, 0, int64_t{1} << 30));
  if (chunk > 0 && a.has("method")) {
    a.fail("method", *a.raw("method"), "no method with chunk= (each chunk's selection is exact)");
  }
  a.finish();
  return std::make_shared<TopK>(amount, sample, chunk);
}

}  // namespace strait::core::codec_impl
