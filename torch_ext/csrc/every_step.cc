// Every-step mode over a Session (strait_torch.h): the bucket exchange
// behind the DDP hook, average() for libtorch loops, and checkpoints.

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <sstream>
#include <thread>
#include <unordered_map>

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

// A decimal number of at most `max` digits, nothing else (no sign, no
// spaces): what a peer's layout and release lines may hold.
bool isDecimal(const std::string& t, size_t max) {
  return !t.empty() && t.size() <= max && std::all_of(t.begin(), t.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Which parameters each gradient bucket holds, in order: bucket index ->
// indices into the model's parameters (strait.Checkpoints registers them).
using Layout = std::map<int64_t, std::vector<int64_t>>;

std::string layoutText(const Layout& layout) {
  std::string out;
  for (const auto& [index, params] : layout) {
    out += std::to_string(index) + ":";
    for (size_t k = 0; k < params.size(); ++k) out += (k ? "," : "") + std::to_string(params[k]);
    out += "\n";
  }
  return out;
}

Layout parseLayout(const std::string& text, size_t params, const std::string& what) {
  Layout out;
  std::istringstream in(text);
  std::vector<bool> seen(params, false);
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const size_t colon = line.find(':');
    try {
      if (colon == std::string::npos) throw std::invalid_argument("no colon");
      auto number = [](const std::string& t) {
        if (!isDecimal(t, 18)) throw std::invalid_argument("not a number");
        return std::stoll(t);
      };
      const int64_t index = number(line.substr(0, colon));
      if (out.count(index)) throw std::invalid_argument("bucket twice");
      std::vector<int64_t>& list = out[index];
      std::istringstream items(line.substr(colon + 1));
      for (std::string item; std::getline(items, item, ',');) {
        const int64_t i = number(item);
        if (i < 0 || size_t(i) >= params || seen[size_t(i)]) throw std::out_of_range("parameter index");
        seen[size_t(i)] = true;
        list.push_back(i);
      }
      if (index < 0 || list.empty()) throw std::out_of_range("bucket");
    } catch (const std::exception&) {
      fail<ProtocolError>(what, " has a malformed bucket layout line '", line.substr(0, 80), "' (", params,
                          " parameters)");
    }
  }
  return out;
}

// GPU work handed to the engine's thread: an event on the calling thread's
// current stream of a device (none for the CPU), which the engine's thread
// then makes its own current stream wait for, so the engine reads what the
// caller wrote.
struct StreamMark {
  std::shared_ptr<c10::Event> event;  // shared: a Bucket travels in a std::function
  at::Device device{at::kCPU};

  void waitOnCurrentStream() const {
    if (!event) return;
    const c10::impl::VirtualGuardImpl impl(device.type());
    event->block(impl.getStream(device));
  }
};

StreamMark markCurrentStream(const at::Device& device) {
  StreamMark mark;
  mark.device = device;
  if (device.is_cpu()) return mark;
  const c10::impl::VirtualGuardImpl impl(device.type());
  mark.event = std::make_shared<c10::Event>(device.type());
  mark.event->record(impl.getStream(device));
  return mark;
}

// Where a step's parameters live (the optimizer's step wrote them there).
StreamMark markCurrentStream(const std::vector<at::Tensor>& params) {
  return markCurrentStream(params.empty() ? at::Device(at::kCPU) : params.front().device());
}

}  // namespace

// A bucket handed over: its buffer, its future, and on the leader its round.
struct Bucket {
  at::Tensor buffer;
  c10::intrusive_ptr<c10::ivalue::Future> future;
  std::optional<Round> round;
  std::exception_ptr error;  // the leader could not start its round
  int64_t numel = 0;
  bool ddp = false;  // handed over by DDP's hook (not average()): its layout is recorded, and regrouped
  // A GPU buffer: marked on the caller's current stream when handed over
  // (DDP's reducer wrote it there); the engine's stream waits for it.
  StreamMark written;
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

