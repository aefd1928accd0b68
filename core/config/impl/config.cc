// YAML -> JobConfig. Every check goes through Field, which carries the key
// path and the source, so that every message has one shape:
//   SOURCE:LINE: KEYPATH = VALUE: must be WHAT
// Values are read from the scalar text with strict parsers of our own, not
// yaml-cpp's as<T>(): that one takes yes/no/on/off as booleans, "0x10" as 16
// and truncates "1.5" to an integer, none of which a config should mean.

#include "core/config/config.h"

#include <fcntl.h>
#include <fnmatch.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

#include "core/error.h"

namespace strait::core {

const char* syncModeName(SyncMode mode) {
  return mode == SyncMode::kDiLoCo ? "diloco" : "every_step";
}

bool CompressionRule::matches(const std::string& name, uint64_t size) const {
  return size >= min_size && size <= max_size && fnmatch(match.c_str(), name.c_str(), 0) == 0;
}

const CompressionRule& CompressionConfig::ruleFor(const std::string& name, uint64_t size) const {
  for (const CompressionRule& r : rules) {
    if (r.matches(name, size)) return r;
  }
  return fallback;
}

const SiteConfig& JobConfig::site(const std::string& name) const {
  std::string known;
  for (const SiteConfig& s : sites) {
    if (s.name == name) return s;
    known += (known.empty() ? "" : ", ") + s.name;
  }
  fail<ConfigError>(source, ": no site named '", name, "' in job '", job_id, "'; sites: ", known);
}

namespace {

constexpr uint64_t kU64Max = std::numeric_limits<uint64_t>::max();

size_t editDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    prev.swap(cur);
  }
  return prev[b.size()];
}

std::string listOf(const std::vector<const char*>& items) {
  std::string s;
  for (const char* i : items) s += (s.empty() ? "" : ", ") + std::string(i);
  return s;
}

// A value as messages show it: bare when that is unambiguous, else quoted.
std::string quoted(const std::string& s) {
  std::string q = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') q += '\\';
    q += c;
  }
  return q + "\"";
}

std::string shownValue(const std::string& s) {
  const bool plain = !s.empty() && std::none_of(s.begin(), s.end(), [](char c) {
    return std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c)) ||
           c == '"' || c == '\\';
  });
  return plain ? s : quoted(s);
}

// Plain decimal only: an optional '-' and digits. No '+', spaces, 0x10, 0o17,
// 1_000, 1.0 or 1e3 (YAML 1.1 and strtoll would each take some of those).
bool parseDecimal(const std::string& s, bool* negative, uint64_t* magnitude) {
  size_t i = 0;
  *negative = !s.empty() && s[0] == '-';
  if (*negative) i = 1;
  if (i == s.size()) return false;
  uint64_t v = 0;
  for (; i < s.size(); ++i) {
    if (s[i] < '0' || s[i] > '9') return false;
    const uint64_t d = static_cast<uint64_t>(s[i] - '0');
    if (v > (kU64Max - d) / 10) return false;
    v = v * 10 + d;
  }
  *magnitude = v;
  return true;
}

// A decimal number such as 1, -0.5, 2.5e-3. Hex floats, inf and nan are not
// numbers here (and YAML's .inf / .nan are not finite either).
bool parseNumber(const std::string& s, double* out) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '-' || c == '+')) return false;
  }
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (*end != '\0' || !std::isfinite(v)) return false;
  *out = v;
  return true;
}

std::string numberText(double v) {
  std::ostringstream o;
  o << v;
  return o.str();
}

// A range of numbers, with the words that describe it in messages.
struct Interval {
  double lo;
  double hi;
  bool lo_open;
  bool hi_open;

  static Interval above(double lo) { return {lo, HUGE_VAL, true, true}; }
  static Interval halfOpen(double lo, double hi) { return {lo, hi, false, true}; }

  bool contains(double v) const {
    return (lo_open ? v > lo : v >= lo) && (hi_open ? v < hi : v <= hi);
  }
  std::string text() const {
    if (std::isinf(hi)) return std::string("a number ") + (lo_open ? "> " : ">= ") + numberText(lo);
    return std::string("a number in ") + (lo_open ? "(" : "[") + numberText(lo) + ", " + numberText(hi) +
           (hi_open ? ")" : "]");
  }
};

