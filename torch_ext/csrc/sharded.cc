// ShardedPieces (strait_torch.h): the pieces of an FSDP2-sharded model
// brought to their owners and back, over the site's process group.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <limits>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "core/codec/parts.h"
#include "core/digest.h"
#include "core/error.h"
#include "core/shards.h"
#include "torch_ext/csrc/device_codecs.h"
#include "torch_ext/csrc/session_impl.h"
#include "torch_ext/csrc/sharded_groups.h"
#include "torch_ext/strait_torch.h"
#include "transport/audit.h"
#include "transport/gateway.h"

namespace strait::torch {
std::vector<core::ParamSize> paramSizes(const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<core::ParamSize> out;
  for (const auto& sizes : shapes) {
    int64_t numel = 1;
    for (int64_t d : sizes) numel *= d;
    out.push_back({sizes.empty() || numel == 0 ? 1 : sizes[0], numel});
  }
  return out;
}

std::vector<uint8_t> u64Bytes(uint64_t v) {
  std::vector<uint8_t> b(8);
  std::memcpy(b.data(), &v, 8);
  return b;
}

struct ShardedPieces::Layout {
  std::vector<core::ParamSize> shapes;
  std::vector<core::Piece> pieces;
  std::vector<core::PieceHolding> held;
  core::SiteTransfers transfers;
  std::vector<core::Range> shards;  // this rank's elements of each tensor
  std::map<int64_t, size_t> owned;  // piece -> position in owned()
  bool any_transfer = false;        // on any rank of the site
};

ShardedPieces::ShardedPieces(std::vector<std::vector<int64_t>> shapes, int64_t piece,
                             c10::intrusive_ptr<c10d::ProcessGroup> group)
    : group_(std::move(group)) {
  if (group_) {
    world_ = group_->getSize();
    rank_ = group_->getRank();
  }
  auto l = std::make_shared<Layout>();
  l->shapes = paramSizes(shapes);
  l->pieces = core::canonicalPieces(l->shapes, piece);
  l->held = core::holdings(l->shapes, l->pieces, world_);
  l->transfers = core::siteTransfers(l->pieces, l->held, world_, rank_);
  for (const auto& t : l->shapes) l->shards.push_back(core::shardRange(t, world_, rank_));
  for (size_t k = 0; k < l->held.size(); ++k) {
    if (l->held[k].parts.size() > 1) l->any_transfer = true;
    if (l->held[k].owner == rank_) {
      l->owned.emplace(int64_t(k), owned_.size());
      owned_.push_back(int64_t(k));
    }
  }
  layout_ = std::move(l);
}

std::vector<std::vector<int64_t>> ShardedPieces::pieces() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& p : layout_->pieces) out.push_back({p.tensor, p.range.begin, p.range.end});
  return out;
}

