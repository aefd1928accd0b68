// ShardedEveryStep (strait_torch.h): every-step mode over a model sharded
// with FSDP2 inside each site, HSDP-style: each FSDP2 unit's reduce-
// scattered gradient is exchanged piece by piece, each rank with the ranks
// owning the same pieces at the other sites, while backward goes on.

#include <ATen/ATen.h>

#include <algorithm>
#include <sstream>

#include "core/error.h"
#include "core/shards.h"
#include "torch_ext/csrc/session_impl.h"
#include "torch_ext/csrc/sharded_groups.h"
#include "torch_ext/strait_torch.h"

namespace strait::torch {

struct ShardedEveryStep::Impl : ShardedGroups {
  c10::intrusive_ptr<Session> session;
  std::vector<at::Tensor> locals;
  // Units: the modules fully_shard was applied to, each reduce-scattering
  // the gradients of its own parameters (indices into the model's).
  std::vector<std::vector<int64_t>> units;
  std::vector<std::unique_ptr<ShardedPieces>> unit_pieces;  // each unit's parameters, over the site's group
  // unit -> j (mine) -> the global pieces of group mine[j] in this unit, ascending
  std::vector<std::vector<std::vector<int64_t>>> unit_group;
  // global piece this rank owns -> its position among its unit's owned pieces
  std::map<int64_t, size_t> owned_at;
  int64_t steps = 0;
  std::string failed;  // why the exchange broke (then every later call raises)

  // This step: per unit, its owned pieces' values (the site's mean, then
  // the job's) and its rounds (one per group of mine with pieces in it).
  struct UnitStep {
    bool handed = false;
    std::vector<at::Tensor> values;
    Futures futures;
  };
  std::vector<UnitStep> step;
  std::exception_ptr step_error;

  Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
       std::vector<std::vector<int64_t>> sh, std::vector<std::vector<int64_t>> u);

  std::string describe() const;
  void mapUnits();
  void unit(int64_t m, const std::vector<at::Tensor>& grads, const std::string& local_error);
  std::vector<at::Tensor> finish();
  void abort(const std::string& why) {
    if (failed.empty()) failed = why;
    // The other sites' rounds of this step wait for this site (under wait,
    // until their hard deadline): tell them it stopped, and why.
    for (auto& [g, gateway] : gateways) gateway->stop("sharded every-step: " + failed);
  }
  void checkUsable() const {
    if (!failed.empty()) {
      fail<Error>(engine, ": the exchange failed at step ", steps, " (", failed,
                  "); the sites' gradients no longer agree: stop the job and restart every site");
    }
  }
};

ShardedEveryStep::Impl::Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
                             std::vector<std::vector<int64_t>> sh, std::vector<std::vector<int64_t>> u)
    : ShardedGroups(sess->impl(), "sharded every-step", std::move(n), std::move(sh)),
      session(std::move(sess)),
      locals(std::move(l)),
      units(std::move(u)) {
  auto refuse = [](const std::string& what) {
    fail<InvalidArgument>("strait.fsdp_hook (every-step mode over a model sharded with FSDP2): ", what,
                          " is not supported yet; see docs/ARCHITECTURE.md \"Sharded models\"");
  };
  if (s.config.mode != core::SyncMode::kEveryStep) {
    fail<InvalidArgument>("strait.fsdp_hook: the job config ", s.config.source, " says sync.mode: ",
                          core::syncModeName(s.config.mode), "; the FSDP2 hook runs only under sync.mode: every_step");
  }
  if (s.adaptive) refuse("compression.adaptive");
  if (s.config.transport.on_site_loss_continue) refuse("on_site_loss: continue");
  if (s.opt.resume) refuse("--resume (checkpoints and joins of a sharded every-step job)");
  if (names.size() != locals.size() || shapes.size() != locals.size()) {
    fail<InvalidArgument>("strait.fsdp_hook: ", names.size(), " names and ", shapes.size(), " shapes for ",
                          locals.size(), " parameters");
  }
  if (locals.empty()) fail<InvalidArgument>("strait.fsdp_hook: the model has no parameters to train");
  std::vector<int> seen(locals.size(), 0);
  for (size_t m = 0; m < units.size(); ++m) {
    for (int64_t i : units[m]) {
      if (i < 0 || size_t(i) >= locals.size() || seen[size_t(i)]++) {
        fail<InvalidArgument>("strait.fsdp_hook: unit ", m, " names parameter ", i, ", which is out of range or in ",
                              "another unit (", locals.size(), " parameters)");
      }
    }
  }
  for (size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) {
      fail<InvalidArgument>("strait.fsdp_hook: parameter '", names[i], "' is in no FSDP2 unit: apply fully_shard to ",
                            "the model (the root) as well as to its blocks");
    }
  }
  s.checkSameEverywhere("fsdp.model", describe());
  agreeWorlds("fsdp.shards");
  // A step opens a round per unit on a group's gateway, each as its unit is
  // reduced: with fewer slots the hook would wait a round trip per unit
  // past them (every site computes the same number, so the peers' limits
  // on rounds opened ahead agree).
  openGateways(int(std::min<size_t>(units.size() + 1, 1024)));
  mapUnits();
  // Every-step mode keeps the sites' replicas equal by applying the same
  // mean gradient to the same parameters: every site starts from site 0's.
  std::vector<at::Tensor> values = pieces->gather(locals);
  agreeInitial(values, "fsdp.init");
  scatterToLocals(values, locals);
  step.resize(units.size());
}