// A YAML node with the key path that leads to it. The getters return the
// fallback when the key is absent or has no value (`key:` or `key: ~`), and
// throw ConfigError when it is there but not acceptable.
class Field {
 public:
  Field(const YAML::Node& node, std::string path, const std::string& source, int line = 0)
      : node_(node), path_(std::move(path)), source_(source), line_(line > 0 ? line : node_.Mark().line + 1) {}

  int line() const { return line_; }
  bool present() const { return node_.IsDefined() && !node_.IsNull(); }

  // "SOURCE:LINE: PATH = VALUE: must be WHAT"
  [[noreturn]] void reject(const std::string& what) const { invalid(shown(), "must be " + what); }
  // "SOURCE:LINE: PATH = VALUE: DETAIL", the value as the caller shows it.
  [[noreturn]] void invalid(const std::string& value, const std::string& detail) const {
    fail<ConfigError>(source_, ":", line(), ": ", name(), " = ", value, ": ", detail);
  }
  // "SOURCE:LINE: PATH: WHAT", for problems with a whole mapping or list.
  [[noreturn]] void error(const std::string& what) const {
    fail<ConfigError>(source_, ":", line(), ": ", name(), ": ", what);
  }

  // Only call these on a node already checked with expectMap / expectList:
  // subscripting a scalar throws inside yaml-cpp.
  Field child(const char* key) const {
    for (const auto& kv : node_) {
      if (kv.first.IsScalar() && kv.first.Scalar() == key) {
        // yaml-cpp marks an empty value where the next token starts, often
        // on a later line: point at the key instead.
        const YAML::Node& at = kv.second.IsNull() ? kv.first : kv.second;
        return Field(kv.second, join(key), source_, at.Mark().line + 1);
      }
    }
    return Field(node_[key], join(key), source_, line_);  // absent: undefined
  }
  Field item(size_t i) const { return Field(node_[i], path_ + "[" + std::to_string(i) + "]", source_); }

  Field required(const char* key) const {
    Field f = child(key);
    if (!f.node_.IsDefined()) error(std::string("missing required key '") + key + "'");
    if (f.node_.IsNull()) f.error("required, but has no value");
    return f;
  }