namespace {

int64_t total(const std::vector<core::Transfer>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.range.size();
  return n;
}

// One all-to-all of float32 runs: `send[q]` to rank q; `from[q]` elements
// come from rank q, into `output` in rank order. Prepared apart from the
// collective so that a failure before it (a bad argument, memory) is agreed
// on by the site first (agreed()).
struct AllToAll {
  at::Tensor input, output;
  std::vector<int64_t> in_splits, out_splits;
};

AllToAll prepareAllToAll(const std::vector<std::vector<at::Tensor>>& send, const std::vector<int64_t>& from,
                         const at::TensorOptions& options) {
  AllToAll a;
  std::vector<at::Tensor> runs;
  a.out_splits = from;
  for (const auto& to_q : send) {
    int64_t n = 0;
    for (const at::Tensor& t : to_q) {
      runs.push_back(t);
      n += t.numel();
    }
    a.in_splits.push_back(n);
  }
  a.input = runs.empty() ? at::empty({0}, options) : at::cat(runs);
  int64_t incoming = 0;
  for (int64_t n : from) incoming += n;
  a.output = at::empty({incoming}, options);
  return a;
}

// Runs `prepare`; when a collective follows (`collective`), every rank of
// the group first learns whether it failed on any rank, so that none waits
// in the collective for a rank that raised: each raises, its own error or
// one naming how many others failed.
void agreed(c10d::ProcessGroup* group, bool collective, const at::Device& device, const char* what,
            const std::function<void()>& prepare) {
  std::exception_ptr error;
  try {
    prepare();
  } catch (const std::exception&) {
    error = std::current_exception();
  }
  if (collective) {
    std::vector<at::Tensor> flag{at::full({1}, error ? 1 : 0, at::TensorOptions(at::kLong).device(device))};
    group->allreduce(flag)->wait();
    const int64_t failed = flag[0].cpu().item<int64_t>();
    if (!error && failed > 0) {
      fail<Error>("ShardedPieces.", what, ": failed on ", failed, " other rank(s) of the site (their error says why)");
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

std::vector<at::Tensor> ShardedPieces::gather(const std::vector<at::Tensor>& locals) const {
  const Layout& l = *layout_;
  const at::Device device = locals.empty() ? at::Device(at::kCPU) : locals[0].device();
  const at::TensorOptions options = at::TensorOptions(at::kFloat).device(device);
  const bool collective = l.any_transfer && world_ > 1;
  std::vector<at::Tensor> out;
  AllToAll batch;
  agreed(group_.get(), collective, device, "gather", [&] {
    if (locals.size() != l.shapes.size()) {
      fail<InvalidArgument>("ShardedPieces.gather: ", locals.size(), " local shards for a model of ",
                            l.shapes.size(), " parameters");
    }
    std::vector<at::Tensor> flat;
    for (size_t i = 0; i < locals.size(); ++i) {
      if (locals[i].numel() != l.shards[i].size()) {
        fail<InvalidArgument>("ShardedPieces: parameter ", i, " has ", locals[i].numel(), " elements on rank ", rank_,
                              ", but FSDP2's Shard(0) of its ", l.shapes[i].numel, " elements (", l.shapes[i].rows,
                              " rows) over ", world_, " ranks gives it ", l.shards[i].size(),
                              ": is the model sharded with fully_shard along dim 0?");
      }
      flat.push_back(locals[i].detach().reshape({-1}).to(options));
    }
    auto ofShard = [&](int64_t tensor, const core::Range& r) {
      return flat[size_t(tensor)].narrow(0, r.begin - l.shards[size_t(tensor)].begin, r.size());
    };
    for (int64_t k : owned_) {
      const core::Piece& p = l.pieces[size_t(k)];
      at::Tensor whole = at::empty({p.range.size()}, options);
      const core::Range own = l.held[size_t(k)].parts.front().second;
      whole.narrow(0, 0, own.size()).copy_(ofShard(p.tensor, own));
      out.push_back(whole);
    }
    if (!collective) return;
    std::vector<std::vector<at::Tensor>> send(static_cast<size_t>(world_));
    std::vector<int64_t> from;
    for (int64_t q = 0; q < world_; ++q) {
      for (const auto& t : l.transfers.to[size_t(q)]) {
        send[size_t(q)].push_back(ofShard(l.pieces[size_t(t.piece)].tensor, t.range));
      }
      from.push_back(total(l.transfers.from[size_t(q)]));
    }
    batch = prepareAllToAll(send, from, options);
  });
  if (!collective) return out;
  group_->alltoall_base(batch.output, batch.input, batch.out_splits, batch.in_splits)->wait();
  int64_t cursor = 0;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.from[size_t(q)]) {
      const core::Piece& p = l.pieces[size_t(t.piece)];
      out[l.owned.at(t.piece)]
          .narrow(0, t.range.begin - p.range.begin, t.range.size())
          .copy_(batch.output.narrow(0, cursor, t.range.size()));
      cursor += t.range.size();
    }
  }
  return out;
}

void ShardedPieces::scatter(const std::vector<at::Tensor>& values, std::vector<at::Tensor>& out) const {
  const Layout& l = *layout_;
  // The transfer device: the outputs' (every rank has them, owner or not).
  const at::Device device = out.empty() ? at::Device(at::kCPU) : out[0].device();
  const at::TensorOptions options = at::TensorOptions(at::kFloat).device(device);
  const bool collective = l.any_transfer && world_ > 1;
  std::vector<at::Tensor> flat;
  AllToAll batch;
  agreed(group_.get(), collective, device, "scatter", [&] {
    if (values.size() != owned_.size()) {
      fail<InvalidArgument>("ShardedPieces.scatter: ", values.size(), " values for the ", owned_.size(),
                            " pieces rank ", rank_, " owns");
    }
    if (out.size() != l.shapes.size()) {
      fail<InvalidArgument>("ShardedPieces.scatter: ", out.size(), " outputs for a model of ", l.shapes.size(),
                            " parameters");
    }
    for (size_t j = 0; j < owned_.size(); ++j) {
      const int64_t n = l.pieces[size_t(owned_[j])].range.size();
      if (values[j].numel() != n || values[j].scalar_type() != at::kFloat || !values[j].is_contiguous()) {
        fail<InvalidArgument>("ShardedPieces.scatter: the value of owned piece ", j, " must be ", n,
                              " contiguous float32 elements (as gather returned it)");
      }
    }
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].numel() != l.shards[i].size() || !out[i].is_contiguous() || out[i].device() != device) {
        fail<InvalidArgument>("ShardedPieces.scatter: output ", i, " must be contiguous with ", l.shards[i].size(),
                              " elements (this rank's shard) on ", device, ", not ", out[i].numel(), " on ",
                              out[i].device());
      }
      flat.push_back(out[i].view({-1}));
    }
    for (size_t j = 0; j < owned_.size(); ++j) {
      const core::Piece& p = l.pieces[size_t(owned_[j])];
      const core::Range own = l.held[size_t(owned_[j])].parts.front().second;
      const int64_t tensor = p.tensor;
      flat[size_t(tensor)].narrow(0, own.begin - l.shards[size_t(tensor)].begin, own.size())
          .copy_(values[j].narrow(0, 0, own.size()));
    }
    if (!collective) return;
    std::vector<std::vector<at::Tensor>> send(static_cast<size_t>(world_));
    std::vector<int64_t> from;
    for (int64_t q = 0; q < world_; ++q) {
      for (const auto& t : l.transfers.from[size_t(q)]) {
        const core::Piece& p = l.pieces[size_t(t.piece)];
        send[size_t(q)].push_back(
            values[l.owned.at(t.piece)].narrow(0, t.range.begin - p.range.begin, t.range.size()).to(options));
      }
      from.push_back(total(l.transfers.to[size_t(q)]));
    }
    batch = prepareAllToAll(send, from, options);
  });
  if (!collective) return;
  group_->alltoall_base(batch.output, batch.input, batch.out_splits, batch.in_splits)->wait();
  int64_t cursor = 0;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.to[size_t(q)]) {
      const int64_t tensor = l.pieces[size_t(t.piece)].tensor;
      flat[size_t(tensor)].narrow(0, t.range.begin - l.shards[size_t(tensor)].begin, t.range.size())
          .copy_(batch.output.narrow(0, cursor, t.range.size()));
      cursor += t.range.size();
    }
  }
}

}  // namespace strait::torch

// ---------------------------------------------------------------------------
// ShardedDiLoCo

