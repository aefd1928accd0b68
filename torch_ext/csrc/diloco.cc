// DiLoCo over a Session (strait_torch.h): plain, streaming fragments,
// overlapped; the start-up agreement, checkpoints, joins and giving way
// after a parting (docs/ARCHITECTURE.md, docs/RELIABILITY.md).

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <sstream>

#include "core/codec/codec.h"
#include "core/codec/parts.h"
#include "core/digest.h"
#include "core/fragments.h"
#include "core/error.h"
#include "torch_ext/csrc/session_impl.h"
#include "transport/audit.h"

namespace strait::torch {

namespace {

transport::StateSection floats(const std::string& name, const at::Tensor& cpu) {
  return {name, transport::SectionType::kFloat32, static_cast<const uint8_t*>(cpu.data_ptr()), size_t(cpu.nbytes())};
}

}  // namespace

// One overlapped round in flight: the leader's rounds (or why it could not
// start them), the fragment it covers and the pseudo-gradient it carries.
struct Inflight {
  std::optional<Round> base, parts;
  std::exception_ptr error;
  int64_t fragment = 0;
  at::Tensor pseudo;
};

struct DiLoCo::Impl {
  c10::intrusive_ptr<Session> session;
  Session::Impl& s;
  std::vector<std::string> names;
  std::vector<at::Tensor> params;
  std::vector<Part> parts;
  int64_t numel = 0;
  at::Device device{at::kCPU};
  int64_t sync_every = 50, interval = 50;
  double outer_lr = 0.7, mu = 0.9;
  std::optional<core::DiLoCoConfig::SparseLoCo> sparseloco;  // set: SparseLoCo
  bool nesterov = true, overlap = false;
  std::string pipeline;
  std::vector<std::vector<int64_t>> fragments;
  std::string model_digest;

  int64_t local_steps = 0, syncs = 0, started = 0;
  at::Tensor global, momentum, sent;
  std::optional<Inflight> inflight;
  bool diverged = false, unflushed = false, checkpoint_due = false;
  std::set<std::string> absent;
  std::optional<Clock::time_point> wait_end;
  std::string resumed;
  std::vector<uint8_t> resumed_extra;
  std::function<std::vector<uint8_t>()> extra_provider;

  Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> p, DiLoCoOptions o);

  // -- the flat vector and its fragments ------------------------------------
  at::Tensor local() const {
    std::vector<at::Tensor> flat;
    for (const at::Tensor& p : params) flat.push_back(p.detach().reshape({-1}).to(device, at::kFloat));
    return flat.empty() ? at::empty({0}, at::TensorOptions(at::kFloat).device(device)) : at::cat(flat);
  }
  int64_t fragmentNumel(int64_t f) const {
    int64_t n = 0;
    for (int64_t i : fragments[f]) n += parts[i].numel;
    return n;
  }
  // Fragment f's values of a full flat vector (the vector itself, not a copy,
  // with one fragment), and its parts re-based to them.
  std::pair<at::Tensor, std::vector<Part>> gather(const at::Tensor& flat, int64_t f) const {
    if (fragments.size() == 1) return {flat, parts};
    std::vector<at::Tensor> pieces;
    std::vector<Part> ps;
    int64_t at = 0;
    for (int64_t i : fragments[f]) {
      Part p = parts[i];
      pieces.push_back(flat.narrow(0, p.offset, p.numel));
      p.offset = at;
      at += p.numel;
      ps.push_back(std::move(p));
    }
    return {at::cat(pieces), ps};
  }
  void scatter(at::Tensor& flat, const at::Tensor& values, int64_t f) const {
    if (values.data_ptr() == flat.data_ptr()) return;
    int64_t at = 0;
    for (int64_t i : fragments[f]) {
      flat.narrow(0, parts[i].offset, parts[i].numel).copy_(values.narrow(0, at, parts[i].numel));
      at += parts[i].numel;
    }
  }
  // Copies flat into the parameters, or only into fragment f's.
  void load(const at::Tensor& flat, int64_t f = -1) {
    std::set<int64_t> members;
    if (f >= 0 && fragments.size() > 1) members.insert(fragments[f].begin(), fragments[f].end());
    for (size_t i = 0; i < params.size(); ++i) {
      if (!members.empty() && !members.count(int64_t(i))) continue;
      at::Tensor p = params[i].detach();
      p.copy_(flat.narrow(0, parts[i].offset, parts[i].numel).view(p.sizes()));
    }
  }