  // -- joins and the job's bucket layout (docs/RELIABILITY.md) -------------
  // The model's parameters, registered by strait.Checkpoints: bucket
  // layouts are recorded as their indices, and a site that joins or resumes
  // regroups its own DDP buckets into the job's layout (`reference`): a
  // restarted DDP's first step uses its initial buckets, the others their
  // rebuilt ones. Engine-thread state, except `owed` (under mu).
  std::vector<at::Tensor> registered;
  std::unordered_map<const c10::TensorImpl*, int64_t> index_of;
  Layout step_layout, last_layout;  // this step's buckets so far; the last whole step's
  Layout reference;                 // the job's layout this site regroups into (none: its own is the job's)
  int regroup_steps = 0;            // steps regrouped whatever this site's own layout is
  bool regrouping = false, step_begins = true, regroup_noted = false;
  bool layout_known = true;          // this step's buckets hold only registered parameters
  std::set<int64_t> started;         // bucket indices whose round this step started
  bool checking = false;             // in a layout's cross-site check (its rounds are not released)
  struct Held {
    Bucket b;
    std::vector<int64_t> indices;
  };
  std::vector<Held> held;                  // a regrouped step's own buckets, until its last
  std::vector<transport::PeerRound> owed;  // leader: join requests owed a state at the step's end
  std::thread worker;

