#pragma once
// The engine's internals: what DiLoCo (diloco.cc) and EveryStep
// (every_step.cc) use of a Session. Not a public API.
//
// The leader owns the gateway; every worker owns the process group view,
// the round counters (kept in step with the leader's) and the log. Cross-
// site calls (start, finish, joins) are the leader's only; fromLeader()
// carries their outcome — a value or the error — to every worker.

#include <atomic>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/codec/adaptive.h"
#include "core/config/config.h"
#include "torch_ext/csrc/compressor.h"
#include "torch_ext/strait_torch.h"
#include "transport/checkpoint_store.h"
#include "transport/gateway.h"
#include "transport/state.h"

namespace strait::torch {

using Clock = std::chrono::steady_clock;

// A round this site's leader started; finish() waits for it.
struct Round {
  uint64_t round = 0;
  std::string tag;
  Clock::time_point start;
  size_t bytes = 0;  // this site's payload
  std::shared_ptr<std::future<transport::RoundResult>> result;
};

// Every site's payload in site order (nullopt: missing, or it sent nothing)
// and who was missing.
struct RoundOutcome {
  std::vector<std::optional<std::vector<uint8_t>>> payloads;
  std::vector<std::string> missing;
};

// A tensor's place in a flat vector of many: DiLoCo's parameters.
struct Part {
  int64_t offset = 0;
  int64_t numel = 0;
  std::string name;
  std::vector<int64_t> shape;
};

// What join() found (docs/RELIABILITY.md).
struct JoinOutcome {
  enum class Kind { kFresh, kCheckpoint, kRunning } kind = Kind::kFresh;
  // kCheckpoint: the newest round every site that answered holds.
  uint64_t round = 0, digest = 0;
  std::vector<std::string> absent;
  // kRunning: the answering site, and its state (empty `no_state` means it
  // sent one; otherwise why it cannot take a site in).
  size_t site = 0;
  std::string no_state;
  std::vector<uint8_t> bytes;  // the running site's state document
  transport::State state;      // views into bytes
  // kRunning: this site's request (a running every-step site answers
  // "deferred" and sends its state in round `nonce` of kJoinStateTag).
  uint64_t nonce = 0;
};

// The join request's tag, and the tag a running every-step site sends its
// state in at its next step boundary (docs/RELIABILITY.md).
extern const char* const kJoinTag;
extern const char* const kJoinStateTag;

struct Session::Impl {
  explicit Impl(SessionOptions options);
  ~Impl();

  SessionOptions opt;
  core::JobConfig config;
  std::optional<core::SitePolicy> policy;
  std::vector<std::string> names;
  std::vector<double> weights;
  size_t site_index = 0;
  int rank = 0, size = 1;
  bool leader = true;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  at::Device control_device{at::kCPU};  // small tensors of in-site control messages (CUDA with NCCL)
  std::unique_ptr<transport::Gateway> gateway;  // the leader's
  std::chrono::milliseconds timeout;            // a round's wait: the hard deadline + 30 s
  std::optional<transport::CheckpointStore> checkpoints;
  std::string checkpoint_root;  // the config's checkpoint.dir, resolved (every worker)
  // The adaptive controller and its last decision (for the next log
  // record): the every-step thread updates them under log_mu.
  std::optional<core::AdaptiveCompression> adaptive;
  std::string adaptive_note;

  // -- round counters (every worker; the leader's number the rounds) ------
  std::map<std::string, uint64_t> counters;
  uint64_t nextRound(const std::string& tag) { return counters[tag]++; }

  // -- compressors: one per key, from the config's rule for (name, size) --
  std::map<std::string, std::unique_ptr<Compressor>> compressors;
  uint64_t seedOf(size_t index) const { return config.compression.seed + 7919 * index; }
  // `pipeline` non-empty: that pipeline (a changed one carries the residual over).
  // `decay` set: error feedback on whatever the config says, its buffer
  // decayed so (SparseLoCo).
  // `rule_size`: the size the config's rules judge (a sharded job's piece
  // is judged by its whole tensor's size); -1: `size`.
  Compressor& compressor(const std::string& key, const std::string& name, int64_t size,
                         const std::string& pipeline = "", std::optional<float> decay = std::nullopt,
                         int64_t rule_size = -1);
  // (key, pipeline, residual) of the error-feedback compressors whose key starts with prefix.
  std::vector<std::tuple<std::string, std::string, at::Tensor>> residuals(const std::string& prefix) const;
  // Restores residuals saved by residuals() (checkpoint sections "residual:KEY").
  void restoreResiduals(const transport::State& state, const std::string& prefix);