std::string ShardedEveryStep::Impl::describe() const {
  std::ostringstream d;
  d << describePieces("sharded every-step");
  // The units too: a unit's round holds its pieces, so the sites must cut
  // the model into the same units.
  for (size_t m = 0; m < units.size(); ++m) {
    d << "unit " << m << ":";
    for (int64_t i : units[m]) d << " " << i;
    d << "\n";
  }
  return d.str();
}

void ShardedEveryStep::Impl::mapUnits() {
  const int64_t piece = int64_t(s.config.transport.chunk_bytes / sizeof(float));
  // The model's pieces are cut tensor by tensor, so a unit's own pieces are
  // the same ranges: its k-th piece of a tensor is the model's k-th of it.
  std::vector<int64_t> first(shapes.size() + 1, -1);
  for (size_t k = table.size(); k-- > 0;) first[size_t(table[k][0])] = int64_t(k);
  std::vector<size_t> position_of_group(groups.size(), SIZE_MAX);
  for (size_t j = 0; j < mine.size(); ++j) position_of_group[mine[j]] = j;
  std::vector<size_t> group_of(table.size(), SIZE_MAX);
  for (size_t g = 0; g < groups.size(); ++g) {
    for (int64_t k : groups[g].pieces) group_of[size_t(k)] = g;
  }
  for (size_t m = 0; m < units.size(); ++m) {
    std::vector<std::vector<int64_t>> unit_shapes;
    for (int64_t i : units[m]) unit_shapes.push_back(shapes[size_t(i)]);
    unit_pieces.push_back(std::make_unique<ShardedPieces>(unit_shapes, piece, s.group));
    std::vector<int64_t> global;
    int64_t last_tensor = -1, within = 0;
    for (const auto& p : unit_pieces.back()->pieces()) {
      within = p[0] == last_tensor ? within + 1 : 0;
      last_tensor = p[0];
      const int64_t k = first[size_t(units[m][size_t(p[0])])] + within;
      STRAIT_CHECK(k >= 0 && size_t(k) < table.size() && table[size_t(k)][1] == p[1] && table[size_t(k)][2] == p[2],
                   "unit ", m, "'s piece does not match the model's");
      global.push_back(k);
    }
    std::vector<std::vector<int64_t>> by_group(mine.size());
    for (int64_t k : global) {
      const size_t j = position_of_group[group_of[size_t(k)]];
      if (j != SIZE_MAX) by_group[j].push_back(k);
    }
    for (auto& ks : by_group) std::sort(ks.begin(), ks.end());
    const auto& owned = unit_pieces.back()->owned();
    for (size_t q = 0; q < owned.size(); ++q) owned_at[global[size_t(owned[q])]] = q;
    unit_group.push_back(std::move(by_group));
  }
}

