// Every-step mode over a Session (strait_torch.h): the bucket exchange
// behind the DDP hook, average() for libtorch loops, and checkpoints.

#include <ATen/ATen.h>

#include <condition_variable>
#include <cstring>
#include <deque>
#include <sstream>
#include <algorithm>
#include <thread>

#include "core/digest.h"
#include "core/error.h"
#include "torch_ext/csrc/session_impl.h"
#include "transport/audit.h"
#include "transport/checksum.h"

namespace strait::torch {

namespace {

std::string shapesOf(const std::vector<at::Tensor>& params) {
  std::string out;
  for (const at::Tensor& p : params) {
    out += "(";
    for (int64_t d = 0; d < p.dim(); ++d) out += (d ? ", " : "") + std::to_string(p.size(d));
    out += p.dim() == 1 ? ",) " : ") ";
    out += std::string(c10::toString(p.scalar_type())) + "\n";
  }
  if (!out.empty()) out.pop_back();
  return out;
}

}  // namespace

// A bucket handed over: its buffer, its future, and on the leader its round.
struct Bucket {
  at::Tensor buffer;
  c10::intrusive_ptr<c10::ivalue::Future> future;
  std::optional<Round> round;
  std::exception_ptr error;  // the leader could not start its round
  int64_t numel = 0;
};

struct EveryStep::Impl {
  c10::intrusive_ptr<Session> session;
  Session::Impl& s;
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> tasks;  // in DDP's order
  size_t busy = 0;                          // tasks handed over and not done
  bool stopping = false;
  std::exception_ptr step_error;  // the first failure of the step, for finishStep()
  std::deque<Bucket> pending;     // the worker's
  std::set<std::string> checked;  // layouts checked against the other sites
  std::optional<Clock::time_point> step_done;
  std::vector<uint8_t> resumed_extra;
  std::thread worker;

  explicit Impl(c10::intrusive_ptr<Session> sess) : session(std::move(sess)), s(session->impl()) {
    if (s.config.mode != core::SyncMode::kEveryStep) {
      fail<InvalidArgument>("strait.ddp_hook: the job config ", s.config.source, " says sync.mode: ",
                            core::syncModeName(s.config.mode),
                            "; the every-step hook runs only under sync.mode: every_step (every site must run the "
                            "mode the config names: set it there, or use strait.DiLoCo)");
    }
    // A site restarted with --resume asks to join: tell it this job cannot
    // take it in, rather than let it train alone.
    s.setJoinServer("ddp.", [this](uint64_t) { s.refuseJoins("every-step"); });
    worker = std::thread([this] { run(); });
  }