namespace strait::torch {
namespace {

// "tcp://HOST:PORT" with PORT + delta.
std::string shiftPort(const std::string& endpoint, int64_t delta, const std::string& site) {
  const size_t colon = endpoint.rfind(':');
  const int64_t port = colon == std::string::npos ? -1 : std::atoll(endpoint.c_str() + colon + 1);
  if (port <= 0 || port + delta > 65535) {
    fail<InvalidArgument>("sharded job: site '", site, "': endpoint ", endpoint, " leaves no port for group ",
                          delta - 1, " (a sharded job uses the endpoint's port + 1 + each group's number)");
  }
  return endpoint.substr(0, colon + 1) + std::to_string(port + delta);
}

// The tag of a group's join round: a (re)starting rank's request, the
// running owners' answers (docs/RELIABILITY.md, "Sharded jobs").
const char* const kGroupJoin = "diloco.join";

}  // namespace

ShardedGroups::ShardedGroups(Session::Impl& session, std::string e, std::vector<std::string> n,
                             std::vector<std::vector<int64_t>> sh)
    : s(session), engine(std::move(e)), names(std::move(n)), shapes(std::move(sh)) {}

std::vector<at::Tensor> ShardedGroups::ofGroup(const std::vector<at::Tensor>& perPiece, size_t g) const {
  std::vector<at::Tensor> out;
  for (int64_t k : groups[g].pieces) out.push_back(perPiece[position.at(k)]);
  return out;
}

int64_t ShardedGroups::groupElements(size_t g) const {
  int64_t n = 0;
  for (int64_t k : groups[g].pieces) n += table[size_t(k)][2] - table[size_t(k)][1];
  return n;
}

void ShardedGroups::together(const std::string& what, const std::function<void()>& fn) {
  std::exception_ptr error;
  try {
    fn();
  } catch (const std::exception&) {
    error = std::current_exception();
  }
  at::Tensor flag = at::full({1}, error ? 1 : 0, at::TensorOptions(at::kLong).device(s.control_device));
  s.allReduceSum(flag);
  if (error) std::rethrow_exception(error);
  const int64_t failed = flag.cpu().item<int64_t>();
  if (failed > 0) {
    fail<Error>(engine, ": ", what, " failed on ", failed, " rank(s) of site '", s.opt.site,
                "' (their own error says why)");
  }
}

ShardedGroups::Futures ShardedGroups::startRounds(uint64_t round, const std::string& tag,
                                                  const std::function<std::vector<uint8_t>(size_t)>& payload,
                                                  core::MessageKind kind, std::exception_ptr& error,
                                                  const std::set<size_t>& skip) {
  Futures futures(mine.size());
  try {
    for (size_t j = 0; j < mine.size(); ++j) {
      if (skip.count(mine[j])) continue;
      std::vector<uint8_t> bytes = payload(mine[j]);
      s.bytes_sent += bytes.size();
      futures[j] = gateways.at(mine[j])->exchange(round, tag, std::move(bytes), kind);
    }
  } catch (const std::exception&) {
    if (!error) error = std::current_exception();
  }
  return futures;
}

std::vector<transport::RoundResult> ShardedGroups::exchange(
    uint64_t round, const std::string& tag, const std::function<std::vector<uint8_t>(size_t)>& payload,
    core::MessageKind kind, const Done& done, const Serve& serve, const std::set<size_t>& skip) {
  std::exception_ptr error;
  Futures futures = startRounds(round, tag, payload, kind, error, skip);
  return awaitRounds("round " + std::to_string(round) + " '" + tag + "'", futures, error, done, serve);
}

std::vector<transport::RoundResult> ShardedGroups::awaitRounds(const std::string& what, Futures& futures,
                                                               std::exception_ptr error, const Done& done,
                                                               const Serve& serve) {
  std::vector<transport::RoundResult> out(futures.size());
  std::vector<bool> have(futures.size(), false);
  for (size_t j = 0; j < futures.size(); ++j) have[j] = !futures[j].has_value();
  // A completed round is taken (and applied) as soon as it is in.
  auto settle = [&](size_t j) {
    if (have[j] || futures[j]->wait_for(std::chrono::seconds(0)) != std::future_status::ready) return;
    have[j] = true;
    out[j] = futures[j]->get();
    if (done) done(j, out[j]);
  };
  const auto deadline = Clock::now() + s.timeout;
  for (;;) {
    int64_t waiting = 0;
    if (!error) {
      try {
        for (size_t j = 0; j < futures.size(); ++j) settle(j);
        if (serve) serve(settle);
        for (size_t j = 0; j < futures.size(); ++j) waiting += have[j] ? 0 : 1;
        if (waiting > 0 && Clock::now() >= deadline) {
          fail<TimeoutError>(engine, ": ", what, " of ", waiting, " group(s) of this rank did not complete within ",
                             std::chrono::duration_cast<std::chrono::seconds>(s.timeout).count(), " s");
        }
      } catch (const std::exception&) {
        error = std::current_exception();
      }
    }
    at::Tensor flags = at::tensor({int64_t(error ? 1 : 0), int64_t(waiting > 0 ? 1 : 0)}, at::kLong);
    if (s.size > 1) {
      at::Tensor d = flags.to(s.control_device);
      s.allReduceSum(d);
      flags = d.cpu();
    }
    if (error) std::rethrow_exception(error);
    const int64_t failed = flags[0].item<int64_t>(), busy = flags[1].item<int64_t>();
    if (failed > 0) {
      fail<Error>(engine, ": ", what, " failed on ", failed, " rank(s) of site '", s.opt.site,
                  "' (their own error says why)");
    }
    if (busy == 0) return out;
    bool waited = false;
    for (size_t j = 0; j < futures.size() && !waited; ++j) {
      if (!have[j]) {
        futures[j]->wait_for(std::chrono::milliseconds(20));
        waited = true;
      }
    }
    if (!waited) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

void ShardedGroups::agreeWorlds(const std::string& tag) {
  at::Tensor worlds_t = at::zeros({int64_t(s.names.size())}, at::TensorOptions(at::kLong).device(s.control_device));
  s.fromLeader(
      [&] {
        Round r = s.start(tag, u64Bytes(uint64_t(s.size)), core::MessageKind::kControl);
        const RoundOutcome o = s.finish(r);
        at::Tensor cpu = at::zeros({int64_t(s.names.size())}, at::kLong);
        for (size_t i = 0; i < o.payloads.size(); ++i) {
          if (!o.payloads[i] || o.payloads[i]->size() != 8) {
            fail<ProtocolError>("site '", s.names[i], "' did not say how many ranks it has ('", tag, "')");
          }
          uint64_t w = 0;
          std::memcpy(&w, o.payloads[i]->data(), 8);
          if (w < 1 || w > (uint64_t{1} << 20)) fail<ProtocolError>("site '", s.names[i], "' says it has ", w, " ranks");
          cpu[int64_t(i)] = int64_t(w);
        }
        worlds_t.copy_(cpu);
      },
      {worlds_t});
  worlds.clear();
  const at::Tensor wc = worlds_t.cpu();
  for (int64_t i = 0; i < wc.numel(); ++i) worlds.push_back(wc[i].item<int64_t>());
}

void ShardedGroups::openGateways(int rounds_in_flight) {
  const int64_t piece = int64_t(s.config.transport.chunk_bytes / sizeof(float));
  pieces = std::make_unique<ShardedPieces>(shapes, piece, s.group);
  table = pieces->pieces();
  sizes = paramSizes(shapes);
  groups = core::exchangeGroups(sizes, piece, worlds);
  mine.clear();
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].owners[s.site_index] == s.rank) mine.push_back(g);
  }
  for (size_t j = 0; j < pieces->owned().size(); ++j) position[pieces->owned()[j]] = j;

  // A gateway per group, between exactly its owners: the site's keys,
  // policy and audit (a file per rank and group) at port + 1 + group.
  together("starting its groups' gateways", [&] {
    for (size_t g : mine) {
      transport::GatewayOptions go =
          transport::GatewayOptions::fromConfig(s.config, s.opt.site, s.policy ? &*s.policy : nullptr);
      go.job_id += "/group" + std::to_string(g);
      go.max_rounds_in_flight = std::max(go.max_rounds_in_flight, rounds_in_flight);
      for (auto& site : go.sites) {
        site.endpoint = shiftPort(site.endpoint, int64_t(g) + 1, site.name);
        if (!site.bind.empty()) site.bind = shiftPort(site.bind, int64_t(g) + 1, site.name);
      }
      const std::string suffix = ".rank" + std::to_string(s.rank) + ".group" + std::to_string(g);
      go.log_name = s.opt.site + " (rank " + std::to_string(s.rank) + ", group " + std::to_string(g) + ")";
      if (!go.audit_log.empty()) go.audit_log += suffix;
      if (!go.metrics_path.empty()) go.metrics_path += suffix;
      gateways.emplace(g, std::make_unique<transport::Gateway>(std::move(go)));
    }
  });
}