  explicit Impl(c10::intrusive_ptr<Session> sess) : session(std::move(sess)), s(session->impl()) {
    if (s.config.mode != core::SyncMode::kEveryStep) {
      fail<InvalidArgument>("strait.ddp_hook: the job config ", s.config.source, " says sync.mode: ",
                            core::syncModeName(s.config.mode),
                            "; the every-step hook runs only under sync.mode: every_step (every site must run the "
                            "mode the config names: set it there, or use strait.DiLoCo)");
    }
    // A site restarted with --resume asks to join while this one waits in
    // a bucket's round: it gets this site's state at the end of the step
    // (strait.Checkpoints.step), or is told no without strait.Checkpoints.
    s.setJoinServer("ddp.", [this](uint64_t) { answerJoins(); });
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

  // Runs fn on the engine's thread (between steps: it is idle then) and
  // waits for it; fn's error is rethrown here.
  void onEngine(const std::function<void()>& fn) {
    std::exception_ptr error;
    std::promise<void> done;
    std::future<void> over = done.get_future();
    submit([&] {
      try {
        fn();
      } catch (...) {
        error = std::current_exception();
      }
      done.set_value();
    });
    over.get();
    if (error) std::rethrow_exception(error);
  }

  std::vector<int64_t> indicesOf(const std::vector<at::Tensor>& params) const {
    std::vector<int64_t> out;
    if (registered.empty()) return out;
    for (const at::Tensor& p : params) {
      const auto it = index_of.find(p.unsafeGetTensorImpl());
      out.push_back(it == index_of.end() ? -1 : it->second);
    }
    return out;
  }

  // The job's layout: what this site regroups into, or its own.
  const Layout& jobLayout() const { return reference.empty() ? last_layout : reference; }

  // Leader, while a bucket's round waits (the join server, or waiting for
  // a slot) or at a step's end: a new join request is answered "deferred"
  // (the state follows at the end of this step) with every round of this
  // step that is not complete: those open, and those of the job's buckets
  // not started yet (at the round each will take). The joiner releases
  // them without a contribution: this step ends with this side's mean, and
  // the joiner takes the state after it. Under `continue` too: otherwise
  // the step waits out round_deadline_s for a joiner that is alive, and
  // the joiner's gateway keeps this site's payloads of rounds it never
  // opens, which count against the rounds a peer may open ahead of it
  // (its later rounds were refused: seen in the chaos test). Not answered
  // yet while this step's buckets are not the job's (a layout being
  // checked, DDP's rebuilt buckets): their rounds cannot be named.
  void answerJoins() {
    if (registered.empty()) {
      s.refuseJoins("every-step (without strait.Checkpoints, which serves joins)");
      return;
    }
    if (s.newJoinRequests(false).empty()) return;
    if (checking || !layout_known) return;
    if (!regrouping) {
      for (const auto& [index, params] : step_layout) {
        const auto it = last_layout.find(index);
        if (it == last_layout.end() || it->second != params) return;
      }
    }
    std::set<std::string> release;
    for (const Bucket& b : pending) {
      if (b.round && !s.ready(*b.round)) release.insert(b.round->tag + ":" + std::to_string(b.round->round));
    }
    for (const auto& kv : jobLayout()) {
      if (started.count(kv.first)) continue;  // open (above) or complete
      const std::string tag = "ddp.b" + std::to_string(kv.first);
      release.insert(tag + ":" + std::to_string(s.counters[tag]));
    }
    std::string lines;
    for (const std::string& r : release) lines += (lines.empty() ? "" : "\n") + r;
    for (transport::PeerRound& p : s.newJoinRequests()) {
      transport::State st;
      st.strings = {{"status", "running"}, {"deferred", "every-step"}, {"release", lines},
                    {"model", modelDigest(registered)}};
      s.joins.push_back(s.start(kJoinTag, transport::encodeState(st), core::MessageKind::kControl, p.round));
      s.event("site '" + p.site + "' asked to join: it gets this site's state at the end of this step" +
              (release.empty() ? "" : " (it releases the " + std::to_string(release.size()) +
                                          " rounds of this step not complete)"));
      std::lock_guard<std::mutex> lock(mu);
      owed.push_back(std::move(p));
    }
  }

  // At a step's first bucket: regroup this step into the job's layout?
  // Always for the first two steps after a join or resume (DDP's initial
  // buckets, then its rebuilt ones), then whenever this site's last layout
  // differs from the job's.
  void beginStep() {
    regrouping = false;
    started.clear();
    layout_known = true;
    if (reference.empty()) return;
    if (regroup_steps > 0) {
      --regroup_steps;
      regrouping = true;
      return;
    }
    regrouping = last_layout != reference;
    if (regrouping && !regroup_noted) {
      regroup_noted = true;
      s.event("this site's DDP buckets hold the parameters otherwise than the job's; every step is regrouped "
              "into the job's buckets before it crosses (its rounds wait for the step's last bucket)");
    }
  }

  // A regrouped step, at its last bucket: the job's buckets are cut from
  // this site's own, exchanged as usual, and the means copied back.
  void regroup() {
    std::map<int64_t, std::pair<size_t, int64_t>> where;  // parameter -> (held bucket, offset)
    for (size_t h = 0; h < held.size(); ++h) {
      int64_t offset = 0;
      for (const int64_t i : held[h].indices) {
        if (i < 0) {
          fail<InvalidArgument>("strait.ddp_hook: a gradient bucket holds a parameter that is not among those "
                                "given to strait.Checkpoints; pass the model DDP wraps");
        }
        if (!where.emplace(i, std::make_pair(h, offset)).second) {
          fail<InvalidArgument>("strait.ddp_hook: parameter ", i, " is in two gradient buckets of one step");
        }
        offset += registered[size_t(i)].numel();
      }
      if (offset != held[h].b.buffer.numel()) {
        fail<InvalidArgument>("strait.ddp_hook: bucket of ", held[h].b.buffer.numel(), " elements holds parameters of ",
                              offset, "; cannot regroup it into the job's buckets");
      }
    }
    // Every parameter with a gradient here is in the job's buckets and the
    // other way round, checked before any round starts (the same on every
    // worker of the site: its buckets are the same).
    size_t covered = 0;
    for (const auto& [index, indices] : reference) {
      for (const int64_t i : indices) {
        if (!where.count(i)) {
          fail<InvalidArgument>("strait.ddp_hook: parameter ", i, " is in the job's bucket ", index,
                                " but has no gradient in this site's step; every site must train the same "
                                "parameters");
        }
      }
      covered += indices.size();
    }
    if (covered != where.size()) {
      fail<InvalidArgument>("strait.ddp_hook: this site's step has gradients of ", where.size(),
                            " parameters, the job's buckets hold ", covered, "; every site must train the same "
                            "parameters");
    }
    // The job's buckets go through `pending` like any step's, so a join
    // request answered meanwhile names their rounds.
    std::vector<at::Tensor> outs;
    std::vector<const std::vector<int64_t>*> lists;
    for (const auto& [index, indices] : reference) {
      std::vector<at::Tensor> parts, params;
      for (const int64_t i : indices) {
        const auto& [h, offset] = where.at(i);
        parts.push_back(held[h].b.buffer.narrow(0, offset, registered[size_t(i)].numel()));
        params.push_back(registered[size_t(i)]);
      }
      Bucket rb;
      rb.buffer = at::cat(parts);
      rb.numel = rb.buffer.numel();
      std::vector<c10::Device> devices;
      if (!rb.buffer.device().is_cpu()) devices.push_back(rb.buffer.device());
      rb.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), devices);
      start(rb, index, params, false);
      outs.push_back(rb.buffer);  // the same storage: finish() averages it in place
      lists.push_back(&indices);
      pending.push_back(std::move(rb));
    }
    while (!pending.empty()) {
      finish(pending.front());
      pending.pop_front();
    }
    for (size_t k = 0; k < outs.size(); ++k) {
      int64_t at = 0;
      for (const int64_t i : *lists[k]) {
        const auto& [h, offset] = where.at(i);
        const int64_t n = registered[size_t(i)].numel();
        held[h].b.buffer.narrow(0, offset, n).copy_(outs[k].narrow(0, at, n));
        at += n;
      }
    }
    for (Held& h : held) h.b.future->markCompleted(h.b.buffer);
    held.clear();
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
      checking = true;
      s.checkSameEverywhere(tag + ".shapes", shapes);
      if (agree) agreeOnStart(tag, params);
      checking = false;
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
      // Every slot may be held by rounds that wait for a lost site: answer
      // its join request meanwhile (the rounds fail at their deadline).
      while (!s.gateway->waitForSlot(std::chrono::milliseconds(50))) {
        answerJoins();
        s.reapJoins();
      }
      b.round = s.start(tag, std::move(payload), core::MessageKind::kModelUpdate);
      started.insert(index);
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
    const bool begins = step_begins;
    step_begins = last;
    try {
      // Everything below runs on this thread's current stream: after the
      // caller's writes to the buffer. (The future's completion records
      // this stream in turn, for the caller's wait().)
      b.written.waitOnCurrentStream();
      if (begins) beginStep();
      if (!registered.empty() && b.ddp) {
        // A step whose buckets hold parameters not registered (not the
        // model given to strait.Checkpoints) has no layout to record.
        std::vector<int64_t> indices = indicesOf(params);
        layout_known = layout_known && std::find(indices.begin(), indices.end(), -1) == indices.end();
        step_layout[index] = std::move(indices);
        if (last) {
          if (layout_known) last_layout = std::move(step_layout);
          step_layout.clear();
        }
      }
      if (regrouping && b.ddp) {
        held.push_back({std::move(b), indicesOf(params)});
        if (last) regroup();
        return;
      }
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
      for (Held& h : held) {
        if (!h.b.future->completed()) h.b.future->setError(e);
      }
      held.clear();
      if (!future->completed()) future->setError(e);
    }
  }

  struct Snapshot;
  Snapshot snapshot(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra);
  std::vector<uint8_t> joinRunning(const JoinOutcome& j, int64_t total, const std::string& model,
                                   Clock::time_point started);

  c10::intrusive_ptr<c10::ivalue::Future> submitBucket(at::Tensor buffer, int64_t index,
                                                       std::vector<at::Tensor> params, bool last, bool agree,
                                                       bool ddp);

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
  return impl_->submitBucket(std::move(buffer), index, std::move(params), last, true, true);
}

