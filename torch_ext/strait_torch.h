#pragma once
// strait's sync engine: the cross-site algorithms over at::Tensor, for
// Python (torch.classes.strait.*, wrapped by the `strait` package) and for
// libtorch programs alike. One implementation of each algorithm and one
// wire dialect (docs/PROTOCOL.md), so a libtorch site and a Python site
// train one model together.
//
//   auto session = c10::make_intrusive<strait::torch::Session>(
//       strait::torch::SessionOptions{"job.yaml", "hangzhou", "", pg});  // pg: the site's c10d group, or null
//
//   // every-step mode: compressed gradients each step
//   strait::torch::EveryStep sync(session);
//   ... loss.backward(); sync.average(grads); optimizer.step();
//
//   // DiLoCo: H local steps, then an outer step on compressed pseudo-gradients
//   strait::torch::DiLoCo diloco(session, names, params);  // options: the config's sync.diloco
//   ... after each inner optimizer step: diloco.step();
//   diloco.flush();  // after training
//
// Inside a site the workers average and broadcast through the c10d process
// group they pass (gloo for CPU tensors, NCCL for CUDA tensors); the site's
// rank 0 (the leader) alone runs the gateway to the other sites. After every
// sync, every worker of every site holds bitwise-identical results.
//
// Threads: a Session and the algorithms over it are driven from one thread
// (the training loop); EveryStep runs its bucket work on a thread of its
// own. Errors are strait::Error subclasses (ConfigError, ProtocolError,
// TimeoutError, PolicyViolation), and a failure on the leader is raised on
// every worker of the site alike.

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace strait::torch {

struct SessionOptions {
  std::string config;  // the job's YAML
  std::string site;    // this process's site
  std::string policy;  // the site's policy file (egress kinds, audit log, privacy); "" = defaults
  // The site's workers; null when this process is the whole site. Its rank
  // 0 is the site leader.
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  bool resume = false;   // continue the job: from checkpoints, or a running site's state
  bool log = true;       // a line per logged step and per recovery event on stderr (leader)
  std::string json_log;  // a file that gets one JSON object per logged step and event ("" = none)
};

// One process's part of a job: its site, its site's process group and, on
// the site leader, the gateway to the other sites.
class Session : public ::torch::CustomClassHolder {
 public:
  // Loads and validates the config (and the policy), starts the gateway on
  // the leader. Throws ConfigError, PolicyViolation (a policy for another
  // site), Error (the endpoint cannot be bound).
  explicit Session(SessionOptions options);
  ~Session() override;
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  const std::string& site() const;
  int64_t siteIndex() const;
  const std::vector<std::string>& sites() const;
  int64_t rank() const;  // in the site
  int64_t size() const;  // workers in the site
  // This worker's place in the whole job: the workers of the sites before
  // this one (config order), then its rank; of all sites' workers. (RANK
  // and WORLD_SIZE of a site's launcher are per site.)
  int64_t jobRank() const;
  int64_t jobSize() const;
  bool leader() const;
  bool resuming() const;
  const std::string& configPath() const;

  // The round log: when rounds crossed since the last call, one line on the
  // leader's stderr (step, loss, bytes out and in, the rounds' time,
  // missing sites) and one JSON object in the JSON log; `fields_json` is a
  // JSON object whose members are added to it ("" or "{}" for none).
  // Returns the JSON object ("" when nothing crossed or not the leader).
  // Call it once per step on every worker; `loss` is this worker's.
  std::string log(int64_t step, std::optional<double> loss, const std::string& fields_json = "");
  // One line about recovery (joins, checkpoints, lost sites), on stderr
  // and as {"event": ...} in the JSON log.
  void event(const std::string& message);

  uint64_t bytesSent() const;                    // payload bytes this site sent (leader)
  std::vector<std::string> lastMissing() const;  // sites missing from the last sync's round
  std::string auditHead() const;                 // "" without an audit log or off the leader
  int64_t auditRecords() const;
  double privacySpent() const;

  // Ends this process's part: lets answered join requests reach the sites
  // that asked (up to 10 s), then stops the gateway. Safe to call twice.
  void close();

  struct Impl;  // the engine's internals (torch_ext/csrc/session_impl.h)
  Impl& impl() { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// DiLoCo's settings; unset ones come from the config's sync.diloco.
struct DiLoCoOptions {
  std::optional<int64_t> sync_every;
  std::optional<double> outer_lr;
  std::optional<double> outer_momentum;
  std::optional<bool> nesterov;
  std::optional<int64_t> fragments;
  std::optional<bool> overlap;
  std::string pipeline;  // one pipeline for every parameter instead of the config's rules ("" = rules)
  // SparseLoCo on or off, whatever the config says; on: the config's
  // sync.diloco.sparseloco settings or their defaults, outer_lr 1 unless
  // given here or in the config's sparseloco job.
  std::optional<bool> sparseloco;
};

// DiLoCo (Douillard et al. 2023): every sync_every inner steps the
// pseudo-gradient (global - local parameters) of each parameter is
// compressed with the config's rule for its name and error feedback, all
// parts cross in one round, every site averages every site's decoded parts
// (weighted, in site order) and applies the same outer SGD step with
// (Nesterov) momentum; local parameters restart from the new global ones.
//
// Streaming fragments (Douillard et al. 2025): the tensors are split into F
// fragments of about equal size and one syncs every sync_every / F steps.
// Overlap: a sync starts its exchange and applies it at the next sync, the
// site keeping its own progress that is not in it yet. flush() after
// training makes every replica end on the global parameters.
//
// Reliability (docs/RELIABILITY.md): checkpoints every checkpoint.every
// syncs; with resume, a running site's state (verified by digest) or the
// newest checkpoint every site holds; joins served while waiting for a
// round; a site that parted from the others (a partition healed under
// on_site_loss: continue) gives way and fetches the winners' state.
class DiLoCo : public ::torch::CustomClassHolder {
 public:
  // params: the trainable parameters (float32, any device), names: theirs
  // (config rules match them). Starts from site 0's parameters (compared by
  // digest first), or resumes (SessionOptions::resume). Throws
  // InvalidArgument on bad options or when the config's sync.mode is not
  // diloco.
  DiLoCo(c10::intrusive_ptr<Session> session, std::vector<std::string> names, std::vector<at::Tensor> params,
         DiLoCoOptions options = {});
  ~DiLoCo() override;

  // After each inner optimizer step: syncs every sync_every / fragments
  // calls. Returns true when this step's sync is due a checkpoint that still
  // needs the caller's own state (see setExtraState, writeCheckpoint).
  bool step();
  // After training: with overlap, applies the round in flight; then every
  // worker takes the global parameters (progress not synced yet is
  // dropped), so replicas end identical whatever the step count.
  void flush();

  // What a checkpoint holds of the caller's own (the inner optimizer, the
  // model's buffers), as bytes the caller reads back. With a provider set,
  // checkpoints are complete without help; without one, step() returns true
  // and the caller passes its state to writeCheckpoint().
  void setExtraState(std::function<std::vector<uint8_t>()> provider);
  void writeCheckpoint(const std::vector<uint8_t>& extra);
  // Leader, after a failed sync (the job stops): writes the rounds applied
  // so far unless a checkpoint of them exists.
  void writeFailureCheckpoint(const std::vector<uint8_t>& extra);
  // The caller's state from the checkpoint this instance resumed from
  // (empty if none); resumed(): "", "checkpoint" or "running".
  const std::vector<uint8_t>& resumedExtra() const;
  const std::string& resumed() const;

  int64_t syncs() const;       // outer steps applied
  int64_t localSteps() const;  // inner steps; drive the training loop by it
  int64_t syncEvery() const;
  double outerLr() const;
  double outerMomentum() const;
  bool nesterov() const;
  // "" without SparseLoCo, else its pipeline and decay ("topk(...) -> int2(...), decay 0.95").
  std::string sparseloco() const;
  bool overlap() const;
  const std::vector<std::vector<int64_t>>& fragments() const;  // parameter indices of each
  at::Tensor globalParams() const;  // flat float32, on the parameters' device
  bool unflushed() const;           // holds progress that is not in the global parameters (flush())

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Every-step mode: the gradient exchange behind the DDP communication hook
// (Python: strait.ddp_hook) and, for libtorch programs, average(). Per
// bucket: mean inside the site (c10d), on the leader compression with the
// config's rule for "ddp.bucket<INDEX>" and error feedback, one round with
// every site, the weighted mean of every site's decoded payload in site
// order, broadcast inside the site. A bucket's work runs on this object's
// thread, so backward goes on while it crosses the border; all of a step's
// rounds are in flight together and awaited at its last bucket.
class EveryStep : public ::torch::CustomClassHolder {
 public:
  // Throws InvalidArgument when the config's sync.mode is not every_step.
  explicit EveryStep(c10::intrusive_ptr<Session> session);
  ~EveryStep() override;

  // Hands over bucket `index`: its flat buffer (averaged in place), its
  // parameters (the first time a layout is seen: checked against every
  // site, and site 0's values adopted where they differ) and whether it is
  // the step's last. Returns at once with a future of the averaged buffer.
  c10::intrusive_ptr<c10::ivalue::Future> bucket(at::Tensor buffer, int64_t index, std::vector<at::Tensor> params,
                                                 bool last);
  // Blocks until every bucket handed over is done; throws the first error
  // of the step (the same on every worker).
  void finishStep();
  // libtorch: averages `tensors` (gradients) in place across the job, as
  // one bucket of index 0. `params`, if given (one per tensor), are the
  // parameters they belong to: their shapes are the bucket's layout, and
  // the first time it is seen their values are checked to be the same at
  // every site.
  void average(std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& params = {});

  // Checkpoints of every-step jobs (strait.Checkpoints): the parameters,
  // the residuals, the round counters and the caller's own state (`extra`:
  // the optimizer's) every checkpoint.every steps, on the leader.
  void checkpoint(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra);
  // With resume: the newest step every site holds, loaded into params (on
  // every worker) and the residuals; returns that step (0 if none) and
  // leaves the caller's state in resumedExtra().
  int64_t resume(std::vector<at::Tensor> params);
  const std::vector<uint8_t>& resumedExtra() const;

  // Joins of a running job (docs/RELIABILITY.md). registerParams: the
  // model's parameters in order (what resume() and checkpoint() are given):
  // bucket layouts are recorded by them, a resumed or joined site regroups
  // its DDP buckets into the job's, and join requests are answered; without
  // it a restarted site is told this job cannot take it in. At the end of
  // each step (after the optimizer's), on the leader: if joinsWaiting(),
  // serveJoins() sends every waiting site this site's state (`extra`: the
  // optimizer's). A restarted site's resume() then joins the running job.
  void registerParams(std::vector<at::Tensor> params);
  bool joinsWaiting();
  void serveJoins(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// The pieces of an FSDP2-sharded model inside one site (core/shards.h,
// docs/PROTOCOL.md "Sharded exchange"): each rank holds its Shard(0) of
// every parameter; gather() brings every piece this rank owns together
// (parts from the ranks after it, one all-to-all through the site's
// group), and scatter() hands every rank its parts of the owners' results.
// The building block of the sharded engine (issue 14; not yet wired to a
// gateway). Every rank of the site must call each method together.
class ShardedPieces : public ::torch::CustomClassHolder {
 public:
  // `shapes`: every parameter's full (unsharded) sizes, in model order;
  // `piece`: elements per piece; `group`: the site's workers, or null for a
  // site of one. Throws InvalidArgument on sizes that cannot be a model.
  ShardedPieces(std::vector<std::vector<int64_t>> shapes, int64_t piece, c10::intrusive_ptr<c10d::ProcessGroup> group);

  int64_t world() const { return world_; }
  int64_t rank() const { return rank_; }
  // Every piece (tensor, begin, end), and the indices of those this rank owns.
  std::vector<std::vector<int64_t>> pieces() const;
  const std::vector<int64_t>& owned() const { return owned_; }

  // `locals`: this rank's shard of each parameter (DTensor.to_local(), any
  // float dtype, one device). Returns each owned piece whole, float32, flat,
  // on that device.
  std::vector<at::Tensor> gather(const std::vector<at::Tensor>& locals) const;
  // `values`: a float32 value per element of each owned piece (as gather
  // returned them). Writes into `out` (one tensor per parameter, shaped as
  // this rank's shard) the values of every element this rank holds.
  void scatter(const std::vector<at::Tensor>& values, std::vector<at::Tensor>& out) const;

 private:
  struct Layout;
  std::shared_ptr<const Layout> layout_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int64_t world_ = 1, rank_ = 0;
  std::vector<int64_t> owned_;
};

// DiLoCo over a model sharded with FSDP2 inside each site (issue 14; docs/
// PROTOCOL.md "Sharded exchange"): every rank compresses and exchanges only
// the pieces it owns, with the ranks owning the same pieces at the other
// sites, through a gateway of its own per group (listening at its site's
// endpoint port + 1 + the group's number); no rank gathers the model, and
// the global parameters and outer momentum are kept per owned piece. Sites
// may have different numbers of ranks. After each sync every rank of every
// site holds the same bits for the same elements.
//
// Differential privacy clips the whole site's update (its squared norm
// summed across the ranks) and each group's gateway noises its share and
// counts the site's release. With the config's checkpoint section each
// rank writes its own pieces; a site restarted with --resume (and the same
// number of ranks) joins a running job, each rank taking its groups' state
// from the running owners, which answer while they wait in a sync, or,
// when every site resumes, all load the newest round every rank of every
// site holds. This version does plain DiLoCo under on_site_loss: wait,
// without fragments, overlap, SparseLoCo or adaptive compression; each of
// those is refused with an InvalidArgument naming it.
class ShardedDiLoCo : public ::torch::CustomClassHolder {
 public:
  // locals: each parameter's shard on this rank (DTensor.to_local(),
  // Shard(0)), updated in place at each sync; shapes: each parameter's full
  // sizes; names: theirs (config rules match them). Every rank of the site
  // calls it together; it agrees on the model and on every site's number of
  // ranks with the other sites and starts every site from site 0's values.
  ShardedDiLoCo(c10::intrusive_ptr<Session> session, std::vector<std::string> names, std::vector<at::Tensor> locals,
                std::vector<std::vector<int64_t>> shapes, DiLoCoOptions options = {});
  ~ShardedDiLoCo() override;

  // After each inner optimizer step: syncs every sync_every calls. A failed
  // exchange on any rank of the site raises on every rank of it. True when
  // a checkpoint is due (the config's checkpoint section): then every rank
  // calls writeCheckpoint with its own bytes (its inner optimizer's state).
  bool step();
  // Every rank together: each writes its pieces (global, momentum,
  // residuals) and `extra` to CHECKPOINT_DIR/SITE/rankR.
  void writeCheckpoint(const std::vector<uint8_t>& extra);
  // After resuming from a checkpoint: this rank's `extra` from it.
  const std::vector<uint8_t>& resumedExtra() const;
  // After training: every rank's shard takes the global parameters.
  void flush();
  int64_t syncs() const;
  int64_t localSteps() const;
  int64_t syncEvery() const;
  double outerLr() const;
  double outerMomentum() const;
  bool nesterov() const;
  int64_t groups() const;  // exchange groups this rank takes part in
  // "running" when it joined a running job (--resume), "" otherwise.
  std::string resumed() const;
  // Epsilon spent by each of this rank's groups' gateways (the same on all
  // of a site's: one release of the site per sync); empty without privacy.
  std::vector<double> privacySpent() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Every-step mode over a model sharded with FSDP2 inside each site (issue
// 14; Python: strait.fsdp_hook): HSDP-style, through FSDP2's all-reduce
// hook. Each *unit* (a module fully_shard was applied to) reduce-scatters
// its gradients inside the site; its hook hands this rank's shards over
// (unit()), which brings the pieces this rank owns together (one all-to-
// all inside the site where a piece crosses a shard boundary) and starts,
// per exchange group, one round with the ranks owning the same pieces at
// the other sites: compressed with the config's rule for the parameter
// (by its whole size) and error feedback, per piece. Backward goes on
// meanwhile. At the end of backward finishStep() waits for the step's
// rounds and hands every rank its parts of the weighted mean of every
// site's gradient, in site order: every rank of every site then holds the
// same bits for the same elements. Sites may have different numbers of
// ranks. This version runs under on_site_loss: wait, without adaptive
// compression, checkpoints or joins (each refused by name).
class ShardedEveryStep : public ::torch::CustomClassHolder {
 public:
  // names, locals, shapes: the trained parameters, as ShardedDiLoCo takes
  // them; units: for each unit, the indices of the parameters whose
  // gradients its reduce-scatter output holds, in its order (every
  // parameter in exactly one). Every rank of the site together: agrees on
  // the model, the units and every site's ranks with the other sites, and
  // starts every site from site 0's values (written into locals).
  ShardedEveryStep(c10::intrusive_ptr<Session> session, std::vector<std::string> names, std::vector<at::Tensor> locals,
                   std::vector<std::vector<int64_t>> shapes, std::vector<std::vector<int64_t>> units);
  ~ShardedEveryStep() override;

  // From unit m's all-reduce hook, on every rank of the site in the same
  // order: this rank's shard of each of its parameters' gradients (the
  // site's mean, unpadded; any float dtype). `local_error`: what failed on
  // this rank before (then it raises on every rank of the site). Returns
  // once its rounds are started; a failure to start one is raised by
  // finishStep().
  void unit(int64_t m, const std::vector<at::Tensor>& grads, const std::string& local_error = "");
  // At the end of backward: waits for the step's rounds (every rank of the
  // site together) and returns this rank's shard of the job's mean gradient
  // of each parameter of the units handed over this step (units in order,
  // their parameters in unit order), float32. After a failure every later
  // call raises: the sites' gradients no longer agree.
  std::vector<at::Tensor> finishStep();
  // The step cannot end (the hook raised after handing units over): every
  // later call raises, naming `why`, and the group gateways stop, telling
  // the other sites why.
  void abort(const std::string& why);
  int64_t steps() const;
  int64_t groups() const;  // exchange groups this rank takes part in
  // Epsilon spent by each of this rank's groups' gateways; empty without privacy.
  std::vector<double> privacySpent() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace strait::torch
