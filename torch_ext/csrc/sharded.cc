// ShardedPieces (strait_torch.h): the pieces of an FSDP2-sharded model
// brought to their owners and back, over the site's process group.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <sstream>

#include "core/codec/parts.h"
#include "core/digest.h"
#include "core/error.h"
#include "core/shards.h"
#include "torch_ext/csrc/device_codecs.h"
#include "torch_ext/csrc/session_impl.h"
#include "torch_ext/strait_torch.h"
#include "transport/gateway.h"

namespace strait::torch {
namespace {

// Each parameter's rows and elements, from its full sizes: a 0-dim tensor
// has one row, a (0, d) one is empty.
std::vector<core::ParamSize> paramSizes(const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<core::ParamSize> out;
  for (const auto& sizes : shapes) {
    int64_t numel = 1;
    for (int64_t d : sizes) numel *= d;
    out.push_back({sizes.empty() || numel == 0 ? 1 : sizes[0], numel});
  }
  return out;
}

}  // namespace

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
    fail<InvalidArgument>("sharded DiLoCo: site '", site, "': endpoint ", endpoint, " leaves no port for group ",
                          delta - 1, " (a sharded job uses the endpoint's port + 1 + each group's number)");
  }
  return endpoint.substr(0, colon + 1) + std::to_string(port + delta);
}

}  // namespace

struct ShardedDiLoCo::Impl {
  c10::intrusive_ptr<Session> session;
  Session::Impl& s;
  std::vector<std::string> names;
  std::vector<at::Tensor> locals;
  std::vector<std::vector<int64_t>> shapes;
  std::unique_ptr<ShardedPieces> pieces;
  std::vector<std::vector<int64_t>> table;  // every piece: tensor, begin, end
  std::vector<core::ParamSize> sizes;       // each parameter's rows and elements
  std::vector<core::ExchangeGroup> groups;  // every group of the job
  std::vector<size_t> mine;                 // the groups this rank owns its site's pieces of
  std::map<size_t, std::unique_ptr<transport::Gateway>> gateways;
  std::map<int64_t, size_t> position;       // owned piece -> index into global / momentum
  std::vector<at::Tensor> global, momentum;  // per owned piece, float32
  int64_t sync_every = 50, local_steps = 0, syncs = 0;
  double outer_lr = 0.7, mu = 0.9;
  bool nesterov = true;
  std::string pipeline;

  Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
       std::vector<std::vector<int64_t>> sh, DiLoCoOptions o);

  // The pieces of group g (in piece order) of a per-owned-piece list.
  std::vector<at::Tensor> ofGroup(const std::vector<at::Tensor>& perPiece, size_t g) const {
    std::vector<at::Tensor> out;
    for (int64_t k : groups[g].pieces) out.push_back(perPiece[position.at(k)]);
    return out;
  }
  // Raises on every rank of the site when fn raised on any (the same
  // message on the ranks where it did; a pointer to them elsewhere).
  void together(const std::string& what, const std::function<void()>& fn);
  // Every group of this rank exchanges (round, tag) at once; returns each
  // group's result in mine's order.
  std::vector<transport::RoundResult> exchange(uint64_t round, const std::string& tag,
                                               const std::function<std::vector<uint8_t>(size_t)>& payload,
                                               core::MessageKind kind);
  void start();
  void sync();
  void writeLocals();
};

ShardedDiLoCo::Impl::Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> l,
                          std::vector<std::vector<int64_t>> sh, DiLoCoOptions o)
    : session(std::move(sess)), s(session->impl()), names(std::move(n)), locals(std::move(l)), shapes(std::move(sh)) {
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
  // From the config, not s.checkpoints (the leader's alone): every rank must refuse alike.
  if (!s.config.checkpoint.dir.empty()) refuse("the checkpoint section (checkpoints and rejoin of sharded jobs)");
  if (s.opt.resume) refuse("resume");
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
  start();
}

void ShardedDiLoCo::Impl::together(const std::string& what, const std::function<void()>& fn) {
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
    fail<Error>("sharded DiLoCo: ", what, " failed on ", failed, " rank(s) of site '", s.opt.site,
                "' (their own error says why)");
  }
}

