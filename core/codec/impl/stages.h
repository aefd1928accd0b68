#pragma once
// Internal interfaces of the codec library: the two kinds of pipeline stage
// and the wire constants shared by encoders and decoders. Not installed.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/bytes.h"
#include "core/codec/codec.h"

namespace strait::core::codec_impl {

// Wire identifiers. Never renumber: they are part of the format (docs/PROTOCOL.md).
enum class ValueKind : uint8_t { kFp32 = 1, kFp16 = 2, kBf16 = 3, kInt = 4, kQsgd = 5, kSign = 6 };
enum class StructureKind : uint8_t { kDense = 0, kTopK = 1, kRandomK = 2, kLowRank = 3 };

constexpr uint8_t kMagic[4] = {'S', 'T', 'R', 'T'};
constexpr uint8_t kFormatVersion = 1;
constexpr size_t kPayloadHeaderBytes = 16;
constexpr size_t kValueHeaderBytes = 8;
// Sparse index arithmetic is 32-bit: a tensor beyond this is rejected at encode
// ("split the tensor"), and a payload claiming more is rejected at decode.
constexpr uint64_t kMaxSparseValues = 0xffffffffULL;
constexpr uint32_t kMinBlock = 8;
constexpr uint32_t kMaxBlock = 65536;

const char* valueKindName(ValueKind kind);
const char* structureKindName(StructureKind kind);

// Largest |x| over in[0..n) as float bits (SIMD-dispatched); a result
// >= 0x7f800000 means a NaN or Inf is present.
uint32_t absMaxBits(const float* in, size_t n);

// Throws InvalidArgument naming the first non-finite value in in[0..n).
// `offset` is added to the reported index.
[[noreturn]] void failNonFinite(const float* in, size_t n, size_t offset);

// Encodes a dense run of float32 values. Immutable and thread-safe.
class ValueCodec {
 public:
  virtual ~ValueCodec() = default;
  virtual std::string text() const = 0;
  virtual ValueKind kind() const = 0;
  virtual int bits() const = 0;
  // The stage as plain numbers (the section header and the device kernels).
  virtual ValueStageSpec spec() const = 0;
  // Exact byte length of the section for `count` values, header included.
  virtual size_t sectionBytes(size_t count) const = 0;
  // Writes exactly sectionBytes(count) bytes to out. Throws InvalidArgument
  // (naming index + offset) on input the format cannot represent.
  virtual void encode(const float* in, size_t count, uint64_t seed, uint8_t* out,
                      size_t offset) const = 0;
};

// A value section read from the wire: header validated and length checked;
// contents checked by validate().
class ValueSection {
 public:
  // Reads the section for `count` values from r. Throws ProtocolError.
  static ValueSection read(ByteReader& r, uint64_t count);

  // Checks every scale and code; throws ProtocolError on the first bad one.
  void validate() const;

  // Decodes all values into out, validating as it goes: on a throw, out holds
  // a partial result. Faster than validate() + decode().
  void decodeChecked(float* out) const;

  // out[j] = value[begin + j] for j < len.
  void decode(size_t begin, size_t len, float* out) const;
  // acc[j] += weight * value[begin + j] for j < len.
  void accumulate(size_t begin, size_t len, float* acc, float weight) const;

  ValueKind kind() const { return kind_; }
  int bits() const { return bits_; }
  uint64_t count() const { return count_; }
  // The section's body: scales (blockwise kinds), then codes or values.
  const uint8_t* body() const { return scales_ != nullptr ? scales_ : data_; }
  ValueStageSpec spec() const;

 private:
  // Copies values [at, at + len) of a float kind into raw (4- or 2-byte
  // words) and throws ProtocolError if any is NaN or Inf.
  void loadCheckedChunk(size_t at, size_t len, void* raw) const;
  // fp16/bf16 values [begin, begin + len) into out (= or += weight *).
  void convert16(size_t begin, size_t len, float* out, float weight, bool accumulate) const;