  // -- the pieces of a sync ---------------------------------------------------
  std::string forcedPipeline() const {
    if (sparseloco) return sparseloco->pipeline();
    if (!pipeline.empty()) return pipeline;
    return s.adaptive ? s.adaptive->pipeline() : "";
  }
  Round startParts(const at::Tensor& flat, const std::vector<Part>& ps, bool contribute);
  // The weighted mean of every kept site's decoded parts (leader).
  at::Tensor decodeParts(RoundOutcome& o, int64_t n, const std::vector<Part>& ps, const std::set<size_t>* keep);
  // Finishes a sync's rounds (the parts, then the base digests) and decodes.
  at::Tensor finishSync(Round& base, Round& parts_round, int64_t n, const std::vector<Part>& ps);
  Round startBase(uint64_t base);
  std::set<size_t> keepOf(Round& base, const RoundOutcome& parts);
  void membership(const std::vector<std::string>& missing);
  void parted(const std::string& name, const std::string& why);
  void adapt(Clock::time_point waiting);
  void outerStep(const at::Tensor& outer_grad, int64_t f);
  void sync(bool contribute = true);
  void syncOverlapped();
  void applyInflight(Inflight in, at::Tensor local, const Inflight* pending);

  // -- start, checkpoints, joins ----------------------------------------------
  at::Tensor agree(const at::Tensor& flat);
  transport::State joinState(at::Tensor& global_cpu, at::Tensor& momentum_cpu) const;
  void serve(uint64_t round);
  void checkpoint(const std::vector<uint8_t>& extra);
  void onFailure();
  bool recover(const at::Tensor& flat, bool give_way);
};

DiLoCo::Impl::Impl(c10::intrusive_ptr<Session> sess, std::vector<std::string> n, std::vector<at::Tensor> p,
                   DiLoCoOptions o)
    : session(std::move(sess)), s(session->impl()), names(std::move(n)), params(std::move(p)) {
  const core::DiLoCoConfig& c = s.config.diloco;
  if (s.config.mode != core::SyncMode::kDiLoCo) {
    fail<InvalidArgument>("strait.DiLoCo: the job config ", s.config.source, " says sync.mode: ",
                          core::syncModeName(s.config.mode),
                          "; DiLoCo runs only under sync.mode: diloco (every site must run the mode the config "
                          "names: set it there, or use the DDP hook)");
  }
  const int64_t frags = o.fragments.value_or(c.fragments);
  sync_every = o.sync_every.value_or(c.sync_every);
  outer_lr = o.outer_lr.value_or(c.outer_lr);
  mu = o.outer_momentum.value_or(c.outer_momentum);
  nesterov = o.nesterov.value_or(c.nesterov);
  overlap = o.overlap.value_or(c.overlap);
  pipeline = o.pipeline;
  if (o.sparseloco.value_or(c.sparseloco.enabled)) {
    // The error-feedback buffer takes the place of outer momentum.
    if (o.outer_momentum.value_or(0) != 0 || o.nesterov.value_or(false)) {
      fail<InvalidArgument>("DiLoCo: SparseLoCo has no outer momentum (its error-feedback buffer takes its place): "
                            "leave outer_momentum and nesterov out");
    }
    if (!pipeline.empty()) {
      fail<InvalidArgument>("DiLoCo: SparseLoCo fixes every tensor's pipeline (", c.sparseloco.pipeline(),
                            "); leave pipeline out");
    }
    sparseloco = c.sparseloco;
    mu = 0;
    nesterov = false;
    if (!c.sparseloco.enabled) outer_lr = o.outer_lr.value_or(1.0);
  }
  if (sync_every < 1) fail<InvalidArgument>("DiLoCo: sync_every = ", sync_every, ": must be >= 1");
  if (frags < 1 || sync_every % frags) {
    fail<InvalidArgument>("DiLoCo: fragments = ", frags, ": must be a divisor of sync_every (", sync_every, ")");
  }
  if (!(outer_lr > 0)) fail<InvalidArgument>("DiLoCo: outer_lr = ", outer_lr, ": must be > 0");
  if (!(mu >= 0 && mu < 1)) fail<InvalidArgument>("DiLoCo: outer_momentum = ", mu, ": must be in [0, 1)");
  if (names.size() != params.size()) {
    fail<InvalidArgument>("DiLoCo: ", names.size(), " names for ", params.size(), " parameters");
  }
  if (params.empty()) fail<InvalidArgument>("DiLoCo: no parameters to train");
  if (!pipeline.empty()) pipeline = core::Pipeline::parse(pipeline).toString();
  device = params[0].device();
  std::string description;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].device() != device) {
      fail<InvalidArgument>("DiLoCo: parameter '", names[i], "' is on ", params[i].device(), ", '", names[0],
                            "' on ", device, ": every parameter must be on one device");
    }
    if (!at::isFloatingType(params[i].scalar_type())) {
      fail<InvalidArgument>("DiLoCo: parameter '", names[i], "' is ", params[i].scalar_type(),
                            ": parameters must be floating point");
    }
    Part part{numel, params[i].numel(), names[i], params[i].sizes().vec()};
    numel += part.numel;
    parts.push_back(part);
    description += names[i] + " (";
    for (size_t d = 0; d < part.shape.size(); ++d) description += (d ? ", " : "") + std::to_string(part.shape[d]);
    description += part.shape.size() == 1 ? ",)\n" : ")\n";
  }
  description.pop_back();
  std::vector<int64_t> sizes;
  for (const Part& part : parts) sizes.push_back(part.numel);
  fragments = core::splitFragments(sizes, frags);
  interval = sync_every / frags;
  model_digest = transport::digestHex(reinterpret_cast<const uint8_t*>(description.data()), description.size());

  at::NoGradGuard no_grad;
  const at::Tensor flat = local();
  momentum = at::zeros_like(flat);
  if (!(s.opt.resume && recover(flat, false))) {
    // The schedule too: constructor arguments can override the config.
    std::ostringstream outer;
    outer.precision(17);
    outer << "\nouter step: lr " << outer_lr << ", momentum " << mu << (nesterov ? " (Nesterov)" : "");
    if (sparseloco) outer << ", SparseLoCo " << sparseloco->pipeline() << ", decay " << sparseloco->decay;
    s.checkSameEverywhere("diloco.model", description + "\nschedule: sync_every " + std::to_string(sync_every) +
                                              ", fragments " + std::to_string(frags) + ", overlap " +
                                              (overlap ? "True" : "False") + outer.str());
    global = agree(flat);
    load(global);
  }
  // From now on this site can hand its state to a site that (re)joins; with
  // overlap the state would miss the round in flight, so a site that asks
  // is told no.
  if (overlap) {
    s.setJoinServer("diloco", [this](uint64_t) { s.refuseJoins("overlapped DiLoCo"); });
  } else {
    s.setJoinServer("diloco", [this](uint64_t round) { serve(round); });
  }
  if (overlap) sent = global.clone();
  started = syncs;
  s.closing_warning = [this]() -> std::string {
    if (!unflushed) return "";
    return std::string("strait.DiLoCo ended without diloco.flush(): ") +
           (inflight ? "a round in flight was not applied and " : "") +
           "this site's parameters are not the global ones; call diloco.flush() after the training loop";
  };
}