  // Checks that the node is a mapping whose keys are all in `allowed`, each
  // at most once (yaml-cpp itself keeps a duplicate key silently).
  void expectMap(const std::vector<const char*>& allowed) const {
    if (!node_.IsMap()) reject("a mapping with keys " + listOf(allowed));
    std::vector<std::pair<std::string, int>> seen;
    for (const auto& kv : node_) {
      const int key_line = kv.first.Mark().line + 1;
      if (!kv.first.IsScalar()) {
        fail<ConfigError>(source_, ":", key_line, ": a key ", where(), " is not a plain name; allowed: ",
                          listOf(allowed));
      }
      const std::string& key = kv.first.Scalar();
      for (const auto& s : seen) {
        if (s.first == key) {
          fail<ConfigError>(source_, ":", key_line, ": duplicate key '", key, "' ", where(),
                            " (first at line ", s.second, ")");
        }
      }
      seen.emplace_back(key, key_line);
      if (std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return key == a; })) continue;
      std::string hint;
      size_t best = 3;
      for (const char* a : allowed) {
        const size_t d = editDistance(key, a);
        if (d < best) {
          best = d;
          hint = std::string("; did you mean '") + a + "'?";
        }
      }
      fail<ConfigError>(source_, ":", key_line, ": unknown key '", key, "' ", where(), "; allowed: ",
                        listOf(allowed), hint);
    }
  }

  // Checks that the node is a sequence of lo..hi items; returns the count.
  size_t expectList(size_t lo, size_t hi, const std::string& what) const {
    if (!node_.IsSequence()) reject(what);
    const size_t n = node_.size();
    if (n < lo || n > hi) invalid("(" + std::to_string(n) + " items)", "must be " + what);
    return n;
  }

  std::string scalar() const {
    if (!node_.IsScalar()) reject("a single value, not a " + kind());
    return node_.Scalar();
  }

  std::string text(const std::string& fallback) const { return present() ? scalar() : fallback; }

  // An integer in [lo, hi]; `what` replaces the generated description.
  uint64_t integer(uint64_t fallback, uint64_t lo, uint64_t hi, const std::string& what = "") const {
    if (!present()) return fallback;
    bool negative = false;
    uint64_t v = 0;
    const bool ok = parseDecimal(scalar(), &negative, &v) && (!negative || v == 0) && v >= lo && v <= hi;
    if (!ok) {
      reject(!what.empty() ? what
             : hi == kU64Max ? "an integer >= " + std::to_string(lo)
                             : "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return v;
  }

  double number(double fallback, const Interval& range, const std::string& what = "") const {
    if (!present()) return fallback;
    double v = 0;
    if (!parseNumber(scalar(), &v) || !range.contains(v)) reject(what.empty() ? range.text() : what);
    return v;
  }

  bool boolean(bool fallback) const {
    if (!present()) return fallback;
    const std::string s = scalar();
    if (s == "true") return true;
    if (s == "false") return false;
    reject("true or false");
  }

  std::string choice(const std::string& fallback, const std::vector<const char*>& allowed) const {
    if (!present()) return fallback;
    const std::string s = scalar();
    for (const char* a : allowed) {
      if (s == a) return s;
    }
    reject("one of " + listOf(allowed));
  }

 private:
  std::string join(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  std::string name() const { return path_.empty() ? "document" : path_; }
  std::string where() const { return path_.empty() ? "at the top level" : "in " + path_; }
  std::string shown() const { return node_.IsScalar() ? shownValue(node_.Scalar()) : "(" + kind() + ")"; }
  std::string kind() const {
    if (node_.IsMap()) return "mapping";
    if (node_.IsSequence()) return "sequence";
    if (node_.IsNull()) return "empty value";
    return "scalar";
  }

  YAML::Node node_;
  std::string path_;
  const std::string& source_;
  int line_;  // 1-based
};

bool onlyChars(const std::string& s, bool upper, const char* extra) {
  return std::all_of(s.begin(), s.end(), [&](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (upper && c >= 'A' && c <= 'Z') ||
           (c != '\0' && std::strchr(extra, c) != nullptr);
  });
}

// tcp://HOST:PORT: HOST a name or IPv4 address, or an IPv6 address in
// brackets; PORT plain digits in 1..65535.
bool validEndpoint(const std::string& e) {
  const std::string prefix = "tcp://";
  if (e.compare(0, prefix.size(), prefix) != 0) return false;
  const size_t colon = e.rfind(':');
  if (colon == std::string::npos || colon < prefix.size()) return false;
  const std::string host = e.substr(prefix.size(), colon - prefix.size());
  const std::string port = e.substr(colon + 1);
  bool negative = false;
  uint64_t p = 0;
  if (!parseDecimal(port, &negative, &p) || negative || p < 1 || p > 65535) return false;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    const std::string v6 = host.substr(1, host.size() - 2);
    return v6.find(':') != std::string::npos && std::all_of(v6.begin(), v6.end(), [](char c) {
             return std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.';
           });
  }
  return !host.empty() && onlyChars(host, true, "._-");
}

Pipeline parsePipeline(const Field& f) {
  const std::string text = f.scalar();
  try {
    return Pipeline::parse(text);
  } catch (const ConfigError& e) {
    f.invalid(quoted(text), e.what());
  }
}

// An ISO 3166-1 alpha-2 code, in job configs and site policies alike.
std::string parseJurisdiction(const Field& f) {
  const std::string j = f.scalar();
  if (j.size() != 2 || !std::all_of(j.begin(), j.end(), [](char c) { return c >= 'A' && c <= 'Z'; })) {
    f.reject("an ISO 3166-1 alpha-2 code: two upper-case letters such as CN or SG");
  }
  return j;
}

SiteConfig parseSite(const Field& f) {
  f.expectMap({"name", "jurisdiction", "endpoint", "bind", "public_key", "secret_key", "weight", "workers"});
  SiteConfig s;
  s.line = f.line();
  const Field name = f.required("name");
  s.name = name.scalar();
  if (s.name.empty() || s.name.size() > 32 || !onlyChars(s.name, false, "_-")) {
    name.reject("1 to 32 characters from a-z, 0-9, '_' and '-'");
  }
  s.jurisdiction = parseJurisdiction(f.required("jurisdiction"));
  const Field endpoint = f.required("endpoint");
  s.endpoint = endpoint.scalar();
  if (!validEndpoint(s.endpoint)) {
    endpoint.reject("tcp://HOST:PORT, with HOST a host name, an IPv4 address or an IPv6 address in [ ], "
                    "and a port in 1..65535");
  }
  const Field bind = f.child("bind");
  if (bind.present()) {
    s.bind = bind.scalar();
    if (!validEndpoint(s.bind)) {
      bind.reject("tcp://HOST:PORT like endpoint (tcp://0.0.0.0:PORT listens on every address)");
    }
  }
  s.public_key = f.child("public_key").text("");
  s.secret_key = f.child("secret_key").text("");
  s.weight = f.child("weight").number(s.weight, Interval::above(0));
  s.workers = static_cast<int>(f.child("workers").integer(s.workers, 1, 4096));
  return s;
}

void parseSites(const Field& f, std::vector<SiteConfig>& sites) {
  const size_t n = f.expectList(1, 64, "a list of 1 to 64 sites (- name: ...)");
  for (size_t i = 0; i < n; ++i) {
    const Field entry = f.item(i);
    SiteConfig s = parseSite(entry);
    for (size_t j = 0; j < sites.size(); ++j) {
      const SiteConfig& other = sites[j];
      const std::string where = "sites[" + std::to_string(j) + "] at line " + std::to_string(other.line);
      if (other.name == s.name) {
        entry.child("name").reject("unique in the job: " + where + " has the same name");
      }
      if (other.endpoint == s.endpoint) {
        entry.child("endpoint").reject("unique in the job: " + where + " ('" + other.name +
                                       "') already listens there");
      }
    }
    sites.push_back(std::move(s));
  }
}

void parseSync(const Field& f, JobConfig& job) {
  if (!f.present()) return;
  f.expectMap({"mode", "diloco"});
  job.mode = f.child("mode").choice("every_step", {"every_step", "diloco"}) == "diloco" ? SyncMode::kDiLoCo
                                                                                         : SyncMode::kEveryStep;
  const Field d = f.child("diloco");
  if (!d.present()) return;
  if (job.mode != SyncMode::kDiLoCo) {
    d.error(std::string("is ignored unless mode: diloco (mode is ") + syncModeName(job.mode) +
            "); remove it or set sync.mode: diloco");
  }
  d.expectMap({"sync_every", "outer_lr", "outer_momentum", "nesterov", "fragments", "overlap", "sparseloco"});
  DiLoCoConfig& c = job.diloco;
  const Field sl = d.child("sparseloco");
  if (sl.present()) {
    sl.expectMap({"density", "chunk", "bits", "decay"});
    auto& x = c.sparseloco;
    x.enabled = true;
    x.density = sl.child("density").number(x.density, Interval{0, 1, true, false});
    x.chunk = sl.child("chunk").integer(x.chunk, 1, uint64_t{1} << 30);
    x.bits = static_cast<int>(sl.child("bits").integer(uint64_t(x.bits), 2, 8));
    if (x.bits != 2 && x.bits != 4 && x.bits != 8) sl.child("bits").reject("2, 4 or 8");
    x.decay = sl.child("decay").number(x.decay, Interval{0, 1, false, false});
    // The buffer is the only outer state: no momentum on top of it. The
    // paper's outer learning rate is 1.
    for (const char* key : {"outer_momentum", "nesterov"}) {
      if (d.child(key).present()) {
        d.child(key).error(std::string("cannot be set with sparseloco: its error-feedback buffer takes the place "
                                       "of outer momentum (remove ") + key + ")");
      }
    }
    c.outer_momentum = 0;
    c.nesterov = false;
    c.outer_lr = 1.0;
  }
  c.sync_every = static_cast<int>(d.child("sync_every").integer(c.sync_every, 1, 1000000));
  c.outer_lr = d.child("outer_lr").number(c.outer_lr, Interval::above(0));
  c.outer_momentum = d.child("outer_momentum").number(c.outer_momentum, Interval::halfOpen(0, 1));
  c.nesterov = d.child("nesterov").boolean(c.nesterov);
  c.overlap = d.child("overlap").boolean(c.overlap);
  // Streaming DiLoCo (Douillard et al. 2025) syncs each fragment at its own
  // step of the period, so there cannot be more fragments than steps.
  const uint64_t max_fragments = std::min(1024, c.sync_every);
  c.fragments = static_cast<int>(d.child("fragments").integer(
      c.fragments, 1, max_fragments,
      "an integer in [1, 1024] and at most sync_every (" + std::to_string(c.sync_every) + ")"));
  // One fragment syncs every sync_every / fragments steps, in turn, so each
  // is synced exactly once per period.
  if (c.sync_every % c.fragments != 0) {
    d.child("fragments").reject("a divisor of sync_every (" + std::to_string(c.sync_every) +
                                "): one fragment syncs every sync_every / fragments steps");
  }
}

CompressionRule parseRule(const Field& r, bool default_error_feedback) {
  r.expectMap({"match", "min_size", "max_size", "pipeline", "error_feedback"});
  CompressionRule rule;
  rule.line = r.line();
  const Field match = r.required("match");
  rule.match = match.scalar();
  if (rule.match.empty()) match.reject("a non-empty glob such as \"*.bias\"");
  rule.min_size = r.child("min_size").integer(rule.min_size, 0, kU64Max);
  rule.max_size = r.child("max_size").integer(rule.max_size, rule.min_size, kU64Max,
                                              "an integer >= min_size (" + std::to_string(rule.min_size) + ")");
  rule.pipeline = parsePipeline(r.required("pipeline"));
  rule.error_feedback = r.child("error_feedback").boolean(default_error_feedback);
  return rule;
}

void parseCompression(const Field& f, CompressionConfig& c) {
  c.fallback = CompressionRule();  // match "*", every size, fp32, line 0
  if (!f.present()) return;
  f.expectMap({"pipeline", "error_feedback", "seed", "rules", "adaptive"});
  const Field pipeline = f.child("pipeline");
  if (pipeline.present()) c.fallback.pipeline = parsePipeline(pipeline);
  c.fallback.error_feedback = f.child("error_feedback").boolean(true);
  c.seed = f.child("seed").integer(0, 0, kU64Max, "an integer in [0, 2^64-1]");
  const Field adaptive = f.child("adaptive");
  if (adaptive.present()) {
    adaptive.expectMap({"min_density", "max_density", "min_bits"});
    auto& a = c.adaptive;
    a.enabled = true;
    a.min_density = adaptive.child("min_density").number(a.min_density, Interval{0, 1, true, false});
    a.max_density = adaptive.child("max_density").number(std::max(a.max_density, a.min_density),
                                                         Interval{a.min_density, 1, false, false});
    a.min_bits = static_cast<int>(adaptive.child("min_bits").integer(a.min_bits, 2, 8));
    if (a.min_bits != 2 && a.min_bits != 4 && a.min_bits != 8) {
      adaptive.child("min_bits").reject("2, 4 or 8");
    }
  }
  const Field rules = f.child("rules");
  if (!rules.present()) return;
  const size_t n = rules.expectList(0, SIZE_MAX, "a list of rules (- match: ...)");
  for (size_t i = 0; i < n; ++i) c.rules.push_back(parseRule(rules.item(i), c.fallback.error_feedback));
}

std::string besideSource(const std::string& path, const std::string& source);  // below

void parseCheckpoint(const Field& f, CheckpointConfig& c, const std::string& source) {
  if (!f.present()) return;
  f.expectMap({"dir", "every", "keep"});
  const Field dir = f.required("dir");
  c.dir = dir.scalar();
  if (c.dir.empty()) dir.reject("a directory path (each site writes to DIR/SITE/)");
  c.dir = besideSource(c.dir, source);
  c.every = static_cast<int>(f.child("every").integer(c.every, 1, 1000000));
  c.keep = static_cast<int>(f.child("keep").integer(c.keep, 1, 1000));
}

void parseTransport(const Field& f, TransportConfig& t) {
  if (!f.present()) return;
  f.expectMap({"chunk_bytes", "max_message_bytes", "max_rounds_in_flight", "high_water_mark", "heartbeat_ms",
               "peer_timeout_ms", "round_deadline_s", "hard_deadline_s", "on_site_loss", "insecure", "streams",
               "io_threads"});
  t.chunk_bytes = f.child("chunk_bytes").integer(t.chunk_bytes, 4096, 256 << 20);
  t.max_message_bytes = f.child("max_message_bytes")
                            .integer(t.max_message_bytes, t.chunk_bytes, uint64_t(t.chunk_bytes) * 0xffffffffULL,
                                     "an integer >= chunk_bytes (" + std::to_string(t.chunk_bytes) +
                                         ") and at most 2^32 - 1 chunks (chunk indices are 32-bit)");
  t.max_rounds_in_flight = static_cast<int>(f.child("max_rounds_in_flight").integer(t.max_rounds_in_flight, 1, 1024));
  t.high_water_mark = static_cast<int>(f.child("high_water_mark").integer(t.high_water_mark, 1, 1000000));
  t.heartbeat_ms = static_cast<int>(f.child("heartbeat_ms").integer(t.heartbeat_ms, 10, 60000));
  const Field peer_timeout = f.child("peer_timeout_ms");
  t.peer_timeout_ms = static_cast<int>(peer_timeout.integer(t.peer_timeout_ms, 1, 3600000));
  if (t.peer_timeout_ms <= t.heartbeat_ms) {
    peer_timeout.reject("greater than heartbeat_ms (" + std::to_string(t.heartbeat_ms) + ")");
  }
  t.round_deadline_s = f.child("round_deadline_s").number(t.round_deadline_s, Interval::above(0),
                                                          "a number of seconds > 0");
  const Field hard = f.child("hard_deadline_s");
  t.hard_deadline_s = hard.number(t.hard_deadline_s, Interval::above(0), "a number of seconds > 0");
  if (t.hard_deadline_s < t.round_deadline_s) {
    hard.reject("at least round_deadline_s (" + numberText(t.round_deadline_s) + ")");
  }
  t.on_site_loss_continue = f.child("on_site_loss").choice("wait", {"wait", "continue"}) == "continue";
  t.insecure = f.child("insecure").boolean(false);
  t.streams = static_cast<int>(f.child("streams").integer(t.streams, 1, 64));
  t.io_threads = static_cast<int>(f.child("io_threads").integer(t.io_threads, 0, 64));
}

}  // namespace

