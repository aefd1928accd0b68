#pragma once
// Compression pipelines for float32 buffers: what crosses the border.
//
// A Pipeline is at most one *structure* stage followed by one *value* stage:
//
//   structure: topk | randomk | lowrank      (omitted: every value is kept)
//   values:    fp32 | fp16 | bf16 | int8 | int4 | int2 | qsgd | sign
//
// written as text, e.g. "topk(0.01) -> int8", "lowrank(rank=4) -> fp16",
// "int4(block=128, rounding=stochastic)". docs/CONFIG.md lists every stage and
// argument; docs/PROTOCOL.md the encoded format.
//
// Encoded payloads are self-describing and versioned: decode() needs no
// configuration, only the bytes. Decoders treat the bytes as hostile: every
// length, count, index, code and scale is validated, and anything wrong throws
// ProtocolError before the output buffer is touched beyond what was already
// valid (see decode() for the exact guarantee).
//
// Non-finite input (NaN, +-Inf) is rejected by every encoder with
// InvalidArgument naming the first bad index: a NaN that crossed the border
// would poison every site's model. fp16 likewise rejects finite values beyond
// its range (|x| >= 65520, which rounds to Inf) rather than sending Inf.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/codec/value_stage.h"

namespace strait::core {

// The shape of the tensor a flat buffer came from. Only lowrank looks at it
// (to choose its 2-D view); every other stage treats the buffer as flat.
struct TensorShape {
  std::vector<int64_t> dims;
};

// Per-tensor encoder state: the random stream for stochastic rounding and
// random-k, the warm-start factor of lowrank, and scratch buffers so that a
// steady-state encode allocates nothing. One CodecState per (pipeline, tensor);
// not thread-safe. Movable, not copyable.
class CodecState {
 public:
  explicit CodecState(uint64_t seed = 0x5eed) : seed_(seed) {}
  CodecState(CodecState&&) = default;
  CodecState& operator=(CodecState&&) = default;
  CodecState(const CodecState&) = delete;
  CodecState& operator=(const CodecState&) = delete;

  uint64_t seed() const { return seed_; }
  uint64_t encodeCount() const { return count_; }

  // Internal to the codecs.
  uint64_t nextSeed();                 // a fresh 64-bit seed for this encode
  std::vector<uint32_t> indices;       // topk / randomk selection
  std::vector<uint32_t> candidates;    // topk selection scratch
  std::vector<uint32_t> keys;          // topk histogram / sample scratch
  std::vector<float> values;           // gathered values / lowrank factors
  std::vector<float> matrix;           // lowrank padded view
  std::vector<float> warm_q;           // lowrank warm start (cols x rank)
  int64_t warm_rows = -1;              // the view warm_q belongs to
  int64_t warm_cols = -1;

 private:
  uint64_t seed_;
  uint64_t count_ = 0;
};

// An encode a device runs (torch_ext/csrc/cuda/): the payload's first bytes
// (its header and the value section's, exactly as encode() writes them), the
// value stage, and the seed encode() would have drawn. The device writes the
// rest: body_bytes of block scales then codes (or float values).
struct DeviceEncodePlan {
  std::vector<uint8_t> header;
  ValueStageSpec values;
  uint64_t seed = 0;
  uint64_t n = 0;
  uint64_t body_bytes = 0;
};

// A top-k encode whose selection and values a device computes: the
// payload header, the value stage, the seed, and how n values are selected.
// The device selects, in each chunk of `chunk` values (0: the whole tensor
// is one chunk), the k_chunk largest magnitudes (k_rest in a last, shorter
// chunk), ties at the k-th going to lower indices, as the CPU encoder does;
// appendTopKHead then writes k and the indices, and the value section of
// the k gathered values follows.
struct DeviceTopKPlan {
  std::vector<uint8_t> header;
  ValueStageSpec values;
  uint64_t seed = 0;
  uint64_t n = 0;
  uint64_t k = 0;
  uint64_t chunk = 0;
  uint64_t k_chunk = 0;
  uint64_t k_rest = 0;
};

// A payload a device decodes, validated in full on the host (the same checks
// as decode(); only compressed bytes are read): the value stage, the offset of
// the value section's body (scales, then codes or values) in the payload, and
// for a top-k payload the kept indices in increasing order.
struct DeviceDecodePlan {
  ValueStageSpec values;
  uint64_t n = 0;         // values of the decoded tensor
  uint64_t count = 0;     // values in the section (n when dense)
  uint64_t body_offset = 0;
  bool dense = true;
  std::vector<uint32_t> indices;  // top-k only
};

// Validates data[0..size) as decode(..., n) would (ProtocolError on anything
// malformed) and, for a dense or top-k payload, returns what a device needs
// to decode it; nullopt for random-k and low-rank payloads (decoded on the
// host).
std::optional<DeviceDecodePlan> planDeviceDecode(const uint8_t* data, size_t size, size_t n);

namespace codec_impl {
class Structure;
class ValueCodec;
}  // namespace codec_impl

// An immutable, validated compression pipeline. Cheap to copy; thread-safe
// (all mutable state lives in the CodecState passed to encode()).
class Pipeline {
 public:
  // "fp32": every value, uncompressed.
  Pipeline();

