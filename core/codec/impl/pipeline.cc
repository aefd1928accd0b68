// Pipeline text parsing, the stage registry, the payload header and the
// dense structure.

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "core/random.h"
#include "core/codec/impl/stages.h"

namespace strait::core {

uint64_t CodecState::nextSeed() { return random::mix64(seed_ ^ random::mix64(count_++)); }

namespace random {
float normal(uint64_t seed, uint64_t i) {
  const uint64_t h = mix64(seed ^ mix64(i));
  // Two 24-bit uniforms; u1 in (0, 1] so the log is finite.
  const double u1 = (static_cast<double>(h >> 40) + 1.0) / 16777216.0;
  const double u2 = static_cast<double>((h >> 16) & 0xffffffULL) / 16777216.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}
}  // namespace random

namespace codec_impl {

const char* structureKindName(StructureKind kind) {
  switch (kind) {
    case StructureKind::kDense: return "dense";
    case StructureKind::kTopK: return "topk";
    case StructureKind::kRandomK: return "randomk";
    case StructureKind::kLowRank: return "lowrank";
  }
  return "?";
}

// ------------------------------------------------------------ arguments ---

ArgReader::ArgReader(const StageArgs& args)
    : args_(args), used_named_(args.named.size(), false), used_positional_(args.positional.size(), false) {}

const std::string* ArgReader::raw(const char* key, int positional) const {
  for (const auto& kv : args_.named) {
    if (kv.first == key) return &kv.second;
  }
  if (positional >= 0 && static_cast<size_t>(positional) < args_.positional.size()) {
    return &args_.positional[static_cast<size_t>(positional)];
  }
  return nullptr;
}

bool ArgReader::has(const char* key, int positional) const { return raw(key, positional) != nullptr; }

void ArgReader::fail(const std::string& key, const std::string& value, const std::string& allowed) const {
  ::strait::fail<ConfigError>("stage '", args_.stage, "' (column ", args_.column, "): ", key, " = ",
                              value, ": must be ", allowed);
}

namespace {
// Marks the argument read by raw() as used.
void markUsed(const StageArgs& args, std::vector<bool>& named, std::vector<bool>& pos,
              const char* key, int positional) {
  for (size_t i = 0; i < args.named.size(); ++i) {
    if (args.named[i].first == key) {
      named[i] = true;
      return;
    }
  }
  if (positional >= 0 && static_cast<size_t>(positional) < pos.size()) {
    pos[static_cast<size_t>(positional)] = true;
  }
}
}  // namespace

double ArgReader::number(const char* key, double fallback, double lo, double hi,
                         const char* allowed, int positional) {
  const std::string* v = raw(key, positional);
  if (v == nullptr) return fallback;
  markUsed(args_, used_named_, used_positional_, key, positional);
  char* end = nullptr;
  const double d = std::strtod(v->c_str(), &end);
  if (v->empty() || *end != '\0' || !std::isfinite(d) || d < lo || d > hi) fail(key, *v, allowed);
  return d;
}

int64_t ArgReader::integer(const char* key, int64_t fallback, int64_t lo, int64_t hi, int positional) {
  const std::string* v = raw(key, positional);
  if (v == nullptr) return fallback;
  markUsed(args_, used_named_, used_positional_, key, positional);
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v->c_str(), &end, 10);
  if (v->empty() || *end != '\0' || errno != 0 || x < lo || x > hi) {
    fail(key, *v, "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return x;
}

std::string ArgReader::choice(const char* key, const std::string& fallback,
                              const std::vector<std::string>& allowed) {
  const std::string* v = raw(key);
  if (v == nullptr) return fallback;
  markUsed(args_, used_named_, used_positional_, key, -1);
  if (std::find(allowed.begin(), allowed.end(), *v) == allowed.end()) {
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : " or ") + a;
    fail(key, *v, list);
  }
  return *v;
}

void ArgReader::finish() const {
  for (size_t i = 0; i < args_.named.size(); ++i) {
    if (!used_named_[i]) {
      ::strait::fail<ConfigError>("stage '", args_.stage, "' (column ", args_.column,
                                  "): unknown argument '", args_.named[i].first,
                                  "' (docs/CONFIG.md lists each stage's arguments)");
    }
  }
  for (size_t i = 0; i < args_.positional.size(); ++i) {
    if (!used_positional_[i]) {
      ::strait::fail<ConfigError>("stage '", args_.stage, "' (column ", args_.column,
                                  "): unexpected argument '", args_.positional[i], "'",
                                  args_.positional.size() > 1 ? " (at most one positional argument)"
                                                              : " (this stage takes only key=value arguments)");
    }
  }
}

size_t SparseAmount::kFor(size_t n) const {
  if (n == 0) return 0;
  if (count > 0) return static_cast<size_t>(std::min<uint64_t>(count, n));
  // ceil(ratio * n), where a product a rounding error above a whole number
  // is that number: topk(0.07) of 100 values keeps 7, not ceil(7.000000000000001).
  const double x = ratio * static_cast<double>(n);
  const double k = std::ceil(x - x * 1e-12);
  return std::min<size_t>(n, std::max<size_t>(1, static_cast<size_t>(k)));
}

std::string SparseAmount::text() const {
  if (count > 0) return "count=" + std::to_string(count);
  // The shortest form that reads back as the same double ("0.1", not
  // "0.10000000000000001").
  char buf[40];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "ratio=%.*g", digits, ratio);
    if (std::strtod(buf + 6, nullptr) == ratio) break;
  }
  return buf;
}