std::string JobConfig::sharedText() const {
  std::ostringstream o;
  o.precision(17);
  o << "job " << job_id << "\n";
  for (const SiteConfig& s : sites) {
    o << "site " << s.name << " " << s.jurisdiction << " " << s.endpoint << " " << s.weight << " "
      << s.workers << "\n";
  }
  o << "sync " << syncModeName(mode);
  if (mode == SyncMode::kDiLoCo) {
    o << " " << diloco.sync_every << " " << diloco.outer_lr << " " << diloco.outer_momentum << " "
      << diloco.nesterov << " " << diloco.fragments << (diloco.overlap ? " overlap" : "");
    const auto& x = diloco.sparseloco;
    if (x.enabled) o << " sparseloco " << x.density << " " << x.chunk << " " << x.bits << " " << x.decay;
  }
  o << "\ncompression " << compression.fallback.pipeline.toString() << " "
    << compression.fallback.error_feedback << " " << compression.seed << "\n";
  for (const CompressionRule& r : compression.rules) {
    o << "rule " << r.match << " " << r.min_size << " " << r.max_size << " " << r.pipeline.toString()
      << " " << r.error_feedback << "\n";
  }
  const TransportConfig& t = transport;
  o << "transport " << t.chunk_bytes << " " << t.max_message_bytes << " " << t.max_rounds_in_flight
    << " " << t.high_water_mark << " " << t.heartbeat_ms << " " << t.peer_timeout_ms << " "
    << t.round_deadline_s << " " << t.hard_deadline_s << " " << t.on_site_loss_continue << " "
    << t.insecure << " " << t.streams << "\n";  // io_threads: each gateway's own business
  // Sites must checkpoint the same rounds to find one they all hold; where
  // each keeps its checkpoints is its own business.
  if (!checkpoint.dir.empty()) o << "checkpoint " << checkpoint.every << "\n";
  return o.str();
}