void ShardedEveryStep::Impl::unit(int64_t m, const std::vector<at::Tensor>& grads, const std::string& local_error) {
  checkUsable();
  // What failed on one rank before it got here fails the unit on every rank
  // of the site (none is left waiting in the gather's collectives).
  together("handing unit " + std::to_string(m) + " over", [&] {
    if (!local_error.empty()) fail<Error>(local_error);
  });
  if (m < 0 || size_t(m) >= units.size()) {
    fail<InvalidArgument>("strait.fsdp_hook: unit ", m, " of ", units.size());
  }
  UnitStep& u = step[size_t(m)];
  if (u.handed) {
    fail<InvalidArgument>("strait.fsdp_hook: unit ", m, " reduced its gradients twice in step ", steps,
                          " (the step's end was not reached: was backward interrupted?)");
  }
  try {
    // The owners' pieces, whole (one all-to-all inside the site when a
    // piece crosses a shard boundary; every rank of the site together).
    u.values = unit_pieces[size_t(m)]->gather(grads);
    u.handed = true;
    // Differential privacy clips the site's gradient of this unit: its
    // squared norm summed across the ranks (each owns its pieces).
    std::optional<double> site_norm;
    if (s.policy && s.policy->privacy.enabled) site_norm = siteNorm(u.values);
    std::set<size_t> skip;
    for (size_t j = 0; j < mine.size(); ++j) {
      if (unit_group[size_t(m)][j].empty()) skip.insert(mine[j]);
    }
    // The release is the site's: a group holding none of the unit's pieces
    // counts it too, so that every gateway of the site keeps the whole account.
    // (A refused charge, like a refused privatize, is raised by finish() on
    // every rank of the site.)
    if (site_norm) {
      try {
        for (size_t g : skip) gateways.at(g)->chargePrivacyRelease();
      } catch (const std::exception&) {
        if (!step_error) step_error = std::current_exception();
      }
      if (step_error) return;  // no share of it leaves (finish() raises on every rank)
    }
    const std::string tag = "fsdp.unit" + std::to_string(m);
    u.futures = startRounds(uint64_t(steps), tag, [&](size_t g) {
      const size_t j = size_t(std::find(mine.begin(), mine.end(), g) - mine.begin());
      const std::vector<int64_t>& ks = unit_group[size_t(m)][j];
      std::vector<at::Tensor> values;
      for (int64_t k : ks) values.push_back(u.values[owned_at.at(k)]);
      return encodeGroup(g, ks, values, "fsdp.piece", "", site_norm);
    }, core::MessageKind::kModelUpdate, step_error, skip);
  } catch (const std::exception& e) {
    failed = e.what();  // the gather raised on every rank of the site
    throw;
  }
}

std::vector<at::Tensor> ShardedEveryStep::Impl::finish() {
  checkUsable();
  // Every round of the step, unit by unit, in one wait of the site.
  Futures all;
  std::vector<std::pair<size_t, size_t>> where;  // (unit, j) of each
  for (size_t m = 0; m < units.size(); ++m) {
    for (size_t j = 0; j < step[m].futures.size(); ++j) {
      all.push_back(std::move(step[m].futures[j]));
      where.emplace_back(m, j);
    }
  }
  const std::string what = "step " + std::to_string(steps);
  try {
    awaitRounds(what, all, step_error, [&](size_t q, const transport::RoundResult& r) {
      const auto [m, j] = where[q];
      std::vector<at::Tensor> values;
      for (int64_t k : unit_group[m][j]) values.push_back(step[m].values[owned_at.at(k)]);
      const std::vector<at::Tensor> mean = groupMean(
          r, values, "a 'fsdp' message for unit " + std::to_string(m) + ", group " + std::to_string(mine[j]));
      for (size_t p = 0; p < values.size(); ++p) values[p].copy_(mean[p]);
    });
    // Every rank takes its parts of the owners' means (units in order: every
    // rank of the site handed over the same ones).
    std::vector<at::Tensor> out;
    for (size_t m = 0; m < units.size(); ++m) {
      if (!step[m].handed) continue;
      std::vector<at::Tensor> shards;
      for (int64_t i : units[m]) {
        const core::Range r = core::shardRange(sizes[size_t(i)], pieces->world(), pieces->rank());
        shards.push_back(at::empty({r.size()}, at::TensorOptions(at::kFloat).device(locals[size_t(i)].device())));
      }
      unit_pieces[m]->scatter(step[m].values, shards);
      for (at::Tensor& t : shards) out.push_back(std::move(t));
    }
    for (UnitStep& u : step) u = UnitStep{};
    step_error = nullptr;
    ++steps;
    return out;
  } catch (const std::exception& e) {
    failed = e.what();
    throw;
  }
}

ShardedEveryStep::ShardedEveryStep(c10::intrusive_ptr<Session> session, std::vector<std::string> names,
                                   std::vector<at::Tensor> locals, std::vector<std::vector<int64_t>> shapes,
                                   std::vector<std::vector<int64_t>> units)
    : impl_(std::make_unique<Impl>(std::move(session), std::move(names), std::move(locals), std::move(shapes),
                                   std::move(units))) {}

ShardedEveryStep::~ShardedEveryStep() = default;

void ShardedEveryStep::unit(int64_t m, const std::vector<at::Tensor>& grads, const std::string& local_error) {
  impl_->unit(m, grads, local_error);
}
std::vector<at::Tensor> ShardedEveryStep::finishStep() { return impl_->finish(); }
void ShardedEveryStep::abort(const std::string& why) { impl_->abort(why); }
int64_t ShardedEveryStep::steps() const { return impl_->steps; }
int64_t ShardedEveryStep::groups() const { return int64_t(impl_->mine.size()); }

std::vector<double> ShardedEveryStep::privacySpent() const {
  std::vector<double> out;
  if (!impl_->s.policy || !impl_->s.policy->privacy.enabled) return out;
  for (size_t g : impl_->mine) out.push_back(impl_->gateways.at(g)->privacySpent());
  return out;
}

}  // namespace strait::torch