// ------------------------------------------------------------- a sync ---

Round DiLoCo::Impl::startParts(const at::Tensor& flat, const std::vector<Part>& ps, bool contribute) {
  std::vector<uint8_t> message;
  if (contribute) {
    const at::Tensor values = s.encodable(flat);
    std::vector<std::vector<uint8_t>> pieces(ps.size());
    const std::string forced = forcedPipeline();
    for (size_t k = 0; k < ps.size(); ++k) {
      const Part& p = ps[k];
      Compressor& c = s.compressor("diloco." + p.name, p.name, p.numel, forced,
                                   sparseloco ? std::optional<float>(float(sparseloco->decay)) : std::nullopt);
      // The parameter's own shape: lowrank factors its 2-D view.
      c.encode(values.narrow(0, p.offset, p.numel).view(p.shape), pieces[k]);
    }
    message = core::frameParts(pieces);
  }
  s.bytes_sent += message.size();
  return s.start("diloco", std::move(message), core::MessageKind::kModelUpdate);
}

at::Tensor DiLoCo::Impl::decodeParts(RoundOutcome& o, int64_t n, const std::vector<Part>& ps,
                                     const std::set<size_t>* keep) {
  if (keep) {
    for (size_t i = 0; i < o.payloads.size(); ++i) {
      if (!keep->count(i)) o.payloads[i].reset();
    }
  }
  at::Tensor out = at::zeros({n}, at::TensorOptions(at::kFloat).device(s.decodeDevice(device)));
  std::vector<at::Tensor> outs;
  for (const Part& p : ps) outs.push_back(out.narrow(0, p.offset, p.numel));
  s.accumulateParts(o, outs, "a 'diloco' message");
  for (auto& p : o.payloads) {
    if (p) s.gateway->recycle(std::move(*p));
  }
  s.last_missing = o.missing;
  return out;
}

at::Tensor DiLoCo::Impl::finishSync(Round& base, Round& parts_round, int64_t n, const std::vector<Part>& ps) {
  RoundOutcome o = s.finish(parts_round);
  const std::set<size_t> keep = keepOf(base, o);
  return decodeParts(o, n, ps, &keep);
}

Round DiLoCo::Impl::startBase(uint64_t base) {
  std::vector<uint8_t> bytes(8);
  std::memcpy(bytes.data(), &base, 8);
  return s.start("diloco.base", std::move(bytes), core::MessageKind::kControl);
}