SparseAmount SparseAmount::read(ArgReader& a) {
  SparseAmount s;
  const std::string* first = a.raw("", 0);
  const bool positional_count = first != nullptr && first->find_first_of(".eE") == std::string::npos;
  if (a.has("count") || positional_count) {
    if (a.has("ratio")) a.fail("ratio", *a.raw("ratio"), "absent when count is given (one or the other)");
    s.count = static_cast<uint64_t>(a.integer("count", 0, 1, INT64_MAX, positional_count ? 0 : -1));
  } else {
    s.ratio = a.number("ratio", 0.01, 0.0, 1.0, "a fraction in (0, 1]", 0);
    if (!(s.ratio > 0.0)) a.fail("ratio", *a.raw("ratio", 0), "a fraction in (0, 1]");
  }
  return s;
}

// ------------------------------------------------------------------ dense ---

namespace {

class Dense final : public Structure {
 public:
  std::string text() const override { return ""; }
  StructureKind kind() const override { return StructureKind::kDense; }
  size_t maxBodyBytes(size_t n, const ValueCodec& values) const override {
    return values.sectionBytes(n);
  }
  void encode(const float* in, size_t n, const TensorShape&, CodecState& st,
              const ValueCodec& values, std::vector<uint8_t>& out) const override {
    appendValues(values, in, n, st.nextSeed(), out, 0);
  }
};

}  // namespace

std::shared_ptr<const Structure> makeDense() {
  static const std::shared_ptr<const Structure> kDense = std::make_shared<Dense>();
  return kDense;
}

void decodeDenseBody(ByteReader& r, const DecodeTarget& t) {
  const ValueSection values = ValueSection::read(r, t.n);
  r.expectEnd("dense payload");
  if (t.accumulate) {
    values.validate();
    values.accumulate(0, t.n, t.data, t.weight);
  } else {
    values.decodeChecked(t.data);
  }
}

// --------------------------------------------------------------- registry ---

namespace {

struct StageEntry {
  const char* name;
  std::function<std::shared_ptr<const Structure>(const StageArgs&)> structure;
  std::function<std::shared_ptr<const ValueCodec>(const StageArgs&)> values;
};

std::vector<StageEntry> registerBuiltins() {
  // Order is documentation order: structures first, then value codecs.
  return {
      {"topk", makeTopK, nullptr},
      {"randomk", makeRandomK, nullptr},
      {"lowrank", makeLowRank, nullptr},
      {"fp32", nullptr, makeFp32},
      {"fp16", nullptr, makeFp16},
      {"bf16", nullptr, makeBf16},
      {"int8", nullptr, makeInt8},
      {"int4", nullptr, makeInt4},
      {"int2", nullptr, makeInt2},
      {"qsgd", nullptr, makeQsgd},
      {"sign", nullptr, makeSign},
  };
}

const std::vector<StageEntry>& registry() {
  static const std::vector<StageEntry> kStages = registerBuiltins();
  return kStages;
}

std::string stageList() {
  std::string s;
  for (const auto& e : registry()) s += (s.empty() ? "" : ", ") + std::string(e.name);
  return s;
}

// A small recursive-descent parser over pipeline text, tracking columns.
class Parser {
 public:
  explicit Parser(const std::string& text) : text_(text) {}