namespace {

// The one YAML document of `yaml`; ConfigError for syntax errors, a second
// document or an empty one (which `needs` says what it should hold).
// The line of a second YAML document in `yaml`, or 0. Found from the
// document markers ("---" or "..." at column 0, which YAML reserves for them):
// yaml-cpp 0.7's LoadAll loops forever on some malformed input (found by
// tests/fuzz/fuzz_config, e.g. `,a ] 01"}`), so documents are not split by it.
size_t secondDocumentLine(const std::string& yaml) {
  bool content = false, ended = false;
  size_t line = 0;
  for (size_t pos = 0; pos <= yaml.size();) {
    size_t nl = yaml.find('\n', pos);
    if (nl == std::string::npos) nl = yaml.size();
    std::string l = yaml.substr(pos, nl - pos);
    pos = nl + 1;
    ++line;
    if (!l.empty() && l.back() == '\r') l.pop_back();
    const bool start = l.rfind("---", 0) == 0 && (l.size() == 3 || l[3] == ' ' || l[3] == '\t');
    const bool end = l.rfind("...", 0) == 0 && (l.size() == 3 || l[3] == ' ' || l[3] == '\t');
    if (start) {
      if (content || ended) return line;
      const size_t rest = l.find_first_not_of(" \t", 3);
      if (rest != std::string::npos && l[rest] != '#') content = true;
      continue;
    }
    if (end) {
      ended = ended || content;
      continue;
    }
    const size_t first = l.find_first_not_of(" \t");
    if (first == std::string::npos || l[first] == '#') continue;
    if (ended) return line;
    content = true;
  }
  return 0;
}

YAML::Node singleDocument(const std::string& yaml, const std::string& source, const char* needs) {
  if (const size_t second = secondDocumentLine(yaml)) {
    fail<ConfigError>(source, ":", second, ": a second YAML document; a config file holds exactly one");
  }
  YAML::Node doc;
  try {
    doc = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) fail<ConfigError>(source, ": YAML syntax error: ", e.msg);
    fail<ConfigError>(source, ":", e.mark.line + 1, ":", e.mark.column + 1, ": YAML syntax error: ", e.msg);
  }
  if (!doc.IsDefined() || doc.IsNull()) {
    fail<ConfigError>(source, ":1: the document is empty; it needs at least ", needs);
  }
  return doc;
}