// The sites whose payloads this round may use. Normally all; when sites
// report different global parameters (a healed partition under
// on_site_loss: continue), the group holding the lowest site index wins (as
// in membership()); a site outside it drops the round and fetches the
// winners' state (sync()).
std::set<size_t> DiLoCo::Impl::keepOf(Round& base, const RoundOutcome& parts_outcome) {
  const RoundOutcome bases = s.finish(base);
  std::map<std::vector<uint8_t>, std::vector<size_t>> groups;
  for (size_t i = 0; i < bases.payloads.size(); ++i) {
    const bool has = bases.payloads[i] && !bases.payloads[i]->empty() && parts_outcome.payloads[i] &&
                     !parts_outcome.payloads[i]->empty();
    if (has || i == s.site_index) groups[bases.payloads[i].value_or(std::vector<uint8_t>{})].push_back(i);
  }
  std::set<size_t> all;
  for (size_t i = 0; i < s.names.size(); ++i) all.insert(i);
  if (groups.size() <= 1) return all;
  const std::vector<size_t>* winners = nullptr;
  for (const auto& g : groups) {
    if (!winners || g.second.front() < winners->front()) winners = &g.second;
  }
  std::vector<size_t> losers;
  for (const auto& g : groups) {
    if (&g.second != winners) losers.insert(losers.end(), g.second.begin(), g.second.end());
  }
  std::sort(losers.begin(), losers.end());
  auto list = [&](const std::vector<size_t>& idx) {
    std::string out;
    for (size_t i : idx) out += (out.empty() ? "" : ", ") + s.names[i];
    return out;
  };
  const bool won = std::count(winners->begin(), winners->end(), s.site_index) > 0;
  if (won) {
    s.event("round " + std::to_string(syncs) + ": sites " + list(losers) +
            " hold other global parameters (a partition healed?); going on with " + list(*winners) +
            ", the others fetch this state");
  } else {
    s.event("round " + std::to_string(syncs) + ": this site's global parameters differ from those of " +
            list(*winners) + " (a partition healed?); dropping this round and fetching theirs");
    diverged = true;
  }
  return std::set<size_t>(winners->begin(), winners->end());
}

// Leader, after each sync: sites left out of a round this site applied are
// remembered; when one of them is heard again in the same life (a cut link,
// not a restart), both sides went on alone (on_site_loss: continue), and a
// site that closed a round without this one (or the reverse) holds other
// state whatever the round counters say: the side without the lower-index
// site gives way.
void DiLoCo::Impl::membership(const std::vector<std::string>& missing) {
  absent.insert(missing.begin(), missing.end());
  for (const std::string& name : s.takeDivergedPeers()) {
    absent.erase(name);
    parted(name, "site '" + name + "' and this site applied different rounds (one closed a round without the other)");
  }
  for (const std::string& name : s.takeReturnedPeers()) {
    if (!absent.erase(name)) continue;
    parted(name, "site '" + name + "' is back after a partition during which both sides went on");
  }
}

void DiLoCo::Impl::parted(const std::string& name, const std::string& why) {
  const size_t other = size_t(std::find(s.names.begin(), s.names.end(), name) - s.names.begin());
  if (other > s.site_index) {
    s.event(why + "; it will fetch this side's state");
  } else if (!diverged) {
    s.event(why + "; this site gives way and fetches the state of the side with '" + name + "'");
    diverged = true;
  }
}

// Leader: feeds the adaptive controller the wait for a round since
// `waiting` and the compute time since the previous wait ended.
void DiLoCo::Impl::adapt(Clock::time_point waiting) {
  const auto done = Clock::now();
  if (s.adaptive && wait_end) {
    auto note = s.adaptive->update(std::chrono::duration<double>(done - waiting).count(),
                                   std::chrono::duration<double>(waiting - *wait_end).count());
    if (note) s.adaptive_note = *note;
  }
  wait_end = done;
}

// The same outer step, in the same float32 ops, on every worker, for
// fragment f (outer_grad holds its values).
void DiLoCo::Impl::outerStep(const at::Tensor& outer_grad, int64_t f) {
  at::Tensor g = gather(global, f).first;
  if (mu == 0 && !nesterov) {  // plain outer SGD (SparseLoCo): no momentum to keep
    g.sub_(outer_grad, outer_lr);
    scatter(global, g, f);
    ++syncs;
    return;
  }
  at::Tensor m = gather(momentum, f).first;
  m.mul_(mu).add_(outer_grad);
  const at::Tensor update = nesterov ? outer_grad.add(m, mu) : m;
  g.sub_(update, outer_lr);
  scatter(momentum, m, f);
  scatter(global, g, f);
  ++syncs;
}

void DiLoCo::Impl::sync(bool contribute) {
  if (overlap) return syncOverlapped();
  const int64_t f = syncs % int64_t(fragments.size());
  at::Tensor loc = local();
  const std::pair<at::Tensor, std::vector<Part>> gathered = gather(global - loc, f);
  const at::Tensor& pseudo = gathered.first;
  const std::vector<Part>& ps = gathered.second;
  at::Tensor outer_grad = at::empty({pseudo.numel()}, at::TensorOptions(at::kFloat).device(s.decodeDevice(device)));
  try {
    s.fromLeader(
        [&] {
          // Every site also says which global parameters its pseudo-gradient
          // is relative to: after a partition healed under `continue` the
          // two sides differ, and only one side may go on (keepOf).
          Round b = startBase(tensorDigest(global));
          const auto started_at = Clock::now();
          Round r = startParts(pseudo, ps, contribute);
          outer_grad.copy_(finishSync(b, r, pseudo.numel(), ps));
          membership(s.last_missing);
          adapt(started_at);
        },
        {outer_grad});
  } catch (const Error&) {
    // A lost site and `wait` ended at the hard deadline (or the round failed
    // otherwise): stop with this site's state on disk.
    onFailure();
    throw;
  }
  at::Tensor flag = at::full({1}, int64_t(diverged), at::kLong).to(s.control_device);
  s.broadcast(flag);
  if (flag.cpu().item<int64_t>()) {
    // This site was on the losing side of a partition: its parameters are
    // not the job's any more. Drop this round, take the state of the sites
    // that went on.
    diverged = false;
    if (s.leader) s.restartGateway();  // the winners void what it sent while apart
    recover(loc, true);                // a running site's state, or an error
    return;
  }
  outerStep(outer_grad.to(device), f);
  load(global, f);
  unflushed = fragments.size() > 1;
  if (!s.config.checkpoint.dir.empty() && syncs % s.config.checkpoint.every == 0 && s.leader) {
    if (extra_provider) {
      checkpoint(extra_provider());
    } else {
      checkpoint_due = true;  // step() tells the caller, who calls writeCheckpoint()
    }
  }
}