c10::intrusive_ptr<c10::ivalue::Future> EveryStep::Impl::submitBucket(at::Tensor buffer, int64_t index,
                                                                      std::vector<at::Tensor> params, bool last,
                                                                      bool agree, bool ddp) {
  Bucket b;
  b.buffer = buffer;
  b.ddp = ddp;
  b.numel = buffer.numel();
  std::vector<c10::Device> devices;
  if (!buffer.device().is_cpu()) devices.push_back(buffer.device());
  b.written = markCurrentStream(buffer.device());
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
  const auto done = impl_->submitBucket(buffer, 0, params.empty() ? tensors : params, true, !params.empty(), false);
  finishStep();
  done->wait();  // GPU tensors: this thread's stream waits for the engine's, which wrote the buffer
  int64_t at = 0;
  for (at::Tensor& t : tensors) {
    t.detach().copy_(buffer.narrow(0, at, t.numel()).view(t.sizes()));
    at += t.numel();
  }
}

// What a checkpoint holds and what a running site sends a joining one: the
// parameters, the round counters, the layouts checked and the job's bucket
// layout, the error-feedback residuals, the caller's own state (`extra`).
// The tensors keep the sections' bytes alive.
struct EveryStep::Impl::Snapshot {
  at::Tensor all;
  std::vector<std::tuple<std::string, std::string, at::Tensor>> residuals;
  transport::State st;
};