std::string readFile(const std::string& path, const char* what) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail<ConfigError>("cannot read ", what, " '", path, "': ", std::strerror(errno));
  // Closes fd on every path out, exceptions included.
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) fail<ConfigError>("cannot read ", what, " '", path, "': ", std::strerror(errno));
  if (S_ISDIR(st.st_mode)) fail<ConfigError>("cannot read ", what, " '", path, "': ", std::strerror(EISDIR));
  std::string text;
  char buf[1 << 14];
  for (;;) {
    const ssize_t got = ::read(fd, buf, sizeof buf);
    if (got == 0) break;
    if (got < 0) {
      if (errno == EINTR) continue;
      fail<ConfigError>("error reading ", what, " '", path, "': ", std::strerror(errno));
    }
    text.append(buf, static_cast<size_t>(got));
  }
  return text;
}

// `path` relative to the directory of `source` (unless absolute or source is not a file).
std::string besideSource(const std::string& path, const std::string& source) {
  if (path.empty() || path[0] == '/' || source.empty() || source[0] == '<') return path;
  const size_t slash = source.rfind('/');
  return slash == std::string::npos ? path : source.substr(0, slash + 1) + path;
}

}  // namespace

JobConfig JobConfig::parse(const std::string& yaml, const std::string& source) {
  JobConfig job;
  job.source = source;
  const Field top(singleDocument(yaml, source, "job and sites"), "", job.source);
  try {
    top.expectMap({"job", "sites", "sync", "compression", "transport", "checkpoint"});

    const Field j = top.required("job");
    j.expectMap({"id"});
    const Field id = j.required("id");
    job.job_id = id.scalar();
    if (job.job_id.empty() || job.job_id.size() > 64 || !onlyChars(job.job_id, true, "_.-")) {
      id.reject("1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'");
    }

    parseSites(top.required("sites"), job.sites);
    parseSync(top.child("sync"), job);
    parseCompression(top.child("compression"), job.compression);
    parseTransport(top.child("transport"), job.transport);
    parseCheckpoint(top.child("checkpoint"), job.checkpoint, source);
    if (job.diloco.sparseloco.enabled && job.compression.adaptive.enabled) {
      top.child("compression").child("adaptive").error(
          "cannot be combined with sync.diloco.sparseloco, which fixes every tensor's pipeline");
    }
  } catch (const YAML::Exception& e) {
    // Field reads nodes only in ways that do not throw; this is a safety net
    // so that nothing but ConfigError leaves the config loader.
    fail<ConfigError>(source, ":", e.mark.line + 1, ": ", e.msg);
  }
  return job;
}