  // -- inside the site -----------------------------------------------------
  void broadcast(at::Tensor& t);      // the leader's values to every worker
  void allReduceSum(at::Tensor& t);
  void allReduceMax(at::Tensor& t);
  // Runs fn on the leader; then every worker holds in `outs` what fn left
  // there (pass tensors of the right shape everywhere), or raises the error
  // fn threw (same class and message on every worker).
  void fromLeader(const std::function<void()>& fn, std::vector<at::Tensor> outs = {});

  // -- across sites (leader) -----------------------------------------------
  Round start(const std::string& tag, std::vector<uint8_t> payload, core::MessageKind kind,
              std::optional<uint64_t> round = std::nullopt);
  bool ready(const Round& r) const;
  // Waits, answering join requests every 50 ms (and calling poll), bounded
  // by the hard deadline; records the round in the log.
  RoundOutcome finish(Round& r, const std::function<void()>& poll = {});
  // (site, weight) of every site that sent something, in site order, the
  // weights renormalised over them.
  std::vector<std::pair<size_t, float>> siteWeights(const RoundOutcome& o) const;
  // The weighted mean of the sites' payloads, each a frame of parts
  // (core/codec/parts.h): part k of every site, by siteWeights and in site
  // order, accumulated exactly into outs[k]. A malformed frame is a
  // ProtocolError naming the site and `what` (the message).
  void accumulateParts(const RoundOutcome& o, const std::vector<at::Tensor>& outs, const std::string& what) const;

  // Every worker of every site must pass the same description; otherwise
  // InvalidArgument on every worker naming the first differing line.
  void checkSameEverywhere(const std::string& tag, const std::string& description);

  // -- joins (docs/RELIABILITY.md) -----------------------------------------
  // The join protocol of a (re)starting site's leader.
  JoinOutcome join(const std::string& model, const std::vector<std::pair<uint64_t, uint64_t>>& held);
  // While a round of a tag starting with `prefix` is awaited, fn(round) is
  // called every 50 ms (serveJoins or refuseJoins).
  void setJoinServer(std::string prefix, std::function<void(uint64_t)> fn);
  // Answers every new join request with this site's state; returns the
  // sites served.
  std::vector<std::string> serveJoins(uint64_t round, const std::function<transport::State()>& make);
  // Answers every new join request with "running, no state to give" (why: the job's kind).
  void refuseJoins(const std::string& why);
  // Join requests not answered yet (mark: count them as answered now).
  std::vector<transport::PeerRound> newJoinRequests(bool mark = true);
  void reapJoins();
  void restartGateway();  // a new incarnation (a site that gives way)
  std::vector<std::string> takeDivergedPeers();
  std::vector<std::string> takeReturnedPeers();

  // With the policy's privacy section: a clipped, noised copy of `flat` (a
  // float32 CPU tensor; the gateway refuses a model update that skipped this).
  at::Tensor privatized(const at::Tensor& flat);
  // What a site encodes of flat (float32, 1-D): flat itself, contiguous, on
  // its GPU when the device codecs run there and no privacy step needs it on
  // the host; otherwise a CPU copy, privatized (privatized()).
  at::Tensor encodable(const at::Tensor& flat);
  // Where decoded means are built for tensors on `d`: d itself if the device
  // codecs run there, else the CPU.
  at::Device decodeDevice(const at::Device& d) const;
  // Means are built with accumulateExact (device_codecs.h): the CPU's bits
  // on either device.
  // Said on the leader when the session closes (DiLoCo: ended without flush()).
  std::function<std::string()> closing_warning;

  // -- the log ---------------------------------------------------------------
  void event(const std::string& message);
  void appendJson(const std::string& line);
  std::mutex log_mu;
  struct Pending {
    uint64_t rounds = 0, bytes_out = 0, bytes_in = 0;
    double seconds = 0;
    std::set<std::string> missing;
  } pending;
  std::atomic<uint64_t> bytes_sent{0};
  std::string last_error;  // the leader's last failure (under log_mu): why it stops, for its peers
  std::vector<std::string> last_missing;

  // -- joins' bookkeeping ------------------------------------------------------
  std::set<std::pair<uint64_t, std::string>> answered;  // join requests seen
  std::vector<Round> joins;                             // answers sent, reaped when done
  std::string join_prefix;
  std::function<void(uint64_t)> join_server;
  bool closed = false;

  std::string where() const { return "strait " + opt.site; }
};

// The digest of a float32 tensor's values on any device (core/digest.h).
uint64_t tensorDigest(const at::Tensor& flat);
// The digest a running site's state document is verified by: of its sections' bytes.
std::string stateDigest(const transport::State& s);
// The message raised on every worker for a strait::Error.
std::string errorText(const std::exception& e);

}  // namespace strait::torch
