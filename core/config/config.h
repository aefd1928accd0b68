#pragma once
// The job configuration: typed structs loaded from YAML and validated.
//
// Every validation error is a ConfigError whose message names the source
// (file path or "<string>"), the line, the key path, the bad value and what is
// allowed, e.g.
//   job.yaml:14: compression.rules[2].max_size = -1: must be an integer >= min_size (0)
// Unknown and duplicate keys are errors too (a typo must not silently fall
// back to a default). docs/CONFIG.md is the reference for every key and the
// message format; examples/config.yaml shows each key.
//
// A JobConfig is a plain value: copy it freely. load() and parse() share no
// state and may run on several threads at once.

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
  std::string endpoint;      // where the other sites reach its gateway: tcp://HOST:PORT
  std::string bind;          // where the gateway listens, when not at `endpoint` (NAT, a proxy); "" = endpoint
  std::string public_key;    // path to the gateway's CurveZMQ public key file ("" = none)
  std::string secret_key;    // path to its secret key file; read only by that site ("" = none)
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
  bool overlap = false;         // each sync's exchange runs during the next H inner steps

  // SparseLoCo (Sarfi et al. 2025): each tensor's pseudo-gradient goes
  // through "topk(density, chunk=chunk) -> int<bits>" with an error-feedback
  // buffer decayed by `decay`, which takes the place of outer momentum
  // (outer_momentum is 0, nesterov off). Present in the config: enabled.
  struct SparseLoCo {
    bool enabled = false;
    double density = 0.03125;  // per chunk, in (0, 1]
    uint64_t chunk = 4096;     // values per chunk
    int bits = 2;              // 2, 4 or 8
    double decay = 0.95;       // in [0, 1]
    std::string pipeline() const;
  } sparseloco;
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

  // Adaptive compression (every-step mode): each site's leader picks
  // "topk(density) -> int<bits>" per step so the exchange hides behind
  // compute, never sparser than min_density nor below min_bits. Payloads
  // describe themselves, so sites need not agree: not in the fingerprint.
  struct Adaptive {
    bool enabled = false;
    double min_density = 0.001;  // the quality floor, (0, 1]
    double max_density = 0.1;    // where it starts, [min_density, 1]
    int min_bits = 4;            // 2, 4 or 8
  } adaptive;

  // The first rule matching (name, size), else the default.
  const CompressionRule& ruleFor(const std::string& name, uint64_t size) const;
};

// The gateways' link settings (docs/CONFIG.md, "transport").
// Connections per site pair by default: one TCP stream's window caps it at
// about its buffer / the round trip (4 MiB / 150 ms ~ 220 Mbit/s), so a
// long fat link needs several (docs/BENCHMARKS.md, "Parallel streams").
constexpr int kDefaultStreams = 8;
struct TransportConfig {
  uint64_t chunk_bytes = 1 << 20;               // [4 KiB, 256 MiB]
  uint64_t max_message_bytes = uint64_t{1} << 30;  // >= chunk_bytes
  int max_rounds_in_flight = 4;                 // [1, 1024]
  int high_water_mark = 64;                     // messages, [1, 1000000]
  int heartbeat_ms = 500;                       // [10, 60000]
  int peer_timeout_ms = 5000;                   // > heartbeat_ms
  double round_deadline_s = 60;                 // > 0
  double hard_deadline_s = 600;                 // >= round_deadline_s
  bool on_site_loss_continue = false;           // on_site_loss: wait (false) | continue
  bool insecure = false;                        // plaintext, loopback endpoints only
  int streams = kDefaultStreams;                // TCP connections per site pair, [1, 64]
  int io_threads = 0;                           // ZeroMQ I/O threads, [1, 64]; 0: chosen from streams
};

// Checkpoints (docs/RELIABILITY.md): each site's leader writes its state
// every `every` syncs (DiLoCo) or steps (every-step mode) to DIR/SITE/.
struct CheckpointConfig {
  std::string dir;   // "" = no checkpoints; relative paths: to the config file
  int every = 10;    // syncs or steps between checkpoints, >= 1
  int keep = 2;      // newest checkpoints kept per site, >= 1
};

struct JobConfig {
  std::string source = "<string>";  // file the config came from, for messages
  std::string job_id;                // [A-Za-z0-9_.-], 1..64 chars
  std::vector<SiteConfig> sites;     // 1..64 sites, names unique
  SyncMode mode = SyncMode::kEveryStep;
  DiLoCoConfig diloco;
  CompressionConfig compression;
  TransportConfig transport;
  CheckpointConfig checkpoint;

  // Canonical text of everything every site must agree on (all but key file
  // paths); its hash is the config fingerprint peers compare in the handshake.
  std::string sharedText() const;

  // Loads and validates a YAML file. Throws ConfigError (also for an
  // unreadable file or YAML syntax errors, with line and column).
  static JobConfig load(const std::string& path);
  // Parses and validates YAML text; `source` names it in messages.
  static JobConfig parse(const std::string& yaml, const std::string& source = "<string>");

  // The site with this name; throws ConfigError listing the known sites.
  const SiteConfig& site(const std::string& name) const;
};

// What may leave a site, by kind. Every payload a gateway sends carries one.
enum class MessageKind : uint32_t {
  kModelUpdate = 1,  // gradients, pseudo-gradients (compressed)
  kModelState = 2,   // whole parameters: a common start, a rejoining site's state
  kControl = 3,      // agreement checks (model description), coordination
  kMetrics = 4,      // losses, timings and other telemetry
};
const char* messageKindName(MessageKind kind);  // "model_update", ...
// Parses a kind name; throws InvalidArgument listing the kinds.
MessageKind parseMessageKind(const std::string& name);

// A site's own policy file: what may leave it, where its audit log goes,
// its differential-privacy budget and its datasets. It belongs to the site,
// not to the job: a job config has no key that could widen it.
struct SitePolicy {
  std::string source;        // file path (or "<string>") for messages
  std::string site;          // the site it governs
  std::string jurisdiction;  // must match the job config's entry for the site
  // Kinds allowed to leave. Default: model_update, model_state, control.
  std::vector<MessageKind> egress_allow{MessageKind::kModelUpdate, MessageKind::kModelState,
                                        MessageKind::kControl};
  std::string audit_log;     // path of the signed audit log ("" = none); relative paths: to the file
  std::string signing_key;   // path of the site's Ed25519 secret key file (needed with audit_log)
  struct Privacy {
    bool enabled = false;
    double clip_norm = 1.0;         // C: an update's L2 norm is clipped to this
    double noise_multiplier = 1.0;  // sigma: noise std = sigma * C
    double epsilon_budget = 10.0;   // total epsilon the site allows
    double delta = 1e-5;
  } privacy;
  std::vector<std::string> data;  // the site's dataset directories (resolved)

  bool allows(MessageKind kind) const;
  static SitePolicy load(const std::string& path);
  static SitePolicy parse(const std::string& yaml, const std::string& source = "<string>");
};

}  // namespace strait::core