std::vector<transport::RoundResult> ShardedDiLoCo::Impl::exchange(
    uint64_t round, const std::string& tag, const std::function<std::vector<uint8_t>(size_t)>& payload,
    core::MessageKind kind) {
  std::vector<std::future<transport::RoundResult>> futures;
  for (size_t g : mine) {
    std::vector<uint8_t> bytes = payload(g);
    s.bytes_sent += bytes.size();
    futures.push_back(gateways.at(g)->exchange(round, tag, std::move(bytes), kind));
  }
  std::vector<transport::RoundResult> out;
  const auto deadline = Clock::now() + s.timeout;
  for (size_t j = 0; j < futures.size(); ++j) {
    if (futures[j].wait_until(deadline) != std::future_status::ready) {
      fail<TimeoutError>("sharded DiLoCo: group ", mine[j], "'s round ", round, " '", tag, "' did not complete within ",
                         std::chrono::duration_cast<std::chrono::seconds>(s.timeout).count(), " s");
    }
    out.push_back(futures[j].get());
  }
  return out;
}

void ShardedDiLoCo::Impl::start() {
  const int64_t piece = int64_t(s.config.transport.chunk_bytes / sizeof(float));
  // The same model everywhere (full shapes, names) and every site's number of ranks.
  std::ostringstream d;
  d << "sharded DiLoCo, pieces of " << piece << " elements\n";
  for (size_t i = 0; i < names.size(); ++i) {
    d << names[i] << " (";
    for (size_t k = 0; k < shapes[i].size(); ++k) d << (k ? ", " : "") << shapes[i][k];
    d << ")\n";
  }
  // The schedule too, as unsharded DiLoCo checks it: constructor arguments
  // can override the config, and owners applying different outer steps to
  // the same pieces would drift apart silently.
  d.precision(17);
  d << "schedule: sync_every " << sync_every << "\nouter step: lr " << outer_lr << ", momentum " << mu
    << (nesterov ? " (Nesterov)" : "") << "\n";
  s.checkSameEverywhere("diloco.model", d.str());
  at::Tensor worlds_t = at::zeros({int64_t(s.names.size())}, at::TensorOptions(at::kLong).device(s.control_device));
  s.fromLeader(
      [&] {
        std::vector<uint8_t> bytes(8);
        const uint64_t w = uint64_t(s.size);
        std::memcpy(bytes.data(), &w, 8);
        Round r = s.start("diloco.shards", std::move(bytes), core::MessageKind::kControl);
        const RoundOutcome o = s.finish(r);
        at::Tensor cpu = at::zeros({int64_t(s.names.size())}, at::kLong);
        for (size_t i = 0; i < o.payloads.size(); ++i) {
          if (!o.payloads[i] || o.payloads[i]->size() != 8) {
            fail<ProtocolError>("site '", s.names[i], "' did not say how many ranks it has ('diloco.shards')");
          }
          uint64_t w = 0;
          std::memcpy(&w, o.payloads[i]->data(), 8);
          if (w < 1 || w > (uint64_t{1} << 20)) fail<ProtocolError>("site '", s.names[i], "' says it has ", w, " ranks");
          cpu[int64_t(i)] = int64_t(w);
        }
        worlds_t.copy_(cpu);
      },
      {worlds_t});
  std::vector<int64_t> worlds;
  const at::Tensor wc = worlds_t.cpu();
  for (int64_t i = 0; i < wc.numel(); ++i) worlds.push_back(wc[i].item<int64_t>());

  pieces = std::make_unique<ShardedPieces>(shapes, piece, s.group);
  table = pieces->pieces();
  sizes = paramSizes(shapes);
  groups = core::exchangeGroups(sizes, piece, worlds);
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
      for (auto& site : go.sites) {
        site.endpoint = shiftPort(site.endpoint, int64_t(g) + 1, site.name);
        if (!site.bind.empty()) site.bind = shiftPort(site.bind, int64_t(g) + 1, site.name);
      }
      const std::string suffix = ".rank" + std::to_string(s.rank) + ".group" + std::to_string(g);
      if (!go.audit_log.empty()) go.audit_log += suffix;
      if (!go.metrics_path.empty()) go.metrics_path += suffix;
      gateways.emplace(g, std::make_unique<transport::Gateway>(std::move(go)));
    }
  });

  // Start from site 0's values, compared by digest first.
  global = pieces->gather(locals);
  for (const at::Tensor& p : global) momentum.push_back(at::zeros_like(p));
  std::vector<size_t> differ;
  together("agreeing on the initial parameters", [&] {
    const auto digests = exchange(0, "diloco.init.digest", [&](size_t g) {
      uint64_t sum = 0, offset = 0;
      for (const at::Tensor& p : ofGroup(global, g)) {
        const at::Tensor c = p.to(at::kCPU).contiguous();
        sum += core::digestSum(c.data_ptr<float>(), size_t(c.numel()), offset);
        offset += uint64_t(c.numel());
      }
      std::vector<uint8_t> b(8);
      std::memcpy(b.data(), &sum, 8);
      return b;
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
  });
  // Every group exchanges the init round (site 0's values where digests differed, nothing otherwise), so
  // the round numbers stay the same on every site whatever each group found.
  together("taking site 0's initial parameters", [&] {
    const auto init = exchange(0, "diloco.init", [&](size_t g) {
      const size_t j = size_t(std::find(mine.begin(), mine.end(), g) - mine.begin());
      if (s.site_index != 0 || std::find(differ.begin(), differ.end(), j) == differ.end()) return std::vector<uint8_t>{};
      std::vector<uint8_t> b;
      for (const at::Tensor& p : ofGroup(global, g)) {
        const at::Tensor c = p.to(at::kCPU).contiguous();
        const auto* bytes = reinterpret_cast<const uint8_t*>(c.data_ptr<float>());
        b.insert(b.end(), bytes, bytes + c.numel() * sizeof(float));
      }
      return b;
    }, core::MessageKind::kModelState);
    for (size_t j = 0; j < mine.size(); ++j) {
      const auto& from0 = init[j].payloads[0];
      if (!from0 || from0->empty()) continue;
      int64_t n = 0;
      for (int64_t k : groups[mine[j]].pieces) n += global[position.at(k)].numel();
      if (int64_t(from0->size()) != n * int64_t(sizeof(float))) {
        fail<ProtocolError>("site '", s.names[0], "' sent ", from0->size(), " bytes of initial parameters for group ",
                            mine[j], ", which holds ", n, " elements");
      }
      size_t off = 0;
      for (int64_t k : groups[mine[j]].pieces) {
        at::Tensor& p = global[position.at(k)];
        at::Tensor src = at::from_blob(const_cast<uint8_t*>(from0->data()) + off, {p.numel()}, at::kFloat);
        p.copy_(src);
        off += size_t(p.numel()) * sizeof(float);
      }
    }
  });
  writeLocals();
}

void ShardedDiLoCo::Impl::writeLocals() {
  std::vector<at::Tensor> out;
  for (const at::Tensor& l : locals) out.push_back(at::empty(l.sizes(), l.options().dtype(at::kFloat)).contiguous());
  pieces->scatter(global, out);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < locals.size(); ++i) locals[i].detach().copy_(out[i]);
}

