#pragma once
// The libtorch C++ API: cross-site synchronisation for C++ training loops.
//
// A strait::torch::Site is one site leader's view of the job: its gateway to
// the other sites and one compressor (pipeline + error feedback) per tensor
// slot. Inside a site, averaging across workers stays the caller's business
// (torch::distributed or one process per site).
//
//   strait::torch::Site site("job.yaml", "hangzhou");
//   ... loss.backward();
//   std::vector<at::Tensor> grads = ...;       // e.g. p.grad() for every parameter
//   site.averageAcrossSites(grads, "grads");   // in place: the weighted mean of every site's decoded update
//   optimizer.step();
//
//   strait::torch::DiLoCo diloco(site, params, {.sync_every = 50});
//   ... after each inner optimizer step: diloco.step();
//
// Every call blocks until every site has contributed (or the job's deadlines
// decide); afterwards the tensors are bitwise identical on every site. Errors
// are strait::Error subclasses (ConfigError, ProtocolError, TimeoutError).
// Not thread-safe: one thread per Site.

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace strait::torch {

class Site {
 public:
  // Loads and validates the job config (and the site's policy file, if
  // given: egress kinds, signed audit log) and starts this site's gateway.
  Site(const std::string& config_path, const std::string& site, const std::string& policy_path = "");
  ~Site();
  Site(const Site&) = delete;
  Site& operator=(const Site&) = delete;

  // Replaces every tensor (float32, any device) with the weighted mean over
  // sites of the decoded, compressed tensors (the config's pipeline and error
  // feedback; one compressor per tensor slot of this tag). Sites missing
  // under on_site_loss: continue are left out and the weights renormalised.
  // Tensor shapes must match across sites (checked on the first call).
  void averageAcrossSites(std::vector<at::Tensor>& tensors, const std::string& tag);

  // Site 0's tensors, uncompressed, on every site (initial weights).
  void adoptFromFirstSite(std::vector<at::Tensor>& tensors, const std::string& tag);

  const std::string& name() const;
  size_t index() const;
  // Sites missing from the last round (on_site_loss: continue).
  const std::vector<std::string>& lastMissing() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

struct DiLoCoOptions {
  int sync_every = 50;
  double outer_lr = 0.7;
  double outer_momentum = 0.9;
  bool nesterov = true;
  int fragments = 1;  // streaming DiLoCo: a divisor of sync_every, at most the number of tensors
};

// DiLoCo (Douillard et al. 2023) over a Site: every sync_every steps the
// pseudo-gradient (global - local parameters) is averaged across sites and
// the same outer SGD step with (Nesterov) momentum updates the global
// parameters everywhere; the local parameters restart from them.
//
// With fragments = F (streaming DiLoCo, Douillard et al. 2025) the tensors
// are split into F groups of about equal size (largest first, to the
// lightest group) and one group syncs every sync_every / F steps, in turn,
// under the tag "diloco.f<k>": the same bytes per period in rounds 1/F the
// size. Call flush() after training so every site ends with the global
// parameters (progress not yet synced is dropped). Overlap is the Python
// API's (strait.DiLoCo).
class DiLoCo {
 public:
  // Adopts site 0's parameters as the common start. Throws InvalidArgument on
  // bad options.
  DiLoCo(Site& site, std::vector<at::Tensor> params, DiLoCoOptions options = {});
  void step();  // after each inner optimizer step
  void sync();   // now: the next fragment (with one fragment, every tensor)
  void flush();  // after training: every parameter takes its global value
  int64_t syncs() const { return syncs_; }
  // Indices into params of each fragment's tensors, in order.
  const std::vector<std::vector<size_t>>& fragments() const { return fragments_; }

 private:
  Site& site_;
  std::vector<at::Tensor> params_;
  DiLoCoOptions opt_;
  std::vector<at::Tensor> global_, momentum_;
  std::vector<std::vector<size_t>> fragments_;
  int64_t steps_ = 0, syncs_ = 0;
};

}  // namespace strait::torch
