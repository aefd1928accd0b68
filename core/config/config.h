#pragma once
// The job configuration: typed structs loaded from YAML and validated.
//
// Every validation error is a ConfigError whose message names the source
// (file path or "<string>"), the line, the key path, the bad value and what is
// allowed, e.g.
//   job.yaml:14: compression.rules[2].max_size = -1: must be an integer >= 0
// Unknown keys are errors too (a typo must not silently fall back to a
// default). docs/CONFIG.md is the reference for every key;
// examples/config.yaml shows each one.

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/codec/codec.h"

namespace strait::core {

// One site of the job: a cluster in one jurisdiction with one gateway.
struct SiteConfig {
  std::string name;          // [a-z0-9_-], 1..32 chars, unique in the job
  std::string jurisdiction;  // ISO 3166-1 alpha-2, upper case ("CN", "SG")
  std::string endpoint;      // where its gateway listens: tcp://HOST:PORT
  std::string public_key;    // path to the gateway's CurveZMQ public key file ("" = none)
  double weight = 1.0;       // relative weight in the cross-site mean, > 0
  int workers = 1;           // processes inside the site, >= 1
  int line = 0;              // line of the entry in the source, for messages
};

enum class SyncMode { kEveryStep, kDiLoCo };

const char* syncModeName(SyncMode mode);  // "every_step" / "diloco"

// DiLoCo (Douillard et al. 2023) outer-loop settings.
struct DiLoCoConfig {
  int sync_every = 50;          // inner steps between syncs, >= 1
  double outer_lr = 0.7;        // > 0
  double outer_momentum = 0.9;  // in [0, 1)
  bool nesterov = true;
  int fragments = 1;            // streaming DiLoCo fragments, >= 1
};

// A per-tensor rule: tensors whose name matches the glob and whose size lies
// in [min_size, max_size] use this pipeline.
struct CompressionRule {
  std::string match = "*";  // fnmatch-style glob over the tensor name: * ? [abc]
  uint64_t min_size = 0;    // values, inclusive
  uint64_t max_size = std::numeric_limits<uint64_t>::max();  // values, inclusive
  Pipeline pipeline;
  bool error_feedback = true;
  int line = 0;             // line in the source, 0 for the default rule

  bool matches(const std::string& name, uint64_t size) const;
};

struct CompressionConfig {
  CompressionRule fallback;             // the default: match "*", every size
  std::vector<CompressionRule> rules;   // tried in order; the first match wins
  uint64_t seed = 0;                    // base seed for stochastic rounding, random-k

  // The first rule matching (name, size), else the default.
  const CompressionRule& ruleFor(const std::string& name, uint64_t size) const;
};

struct JobConfig {
  std::string source = "<string>";  // file the config came from, for messages
  std::string job_id;                // [A-Za-z0-9_.-], 1..64 chars
  std::vector<SiteConfig> sites;     // 1..64 sites, names unique
  SyncMode mode = SyncMode::kEveryStep;
  DiLoCoConfig diloco;
  CompressionConfig compression;

  // Loads and validates a YAML file. Throws ConfigError (also for an
  // unreadable file or YAML syntax errors, with line and column).
  static JobConfig load(const std::string& path);
  // Parses and validates YAML text; `source` names it in messages.
  static JobConfig parse(const std::string& yaml, const std::string& source = "<string>");

  // The site with this name; throws ConfigError listing the known sites.
  const SiteConfig& site(const std::string& name) const;
};

}  // namespace strait::core
