// YAML -> JobConfig, with validation messages that name source, line, key,
// value and what is allowed.

#include "core/config/config.h"

#include <fnmatch.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
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

// A YAML node with the key path that leads to it, for messages.
class Field {
 public:
  Field(const YAML::Node& node, std::string path, const std::string& source)
      : node_(node), path_(std::move(path)), source_(source) {}

  const YAML::Node& node() const { return node_; }
  const std::string& path() const { return path_; }
  int line() const { return node_.Mark().line + 1; }

  [[noreturn]] void reject(const std::string& what) const {
    fail<ConfigError>(source_, ":", line(), ": ", path_, " = ", shown(), ": must be ", what);
  }
  [[noreturn]] void error(const std::string& what) const {
    fail<ConfigError>(source_, ":", line(), ": ", path_.empty() ? std::string("document") : path_,
                      ": ", what);
  }

  // The child at key, or an undefined Field when absent.
  Field child(const char* key) const {
    return Field(node_[key], join(key), source_);
  }
  Field item(size_t i) const {
    return Field(node_[i], path_ + "[" + std::to_string(i) + "]", source_);
  }
  bool present() const { return node_.IsDefined() && !node_.IsNull(); }

  Field required(const char* key) const {
    Field f = child(key);
    if (!f.present()) error(std::string("missing required key '") + key + "'");
    return f;
  }

  void expectMap(const std::vector<const char*>& allowed) const {
    if (!node_.IsMap()) error("must be a mapping of keys (" + list(allowed) + ")");
    for (const auto& kv : node_) {
      const std::string key = kv.first.as<std::string>();
      bool ok = false;
      for (const char* a : allowed) ok = ok || key == a;
      if (ok) continue;
      std::string hint;
      for (const char* a : allowed) {
        if (editDistance(key, a) <= 2) hint = std::string("; did you mean '") + a + "'?";
      }
      fail<ConfigError>(source_, ":", kv.first.Mark().line + 1, ": unknown key '", key, "' ",
                        path_.empty() ? std::string("at the top level") : "in " + path_,
                        "; allowed: ", list(allowed), hint);
    }
  }

  std::string scalar() const {
    if (!node_.IsScalar()) reject("a single value, not a " + kind());
    return node_.Scalar();
  }

  std::string text(const std::string& fallback = "") const {
    return present() ? scalar() : fallback;
  }

  int64_t integer(int64_t fallback, int64_t lo, int64_t hi, const std::string& what) const {
    if (!present()) return fallback;
    const std::string s = scalar();
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno != 0 || v < lo || v > hi) reject(what);
    return v;
  }

  uint64_t unsignedInteger(uint64_t fallback, const std::string& what) const {
    if (!present()) return fallback;
    const std::string s = scalar();
    errno = 0;
    char* end = nullptr;
    const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
    if (s.empty() || s[0] == '-' || *end != '\0' || errno != 0) reject(what);
    return v;
  }

  double number(double fallback, bool (*ok)(double), const std::string& what) const {
    if (!present()) return fallback;
    const std::string s = scalar();
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || !std::isfinite(v) || !ok(v)) reject(what);
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
    reject("one of " + list(allowed));
  }

 private:
  std::string join(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  std::string shown() const {
    if (node_.IsScalar()) return node_.Scalar().empty() ? "\"\"" : node_.Scalar();
    return "(" + kind() + ")";
  }
  std::string kind() const {
    if (node_.IsMap()) return "mapping";
    if (node_.IsSequence()) return "sequence";
    if (node_.IsNull()) return "empty value";
    return "scalar";
  }
  static std::string list(const std::vector<const char*>& items) {
    std::string s;
    for (const char* i : items) s += (s.empty() ? "" : ", ") + std::string(i);
    return s;
  }

  YAML::Node node_;
  std::string path_;
  const std::string& source_;
};

bool matchesChars(const std::string& s, const char* extra, bool upper_ok) {
  for (char c : s) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    (upper_ok && c >= 'A' && c <= 'Z') || std::strchr(extra, c) != nullptr;
    if (!ok || c == '\0') return false;
  }
  return true;
}

void checkEndpoint(const Field& f, const std::string& e) {
  const std::string prefix = "tcp://";
  const std::string allowed = "tcp://HOST:PORT with a port in 1..65535";
  if (e.compare(0, prefix.size(), prefix) != 0) f.reject(allowed);
  const size_t colon = e.rfind(':');
  if (colon == std::string::npos || colon < prefix.size()) f.reject(allowed);
  std::string host = e.substr(prefix.size(), colon - prefix.size());
  if (!host.empty() && host.front() == '[') {
    if (host.back() != ']' || host.size() < 3) f.reject(allowed + " (IPv6 as [addr])");
  } else if (host.empty() || host.find(':') != std::string::npos) {
    f.reject(allowed + " (IPv6 as [addr])");
  }
  const std::string port = e.substr(colon + 1);
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 1 || p > 65535) f.reject(allowed);
}