// Start from site 0's values, compared by digest first.
void ShardedGroups::agreeInitial(std::vector<at::Tensor>& values, const std::string& tag) {
  std::vector<size_t> differ;
  const auto digests = exchange(0, tag + ".digest", [&](size_t g) {
    uint64_t sum = 0, offset = 0;
    for (const at::Tensor& p : ofGroup(values, g)) {
      const at::Tensor c = p.to(at::kCPU).contiguous();
      sum += core::digestSum(c.data_ptr<float>(), size_t(c.numel()), offset);
      offset += uint64_t(c.numel());
    }
    return u64Bytes(sum);
  }, core::MessageKind::kControl);
  for (size_t j = 0; j < mine.size(); ++j) {
    const auto& ps = digests[j].payloads;
    for (size_t i = 1; i < ps.size(); ++i) {
      if (!ps[i] || *ps[i] != *ps[0]) {
        differ.push_back(j);
        break;
      }
    }
  }
  // Every group exchanges the init round (site 0's values where digests differed, nothing otherwise), so
  // the round numbers stay the same on every site whatever each group found.
  exchange(0, tag, [&](size_t g) {
    const size_t j = size_t(std::find(mine.begin(), mine.end(), g) - mine.begin());
    if (s.site_index != 0 || std::find(differ.begin(), differ.end(), j) == differ.end()) return std::vector<uint8_t>{};
    std::vector<uint8_t> b;
    for (const at::Tensor& p : ofGroup(values, g)) {
      const at::Tensor c = p.to(at::kCPU).contiguous();
      const auto* bytes = reinterpret_cast<const uint8_t*>(c.data_ptr<float>());
      b.insert(b.end(), bytes, bytes + c.numel() * sizeof(float));
    }
    return b;
  }, core::MessageKind::kModelState, [&](size_t j, const transport::RoundResult& r) {
    const auto& from0 = r.payloads[0];
    if (!from0 || from0->empty()) return;
    const int64_t n = groupElements(mine[j]);
    if (int64_t(from0->size()) != n * int64_t(sizeof(float))) {
      fail<ProtocolError>("site '", s.names[0], "' sent ", from0->size(), " bytes of initial parameters for group ",
                          mine[j], ", which holds ", n, " elements");
    }
    size_t off = 0;
    for (int64_t k : groups[mine[j]].pieces) {
      at::Tensor& p = values[position.at(k)];
      p.copy_(at::from_blob(const_cast<uint8_t*>(from0->data()) + off, {p.numel()}, at::kFloat));
      off += size_t(p.numel()) * sizeof(float);
    }
  });
}

struct ShardedDiLoCo::Impl : ShardedGroups {
  c10::intrusive_ptr<Session> session;
  std::vector<at::Tensor> locals;
  std::vector<at::Tensor> global, momentum;  // per owned piece, float32
  int64_t sync_every = 50, local_steps = 0, syncs = 0;
  double outer_lr = 0.7, mu = 0.9;
  bool nesterov = true;
  std::string pipeline;
  std::string model_digest;  // of the model's description (start())
  std::string resumed;       // "running" after joining a running job
  // During a sync: which of mine's groups have applied it already (the
  // state a joining rank is sent is after it for those).
  std::vector<bool> stepped;
  // Group join requests answered (group, round) and the answers in flight.
  std::set<std::pair<size_t, uint64_t>> group_answered;
  std::vector<std::future<transport::RoundResult>> group_answers;
  // Checkpoints: each rank writes its own pieces to CHECKPOINT_DIR/SITE/rankR.
  std::optional<transport::CheckpointStore> store;
  bool checkpoint_due = false;
  std::vector<uint8_t> resumed_extra;  // the caller's bytes from the checkpoint resumed from

  Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
       std::vector<std::vector<int64_t>> sh, DiLoCoOptions o);

  std::string describe() const;
  void setup();          // the groups' gateways, global parameters and momentum, from worlds
  void agreeWorlds() { ShardedGroups::agreeWorlds("diloco.shards"); }
  bool join();           // --resume: takes a running site's state; false: start afresh
  void serveJoins(const std::function<void(size_t)>& settle);
  transport::State groupState(size_t j, std::vector<at::Tensor>& keep) const;
  void applyGroup(size_t j, const transport::RoundResult& r);
  // The digest of the whole model's global parameters (core/digest.h, as
  // of one flat vector in model order): each rank's pieces' share, summed
  // over the site. Every rank calls it together.
  uint64_t modelDigest(uint64_t* mine_only = nullptr) const;
  void checkpoint(const std::vector<uint8_t>& extra);  // every rank together
  // (round, digest) of the checkpoints every rank of the site holds.
  std::vector<std::pair<uint64_t, uint64_t>> siteHeld();
  void loadCheckpoint(uint64_t round, uint64_t digest);
  void sync(bool contribute = true, const std::set<size_t>& skip = {});
  void writeLocals();
};

ShardedDiLoCo::Impl::Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
                          std::vector<std::vector<int64_t>> sh, DiLoCoOptions o)
    : ShardedGroups(sess->impl(), "sharded DiLoCo", std::move(n), std::move(sh)),
      session(std::move(sess)),
      locals(std::move(l)) {
  const core::DiLoCoConfig& c = s.config.diloco;
  auto refuse = [](const std::string& what) {
    fail<InvalidArgument>("sharded DiLoCo (a model sharded with FSDP2): ", what,
                          " is not supported yet; see docs/ARCHITECTURE.md \"Sharded models\"");
  };
  if (s.config.mode != core::SyncMode::kDiLoCo) {
    fail<InvalidArgument>("strait.DiLoCo: the job config ", s.config.source, " says sync.mode: ",
                          core::syncModeName(s.config.mode), "; DiLoCo runs only under sync.mode: diloco");
  }
  if (o.fragments.value_or(c.fragments) != 1) refuse("sync.diloco.fragments other than 1");
  if (o.overlap.value_or(c.overlap)) refuse("sync.diloco.overlap");
  if (o.sparseloco.value_or(c.sparseloco.enabled)) refuse("SparseLoCo");
  if (s.adaptive) refuse("compression.adaptive");
  if (s.config.transport.on_site_loss_continue) refuse("on_site_loss: continue");
  if (!s.checkpoint_root.empty()) {
    store.emplace(s.checkpoint_root, s.opt.site + "/rank" + std::to_string(s.rank), s.config.checkpoint.every,
                  s.config.checkpoint.keep);
  }
  sync_every = o.sync_every.value_or(c.sync_every);
  outer_lr = o.outer_lr.value_or(c.outer_lr);
  mu = o.outer_momentum.value_or(c.outer_momentum);
  nesterov = o.nesterov.value_or(c.nesterov);
  if (sync_every < 1) fail<InvalidArgument>("DiLoCo: sync_every = ", sync_every, ": must be >= 1");
  if (!(outer_lr > 0)) fail<InvalidArgument>("DiLoCo: outer_lr = ", outer_lr, ": must be > 0");
  if (!(mu >= 0 && mu < 1)) fail<InvalidArgument>("DiLoCo: outer_momentum = ", mu, ": must be in [0, 1)");
  if (!o.pipeline.empty()) pipeline = core::Pipeline::parse(o.pipeline).toString();
  if (names.size() != locals.size() || shapes.size() != locals.size()) {
    fail<InvalidArgument>("sharded DiLoCo: ", names.size(), " names and ", shapes.size(), " shapes for ",
                          locals.size(), " parameters");
  }
  if (locals.empty()) fail<InvalidArgument>("DiLoCo: no parameters to train");
  for (size_t i = 0; i < locals.size(); ++i) {
    if (!at::isFloatingType(locals[i].scalar_type())) {
      fail<InvalidArgument>("DiLoCo: parameter '", names[i], "' is ", locals[i].scalar_type(),
                            ": DiLoCo trains floating-point parameters");
    }
  }
  const std::string description = describe();
  model_digest = transport::digestHex(reinterpret_cast<const uint8_t*>(description.data()), description.size());
  if (s.opt.resume && join()) return;
  s.checkSameEverywhere("diloco.model", description);
  agreeWorlds();
  setup();
  agreeInitial(global, "diloco.init");
  writeLocals();
}