  // Parses pipeline text such as "topk(0.01) -> int8". Throws ConfigError with
  // the column and what is allowed on anything malformed.
  static Pipeline parse(const std::string& text);

  // The canonical text with every argument spelled out; parse(toString())
  // gives an equal pipeline.
  std::string toString() const;

  // An upper bound on the encoded size of n values (exact for dense
  // pipelines), so that buffers can be sized once.
  size_t maxEncodedBytes(size_t n) const;

  // Encodes n float32 values into out (resized to the payload length; its
  // capacity is reused). Throws InvalidArgument on non-finite input or a size
  // the pipeline does not support. Does not block; O(n).
  void encode(const float* in, size_t n, const TensorShape& shape, CodecState& state,
              std::vector<uint8_t>& out) const;
  void encode(const float* in, size_t n, CodecState& state, std::vector<uint8_t>& out) const {
    encode(in, n, TensorShape{}, state, out);
  }

  bool sparse() const;  // true when a structure stage drops or factors values

  // For a dense pipeline: the encode of n values a device runs, drawing the
  // seed from state as encode() does (so the two stay interchangeable);
  // nullopt for the structures the device does not run (state untouched).
  std::optional<DeviceEncodePlan> planDeviceEncode(size_t n, CodecState& state) const;

  // For a top-k pipeline: the encode a device runs (see DeviceTopKPlan),
  // drawing the seed as encode() does; nullopt for other structures.
  std::optional<DeviceTopKPlan> planDeviceTopK(size_t n, CodecState& state) const;

  // Appends, after plan.header, what follows it up to the value section's
  // body: k, the index section of `indices` (the plan's selection, k
  // increasing indices) and the value section's header.
  void appendTopKHead(const DeviceTopKPlan& plan, const std::vector<uint32_t>& indices,
                      std::vector<uint8_t>& out) const;

 private:
  std::shared_ptr<const codec_impl::Structure> structure_;
  std::shared_ptr<const codec_impl::ValueCodec> values_;
};

// What a payload's header says, validated as far as the header goes.
struct PayloadInfo {
  uint8_t version = 0;
  uint64_t n = 0;              // number of float32 values it represents
  std::string structure;       // "dense", "topk", "randomk", "lowrank"
  std::string values;          // "fp32", "fp16", ..., "sign"
  int bits = 0;                // bits per transmitted value
};

// Reads the header. Throws ProtocolError on a malformed header.
PayloadInfo inspectPayload(const uint8_t* data, size_t size);

// Decodes a payload into out[0..n). n must equal the payload's value count.
// Throws ProtocolError on malformed bytes. On a throw, out may hold a partial
// result: callers decode into scratch or discard out on error.
void decode(const uint8_t* data, size_t size, float* out, size_t n);

// acc[i] += weight * decoded[i], without materialising the decoded buffer.
// The whole payload is validated before acc is modified, so a malformed
// payload throws ProtocolError and leaves acc untouched.
void decodeAccumulate(const uint8_t* data, size_t size, float* acc, size_t n, float weight);

// Stage names the parser accepts, in documentation order.
std::vector<std::string> stageNames();

}  // namespace strait::core