Pipeline parsePipeline(const Field& f) {
  const std::string text = f.scalar();
  try {
    return Pipeline::parse(text);
  } catch (const ConfigError& e) {
    f.error(std::string("\"") + text + "\": " + e.what());
  }
}

SiteConfig parseSite(const Field& f) {
  f.expectMap({"name", "jurisdiction", "endpoint", "public_key", "secret_key", "weight", "workers"});
  SiteConfig s;
  s.line = f.line();
  const Field name = f.required("name");
  s.name = name.scalar();
  if (s.name.empty() || s.name.size() > 32 || !matchesChars(s.name, "_-", false)) {
    name.reject("1 to 32 characters from a-z, 0-9, '_' and '-'");
  }
  const Field jur = f.required("jurisdiction");
  s.jurisdiction = jur.scalar();
  if (s.jurisdiction.size() != 2 || !std::isupper(static_cast<unsigned char>(s.jurisdiction[0])) ||
      !std::isupper(static_cast<unsigned char>(s.jurisdiction[1]))) {
    jur.reject("an ISO 3166-1 alpha-2 code: two upper-case letters such as CN or SG");
  }
  const Field endpoint = f.required("endpoint");
  s.endpoint = endpoint.scalar();
  checkEndpoint(endpoint, s.endpoint);
  s.public_key = f.child("public_key").text();
  s.secret_key = f.child("secret_key").text();
  s.weight = f.child("weight").number(1.0, [](double v) { return v > 0; }, "a number > 0");
  s.workers = static_cast<int>(f.child("workers").integer(1, 1, 4096, "an integer in [1, 4096]"));
  return s;
}

void parseSync(const Field& f, JobConfig& job) {
  if (!f.present()) return;
  f.expectMap({"mode", "diloco"});
  job.mode = f.child("mode").choice("every_step", {"every_step", "diloco"}) == "diloco"
                 ? SyncMode::kDiLoCo
                 : SyncMode::kEveryStep;
  const Field d = f.child("diloco");
  if (!d.present()) return;
  if (job.mode != SyncMode::kDiLoCo) {
    d.error("is only used with 'mode: diloco' (mode is every_step); remove it or set the mode");
  }
  d.expectMap({"sync_every", "outer_lr", "outer_momentum", "nesterov", "fragments"});
  DiLoCoConfig& c = job.diloco;
  c.sync_every = static_cast<int>(
      d.child("sync_every").integer(c.sync_every, 1, 1000000, "an integer in [1, 1000000]"));
  c.outer_lr = d.child("outer_lr").number(c.outer_lr, [](double v) { return v > 0; }, "a number > 0");
  c.outer_momentum = d.child("outer_momentum")
                         .number(c.outer_momentum, [](double v) { return v >= 0 && v < 1; },
                                 "a number in [0, 1)");
  c.nesterov = d.child("nesterov").boolean(c.nesterov);
  const Field frag = d.child("fragments");
  c.fragments = static_cast<int>(frag.integer(c.fragments, 1, 1024, "an integer in [1, 1024]"));
  if (c.fragments > c.sync_every) {
    frag.reject("at most sync_every (" + std::to_string(c.sync_every) +
                "): each fragment syncs at its own step within the period");
  }
}

void parseCompression(const Field& f, CompressionConfig& c) {
  c.fallback.match = "*";
  c.fallback.line = 0;
  if (!f.present()) return;
  f.expectMap({"pipeline", "error_feedback", "seed", "rules"});
  const Field p = f.child("pipeline");
  if (p.present()) c.fallback.pipeline = parsePipeline(p);
  c.fallback.error_feedback = f.child("error_feedback").boolean(true);
  c.seed = f.child("seed").unsignedInteger(0, "an integer in [0, 2^64)");
  const Field rules = f.child("rules");
  if (!rules.present()) return;
  if (!rules.node().IsSequence()) rules.error("must be a list of rules (- match: ...)");
  for (size_t i = 0; i < rules.node().size(); ++i) {
    const Field r = rules.item(i);
    r.expectMap({"match", "min_size", "max_size", "pipeline", "error_feedback"});
    CompressionRule rule;
    rule.line = r.line();
    const Field m = r.required("match");
    rule.match = m.scalar();
    if (rule.match.empty()) m.reject("a non-empty glob such as \"*.bias\"");
    rule.min_size = r.child("min_size").unsignedInteger(0, "an integer >= 0");
    const Field mx = r.child("max_size");
    rule.max_size = mx.unsignedInteger(rule.max_size, "an integer >= 0");
    if (rule.max_size < rule.min_size) {
      mx.reject("an integer >= min_size (" + std::to_string(rule.min_size) + ")");
    }
    rule.pipeline = parsePipeline(r.required("pipeline"));
    rule.error_feedback = r.child("error_feedback").boolean(c.fallback.error_feedback);
    c.rules.push_back(std::move(rule));
  }
}