  ~Impl() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stopping = true;
    }
    cv.notify_all();
    worker.join();
    s.setJoinServer("", nullptr);
  }

  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stopping || !tasks.empty(); });
        if (tasks.empty()) return;
        task = std::move(tasks.front());
        tasks.pop_front();
      }
      task();
      {
        std::lock_guard<std::mutex> lock(mu);
        --busy;
      }
      cv.notify_all();
    }
  }

  void submit(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mu);
      tasks.push_back(std::move(task));
      ++busy;
    }
    cv.notify_all();
  }

  // First half, as soon as the bucket is handed over: the agreement check
  // (the first time a layout is seen), the mean inside the site, and on the
  // leader the compressed payload's round started.
  void start(Bucket& b, int64_t index, const std::vector<at::Tensor>& params, bool agree) {
    const std::string tag = "ddp.b" + std::to_string(index);
    // DDP rebuilds its buckets after the first iteration (and after every
    // restart), so a bucket index can stand for other parameters later:
    // compressors (and their residuals) are keyed by the layout, and each
    // new layout is checked against the other sites once. The round tag
    // does not depend on the layout: sites whose layouts differ must still
    // meet in the same round to find out.
    const std::string shapes = shapesOf(params);
    char hash[24];
    std::snprintf(hash, sizeof hash, "%08x",
                  unsigned(transport::chunkChecksum(reinterpret_cast<const uint8_t*>(shapes.data()), shapes.size())));
    const std::string layout = tag + ".n" + std::to_string(b.buffer.numel()) + "." + hash;
    if (checked.insert(layout).second) {
      s.checkSameEverywhere(tag + ".shapes", shapes);
      if (agree) agreeOnStart(tag, params);
    }
    if (s.size > 1) {
      s.allReduceSum(b.buffer);
      b.buffer.div_(s.size);
    }
    if (!s.leader) {
      s.nextRound(tag);  // keep round numbers in step with the leader
      return;
    }
    try {
      // Config rules see a bucket as "ddp.bucket<INDEX>" of its size; with
      // adaptive compression the controller's pipeline of this step wins.
      const at::Tensor flat = s.encodable(b.buffer.reshape({-1}));
      b.numel = flat.numel();
      Compressor& c = s.compressor(layout, "ddp.bucket" + std::to_string(index), flat.numel(),
                                   s.adaptive ? s.adaptive->pipeline() : "");
      std::vector<uint8_t> payload;
      c.encode(flat, payload);
      s.bytes_sent += payload.size();
      b.round = s.start(tag, std::move(payload), core::MessageKind::kModelUpdate);
    } catch (const Error&) {
      b.error = std::current_exception();
    }
  }

  // Every-step mode has no way to reconcile sites that start from different
  // parameters (a model built without a common seed): refused at the first
  // step, on every worker, naming each site's digest.
  void agreeOnStart(const std::string& tag, const std::vector<at::Tensor>& params) {
    s.fromLeader([&] {
      uint64_t digest = 0, first = 0;
      for (const at::Tensor& p : params) {
        const at::Tensor flat = p.detach().reshape({-1});
        digest += digestOf(flat, first);
        first += uint64_t(flat.numel());
      }
      std::vector<uint8_t> mine(8);
      std::memcpy(mine.data(), &digest, 8);
      Round r = s.start(tag + ".start", mine, core::MessageKind::kControl);
      const RoundOutcome o = s.finish(r);
      std::string all;
      bool same = true;
      for (size_t i = 0; i < o.payloads.size(); ++i) {
        if (!o.payloads[i] || o.payloads[i]->size() != 8) continue;
        uint64_t d;
        std::memcpy(&d, o.payloads[i]->data(), 8);
        same = same && d == digest;
        all += (all.empty() ? "" : ", ") + s.names[i] + " " + core::digestHex(d);
      }
      if (!same) {
        fail<InvalidArgument>("the sites start from different parameters (", tag, " digests: ", all,
                              "); every-step mode averages gradients and cannot reconcile them: build the model "
                              "the same way at every site (torch.manual_seed before creating it) or load the same "
                              "weights, or use strait.DiLoCo, which adopts site 0's");
      }
    });
  }

  // Second half: the leader waits for the round and decodes; the result is
  // broadcast inside the site and completes the bucket's future.
  void finish(Bucket& b) {
    s.fromLeader(
        [&] {
          if (b.error) std::rethrow_exception(b.error);
          RoundOutcome o = s.finish(*b.round);
          at::Tensor out = at::zeros({b.numel}, at::TensorOptions(at::kFloat).device(s.decodeDevice(b.buffer.device())));
          for (const auto& [i, weight] : s.siteWeights(o)) {  // fixed site order: identical bits everywhere
            accumulateExact(o.payloads[i]->data(), o.payloads[i]->size(), out, weight);
          }
          for (auto& p : o.payloads) {
            if (p) s.gateway->recycle(std::move(*p));
          }
          s.last_missing = o.missing;
          b.buffer.copy_(out.view(b.buffer.sizes()));
          checkParted();
        },
        {b.buffer});
    b.future->markCompleted(b.buffer);
  }

  // Leader: a site this one parted from (one of them completed a round
  // without the other, on_site_loss: continue) holds other parameters from
  // now on, and every-step mode cannot reconcile them in place: the
  // higher-index site of the pair stops instead of training on with a
  // replica that silently differs; the other says so and goes on.
  void checkParted() {
    for (const std::string& name : s.takeDivergedPeers()) {
      const size_t other = size_t(std::find(s.names.begin(), s.names.end(), name) - s.names.begin());
      if (other < s.site_index) {
        fail<Error>("this site and '", name, "' applied different rounds (one completed a round without the "
                    "other: a frozen or cut-off site under on_site_loss: continue), so their replicas differ; "
                    "every-step mode cannot reconcile them in place: this site stops. Restart every site with "
                    "--resume (checkpoints), or use on_site_loss: wait");
      }
      s.event("site '" + name + "' and this site applied different rounds (one completed a round without the "
              "other); every-step mode cannot reconcile them: '" + name + "' stops, this site goes on");
    }
  }

  void work(Bucket b, int64_t index, const std::vector<at::Tensor>& params, bool last, bool agree) {
    const c10::intrusive_ptr<c10::ivalue::Future> future = b.future;  // b moves into pending
    try {
      start(b, index, params, agree);
      pending.push_back(std::move(b));
      if (s.size == 1 && !last) {
        // A site of one worker has no collectives to keep in order: finish
        // the rounds that are already done, so their decode overlaps with
        // backward (on a fast link that is most of them).
        while (!pending.empty() && (pending.front().error || !pending.front().round ||
                                    s.ready(*pending.front().round))) {
          finish(pending.front());
          pending.pop_front();
        }
      }
      if (last) {
        const auto waiting = Clock::now();
        while (!pending.empty()) {
          finish(pending.front());
          pending.pop_front();
        }
        const auto done = Clock::now();
        if (s.adaptive && s.leader && step_done) {
          std::lock_guard<std::mutex> lock(s.log_mu);  // Session::log reads the controller
          auto note = s.adaptive->update(std::chrono::duration<double>(done - waiting).count(),
                                         std::chrono::duration<double>(waiting - *step_done).count());
          if (note) s.adaptive_note = *note;
        }
        step_done = done;
      }
    } catch (const std::exception&) {
      const std::exception_ptr e = std::current_exception();
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!step_error) step_error = e;
      }
      for (Bucket& p : pending) {
        if (!p.future->completed()) p.future->setError(e);
      }
      pending.clear();
      if (!future->completed()) future->setError(e);
    }
  }

  c10::intrusive_ptr<c10::ivalue::Future> submitBucket(at::Tensor buffer, int64_t index,
                                                       std::vector<at::Tensor> params, bool last, bool agree);

  void finishStep() {
    std::exception_ptr e;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return busy == 0; });
      std::swap(e, step_error);
    }
    if (e) std::rethrow_exception(e);
  }

  std::string modelDigest(const std::vector<at::Tensor>& params) const {
    const std::string shapes = shapesOf(params);
    return transport::digestHex(reinterpret_cast<const uint8_t*>(shapes.data()), shapes.size());
  }
};