std::string DiLoCoConfig::SparseLoCo::pipeline() const {
  std::ostringstream o;
  o.precision(17);
  o << "topk(ratio=" << density << ", chunk=" << chunk << ") -> int" << bits;
  return Pipeline::parse(o.str()).toString();  // the canonical text: shortest numbers, every argument
}

JobConfig JobConfig::load(const std::string& path) { return parse(readFile(path, "config file"), path); }

// ------------------------------------------------------------ site policy ---

const char* messageKindName(MessageKind kind) {
  switch (kind) {
    case MessageKind::kModelUpdate: return "model_update";
    case MessageKind::kModelState: return "model_state";
    case MessageKind::kControl: return "control";
    case MessageKind::kMetrics: return "metrics";
  }
  return "unknown";
}

MessageKind parseMessageKind(const std::string& name) {
  for (MessageKind k : {MessageKind::kModelUpdate, MessageKind::kModelState, MessageKind::kControl,
                        MessageKind::kMetrics}) {
    if (name == messageKindName(k)) return k;
  }
  fail<InvalidArgument>("unknown message kind '", name, "'; kinds: model_update, model_state, control, metrics");
}

bool SitePolicy::allows(MessageKind kind) const {
  return std::find(egress_allow.begin(), egress_allow.end(), kind) != egress_allow.end();
}