// Overlap: this site's progress on the next fragment since it was last sent
// starts crossing now; the previous round's mean, which crossed during the
// inner steps since, is applied.
void DiLoCo::Impl::syncOverlapped() {
  const int64_t f = started % int64_t(fragments.size());
  at::Tensor loc = local();
  Inflight next;
  next.fragment = f;
  std::vector<Part> ps;
  std::tie(next.pseudo, ps) = gather(sent - loc, f);
  scatter(sent, gather(loc, f).first, f);  // sent up to here
  if (s.leader) {
    try {
      next.base = startBase(tensorDigest(global));
      next.parts = startParts(next.pseudo, ps, true);
    } catch (const Error&) {
      next.error = std::current_exception();
    }
  }
  std::optional<Inflight> previous = std::move(inflight);
  inflight = next;
  ++started;
  unflushed = true;
  if (previous) {
    try {
      applyInflight(std::move(*previous), loc, &next);
    } catch (const Error&) {
      // As without overlap: stop with this site's state on disk, the rounds
      // applied so far (a resume starts with nothing in flight and nothing
      // sent: `sent` is the global parameters).
      onFailure();
      throw;
    }
  }
  if (!s.config.checkpoint.dir.empty() && started % s.config.checkpoint.every == 0) {
    // A checkpoint holds no round in flight: wait for the one just started
    // (every site does, at the same sync), then write.
    Inflight last = std::move(*inflight);
    inflight.reset();
    applyInflight(std::move(last), local(), nullptr);
    if (s.leader) {
      if (extra_provider) {
        checkpoint(extra_provider());
      } else {
        checkpoint_due = true;
      }
      wait_end = Clock::now();  // the drain is not compute the next round hid behind
    }
  }
}

// Waits for an overlapped round (on the leader), broadcasts its mean in the
// site and applies the outer step to its fragment g. g's parameters become
// the new global ones plus this site's progress not in them yet: what it
// has not sent, and the round `pending` just started if it is g's too.
void DiLoCo::Impl::applyInflight(Inflight in, at::Tensor loc, const Inflight* pending) {
  const int64_t g = in.fragment;
  at::Tensor outer_grad = at::empty({fragmentNumel(g)}, at::TensorOptions(at::kFloat).device(s.decodeDevice(device)));
  s.fromLeader(
      [&] {
        if (in.error) std::rethrow_exception(in.error);
        const auto waiting = Clock::now();
        std::vector<Part> ps = gather(global, g).second;
        outer_grad.copy_(finishSync(*in.base, *in.parts, outer_grad.numel(), ps));
        membership(s.last_missing);
        if (pending) adapt(waiting);  // not a checkpoint's wait for the round just started
      },
      {outer_grad});
  at::Tensor flag = at::full({1}, int64_t(diverged), at::kLong).to(s.control_device);
  s.broadcast(flag);
  if (flag.cpu().item<int64_t>()) {
    fail<Error>("strait.DiLoCo: this site's parameters diverged from the other sites' after a partition, and "
                "overlap mode cannot rejoin in place; restart the site");
  }
  outerStep(outer_grad.to(device), g);
  const at::Tensor unsent = gather(loc, g).first - gather(sent, g).first;
  at::Tensor start = gather(global, g).first;
  start = pending && pending->fragment == g ? start - pending->pseudo : start.clone();
  scatter(sent, start, g);
  // (Adding zeros would turn -0.0 into 0.0: only add when something is unsent.)
  scatter(loc, unsent.any().item<bool>() ? start + unsent : start, g);
  load(loc, g);
}

// ------------------------------------------------ start, state, joins ---