EveryStep::Impl::Snapshot EveryStep::Impl::snapshot(int64_t step, const std::vector<at::Tensor>& params,
                                                    const std::vector<uint8_t>& extra) {
  Snapshot out;
  std::vector<at::Tensor> flat;
  for (const at::Tensor& p : params) flat.push_back(p.detach().reshape({-1}).to(at::kCPU, at::kFloat));
  out.all = flat.empty() ? at::empty({0}, at::kFloat) : at::cat(flat).contiguous();
  transport::State& st = out.st;
  st.counters = {{"round", uint64_t(step)}, {"step", uint64_t(step)},
                 {"audit_records", uint64_t(session->auditRecords())}};
  st.strings = {{"audit_head", session->auditHead()}, {"model", modelDigest(params)}};
  std::string list;
  for (const std::string& c : checked) list += (list.empty() ? "" : "\n") + c;
  st.strings["checked"] = list;
  if (!registered.empty()) st.strings["layout"] = layoutText(jobLayout());
  for (const auto& kv : s.counters) st.counters["rounds:" + kv.first] = kv.second;
  st.sections.push_back({"params", transport::SectionType::kFloat32, static_cast<const uint8_t*>(out.all.data_ptr()),
                         size_t(out.all.nbytes())});
  out.residuals = s.residuals("ddp.");
  for (const auto& [key, pipe, residual] : out.residuals) {
    st.sections.push_back({"residual:" + key, transport::SectionType::kFloat32,
                           static_cast<const uint8_t*>(residual.data_ptr()), size_t(residual.nbytes())});
    st.strings["pipeline:" + key] = pipe;
  }
  st.sections.push_back({"extra", transport::SectionType::kBytes, extra.data(), extra.size()});
  return out;
}

void EveryStep::checkpoint(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra) {
  Impl& d = *impl_;
  Session::Impl& s = d.s;
  if (!s.leader || !s.checkpoints || step <= 0 || step % s.checkpoints->every()) return;
  const auto t0 = Clock::now();
  try {
    Impl::Snapshot snap;
    // The parameters as the caller's stream left them (the optimizer's step).
    const StreamMark written = markCurrentStream(params);
    d.onEngine([&] {
      written.waitOnCurrentStream();
      snap = d.snapshot(step, params, extra);
    });
    const std::string path = s.checkpoints->save(
        uint64_t(step), core::digestSum(snap.all.data_ptr<float>(), size_t(snap.all.numel())), snap.st);
    char took[32];
    std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - t0).count());
    s.event("checkpoint of step " + std::to_string(step) + " written to " + path + " in " + took + " s");
  } catch (const Error& e) {
    s.event(std::string(e.what()) + " (training goes on)");
  }
}

void EveryStep::registerParams(std::vector<at::Tensor> params) {
  Impl& d = *impl_;
  d.onEngine([&] {
    d.index_of.clear();
    for (size_t i = 0; i < params.size(); ++i) d.index_of[params[i].unsafeGetTensorImpl()] = int64_t(i);
    d.registered = std::move(params);
  });
}

bool EveryStep::joinsWaiting() {
  Impl& d = *impl_;
  if (!d.s.leader) return false;
  bool waiting = false;
  d.onEngine([&] {
    std::lock_guard<std::mutex> lock(d.mu);
    waiting = !d.owed.empty() || !d.s.newJoinRequests(false).empty();
  });
  return waiting;
}