void parseTransport(const Field& f, TransportConfig& t) {
  if (!f.present()) return;
  f.expectMap({"chunk_bytes", "max_message_bytes", "max_rounds_in_flight", "high_water_mark",
               "heartbeat_ms", "peer_timeout_ms", "round_deadline_s", "hard_deadline_s",
               "on_site_loss", "insecure"});
  t.chunk_bytes = static_cast<uint64_t>(
      f.child("chunk_bytes").integer(t.chunk_bytes, 4096, 256 << 20, "an integer in [4096, 268435456]"));
  const Field mm = f.child("max_message_bytes");
  t.max_message_bytes = mm.unsignedInteger(t.max_message_bytes, "an integer >= chunk_bytes");
  if (t.max_message_bytes < t.chunk_bytes) {
    mm.reject("an integer >= chunk_bytes (" + std::to_string(t.chunk_bytes) + ")");
  }
  t.max_rounds_in_flight = static_cast<int>(f.child("max_rounds_in_flight")
                                                .integer(t.max_rounds_in_flight, 1, 1024, "an integer in [1, 1024]"));
  t.high_water_mark = static_cast<int>(
      f.child("high_water_mark").integer(t.high_water_mark, 1, 1000000, "an integer in [1, 1000000]"));
  t.heartbeat_ms = static_cast<int>(
      f.child("heartbeat_ms").integer(t.heartbeat_ms, 10, 60000, "an integer in [10, 60000]"));
  const Field pt = f.child("peer_timeout_ms");
  t.peer_timeout_ms = static_cast<int>(pt.integer(t.peer_timeout_ms, 1, 3600000, "an integer in [1, 3600000]"));
  if (t.peer_timeout_ms <= t.heartbeat_ms) {
    pt.reject("greater than heartbeat_ms (" + std::to_string(t.heartbeat_ms) + ")");
  }
  t.round_deadline_s = f.child("round_deadline_s").number(t.round_deadline_s, [](double v) { return v > 0; },
                                                          "a number of seconds > 0");
  const Field hd = f.child("hard_deadline_s");
  t.hard_deadline_s = hd.number(t.hard_deadline_s, [](double v) { return v > 0; }, "a number of seconds > 0");
  if (t.hard_deadline_s < t.round_deadline_s) {
    hd.reject("at least round_deadline_s (" + std::to_string(t.round_deadline_s) + ")");
  }
  t.on_site_loss_continue = f.child("on_site_loss").choice("wait", {"wait", "continue"}) == "continue";
  t.insecure = f.child("insecure").boolean(false);
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
      << diloco.nesterov << " " << diloco.fragments;
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
    << t.insecure << "\n";
  return o.str();
}

JobConfig JobConfig::parse(const std::string& yaml, const std::string& source) {
  JobConfig job;
  job.source = source;
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::Exception& e) {
    fail<ConfigError>(source, ":", e.mark.line + 1, ":", e.mark.column + 1, ": YAML syntax error: ", e.msg);
  }
  const Field top(root, "", job.source);
  if (!top.present()) fail<ConfigError>(source, ": the document is empty; it needs job and sites");
  try {
    top.expectMap({"job", "sites", "sync", "compression", "transport"});

    const Field j = top.required("job");
    j.expectMap({"id"});
    const Field id = j.required("id");
    job.job_id = id.scalar();
    if (job.job_id.empty() || job.job_id.size() > 64 || !matchesChars(job.job_id, "_.-", true)) {
      id.reject("1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'");
    }

    const Field sites = top.required("sites");
    if (!sites.node().IsSequence() || sites.node().size() == 0) {
      sites.error("must be a list of 1 to 64 sites (- name: ...)");
    }
    if (sites.node().size() > 64) sites.error("has " + std::to_string(sites.node().size()) + " sites; at most 64");
    for (size_t i = 0; i < sites.node().size(); ++i) {
      const Field sf = sites.item(i);
      SiteConfig s = parseSite(sf);
      for (const SiteConfig& other : job.sites) {
        if (other.name == s.name) {
          sf.child("name").error("duplicate site name '" + s.name + "' (first defined at line " +
                                 std::to_string(other.line) + ")");
        }
        if (other.endpoint == s.endpoint) {
          sf.child("endpoint").error("endpoint " + s.endpoint + " is also site '" + other.name +
                                     "''s (line " + std::to_string(other.line) + ")");
        }
      }
      job.sites.push_back(std::move(s));
    }

    parseSync(top.child("sync"), job);
    parseCompression(top.child("compression"), job.compression);
    parseTransport(top.child("transport"), job.transport);
  } catch (const YAML::Exception& e) {
    // Type conversions inside yaml-cpp (rare: keys that are not scalars).
    fail<ConfigError>(source, ":", e.mark.line + 1, ": ", e.msg);
  }
  return job;
}

JobConfig JobConfig::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<ConfigError>("cannot read config file '", path, "': ", std::strerror(errno));
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) fail<ConfigError>("error reading config file '", path, "': ", std::strerror(errno));
  return parse(text.str(), path);
}

}  // namespace strait::core