// Every worker adopts site 0's initial parameters. Sites compare a digest
// first (a control message of 8 bytes, computed where the parameters are:
// on the GPU for CUDA tensors): when they already agree (the same seed), no
// parameters cross the border; otherwise site 0 sends its own, uncompressed,
// and the other sites send nothing (only then does the leader hold a host
// copy of the model, for the wire). Inside the site the leader's result is
// broadcast either way (workers built without a common seed agree too): on
// the GPU with NCCL, through the host with gloo.
at::Tensor DiLoCo::Impl::agree(const at::Tensor& flat) {
  at::Tensor out = flat.detach().reshape({-1}).to(s.decodeDevice(device), at::kFloat, /*non_blocking=*/false,
                                                  /*copy=*/true);
  s.fromLeader(
      [&] {
        const uint64_t digest = tensorDigest(out);
        std::vector<uint8_t> mine(8);
        std::memcpy(mine.data(), &digest, 8);
        Round d = s.start("diloco.init.digest", mine, core::MessageKind::kControl);
        const RoundOutcome digests = s.finish(d);
        bool same = true;
        for (const auto& p : digests.payloads) same = same && (!p || p->empty() || *p == mine);
        if (same) return;
        at::Tensor host = out.to(at::kCPU).contiguous();
        std::vector<uint8_t> payload;
        if (s.site_index == 0) {
          core::CodecState state(0);
          core::Pipeline::parse("fp32").encode(host.data_ptr<float>(), size_t(host.numel()), state, payload);
        }
        Round r = s.start("diloco.init", std::move(payload), core::MessageKind::kModelState);
        const RoundOutcome o = s.finish(r);
        if (!o.payloads[0] || o.payloads[0]->empty()) fail<Error>("site 0 did not send its initial parameters");
        core::decode(o.payloads[0]->data(), o.payloads[0]->size(), host.data_ptr<float>(), size_t(host.numel()));
        out.copy_(host);
      },
      {out});
  return out.to(device);
}

// What a site that (re)joins needs from a running one: the global
// parameters and the outer momentum (host copies kept alive by the caller).
transport::State DiLoCo::Impl::joinState(at::Tensor& global_cpu, at::Tensor& momentum_cpu) const {
  global_cpu = global.to(at::kCPU).contiguous();
  momentum_cpu = momentum.to(at::kCPU).contiguous();
  transport::State st;
  st.strings = {{"params", core::digestHex(tensorDigest(global))}, {"model", model_digest}};
  st.counters = {{"syncs", uint64_t(syncs)}};
  st.sections = {floats("global", global_cpu), floats("momentum", momentum_cpu)};
  return st;
}

// Leader, while waiting for sync round `round`: answers join requests.
void DiLoCo::Impl::serve(uint64_t round) {
  if (int64_t(round) != syncs) return;  // the state before this round's outer step
  at::Tensor g, m;
  for (const std::string& site : s.serveJoins(round, [&] { return joinState(g, m); })) {
    absent.erase(site);  // a site that joins takes this side's state: nothing to reconcile later
  }
}

// Leader: this site's state after `syncs` syncs. A failure is reported and
// training goes on (the older checkpoints are intact).
void DiLoCo::Impl::checkpoint(const std::vector<uint8_t>& extra) {
  checkpoint_due = false;
  if (!s.checkpoints) return;
  const auto t0 = Clock::now();
  const at::Tensor g = global.to(at::kCPU).contiguous(), m = momentum.to(at::kCPU).contiguous();
  const at::Tensor loc = local().to(at::kCPU).contiguous();
  transport::State st;
  st.counters = {{"round", uint64_t(syncs)}, {"local_steps", uint64_t(local_steps)},
                 {"audit_records", uint64_t(session->auditRecords())}};
  st.strings = {{"audit_head", session->auditHead()}, {"model", model_digest}};
  for (const auto& kv : s.counters) st.counters["rounds:" + kv.first] = kv.second;
  st.sections = {floats("global", g), floats("momentum", m), floats("local", loc)};
  const auto residuals = s.residuals("diloco.");
  for (const auto& [key, pipe, residual] : residuals) {
    st.sections.push_back(floats("residual:" + key, residual));
    st.strings["pipeline:" + key] = pipe;
  }
  st.sections.push_back({"extra", transport::SectionType::kBytes, extra.data(), extra.size()});
  try {
    const std::string path = s.checkpoints->save(uint64_t(syncs), tensorDigest(global), st);
    char took[32];
    std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - t0).count());
    s.event("checkpoint of round " + std::to_string(syncs) + " written to " + path + " in " + took + " s");
  } catch (const Error& e) {
    s.event(std::string(e.what()) + " (training goes on)");
  }
}

// When a round failed (the job stops): the leader writes the state of the
// rounds applied so far unless that checkpoint exists already.
void DiLoCo::Impl::onFailure() {
  if (!s.leader || !s.checkpoints) return;
  const std::pair<uint64_t, uint64_t> now{uint64_t(syncs), tensorDigest(global)};
  for (const auto& h : s.checkpoints->held()) {
    if (h == now) return;
  }
  if (extra_provider) {
    checkpoint(extra_provider());
  } else {
    checkpoint_due = true;  // the caller's writeFailureCheckpoint() writes it
  }
}