std::string ShardedDiLoCo::Impl::describe() const {
  // The same model everywhere (full shapes, names).
  std::ostringstream d;
  d << describePieces("sharded DiLoCo");
  // The schedule too, as unsharded DiLoCo checks it: constructor arguments
  // can override the config, and owners applying different outer steps to
  // the same pieces would drift apart silently.
  d.precision(17);
  d << "schedule: sync_every " << sync_every << "\nouter step: lr " << outer_lr << ", momentum " << mu
    << (nesterov ? " (Nesterov)" : "") << "\n";
  return d.str();
}

void ShardedDiLoCo::Impl::setup() {
  openGateways();
  global = pieces->gather(locals);
  momentum.clear();
  for (const at::Tensor& p : global) momentum.push_back(at::zeros_like(p));
}

std::vector<at::Tensor> ShardedGroups::groupMean(const transport::RoundResult& r, const std::vector<at::Tensor>& like,
                                                 const std::string& what) const {
  RoundOutcome o;
  o.payloads = r.payloads;
  o.missing = r.missing;
  std::vector<at::Tensor> acc;
  for (const at::Tensor& v : like) {
    acc.push_back(at::zeros({v.numel()}, at::TensorOptions(at::kFloat).device(s.decodeDevice(v.device()))));
  }
  s.accumulateParts(o, acc, what);
  return acc;
}

void ShardedGroups::scatterToLocals(const std::vector<at::Tensor>& values, std::vector<at::Tensor>& locals) const {
  std::vector<at::Tensor> out;
  for (const at::Tensor& l : locals) out.push_back(at::empty(l.sizes(), l.options().dtype(at::kFloat)).contiguous());
  pieces->scatter(values, out);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < locals.size(); ++i) locals[i].detach().copy_(out[i]);
}

std::string ShardedGroups::describePieces(const std::string& engine_line) const {
  const int64_t piece = int64_t(s.config.transport.chunk_bytes / sizeof(float));
  std::ostringstream d;
  d << engine_line << ", pieces of " << piece << " elements\n";
  for (size_t i = 0; i < names.size(); ++i) {
    d << names[i] << " (";
    for (size_t k = 0; k < shapes[i].size(); ++k) d << (k ? ", " : "") << shapes[i][k];
    d << ")\n";
  }
  return d.str();
}

double ShardedGroups::siteNorm(const std::vector<at::Tensor>& values) {
  double sq = 0;
  for (const at::Tensor& v : values) sq += v.to(at::kDouble).square().sum().item<double>();
  at::Tensor t = at::full({1}, sq, at::TensorOptions(at::kDouble).device(s.control_device));
  s.allReduceSum(t);
  return std::sqrt(t.cpu().item<double>());
}

std::vector<uint8_t> ShardedGroups::encodeGroup(size_t g, const std::vector<int64_t>& ks,
                                                const std::vector<at::Tensor>& values, const std::string& key,
                                                const std::string& pipeline, std::optional<double> site_norm) {
  std::vector<at::Tensor> host;
  for (const at::Tensor& v : values) host.push_back(v.to(at::kCPU).contiguous());
  if (site_norm) {
    at::Tensor share = at::cat(host);
    gateways.at(g)->privatize(share.data_ptr<float>(), size_t(share.numel()), *site_norm);
    int64_t offset = 0;
    for (at::Tensor& v : host) {
      v = share.narrow(0, offset, v.numel());
      offset += v.numel();
    }
  }
  std::vector<std::vector<uint8_t>> parts;
  for (size_t q = 0; q < host.size(); ++q) {
    const int64_t t = table[size_t(ks[q])][0];
    Compressor& c = s.compressor(key + std::to_string(ks[q]), names[size_t(t)], host[q].numel(), pipeline,
                                 std::nullopt, sizes[size_t(t)].numel);
    parts.emplace_back();
    c.encode(host[q], parts.back());
  }
  return core::frameParts(parts);
}

// What a rank joining group mine[j] needs: its pieces' global parameters
// and outer momentum, and how many rounds they have had (host copies kept
// alive in `keep`).
transport::State ShardedDiLoCo::Impl::groupState(size_t j, std::vector<at::Tensor>& keep) const {
  const size_t g = mine[j];
  keep = {at::cat(ofGroup(global, g)).to(at::kCPU).contiguous(), at::cat(ofGroup(momentum, g)).to(at::kCPU).contiguous()};
  transport::State st;
  st.strings = {{"status", "running"}, {"model", model_digest}};
  st.counters = {{"rounds", uint64_t(syncs) + (stepped.size() > j && stepped[j] ? 1 : 0)}, {"group", g}};
  for (size_t k = 0; k < 2; ++k) {
    st.sections.push_back({k == 0 ? "global" : "momentum", transport::SectionType::kFloat32,
                           reinterpret_cast<const uint8_t*>(keep[k].data_ptr<float>()),
                           size_t(keep[k].numel()) * sizeof(float)});
  }
  st.strings["state_digest"] = stateDigest(st);
  return st;
}

// While this site waits in a sync: every rank answers the join requests of
// its groups (settling a round that completed first, so that the state it
// sends is after it); the leader answers the site's join request with what
// the joining site must agree on (the model and every site's ranks).
void ShardedDiLoCo::Impl::serveJoins(const std::function<void(size_t)>& settle) {
  for (size_t j = 0; j < mine.size(); ++j) {
    const size_t g = mine[j];
    for (const transport::PeerRound& p : gateways.at(g)->peerRounds(kGroupJoin)) {
      if (p.tag != kGroupJoin || !group_answered.emplace(g, p.round).second) continue;
      settle(j);
      std::vector<at::Tensor> keep;
      const transport::State st = groupState(j, keep);
      group_answers.push_back(
          gateways.at(g)->exchange(p.round, kGroupJoin, transport::encodeState(st), core::MessageKind::kModelState));
    }
  }
  for (auto it = group_answers.begin(); it != group_answers.end();) {
    if (it->wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      ++it;
      continue;
    }
    try {
      it->get();  // of no use here; an error only means the asker left
    } catch (const std::exception&) {
    }
    it = group_answers.erase(it);
  }
  if (!s.leader) return;
  std::vector<uint8_t> ranks;
  for (int64_t w : worlds) {
    const std::vector<uint8_t> b = u64Bytes(uint64_t(w));
    ranks.insert(ranks.end(), b.begin(), b.end());
  }
  s.serveJoins(uint64_t(syncs), [&] {
    transport::State st;
    // No parameters here ("params", which running sites' answers are
    // compared by, names the round instead); the pieces go per group.
    st.strings = {{"model", model_digest}, {"sharded", "pieces per group"}, {"params", "round " + std::to_string(syncs)}};
    st.counters = {{"syncs", uint64_t(syncs)}};
    st.sections = {{"worlds", transport::SectionType::kU64, ranks.data(), ranks.size()}};
    return st;
  });
  s.reapJoins();
}