void ShardedDiLoCo::Impl::sync() {
  const std::vector<at::Tensor> current = pieces->gather(locals);
  std::vector<at::Tensor> pseudo;
  for (size_t j = 0; j < global.size(); ++j) pseudo.push_back(global[j] - current[j]);
  // Differential privacy clips the *site's* update: its norm is summed
  // across the ranks (each holds its pieces' squares), then each group's
  // gateway clips its share by that norm and noises it (one release of the
  // site per sync, on every group's gateway alike).
  const bool private_release = s.policy && s.policy->privacy.enabled;
  double site_norm = 0;
  if (private_release) {
    double sq = 0;
    for (const at::Tensor& p : pseudo) sq += p.to(at::kDouble).square().sum().item<double>();
    at::Tensor t = at::full({1}, sq, at::TensorOptions(at::kDouble).device(s.control_device));
    s.allReduceSum(t);
    site_norm = std::sqrt(t.cpu().item<double>());
  }
  std::vector<at::Tensor> mean(global.size());
  together("the sync", [&] {
    const auto results = exchange(uint64_t(syncs), "diloco", [&](size_t g) {
      std::vector<at::Tensor> values;
      for (int64_t k : groups[g].pieces) values.push_back(pseudo[position.at(k)].to(at::kCPU).contiguous());
      if (private_release) {
        at::Tensor share = at::cat(values);
        gateways.at(g)->privatize(share.data_ptr<float>(), size_t(share.numel()), site_norm);
        int64_t offset = 0;
        for (at::Tensor& v : values) {
          v = share.narrow(0, offset, v.numel());
          offset += v.numel();
        }
      }
      std::vector<std::vector<uint8_t>> parts;
      for (size_t q = 0; q < values.size(); ++q) {
        const int64_t k = groups[g].pieces[q];
        const int64_t t = table[size_t(k)][0];
        Compressor& c = s.compressor("diloco.piece" + std::to_string(k), names[size_t(t)], values[q].numel(), pipeline,
                                     std::nullopt, sizes[size_t(t)].numel);
        parts.emplace_back();
        c.encode(values[q], parts.back());
      }
      return core::frameParts(parts);
    }, core::MessageKind::kModelUpdate);
    for (size_t j = 0; j < mine.size(); ++j) {
      const size_t g = mine[j];
      const auto& r = results[j];
      RoundOutcome o;
      o.payloads = r.payloads;
      o.missing = r.missing;
      std::vector<at::Tensor> acc;
      for (int64_t k : groups[g].pieces) {
        acc.push_back(at::zeros({global[position.at(k)].numel()},
                                at::TensorOptions(at::kFloat).device(s.decodeDevice(global[position.at(k)].device()))));
      }
      for (const auto& [i, weight] : s.siteWeights(o)) {
        const std::vector<uint8_t>& blob = *o.payloads[i];
        std::vector<core::PartView> views;
        try {
          views = core::splitParts(blob.data(), blob.size(), acc.size());
        } catch (const ProtocolError& e) {
          fail<ProtocolError>("site '", s.names[i], "' sent a 'diloco' message for group ", g, ": ", e.what());
        }
        for (size_t q = 0; q < acc.size(); ++q) accumulateExact(views[q].data, views[q].size, acc[q], weight);
      }
      for (size_t q = 0; q < acc.size(); ++q) mean[position.at(groups[g].pieces[q])] = acc[q];
    }
  });
  // The outer step, elementwise on each owned piece, in DiLoCo's order of
  // float32 operations (diloco.cc): m = m mu + g; u = nesterov ? g + mu m : m; p -= lr u.
  for (size_t j = 0; j < global.size(); ++j) {
    const at::Tensor g = mean[j].to(global[j].device());
    if (mu == 0 && !nesterov) {
      global[j].sub_(g, outer_lr);
      continue;
    }
    momentum[j].mul_(mu).add_(g);
    const at::Tensor update = nesterov ? g.add(momentum[j], mu) : momentum[j];
    global[j].sub_(update, outer_lr);
  }
  ++syncs;
  writeLocals();
}