EveryStep::EveryStep(c10::intrusive_ptr<Session> session) : impl_(std::make_unique<Impl>(std::move(session))) {}
EveryStep::~EveryStep() = default;

c10::intrusive_ptr<c10::ivalue::Future> EveryStep::bucket(at::Tensor buffer, int64_t index,
                                                          std::vector<at::Tensor> params, bool last) {
  return impl_->submitBucket(std::move(buffer), index, std::move(params), last, true);
}

c10::intrusive_ptr<c10::ivalue::Future> EveryStep::Impl::submitBucket(at::Tensor buffer, int64_t index,
                                                                      std::vector<at::Tensor> params, bool last,
                                                                      bool agree) {
  Bucket b;
  b.buffer = buffer;
  b.numel = buffer.numel();
  std::vector<c10::Device> devices;
  if (!buffer.device().is_cpu()) devices.push_back(buffer.device());
  b.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), devices);
  auto future = b.future;
  submit([this, b = std::move(b), index, params = std::move(params), last, agree]() mutable {
    work(std::move(b), index, params, last, agree);
  });
  return future;
}

void EveryStep::finishStep() { impl_->finishStep(); }

void EveryStep::average(std::vector<at::Tensor>& tensors, const std::vector<at::Tensor>& params) {
  if (tensors.empty()) return;
  if (!params.empty() && params.size() != tensors.size()) {
    fail<InvalidArgument>("EveryStep::average: ", params.size(), " parameters for ", tensors.size(), " tensors");
  }
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : tensors) flat.push_back(t.detach().reshape({-1}).to(at::kFloat));
  at::Tensor buffer = at::cat(flat);
  // The parameters (if given) are the layout and are compared across sites
  // at the first step; otherwise the tensors' shapes are the layout.
  impl_->submitBucket(buffer, 0, params.empty() ? tensors : params, true, !params.empty());
  finishStep();
  int64_t at = 0;
  for (at::Tensor& t : tensors) {
    t.detach().copy_(buffer.narrow(0, at, t.numel()).view(t.sizes()));
    at += t.numel();
  }
}