// --resume. The leader runs the site's join protocol: a running site
// answers with the model and every site's ranks, and then each rank asks
// the running owners of its groups for their pieces' state. A group's
// owners may be a round apart (the round completed for some groups of the
// running site before this site died, not for others): the pieces of a
// group still waiting in round N take part in it without a contribution,
// as unsharded DiLoCo's joiner does; those already past it skip it. Every
// group ends at N + 1 on every site.
bool ShardedDiLoCo::Impl::join() {
  enum Kind : int64_t { kFresh = 0, kRunning = 1, kCheckpoint = 2 };
  // kRunning: site, nonce; kCheckpoint: round, digest.
  at::Tensor info = at::zeros({3}, at::TensorOptions(at::kLong).device(s.control_device));
  at::Tensor worlds_t = at::zeros({int64_t(s.names.size())}, at::TensorOptions(at::kLong).device(s.control_device));
  const auto started_at = Clock::now();
  const std::vector<std::pair<uint64_t, uint64_t>> held = siteHeld();
  s.fromLeader(
      [&] {
        const JoinOutcome j = s.join(model_digest, held);
        if (j.kind == JoinOutcome::Kind::kCheckpoint) {
          info.copy_(at::tensor({int64_t(kCheckpoint), int64_t(j.round), int64_t(j.digest)}, at::kLong));
          return;
        }
        if (j.kind == JoinOutcome::Kind::kFresh) return;  // nobody runs or holds anything: a fresh start
        const std::string what = "the answer of site '" + s.names[j.site] + "' to this site's join request";
        if (!j.no_state.empty()) {
          fail<Error>("site '", s.names[j.site], "' is still running; a site cannot join a running ", j.no_state,
                      " job — stop it and restart every site with --resume");
        }
        if (!j.state.strings.count("sharded")) {
          fail<InvalidArgument>("site '", s.names[j.site], "' runs a model that is not sharded; this site's is: ",
                                "every site must shard it (or none)");
        }
        const auto& w = j.state.section("worlds", transport::SectionType::kU64, what, s.names.size());
        at::Tensor cpu = at::zeros({int64_t(s.names.size())}, at::kLong);
        for (size_t i = 0; i < s.names.size(); ++i) {
          uint64_t v = 0;
          std::memcpy(&v, w.data + 8 * i, 8);
          if (v < 1 || v > (uint64_t{1} << 20)) fail<ProtocolError>(what, " says site '", s.names[i], "' has ", v, " ranks");
          cpu[int64_t(i)] = int64_t(v);
        }
        std::random_device rd;
        const int64_t nonce = int64_t(((uint64_t(rd()) << 32) ^ rd()) & ((uint64_t{1} << 62) - 1)) | 1;
        worlds_t.copy_(cpu);
        info.copy_(at::tensor({int64_t(kRunning), int64_t(j.site), nonce}, at::kLong));
      },
      {info, worlds_t});
  const at::Tensor ic = info.cpu();
  if (ic[0].item<int64_t>() == kFresh) return false;
  if (ic[0].item<int64_t>() == kCheckpoint) {
    // The same split as when it was written (every site's ranks are in the
    // job's first exchange again, as on a fresh start).
    s.checkSameEverywhere("diloco.model", describe());
    agreeWorlds();
    setup();
    loadCheckpoint(uint64_t(ic[1].item<int64_t>()), uint64_t(ic[2].item<int64_t>()));
    return true;
  }
  const size_t from = size_t(ic[1].item<int64_t>());
  const uint64_t nonce = uint64_t(ic[2].item<int64_t>());
  worlds.clear();
  const at::Tensor wc = worlds_t.cpu();
  for (int64_t i = 0; i < wc.numel(); ++i) worlds.push_back(wc[i].item<int64_t>());
  if (worlds[s.site_index] != s.size) {
    fail<InvalidArgument>("site '", s.opt.site, "' restarted with ", s.size, " ranks, but the running job split the ",
                          "model over its ", worlds[s.site_index], ": restart it with ", worlds[s.site_index], " ranks");
  }
  setup();

  // Each rank: its groups' state from the running site's owners.
  std::vector<int64_t> rounds(mine.size(), 0);
  transport::State request;
  request.strings = {{"status", "resuming"}, {"model", model_digest}};
  const std::vector<uint8_t> asked = transport::encodeState(request);
  exchange(nonce, kGroupJoin, [&](size_t) { return asked; }, core::MessageKind::kControl,
           [&](size_t j, const transport::RoundResult& r) {
             const size_t g = mine[j];
             const std::string what = "the state of group " + std::to_string(g) + " sent by site '" + s.names[from] + "'";
             if (!r.payloads[from] || r.payloads[from]->empty()) fail<ProtocolError>(what, " did not come");
             const std::vector<uint8_t>& bytes = *r.payloads[from];
             const transport::State st = transport::decodeState(bytes.data(), bytes.size(), what);
             if (st.string("status", what) != "running" || st.string("model", what) != model_digest) {
               fail<ProtocolError>(what, " is not a running site's state of this model");
             }
             if (stateDigest(st) != st.string("state_digest", what)) {
               fail<ProtocolError>(what, " does not match its digest (", bytes.size(), " bytes): refusing it");
             }
             const size_t n = size_t(groupElements(g));
             const auto& gs = st.section("global", transport::SectionType::kFloat32, what, n);
             const auto& ms = st.section("momentum", transport::SectionType::kFloat32, what, n);
             size_t off = 0;
             for (int64_t k : groups[g].pieces) {
               const size_t p = position.at(k);
               const int64_t m = global[p].numel();
               global[p].copy_(at::from_blob(const_cast<uint8_t*>(gs.data) + off, {m}, at::kFloat));
               momentum[p].copy_(at::from_blob(const_cast<uint8_t*>(ms.data) + off, {m}, at::kFloat));
               if (!at::isfinite(global[p]).all().item<bool>() || !at::isfinite(momentum[p]).all().item<bool>()) {
                 fail<ProtocolError>(what, " holds non-finite values");
               }
               off += size_t(m) * sizeof(float);
             }
             rounds[j] = int64_t(st.counter("rounds", what));
           });
  // The site's lowest and highest group round: N and N or N + 1.
  int64_t lo = std::numeric_limits<int64_t>::max() / 2, hi = -lo;
  for (int64_t r : rounds) {
    lo = std::min(lo, r);
    hi = std::max(hi, r);
  }
  at::Tensor bounds = at::tensor({-lo, hi}, at::kLong).to(s.control_device);
  s.allReduceMax(bounds);
  const at::Tensor bc = bounds.cpu();
  lo = -bc[0].item<int64_t>();
  hi = bc[1].item<int64_t>();
  if (hi - lo > 1 || lo < 0) {
    fail<ProtocolError>("sharded DiLoCo: the running site's groups are at rounds ", lo, " to ", hi,
                        "; a joining site can take them only a round apart at most");
  }
  std::set<size_t> past;
  for (size_t j = 0; j < mine.size(); ++j) {
    if (rounds[j] > lo) past.insert(mine[j]);
  }
  syncs = lo;
  writeLocals();
  resumed = "running";
  char took[32];
  std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - started_at).count());
  if (s.leader) {
    s.event("joined: state of round " + std::to_string(lo) + " from site '" + s.names[from] +
            "', each rank's groups from their owners there (digests verified) in " + took + " s");
  }
  // The running site waits in round `lo` for the groups not past it.
  sync(false, past);
  local_steps = syncs * sync_every;
  checkpoint_due = false;  // the running site has it; the next one is this site's too
  return true;
}