ShardedDiLoCo::ShardedDiLoCo(c10::intrusive_ptr<Session> session, std::vector<std::string> names,
                             std::vector<at::Tensor> locals, std::vector<std::vector<int64_t>> shapes,
                             DiLoCoOptions options)
    : impl_(std::make_unique<Impl>(std::move(session), std::move(names), std::move(locals), std::move(shapes),
                                   std::move(options))) {}

ShardedDiLoCo::~ShardedDiLoCo() = default;

void ShardedDiLoCo::step() {
  if (++impl_->local_steps % impl_->sync_every == 0) impl_->sync();
}

void ShardedDiLoCo::flush() { impl_->writeLocals(); }
int64_t ShardedDiLoCo::syncs() const { return impl_->syncs; }
int64_t ShardedDiLoCo::localSteps() const { return impl_->local_steps; }
int64_t ShardedDiLoCo::groups() const { return int64_t(impl_->mine.size()); }
int64_t ShardedDiLoCo::syncEvery() const { return impl_->sync_every; }
double ShardedDiLoCo::outerLr() const { return impl_->outer_lr; }
double ShardedDiLoCo::outerMomentum() const { return impl_->mu; }
bool ShardedDiLoCo::nesterov() const { return impl_->nesterov; }

std::vector<double> ShardedDiLoCo::privacySpent() const {
  std::vector<double> out;
  if (!impl_->s.policy || !impl_->s.policy->privacy.enabled) return out;
  for (size_t g : impl_->mine) out.push_back(impl_->gateways.at(g)->privacySpent());
  return out;
}

}  // namespace strait::torch