void EveryStep::checkpoint(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra) {
  Impl& d = *impl_;
  Session::Impl& s = d.s;
  if (!s.leader || !s.checkpoints || step <= 0 || step % s.checkpoints->every()) return;
  std::vector<at::Tensor> flat;
  for (const at::Tensor& p : params) flat.push_back(p.detach().reshape({-1}).to(at::kCPU, at::kFloat));
  const at::Tensor all = flat.empty() ? at::empty({0}, at::kFloat) : at::cat(flat).contiguous();
  transport::State st;
  st.counters = {{"round", uint64_t(step)}, {"step", uint64_t(step)},
                 {"audit_records", uint64_t(d.session->auditRecords())}};
  st.strings = {{"audit_head", d.session->auditHead()}, {"model", d.modelDigest(params)}};
  std::string checked;
  for (const std::string& c : d.checked) checked += (checked.empty() ? "" : "\n") + c;
  st.strings["checked"] = checked;
  for (const auto& kv : s.counters) st.counters["rounds:" + kv.first] = kv.second;
  st.sections.push_back({"params", transport::SectionType::kFloat32, static_cast<const uint8_t*>(all.data_ptr()),
                         size_t(all.nbytes())});
  const auto residuals = s.residuals("ddp.");
  for (const auto& [key, pipe, residual] : residuals) {
    st.sections.push_back({"residual:" + key, transport::SectionType::kFloat32,
                           static_cast<const uint8_t*>(residual.data_ptr()), size_t(residual.nbytes())});
    st.strings["pipeline:" + key] = pipe;
  }
  st.sections.push_back({"extra", transport::SectionType::kBytes, extra.data(), extra.size()});
  const auto t0 = Clock::now();
  try {
    const std::string path = s.checkpoints->save(uint64_t(step), core::digestSum(all.data_ptr<float>(),
                                                                                 size_t(all.numel())), st);
    char took[32];
    std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - t0).count());
    s.event("checkpoint of step " + std::to_string(step) + " written to " + path + " in " + took + " s");
  } catch (const Error& e) {
    s.event(std::string(e.what()) + " (training goes on)");
  }
}

int64_t EveryStep::resume(std::vector<at::Tensor> params) {
  Impl& d = *impl_;
  Session::Impl& s = d.s;
  if (!s.opt.resume) return 0;
  int64_t total = 0;
  for (const at::Tensor& p : params) total += p.numel();
  // The leader finds the step and encodes what every worker needs as one
  // state document, broadcast in the site.
  std::vector<uint8_t> doc;
  at::Tensor length = at::zeros({1}, at::kLong);
  s.fromLeader(
      [&] {
        const auto held = s.checkpoints ? s.checkpoints->held() : std::vector<std::pair<uint64_t, uint64_t>>{};
        JoinOutcome j = s.join(d.modelDigest(params), held);
        if (j.kind == JoinOutcome::Kind::kRunning) {
          fail<Error>("site '", s.names[j.site], "' is still running; a site cannot join a running ",
                      j.no_state.empty() ? std::string("every-step") : j.no_state,
                      " job — stop it and restart every site with --resume");
        }
        if (j.kind != JoinOutcome::Kind::kCheckpoint) return;
        transport::LoadedState ck = s.checkpoints->load(j.round, j.digest, "params");
        const std::string what = "checkpoint " + s.checkpoints->path(j.round, j.digest);
        ck.state.section("params", transport::SectionType::kFloat32, what, size_t(total));
        s.restoreResiduals(ck.state, "ddp.");
        doc = transport::encodeState(ck.state);
        length[0] = int64_t(doc.size());
        s.event("resumed from step " + std::to_string(j.round) + " (every site holds it)");
      },
      {length});
  const int64_t n = length[0].item<int64_t>();
  if (n == 0) return 0;
  at::Tensor bytes = at::zeros({n}, at::kByte);
  if (s.leader) std::memcpy(bytes.data_ptr<uint8_t>(), doc.data(), doc.size());
  at::Tensor on = bytes.to(s.control_device);
  s.broadcast(on);
  bytes = on.cpu();
  const transport::State st = transport::decodeState(bytes.data_ptr<uint8_t>(), size_t(n), "a checkpoint");
  const auto& flat = st.section("params", transport::SectionType::kFloat32, "a checkpoint", size_t(total));
  int64_t at = 0;
  at::NoGradGuard no_grad;
  for (at::Tensor& p : params) {
    at::Tensor values = at::empty({p.numel()}, at::kFloat);
    std::memcpy(values.data_ptr<float>(), flat.data + at * 4, size_t(p.numel()) * 4);
    p.detach().copy_(values.view(p.sizes()));
    at += p.numel();
  }
  for (const auto& kv : st.counters) {
    if (kv.first.rfind("rounds:", 0) == 0) s.counters[kv.first.substr(7)] = kv.second;
  }
  const auto checked = st.strings.find("checked");
  if (checked != st.strings.end()) {
    std::istringstream in(checked->second);
    for (std::string line; std::getline(in, line);) {
      if (!line.empty()) d.checked.insert(line);
    }
  }
  if (st.has("extra")) {
    const auto& e = st.section("extra", transport::SectionType::kBytes, "a checkpoint");
    d.resumed_extra.assign(e.data, e.data + e.size);
  }
  return int64_t(st.counter("step", "a checkpoint"));
}

const std::vector<uint8_t>& EveryStep::resumedExtra() const { return impl_->resumed_extra; }

}  // namespace strait::torch