  std::vector<StageArgs> stages() {
    std::vector<StageArgs> out;
    skipSpace();
    if (pos_ == text_.size()) error("empty pipeline; expected e.g. \"topk(0.01) -> int8\"");
    while (true) {
      out.push_back(stage());
      skipSpace();
      if (pos_ == text_.size()) break;
      if (text_.compare(pos_, 2, "->") != 0) error("expected '->' between stages");
      pos_ += 2;
      skipSpace();
    }
    return out;
  }

 private:
  [[noreturn]] void error(const std::string& what) const {
    fail<ConfigError>("pipeline \"", text_, "\", column ", pos_ + 1, ": ", what);
  }

  void skipSpace() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }

  std::string word() {
    const size_t start = pos_;
    while (pos_ < text_.size() &&
           (std::isalnum(static_cast<unsigned char>(text_[pos_])) || text_[pos_] == '_' ||
            text_[pos_] == '.' || text_[pos_] == '-' || text_[pos_] == '+')) {
      // '-' starts "->" between stages, not part of a word
      if (text_[pos_] == '-' && pos_ + 1 < text_.size() && text_[pos_ + 1] == '>') break;
      ++pos_;
    }
    return text_.substr(start, pos_ - start);
  }

  StageArgs stage() {
    StageArgs s;
    s.column = pos_ + 1;
    s.stage = word();
    if (s.stage.empty()) error("expected a stage name (" + stageList() + ")");
    skipSpace();
    if (pos_ < text_.size() && text_[pos_] == '(') {
      ++pos_;
      skipSpace();
      if (pos_ < text_.size() && text_[pos_] == ')') {
        ++pos_;
        return s;
      }
      while (true) {
        skipSpace();
        std::string first = word();
        if (first.empty()) error("expected an argument");
        skipSpace();
        if (pos_ < text_.size() && text_[pos_] == '=') {
          ++pos_;
          skipSpace();
          std::string value = word();
          if (value.empty()) error("expected a value after '" + first + "='");
          for (const auto& kv : s.named) {
            if (kv.first == first) error("argument '" + first + "' given twice");
          }
          s.named.emplace_back(first, value);
        } else {
          if (!s.named.empty()) error("positional argument after key=value arguments");
          s.positional.push_back(first);
        }
        skipSpace();
        if (pos_ < text_.size() && text_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < text_.size() && text_[pos_] == ')') {
          ++pos_;
          break;
        }
        error("expected ',' or ')'");
      }
    }
    return s;
  }

  const std::string& text_;
  size_t pos_ = 0;
};

}  // namespace
}  // namespace codec_impl

using namespace codec_impl;

std::vector<std::string> stageNames() {
  std::vector<std::string> names;
  for (const auto& e : registry()) names.emplace_back(e.name);
  return names;
}

Pipeline::Pipeline() : structure_(makeDense()), values_(makeFp32(StageArgs{"fp32", 0, {}, {}})) {}

Pipeline Pipeline::parse(const std::string& text) {
  std::shared_ptr<const Structure> structure;
  std::shared_ptr<const ValueCodec> values;
  for (const StageArgs& s : Parser(text).stages()) {
    const StageEntry* entry = nullptr;
    for (const auto& e : registry()) {
      if (s.stage == e.name) entry = &e;
    }
    if (entry == nullptr) {
      fail<ConfigError>("pipeline \"", text, "\", column ", s.column, ": unknown stage '", s.stage,
                        "'; known stages: ", stageList());
    }
    if (entry->structure) {
      if (structure) {
        fail<ConfigError>("pipeline \"", text, "\", column ", s.column, ": '", s.stage,
                          "' after '", structure->text(),
                          "': a pipeline has at most one of topk, randomk, lowrank");
      }
      if (values) {
        fail<ConfigError>("pipeline \"", text, "\", column ", s.column, ": '", s.stage,
                          "' must come before the value codec '", values->text(), "'");
      }
      structure = entry->structure(s);
    } else {
      if (values) {
        fail<ConfigError>("pipeline \"", text, "\", column ", s.column, ": a second value codec '",
                          s.stage, "' after '", values->text(),
                          "'; a pipeline has at most one of fp32, fp16, bf16, int8, int4, int2, qsgd, sign");
      }
      values = entry->values(s);
    }
  }
  Pipeline p;
  if (structure) p.structure_ = std::move(structure);
  if (values) p.values_ = std::move(values);
  return p;
}