void EveryStep::serveJoins(int64_t step, const std::vector<at::Tensor>& params, const std::vector<uint8_t>& extra) {
  Impl& d = *impl_;
  Session::Impl& s = d.s;
  if (!s.leader) return;
  // The parameters as the caller's stream left them, as for a checkpoint.
  const StreamMark written = markCurrentStream(params);
  d.onEngine([&] {
    written.waitOnCurrentStream();
    d.answerJoins();  // requests that came between rounds: nothing to release
    std::vector<transport::PeerRound> to;
    {
      std::lock_guard<std::mutex> lock(d.mu);
      to.swap(d.owed);
    }
    if (to.empty()) return;
    // A joining site must not cost this one its training: a state that
    // cannot leave (too large, refused by the egress policy) is reported
    // and the request dropped (the joiner times out naming the round).
    try {
      const auto t0 = Clock::now();
      Impl::Snapshot snap = d.snapshot(step, params, extra);
      snap.st.strings["status"] = "running";
      snap.st.strings["state_digest"] = stateDigest(snap.st);
      const std::vector<uint8_t> message = transport::encodeState(snap.st);
      for (const transport::PeerRound& p : to) {
        try {
          s.joins.push_back(s.start(kJoinStateTag, message, core::MessageKind::kModelState, p.round));
          char note[96];
          std::snprintf(note, sizeof note, " (%.1f MB, %.2f s to queue)", message.size() / 1e6,
                        std::chrono::duration<double>(Clock::now() - t0).count());
          s.event("site '" + p.site + "' asked to join: sending it the state of step " + std::to_string(step) +
                  note);
        } catch (const Error& e) {
          s.event("could not send site '" + p.site + "' this site's state: " + e.what() + " (training goes on)");
        }
      }
    } catch (const Error& e) {
      s.event(std::string("could not make this site's state for a joining site: ") + e.what() +
              " (training goes on)");
    }
  });
}