  ValueKind kind_ = ValueKind::kFp32;
  int bits_ = 32;
  bool stochastic_ = false;
  uint32_t block_ = 0;
  uint64_t count_ = 0;
  const uint8_t* scales_ = nullptr;  // float32 per block (int, qsgd, sign)
  const uint8_t* data_ = nullptr;    // values or packed codes
};

// The first stage of a pipeline: which values are sent, in what arrangement.
class Structure {
 public:
  virtual ~Structure() = default;
  virtual std::string text() const = 0;
  virtual StructureKind kind() const = 0;
  // Upper bound of the body length (after the payload header) for n values.
  virtual size_t maxBodyBytes(size_t n, const ValueCodec& values) const = 0;
  // Appends the body to out (the payload header is already there).
  virtual void encode(const float* in, size_t n, const TensorShape& shape, CodecState& state,
                      const ValueCodec& values, std::vector<uint8_t>& out) const = 0;
  // Top-k only: how n values are selected (DeviceTopKPlan's chunk, k_chunk,
  // k_rest, k). Throws InvalidArgument where encode() would on the size.
  virtual bool topkShape(size_t n, uint64_t* chunk, uint64_t* k_chunk, uint64_t* k_rest, uint64_t* k) const {
    (void)n, (void)chunk, (void)k_chunk, (void)k_rest, (void)k;
    return false;
  }
};

// Appends a top-k index section for increasing indices.
void appendTopKIndices(const std::vector<uint32_t>& idx, std::vector<uint8_t>& out);

// Throws ProtocolError unless a sparse payload's k and n are acceptable.
void checkSparseCounts(uint64_t k, uint64_t n, const char* what);

// The 8-byte value-section header of a stage.
void writeValueHeader(uint8_t* out, const ValueStageSpec& spec);

// The 16-byte payload header.
void writePayloadHeader(std::vector<uint8_t>& out, StructureKind structure, uint64_t n);

// Writes a value section for in[0..count) at the end of out.
void appendValues(const ValueCodec& codec, const float* in, size_t count, uint64_t seed,
                  std::vector<uint8_t>& out, size_t offset);

// Body decoders, one per structure. Each validates the whole body before it
// writes to `target`; accumulate selects acc += weight * v over out = v.
struct DecodeTarget {
  float* data;
  uint64_t n;
  float weight;
  bool accumulate;
};
void decodeDenseBody(ByteReader& r, const DecodeTarget& t);
void decodeTopKBody(ByteReader& r, const DecodeTarget& t);
void decodeRandomKBody(ByteReader& r, const DecodeTarget& t);
void decodeLowRankBody(ByteReader& r, const DecodeTarget& t);

// A top-k body read for a device decoder: the kept indices (validated: in
// range, increasing) into `indices`, and the value section, validated.
ValueSection readTopKForDevice(ByteReader& r, uint64_t n, std::vector<uint32_t>& indices);

// Stage arguments as parsed from pipeline text: positional then key=value.
struct StageArgs {
  std::string stage;                 // stage name, for messages
  size_t column = 0;                 // 1-based column of the stage in the text
  std::vector<std::string> positional;
  std::vector<std::pair<std::string, std::string>> named;
};

// Factories (registerBuiltins() lists them). Each validates its arguments and
// throws ConfigError naming the stage, argument, value and what is allowed.
std::shared_ptr<const ValueCodec> makeFp32(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeFp16(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeBf16(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeInt8(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeInt4(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeInt2(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeQsgd(const StageArgs& args);
std::shared_ptr<const ValueCodec> makeSign(const StageArgs& args);
std::shared_ptr<const Structure> makeTopK(const StageArgs& args);
std::shared_ptr<const Structure> makeRandomK(const StageArgs& args);
std::shared_ptr<const Structure> makeLowRank(const StageArgs& args);
std::shared_ptr<const Structure> makeDense();

// Argument helpers for the factories.
class ArgReader {
 public:
  explicit ArgReader(const StageArgs& args);
  // Each returns the named (or the given positional) argument, or the default.
  double number(const char* key, double fallback, double lo, double hi, const char* allowed,
                int positional = -1);
  int64_t integer(const char* key, int64_t fallback, int64_t lo, int64_t hi, int positional = -1);
  std::string choice(const char* key, const std::string& fallback,
                     const std::vector<std::string>& allowed);
  bool has(const char* key, int positional = -1) const;
  const std::string* raw(const char* key, int positional = -1) const;
  // Throws on any argument that no accessor asked for.
  void finish() const;
  [[noreturn]] void fail(const std::string& key, const std::string& value,
                         const std::string& allowed) const;

 private:
  const StageArgs& args_;
  std::vector<bool> used_named_;
  std::vector<bool> used_positional_;
};

// How many values a sparsifier keeps: a ratio of n (rounded up, at least one)
// or a fixed count (at most n). Shared by topk and randomk.
struct SparseAmount {
  double ratio = 0.01;
  uint64_t count = 0;  // > 0: a fixed count, ratio unused
  size_t kFor(size_t n) const;
  std::string text() const;  // "ratio=0.01" or "count=100"
  // Reads ratio= / count= or one positional number (an integer literal is a
  // count, anything with '.' or an exponent a ratio).
  static SparseAmount read(ArgReader& a);
};

// fp16 conversions, exposed so tests can compare the SIMD and scalar paths.
uint16_t floatToHalfScalar(float f);
float halfToFloatScalar(uint16_t h);
void floatToHalf(const float* in, size_t n, uint16_t* out);  // dispatched
void halfToFloat(const uint16_t* in, size_t n, float* out);  // dispatched

}  // namespace strait::core::codec_impl