// --resume: the join protocol on the leader, its outcome broadcast in the
// site. Returns false when nobody holds anything (a fresh start). give_way:
// this site parted from the others and must take a running site's state.
bool DiLoCo::Impl::recover(const at::Tensor& flat, bool give_way) {
  enum Kind : int64_t { kFresh = 0, kCheckpoint = 1, kRunning = 2 };
  at::Tensor out = flat.detach().to(at::kCPU, at::kFloat).contiguous().clone();
  at::Tensor mom = at::zeros_like(out);
  at::Tensor loc = out.clone();
  at::Tensor info = at::zeros({3}, at::kLong);  // kind, syncs, local steps
  std::vector<uint8_t> extra;
  s.fromLeader([&] {
    const auto started_at = Clock::now();
    const auto held = s.checkpoints ? s.checkpoints->held() : std::vector<std::pair<uint64_t, uint64_t>>{};
    JoinOutcome j = s.join(model_digest, held);
    if (j.kind == JoinOutcome::Kind::kRunning && !j.no_state.empty()) {
      fail<Error>("site '", s.names[j.site], "' is still running; a site cannot join a running ", j.no_state,
                  " job — stop it and restart every site with --resume");
    }
    if (j.kind == JoinOutcome::Kind::kRunning && overlap) {
      fail<Error>("strait.DiLoCo: site '", s.names[j.site], "' is running and offers its state, but this site runs "
                  "overlapped DiLoCo, which cannot join a running job; use the same sync.diloco settings on every "
                  "site");
    }
    if (j.kind != JoinOutcome::Kind::kRunning && give_way) {
      // Its own checkpoints hold the state it parted from the others with:
      // loading one would be training alone again.
      fail<Error>("site '", s.opt.site, "' gave way after parting from the other sites, but no running site "
                  "answered its join request (",
                  j.kind == JoinOutcome::Kind::kFresh ? "fresh" : "checkpoint",
                  "); its own state is not the job's: restart it with --resume once the others run");
    }
    if (j.kind == JoinOutcome::Kind::kRunning) {
      const std::string what = "the state sent by site '" + s.names[j.site] + "'";
      const auto& g = j.state.section("global", transport::SectionType::kFloat32, what, size_t(numel));
      const auto& m = j.state.section("momentum", transport::SectionType::kFloat32, what, size_t(numel));
      std::memcpy(out.data_ptr<float>(), g.data, g.size);
      std::memcpy(mom.data_ptr<float>(), m.data, m.size);
      if (!at::isfinite(out).all().item<bool>() || !at::isfinite(mom).all().item<bool>()) {
        fail<ProtocolError>(what, " holds non-finite values");
      }
      const uint64_t synced = j.state.counter("syncs", what);
      loc.copy_(out);
      info[0] = int64_t(kRunning);
      info[1] = int64_t(synced);
      info[2] = int64_t(synced) * interval;
      // Site-local state (the inner optimizer) from this site's own newest checkpoint, if any.
      if (!held.empty()) {
        try {
          const transport::LoadedState own = s.checkpoints->load(held.back().first, held.back().second, "global");
          if (own.state.has("extra")) {
            const auto& e = own.state.section("extra", transport::SectionType::kBytes, "checkpoint");
            extra.assign(e.data, e.data + e.size);
          }
        } catch (const Error& e) {
          s.event(std::string(e.what()) + "; the inner optimizer starts afresh");
        }
      }
      char took[32];
      std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - started_at).count());
      s.event("joined: state of round " + std::to_string(synced) + " from site '" + s.names[j.site] +
              "' (digest verified) in " + took + " s");
      return;
    }
    if (j.kind == JoinOutcome::Kind::kCheckpoint) {
      const transport::LoadedState ck = s.checkpoints->load(j.round, j.digest, "global");
      const std::string what = "checkpoint " + s.checkpoints->path(j.round, j.digest);
      std::memcpy(out.data_ptr<float>(), ck.state.section("global", transport::SectionType::kFloat32, what,
                                                          size_t(numel)).data, size_t(numel) * 4);
      std::memcpy(mom.data_ptr<float>(), ck.state.section("momentum", transport::SectionType::kFloat32, what,
                                                          size_t(numel)).data, size_t(numel) * 4);
      // With fragments the local parameters of the fragments not synced
      // last; plain DiLoCo restarts from the global ones (a checkpoint
      // written at a failed round holds unsynced local ones).
      const auto& l = ck.state.section("local", transport::SectionType::kFloat32, what, size_t(numel));
      if (fragments.size() > 1) {
        std::memcpy(loc.data_ptr<float>(), l.data, l.size);
      } else {
        loc.copy_(out);
      }
      s.restoreResiduals(ck.state, "diloco.");
      if (ck.state.has("extra")) {
        const auto& e = ck.state.section("extra", transport::SectionType::kBytes, what);
        extra.assign(e.data, e.data + e.size);
      }
      info[0] = int64_t(kCheckpoint);
      info[1] = int64_t(j.round);
      info[2] = int64_t(ck.state.counter("local_steps", what));
      std::string held_by = "every site holds it";
      if (!j.absent.empty()) {
        held_by = "held by every site that answered; no answer from ";
        for (size_t k = 0; k < j.absent.size(); ++k) held_by += (k ? ", " : "") + j.absent[k];
      }
      const auto head = ck.state.strings.find("audit_head");
      const std::string was = head == ck.state.strings.end() || head->second.empty() ? "none" : head->second;
      const std::string now = session->auditHead().empty() ? "none" : session->auditHead();
      s.event("resumed from round " + std::to_string(j.round) + " (" + held_by + "): " +
              s.checkpoints->path(j.round, j.digest) + "; audit log head then " + was + ", now " + now);
      return;
    }
    info[0] = int64_t(kFresh);
  });
  // The site's workers learn the outcome, then the state.
  at::Tensor i = info.to(s.control_device);
  s.broadcast(i);
  info = i.cpu();
  const int64_t kind = info[0].item<int64_t>();
  if (kind == kFresh) return false;
  for (at::Tensor* t : {&out, &mom, &loc}) {
    at::Tensor d = t->to(s.control_device);
    s.broadcast(d);
    if (!s.leader) t->copy_(d);
  }
  at::Tensor n = at::full({1}, int64_t(extra.size()), at::kLong).to(s.control_device);
  s.broadcast(n);
  at::Tensor e = at::zeros({n.cpu().item<int64_t>()}, at::kByte);
  if (s.leader && !extra.empty()) std::memcpy(e.data_ptr<uint8_t>(), extra.data(), extra.size());
  at::Tensor ed = e.to(s.control_device);
  s.broadcast(ed);
  e = ed.cpu();
  resumed_extra.assign(e.data_ptr<uint8_t>(), e.data_ptr<uint8_t>() + e.numel());

  global = out.to(device);
  momentum = mom.to(device);
  syncs = started = info[1].item<int64_t>();
  local_steps = info[2].item<int64_t>();
  s.counters["diloco"] = uint64_t(syncs);
  s.counters["diloco.base"] = uint64_t(syncs);
  load(loc.to(device));
  resumed = kind == kCheckpoint ? "checkpoint" : "running";
  if (kind == kRunning) {
    // The running sites are waiting in round `syncs` (they answered from
    // there): take part without a contribution, so this site applies the
    // same outer step and stays in step.
    sync(false);
    local_steps = syncs * interval;
  }
  return true;
}