uint64_t ShardedDiLoCo::Impl::modelDigest(uint64_t* mine_only) const {
  std::vector<uint64_t> before(shapes.size() + 1, 0);  // each tensor's offset in the flat model
  for (size_t t = 0; t < sizes.size(); ++t) before[t + 1] = before[t] + uint64_t(sizes[t].numel);
  uint64_t sum = 0;
  for (const auto& [k, j] : position) {
    const at::Tensor c = global[j].to(at::kCPU).contiguous();
    const auto& p = table[size_t(k)];
    sum += core::digestSum(c.data_ptr<float>(), size_t(c.numel()), before[size_t(p[0])] + uint64_t(p[1]));
  }
  if (mine_only) *mine_only = sum;
  at::Tensor t = at::full({1}, int64_t(sum), at::TensorOptions(at::kLong).device(s.control_device));
  s.allReduceSum(t);  // wraps around as the u64 sum does
  return uint64_t(t.cpu().item<int64_t>());
}

// Every rank its own file: its pieces' global parameters and momentum,
// its compressors' residuals and the caller's bytes (the inner optimizer's
// state of its shard); named by the round and the whole model's digest,
// the same on every rank and every site. A failure is reported and
// training goes on (the older checkpoints are intact; a round some rank
// lacks is not resumed from).
void ShardedDiLoCo::Impl::checkpoint(const std::vector<uint8_t>& extra) {
  checkpoint_due = false;
  if (!store) return;
  const auto t0 = Clock::now();
  uint64_t share = 0;
  const uint64_t digest = modelDigest(&share);
  const at::Tensor g = global.empty() ? at::empty({0}, at::kFloat) : at::cat(global).to(at::kCPU).contiguous();
  const at::Tensor m = momentum.empty() ? at::empty({0}, at::kFloat) : at::cat(momentum).to(at::kCPU).contiguous();
  transport::State st;
  // Written at a sync: the steps are those of the syncs (a site that has
  // just joined has taken a step since).
  st.counters = {{"round", uint64_t(syncs)}, {"local_steps", uint64_t(syncs * sync_every)}, {"world", uint64_t(s.size)},
                 {"rank", uint64_t(s.rank)}, {"share", share}};
  st.strings = {{"model", model_digest}};
  auto floats = [](const std::string& name, const at::Tensor& t) {
    return transport::StateSection{name, transport::SectionType::kFloat32,
                                   reinterpret_cast<const uint8_t*>(t.data_ptr<float>()), size_t(t.numel()) * 4};
  };
  st.sections = {floats("global", g), floats("momentum", m)};
  const auto residuals = s.residuals("diloco.piece");
  for (const auto& [key, pipe, residual] : residuals) {
    st.sections.push_back(floats("residual:" + key, residual));
    st.strings["pipeline:" + key] = pipe;
  }
  st.sections.push_back({"extra", transport::SectionType::kBytes, extra.data(), extra.size()});
  std::string path;
  try {
    path = store->save(uint64_t(syncs), digest, st);
  } catch (const std::exception& e) {
    s.event(std::string(e.what()) + " (rank " + std::to_string(s.rank) + "; training goes on)");
  }
  at::Tensor failed = at::full({1}, path.empty() ? 1 : 0, at::TensorOptions(at::kLong).device(s.control_device));
  s.allReduceSum(failed);
  if (!s.leader) return;
  const int64_t n = failed.cpu().item<int64_t>();
  char took[32];
  std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - t0).count());
  if (n == 0) {
    s.event("checkpoint of round " + std::to_string(syncs) + " written by each rank (rank 0's: " + path + ") in " +
            took + " s");
  } else {
    s.event("checkpoint of round " + std::to_string(syncs) + " failed on " + std::to_string(n) +
            " rank(s) (their own message says why): the site cannot resume from that round; training goes on");
  }
}

std::vector<std::pair<uint64_t, uint64_t>> ShardedDiLoCo::Impl::siteHeld() {
  const auto own = store ? store->held() : std::vector<std::pair<uint64_t, uint64_t>>{};
  at::Tensor n = at::full({1}, int64_t(own.size()), at::TensorOptions(at::kLong).device(s.control_device));
  s.broadcast(n);  // the leader's count
  const int64_t count = n.cpu().item<int64_t>();
  at::Tensor list = at::zeros({2 * count}, at::kLong);
  if (s.leader) {
    for (int64_t i = 0; i < count; ++i) {
      list[2 * i] = int64_t(own[size_t(i)].first);
      list[2 * i + 1] = int64_t(own[size_t(i)].second);
    }
  }
  at::Tensor d = list.to(s.control_device);
  s.broadcast(d);
  list = d.cpu();
  const std::set<std::pair<uint64_t, uint64_t>> mine_set(own.begin(), own.end());
  at::Tensor have = at::zeros({count}, at::kLong);
  for (int64_t i = 0; i < count; ++i) {
    have[i] = int64_t(mine_set.count({uint64_t(list[2 * i].item<int64_t>()), uint64_t(list[2 * i + 1].item<int64_t>())}));
  }
  at::Tensor h = have.to(s.control_device);
  s.allReduceSum(h);
  have = h.cpu();
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (int64_t i = 0; i < count; ++i) {
    if (have[i].item<int64_t>() == s.size) {
      out.emplace_back(uint64_t(list[2 * i].item<int64_t>()), uint64_t(list[2 * i + 1].item<int64_t>()));
    }
  }
  return out;
}