SitePolicy SitePolicy::parse(const std::string& yaml, const std::string& source) {
  SitePolicy p;
  p.source = source;
  const Field top(singleDocument(yaml, source, "site and jurisdiction"), "", source);
  try {
    top.expectMap({"site", "jurisdiction", "egress", "audit", "privacy", "data"});
    const Field site = top.required("site");
    p.site = site.scalar();
    p.jurisdiction = parseJurisdiction(top.required("jurisdiction"));
    const Field egress = top.child("egress");
    if (egress.present()) {
      egress.expectMap({"allow"});
      const Field allow = egress.required("allow");
      const size_t n = allow.expectList(0, 16, "a list of message kinds (model_update, model_state, control, metrics)");
      p.egress_allow.clear();
      for (size_t i = 0; i < n; ++i) {
        const std::string k = allow.item(i).choice("", {"model_update", "model_state", "control", "metrics"});
        const MessageKind kind = parseMessageKind(k);
        if (!p.allows(kind)) p.egress_allow.push_back(kind);
      }
    }
    const Field audit = top.child("audit");
    if (audit.present()) {
      audit.expectMap({"log", "signing_key"});
      p.audit_log = besideSource(audit.required("log").scalar(), source);
      const Field key = audit.child("signing_key");
      if (!key.present()) {
        audit.error("needs signing_key (the site's Ed25519 secret key file; ./strait keys generate " + p.site +
                    " writes one) to sign the log");
      }
      p.signing_key = besideSource(key.scalar(), source);
    }
    const Field privacy = top.child("privacy");
    if (privacy.present()) {
      privacy.expectMap({"clip_norm", "noise_multiplier", "epsilon_budget", "delta"});
      p.privacy.enabled = true;
      p.privacy.clip_norm = privacy.required("clip_norm").number(0, Interval::above(0));
      p.privacy.noise_multiplier = privacy.required("noise_multiplier").number(0, Interval::above(0));
      p.privacy.epsilon_budget = privacy.required("epsilon_budget").number(0, Interval::above(0));
      p.privacy.delta = privacy.child("delta").number(1e-5, Interval{0, 1, true, true});
    }
    const Field data = top.child("data");
    if (data.present()) {
      const size_t n = data.expectList(0, 1024, "a list of the site's dataset directories");
      for (size_t i = 0; i < n; ++i) p.data.push_back(besideSource(data.item(i).scalar(), source));
    }
  } catch (const YAML::Exception& e) {
    fail<ConfigError>(source, ":", e.mark.line + 1, ": ", e.msg);
  }
  return p;
}

SitePolicy SitePolicy::load(const std::string& path) { return parse(readFile(path, "policy file"), path); }

}  // namespace strait::core