// --------------------------------------------------------------- API ---

DiLoCo::DiLoCo(c10::intrusive_ptr<Session> session, std::vector<std::string> names, std::vector<at::Tensor> params,
               DiLoCoOptions options)
    : impl_(std::make_unique<Impl>(std::move(session), std::move(names), std::move(params), std::move(options))) {}

DiLoCo::~DiLoCo() {
  // The session may outlive this object: nothing of it may call back here.
  impl_->s.closing_warning = nullptr;
  impl_->s.setJoinServer("", nullptr);
}

bool DiLoCo::step() {
  at::NoGradGuard no_grad;
  Impl& d = *impl_;
  d.local_steps += 1;
  if (d.local_steps % d.interval == 0) {
    d.sync();
  } else {
    d.unflushed = true;  // progress since the last sync is this site's own
  }
  return d.checkpoint_due;
}

void DiLoCo::flush() {
  at::NoGradGuard no_grad;
  Impl& d = *impl_;
  if (d.inflight) {
    Inflight previous = std::move(*d.inflight);
    d.inflight.reset();
    d.applyInflight(std::move(previous), d.local(), nullptr);
  }
  // Progress not synced yet (the steps since the last sync, other
  // fragments' steps) is this site's alone: every worker takes the global
  // parameters, so the replicas end identical whatever the step count.
  if (d.overlap) d.sent = d.global.clone();
  d.load(d.global);
  d.unflushed = false;
}

void DiLoCo::setExtraState(std::function<std::vector<uint8_t>()> provider) { impl_->extra_provider = std::move(provider); }

void DiLoCo::writeCheckpoint(const std::vector<uint8_t>& extra) {
  if (impl_->s.leader) impl_->checkpoint(extra);
  impl_->checkpoint_due = false;
}

void DiLoCo::writeFailureCheckpoint(const std::vector<uint8_t>& extra) {
  Impl& d = *impl_;
  if (!d.checkpoint_due) return;
  d.checkpoint(extra);
}

const std::vector<uint8_t>& DiLoCo::resumedExtra() const { return impl_->resumed_extra; }
const std::string& DiLoCo::resumed() const { return impl_->resumed; }
int64_t DiLoCo::syncs() const { return impl_->syncs; }
int64_t DiLoCo::localSteps() const { return impl_->local_steps; }
int64_t DiLoCo::syncEvery() const { return impl_->sync_every; }
double DiLoCo::outerLr() const { return impl_->outer_lr; }
double DiLoCo::outerMomentum() const { return impl_->mu; }
bool DiLoCo::nesterov() const { return impl_->nesterov; }
std::string DiLoCo::sparseloco() const {
  if (!impl_->sparseloco) return "";
  std::ostringstream o;
  o << impl_->sparseloco->pipeline() << ", decay " << impl_->sparseloco->decay;
  return o.str();
}
bool DiLoCo::overlap() const { return impl_->overlap; }
const std::vector<std::vector<int64_t>>& DiLoCo::fragments() const { return impl_->fragments; }
at::Tensor DiLoCo::globalParams() const { return impl_->global; }
bool DiLoCo::unflushed() const { return impl_->unflushed; }

}  // namespace strait::torch