std::string Pipeline::toString() const {
  const std::string s = structure_->text();
  return s.empty() ? values_->text() : s + " -> " + values_->text();
}

bool Pipeline::sparse() const { return structure_->kind() != StructureKind::kDense; }

size_t Pipeline::maxEncodedBytes(size_t n) const {
  return kPayloadHeaderBytes + structure_->maxBodyBytes(n, *values_);
}

namespace codec_impl {
void writePayloadHeader(std::vector<uint8_t>& out, StructureKind structure, uint64_t n) {
  ByteWriter w(out);
  uint8_t* magic = w.extend(4);
  std::copy(std::begin(kMagic), std::end(kMagic), magic);
  w.put<uint8_t>(kFormatVersion);
  w.put<uint8_t>(static_cast<uint8_t>(structure));
  w.put<uint16_t>(0);
  w.put<uint64_t>(n);
}
}  // namespace codec_impl

void Pipeline::encode(const float* in, size_t n, const TensorShape& shape, CodecState& state,
                      std::vector<uint8_t>& out) const {
  if (n > 0 && in == nullptr) fail<InvalidArgument>("encode: null input with n = ", n);
  out.clear();
  writePayloadHeader(out, structure_->kind(), n);
  structure_->encode(in, n, shape, state, *values_, out);
}

std::optional<DeviceEncodePlan> Pipeline::planDeviceEncode(size_t n, CodecState& state) const {
  if (structure_->kind() != StructureKind::kDense) return std::nullopt;
  DeviceEncodePlan plan;
  plan.values = values_->spec();
  plan.n = n;
  plan.body_bytes = values_->sectionBytes(n) - kValueHeaderBytes;
  writePayloadHeader(plan.header, StructureKind::kDense, n);
  plan.header.resize(kPayloadHeaderBytes + kValueHeaderBytes);
  writeValueHeader(plan.header.data() + kPayloadHeaderBytes, plan.values);
  plan.seed = state.nextSeed();  // as Dense::encode draws it
  return plan;
}

namespace {

struct Header {
  uint8_t version;
  StructureKind structure;
  uint64_t n;
};

Header readHeader(ByteReader& r) {
  const uint8_t* magic = r.take(4, "payload magic");
  if (!std::equal(magic, magic + 4, std::begin(kMagic))) {
    fail<ProtocolError>("not a strait payload: bad magic bytes (expected \"STRT\")");
  }
  Header h;
  h.version = r.get<uint8_t>("format version");
  if (h.version != kFormatVersion) {
    fail<ProtocolError>("payload format version ", int(h.version), " is not supported (this build reads version ",
                        int(kFormatVersion), ")");
  }
  const uint8_t kind = r.get<uint8_t>("structure");
  if (kind > static_cast<uint8_t>(StructureKind::kLowRank)) {
    fail<ProtocolError>("unknown structure id ", int(kind), " (this build knows 0..3: dense, topk, randomk, lowrank)");
  }
  h.structure = static_cast<StructureKind>(kind);
  const uint16_t flags = r.get<uint16_t>("flags");
  if (flags != 0) fail<ProtocolError>("payload flags = ", flags, ", must be 0 in version 1");
  h.n = r.get<uint64_t>("value count");
  return h;
}

void decodeInto(const uint8_t* data, size_t size, float* target, size_t n, float weight, bool accumulate) {
  if (data == nullptr && size > 0) fail<InvalidArgument>("decode: null payload with size ", size);
  ByteReader r(data, size);
  const Header h = readHeader(r);
  if (h.n != n) {
    fail<ProtocolError>("payload holds ", h.n, " values but the destination has ", n);
  }
  if (n > 0 && target == nullptr) fail<InvalidArgument>("decode: null destination with n = ", n);
  const DecodeTarget t{target, h.n, weight, accumulate};
  switch (h.structure) {
    case StructureKind::kDense: return decodeDenseBody(r, t);
    case StructureKind::kTopK: return decodeTopKBody(r, t);
    case StructureKind::kRandomK: return decodeRandomKBody(r, t);
    case StructureKind::kLowRank: return decodeLowRankBody(r, t);
  }
}

}  // namespace