int64_t EveryStep::resume(std::vector<at::Tensor> params) {
  Impl& d = *impl_;
  Session::Impl& s = d.s;
  if (!s.opt.resume) return 0;
  int64_t total = 0;
  for (const at::Tensor& p : params) total += p.numel();
  // The leader finds the step (a checkpoint every site holds, or a running
  // site's state) and encodes what every worker needs as one state
  // document, broadcast in the site.
  std::vector<uint8_t> doc;
  at::Tensor length = at::zeros({1}, at::kLong);
  s.fromLeader(
      [&] {
        const auto started = Clock::now();
        const auto held = s.checkpoints ? s.checkpoints->held() : std::vector<std::pair<uint64_t, uint64_t>>{};
        JoinOutcome j = s.join(d.modelDigest(params), held);
        if (j.kind == JoinOutcome::Kind::kRunning) {
          if (!j.no_state.empty() || !j.state.strings.count("deferred")) {
            fail<Error>("site '", s.names[j.site], "' is still running; a site cannot join a running ",
                        j.no_state.empty() ? std::string("DiLoCo job in every-step mode") : j.no_state + " job",
                        " — stop it and restart every site with --resume");
          }
          doc = d.joinRunning(j, total, d.modelDigest(params), started);
          length[0] = int64_t(doc.size());
          return;
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
  // The job's bucket layout: this site's DDP starts with its initial
  // buckets, so its first steps are regrouped into the job's.
  const auto layout = st.strings.find("layout");
  if (layout != st.strings.end() && !d.registered.empty() && size_t(params.size()) == d.registered.size()) {
    d.onEngine([&] {
      d.reference = parseLayout(layout->second, d.registered.size(), "the state resumed from");
      d.regroup_steps = d.reference.empty() ? 0 : 2;
    });
  }
  if (st.has("extra")) {
    const auto& e = st.section("extra", transport::SectionType::kBytes, "a checkpoint");
    d.resumed_extra.assign(e.data, e.data + e.size);
  }
  return int64_t(st.counter("step", "a checkpoint"));
}

// Leader of a site joining a running every-step job: it releases the
// rounds of the running sites' step not complete (no contribution), then
// takes the state they send at the end of that step, digest-verified.
std::vector<uint8_t> EveryStep::Impl::joinRunning(const JoinOutcome& j, int64_t total, const std::string& model,
                                                  Clock::time_point started) {
  // The rounds to release: "ddp.b<INDEX>:<ROUND>" lines, each (tag, round)
  // once, at most one round a tag (a step's), no more than the model has
  // parameters. Anything else is refused: a released round is an empty
  // payload in a round this site would otherwise use itself.
  const std::string& text = j.state.strings.at("release");
  std::map<std::string, uint64_t> release;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    const size_t colon = line.find(':');
    const std::string tag = line.substr(0, colon);
    if (colon == std::string::npos || tag.rfind("ddp.b", 0) != 0 || !isDecimal(tag.substr(5), 19) ||
        !isDecimal(line.substr(colon + 1), 19) || release.size() >= std::max<size_t>(registered.size(), 1) ||
        !release.emplace(tag, std::stoull(line.substr(colon + 1))).second) {
      fail<ProtocolError>("site '", s.names[j.site], "' asked this site to release rounds '", text.substr(0, 120),
                          "': not one round per bucket tag of at most ", std::max<size_t>(registered.size(), 1),
                          " buckets");
    }
  }
  for (const auto& [tag, round] : release) {
    s.joins.push_back(s.start(tag, {}, core::MessageKind::kModelUpdate, round));
  }
  s.event("joining: site '" + s.names[j.site] + "' sends its state at the end of its step" +
          (release.empty() ? "" : "; releasing the " + std::to_string(release.size()) + " rounds it waits in"));
  // The round opens once the state is on its way: under `continue` a round
  // ends at round_deadline_s, and the running site sends at the end of a
  // step that may itself have waited that long for this site. Meanwhile
  // the state rounds of other sites joining at the same time are answered
  // (empty): every site takes part in every round.
  const auto deadline = Clock::now() + s.timeout;
  std::set<uint64_t> others;
  for (bool here = false; !here;) {
    for (const transport::PeerRound& p : s.gateway->peerRounds(kJoinStateTag)) {
      if (p.tag != kJoinStateTag) continue;
      if (p.round == j.nonce) {
        here = true;
      } else if (others.insert(p.round).second) {
        s.joins.push_back(s.start(kJoinStateTag, {}, core::MessageKind::kControl, p.round));
      }
    }
    s.reapJoins();
    if (here) break;
    if (Clock::now() > deadline) {
      fail<TimeoutError>("site '", s.names[j.site], "' answered the join request but sent no state within ",
                         std::chrono::duration_cast<std::chrono::seconds>(s.timeout).count(),
                         " s (does its program call strait.Checkpoints.step() every step?)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  Round r = s.start(kJoinStateTag, {}, core::MessageKind::kControl, j.nonce);
  RoundOutcome o = s.finish(r);
  size_t from = j.site;
  if (!o.payloads[from] || o.payloads[from]->empty()) {
    for (from = 0; from < o.payloads.size(); ++from) {
      if (from != s.site_index && o.payloads[from] && !o.payloads[from]->empty()) break;
    }
    if (from == o.payloads.size()) {
      fail<Error>("site '", s.names[j.site], "' answered the join request but sent no state (it stopped?)");
    }
  }
  std::vector<uint8_t> bytes = std::move(*o.payloads[from]);
  const std::string what = "the state sent by site '" + s.names[from] + "'";
  const transport::State st = transport::decodeState(bytes.data(), bytes.size(), what);
  if (st.string("status", what) != "running") fail<ProtocolError>(what, " is not a running site's state");
  if (stateDigest(st) != st.string("state_digest", what)) {
    fail<ProtocolError>(what, " does not match its digest (", bytes.size(), " bytes): refusing it");
  }
  if (st.string("model", what) != model) {
    fail<InvalidArgument>("site '", s.names[from], "' trains another model (its parameter list differs)");
  }
  const auto& flat = st.section("params", transport::SectionType::kFloat32, what, size_t(total));
  at::Tensor values = at::from_blob(const_cast<uint8_t*>(flat.data), {total}, at::kFloat);
  if (!at::isfinite(values).all().item<bool>()) fail<ProtocolError>(what, " holds non-finite values");
  const uint64_t step = st.counter("step", what);
  s.restoreResiduals(st, "ddp.");
  char took[32];
  std::snprintf(took, sizeof took, "%.2f", std::chrono::duration<double>(Clock::now() - started).count());
  s.event("joined: state of step " + std::to_string(step) + " from site '" + s.names[from] +
          "' (digest verified) in " + took + " s");
  return bytes;
}

const std::vector<uint8_t>& EveryStep::resumedExtra() const { return impl_->resumed_extra; }

}  // namespace strait::torch