// Every rank loads its own file of (round, digest) and checks it holds this
// rank's pieces of this model and split; the shares of all the site's
// files must add up to the digest.
void ShardedDiLoCo::Impl::loadCheckpoint(uint64_t round, uint64_t digest) {
  std::optional<transport::LoadedState> ck;
  together("loading its checkpoint of round " + std::to_string(round), [&] {
    ck.emplace(store->load(round, digest, ""));
    const std::string what = "checkpoint " + store->path(round, digest);
    const transport::State& st = ck->state;
    if (st.string("model", what) != model_digest) {
      fail<InvalidArgument>(what, " is of another model or schedule than this run's");
    }
    if (st.counter("world", what) != uint64_t(s.size) || st.counter("rank", what) != uint64_t(s.rank)) {
      fail<InvalidArgument>(what, " was written by rank ", st.counter("rank", what), " of ", st.counter("world", what),
                            "; this is rank ", s.rank, " of ", s.size, ": restart site '", s.opt.site, "' with ",
                            st.counter("world", what), " ranks");
    }
    int64_t n = 0;
    for (const at::Tensor& p : global) n += p.numel();
    const auto& g = st.section("global", transport::SectionType::kFloat32, what, size_t(n));
    const auto& m = st.section("momentum", transport::SectionType::kFloat32, what, size_t(n));
    size_t off = 0;
    for (size_t j = 0; j < global.size(); ++j) {
      const int64_t k = global[j].numel();
      global[j].copy_(at::from_blob(const_cast<uint8_t*>(g.data) + off, {k}, at::kFloat));
      momentum[j].copy_(at::from_blob(const_cast<uint8_t*>(m.data) + off, {k}, at::kFloat));
      off += size_t(k) * sizeof(float);
    }
    s.restoreResiduals(st, "diloco.piece");
    if (st.has("extra")) {
      const auto& e = st.section("extra", transport::SectionType::kBytes, what);
      resumed_extra.assign(e.data, e.data + e.size);
    }
    local_steps = int64_t(st.counter("local_steps", what));
  });
  uint64_t share = 0;
  const uint64_t sum = modelDigest(&share);
  if (sum != digest) {
    fail<Error>("the checkpoints of round ", round, " of site '", s.opt.site, "' do not add up to their digest ",
                core::digestHex(digest), " (this rank's: ", store->path(round, digest), "; damaged, or from "
                "different runs)");
  }
  syncs = int64_t(round);
  writeLocals();
  resumed = "checkpoint";
  if (s.leader) {
    s.event("resumed from round " + std::to_string(round) + " (the newest every rank of every site that answered " +
            "holds): each rank's own checkpoint, rank 0's " + store->path(round, digest));
  }
}

void ShardedDiLoCo::Impl::writeLocals() { scatterToLocals(global, locals); }

// Group mine[j]'s round is in: the weighted mean of the sites' updates,
// then the outer step on its pieces, elementwise, in DiLoCo's order of
// float32 operations (diloco.cc): m = m mu + g; u = nesterov ? g + mu m : m; p -= lr u.
void ShardedDiLoCo::Impl::applyGroup(size_t j, const transport::RoundResult& r) {
  const size_t g = mine[j];
  const std::vector<at::Tensor> acc =
      groupMean(r, ofGroup(global, g), "a 'diloco' message for group " + std::to_string(g));
  for (size_t q = 0; q < acc.size(); ++q) {
    const size_t p = position.at(groups[g].pieces[q]);
    const at::Tensor mean = acc[q].to(global[p].device());
    if (mu == 0 && !nesterov) {
      global[p].sub_(mean, outer_lr);
      continue;
    }
    momentum[p].mul_(mu).add_(mean);
    const at::Tensor update = nesterov ? mean.add(momentum[p], mu) : momentum[p];
    global[p].sub_(update, outer_lr);
  }
  stepped[j] = true;
}

// contribute false: this site takes part in the round without an update
// (a site that has just joined). skip: groups already past this round.
void ShardedDiLoCo::Impl::sync(bool contribute, const std::set<size_t>& skip) {
  std::vector<at::Tensor> pseudo;
  if (contribute) {
    const std::vector<at::Tensor> current = pieces->gather(locals);
    for (size_t j = 0; j < global.size(); ++j) pseudo.push_back(global[j] - current[j]);
  }
  // Differential privacy clips the *site's* update: its norm is summed
  // across the ranks (each holds its pieces' squares), then each group's
  // gateway clips its share by that norm and noises it (one release of the
  // site per sync, on every group's gateway alike).
  std::optional<double> site_norm;
  if (contribute && s.policy && s.policy->privacy.enabled) site_norm = siteNorm(pseudo);
  stepped.assign(mine.size(), false);
  exchange(
      uint64_t(syncs), "diloco",
      [&](size_t g) {
        if (!contribute) return std::vector<uint8_t>{};
        return encodeGroup(g, groups[g].pieces, ofGroup(pseudo, g), "diloco.piece", pipeline, site_norm);
      },
      core::MessageKind::kModelUpdate, [&](size_t j, const transport::RoundResult& r) { applyGroup(j, r); },
      [&](const std::function<void(size_t)>& settle) { serveJoins(settle); }, skip);
  stepped.clear();
  ++syncs;
  writeLocals();
  if (store && syncs % store->every() == 0) checkpoint_due = true;  // step() tells the caller
}

ShardedDiLoCo::ShardedDiLoCo(c10::intrusive_ptr<Session> session, std::vector<std::string> names,
                             std::vector<at::Tensor> locals, std::vector<std::vector<int64_t>> shapes,
                             DiLoCoOptions options)
    : impl_(std::make_unique<Impl>(std::move(session), std::move(names), std::move(locals), std::move(shapes),
                                   std::move(options))) {}

ShardedDiLoCo::~ShardedDiLoCo() = default;

bool ShardedDiLoCo::step() {
  if (++impl_->local_steps % impl_->sync_every == 0) impl_->sync();
  return impl_->checkpoint_due;
}

void ShardedDiLoCo::writeCheckpoint(const std::vector<uint8_t>& extra) { impl_->checkpoint(extra); }
const std::vector<uint8_t>& ShardedDiLoCo::resumedExtra() const { return impl_->resumed_extra; }

void ShardedDiLoCo::flush() { impl_->writeLocals(); }
int64_t ShardedDiLoCo::syncs() const { return impl_->syncs; }
int64_t ShardedDiLoCo::localSteps() const { return impl_->local_steps; }
int64_t ShardedDiLoCo::groups() const { return int64_t(impl_->mine.size()); }
int64_t ShardedDiLoCo::syncEvery() const { return impl_->sync_every; }
double ShardedDiLoCo::outerLr() const { return impl_->outer_lr; }
double ShardedDiLoCo::outerMomentum() const { return impl_->mu; }
bool ShardedDiLoCo::nesterov() const { return impl_->nesterov; }
std::string ShardedDiLoCo::resumed() const { return impl_->resumed; }

std::vector<double> ShardedDiLoCo::privacySpent() const {
  std::vector<double> out;
  if (!impl_->s.policy || !impl_->s.policy->privacy.enabled) return out;
  for (size_t g : impl_->mine) out.push_back(impl_->gateways.at(g)->privacySpent());
  return out;
}

}  // namespace strait::torch