std::optional<DeviceTopKPlan> Pipeline::planDeviceTopK(size_t n, CodecState& state) const {
  DeviceTopKPlan plan;
  if (!structure_->topkShape(n, &plan.chunk, &plan.k_chunk, &plan.k_rest, &plan.k)) return std::nullopt;
  plan.values = values_->spec();
  plan.n = n;
  writePayloadHeader(plan.header, StructureKind::kTopK, n);
  plan.seed = state.nextSeed();  // as TopK::encode draws it
  return plan;
}

void Pipeline::appendTopKHead(const DeviceTopKPlan& plan, const std::vector<uint32_t>& indices,
                              std::vector<uint8_t>& out) const {
  if (indices.size() != plan.k) fail<InvalidArgument>("topk: ", indices.size(), " indices for k = ", plan.k);
  ByteWriter(out).put<uint64_t>(plan.k);
  appendTopKIndices(indices, out);
  uint8_t* at = ByteWriter(out).extend(kValueHeaderBytes);
  writeValueHeader(at, plan.values);
}

std::optional<DeviceDecodePlan> planDeviceDecode(const uint8_t* data, size_t size, size_t n) {
  if (data == nullptr && size > 0) fail<InvalidArgument>("decode: null payload with size ", size);
  ByteReader r(data, size);
  const Header h = readHeader(r);
  if (h.n != n) fail<ProtocolError>("payload holds ", h.n, " values but the destination has ", n);
  DeviceDecodePlan plan;
  plan.n = h.n;
  std::optional<ValueSection> values;
  switch (h.structure) {
    case StructureKind::kDense:
      values = ValueSection::read(r, h.n);
      r.expectEnd("dense payload");
      values->validate();
      break;
    case StructureKind::kTopK:
      plan.dense = false;
      values = readTopKForDevice(r, h.n, plan.indices);
      break;
    default:
      return std::nullopt;
  }
  plan.values = values->spec();
  plan.count = values->count();
  plan.body_offset = static_cast<uint64_t>(values->body() - data);
  return plan;
}

PayloadInfo inspectPayload(const uint8_t* data, size_t size) {
  if (data == nullptr && size > 0) fail<InvalidArgument>("inspectPayload: null payload");
  ByteReader r(data, size);
  const Header h = readHeader(r);
  PayloadInfo info;
  info.version = h.version;
  info.n = h.n;
  info.structure = structureKindName(h.structure);
  // Skip the structure's fixed fields to reach the value section header.
  size_t skip = 0;
  switch (h.structure) {
    case StructureKind::kDense: skip = 0; break;
    case StructureKind::kTopK: {
      const uint64_t k = r.get<uint64_t>("topk k");
      checkSparseCounts(k, h.n, "topk");
      r.take(1, "index format");
      const uint8_t* widths = r.take((k + 127) / 128, "index block widths");
      size_t bytes = 0;
      for (uint64_t b = 0; b < (k + 127) / 128; ++b) {
        const uint64_t len = std::min<uint64_t>(128, k - b * 128);
        bytes += (len * widths[b] + 7) / 8;
      }
      skip = bytes;
      break;
    }
    case StructureKind::kRandomK: skip = 16; break;
    case StructureKind::kLowRank: skip = 12; break;
  }
  r.take(skip, "structure fields");
  const uint8_t kind = r.get<uint8_t>("value section kind");
  const uint8_t bits = r.get<uint8_t>("value section bits");
  if (kind < 1 || kind > 6) fail<ProtocolError>("unknown value codec id ", int(kind));
  info.values = valueKindName(static_cast<ValueKind>(kind));
  if (info.values == "int") info.values += std::to_string(bits);
  info.bits = bits;
  return info;
}

void decode(const uint8_t* data, size_t size, float* out, size_t n) {
  decodeInto(data, size, out, n, 1.0f, false);
}

void decodeAccumulate(const uint8_t* data, size_t size, float* acc, size_t n, float weight) {
  if (!std::isfinite(weight)) fail<InvalidArgument>("decodeAccumulate: weight ", weight, " is not finite");
  decodeInto(data, size, acc, n, weight, true);
}

}  // namespace strait::core
