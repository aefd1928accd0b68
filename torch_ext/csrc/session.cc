// Session: a process's site, its process group, the leader's gateway, the
// round log, and the join protocol (docs/RELIABILITY.md).

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <sys/time.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>

#include "core/codec/parts.h"
#include "core/digest.h"
#include "core/error.h"
#include "core/json.h"
#include "torch_ext/csrc/device_codecs.h"
#include "torch_ext/csrc/session_impl.h"
#include "transport/audit.h"

namespace strait::torch {

const char* const kJoinTag = "strait.join";
const char* const kJoinStateTag = "strait.join.state";

namespace {

// Error classes carried from the leader to the other workers of its site.
enum ErrorCode : int64_t {
  kNoError = 0,
  kGeneric = 1,
  kPolicy = 2,
  kTimeout = 3,
  kProtocol = 4,
  kInvalid = 5,
  kConfig = 6,
};

ErrorCode codeOf(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const PolicyViolation&) {
    return kPolicy;
  } catch (const TimeoutError&) {
    return kTimeout;
  } catch (const ProtocolError&) {
    return kProtocol;
  } catch (const ConfigError&) {
    return kConfig;
  } catch (const InvalidArgument&) {
    return kInvalid;
  } catch (...) {
    return kGeneric;
  }
}

[[noreturn]] void throwCoded(int64_t code, const std::string& text) {
  switch (code) {
    case kPolicy: throw PolicyViolation(text);
    case kTimeout: throw TimeoutError(text);
    case kProtocol: throw ProtocolError(text);
    case kConfig: throw ConfigError(text);
    case kInvalid: throw InvalidArgument(text);
    default: throw Error(text);
  }
}

std::string sizeText(uint64_t n) {
  char text[32];
  if (n >= 1000000000) {
    std::snprintf(text, sizeof text, "%.1f GB", n / 1e9);
  } else if (n >= 1000000) {
    std::snprintf(text, sizeof text, "%.1f MB", n / 1e6);
  } else if (n >= 1000) {
    std::snprintf(text, sizeof text, "%.1f KB", n / 1e3);
  } else {
    std::snprintf(text, sizeof text, "%llu B", static_cast<unsigned long long>(n));
  }
  return text;
}

std::string num(const char* fmt, double v) {
  char text[64];
  std::snprintf(text, sizeof text, fmt, v);
  return text;
}

double wallTime() {
  timeval tv{};
  gettimeofday(&tv, nullptr);
  return tv.tv_sec + tv.tv_usec / 1e6;
}

std::string joinList(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (const std::string& s : items) out += (out.empty() ? "" : sep) + s;
  return out;
}

// The checkpoint directory: relative paths are relative to the config file.
std::string resolveDir(const std::string& dir, const std::string& config_path) {
  std::string d = dir;
  if (d.rfind("~/", 0) == 0 || d == "~") {
    const char* home = std::getenv("HOME");
    d = std::string(home ? home : "") + d.substr(1);
  }
  if (!d.empty() && d[0] == '/') return d;
  const size_t slash = config_path.rfind('/');
  return (slash == std::string::npos ? std::string(".") : config_path.substr(0, slash)) + "/" + d;
}

std::string absolute(const std::string& path) {
  if (path.empty() || path[0] == '/') return path;
  char cwd[4096];
  if (!::getcwd(cwd, sizeof cwd)) return path;
  return std::string(cwd) + "/" + path;
}

}  // namespace

std::string errorText(const std::exception& e) { return e.what(); }

uint64_t tensorDigest(const at::Tensor& flat) { return digestOf(flat.detach().reshape({-1})); }

// ------------------------------------------------------------ Session ---

Session::Impl::Impl(SessionOptions options) : opt(std::move(options)) {
  opt.config = absolute(opt.config);
  config = core::JobConfig::load(opt.config);
  const core::SiteConfig& me = config.site(opt.site);  // ConfigError listing the sites
  if (!opt.policy.empty()) policy = core::SitePolicy::load(absolute(opt.policy));
  for (const core::SiteConfig& s : config.sites) {
    names.push_back(s.name);
    weights.push_back(s.weight);
    if (s.name == opt.site) site_index = names.size() - 1;
  }
  group = opt.group;
  if (group) {
    rank = group->getRank();
    size = group->getSize();
    if (group->getBackendName().find("nccl") != std::string::npos) {
      // NCCL moves CUDA tensors only: control messages go on this rank's GPU.
      control_device = c10::impl::getDeviceGuardImpl(at::kCUDA)->getDevice();
    }
  }
  leader = rank == 0;
  timeout = std::chrono::milliseconds(int64_t(config.transport.hard_deadline_s * 1000) + 30000);
  if (config.compression.adaptive.enabled) {
    const auto& a = config.compression.adaptive;
    adaptive.emplace(a.min_density, a.max_density, a.min_bits);
  }
  if (leader) {
    gateway = std::make_unique<transport::Gateway>(
        transport::GatewayOptions::fromConfig(config, opt.site, policy ? &*policy : nullptr));
  }
  try {
    if (size != me.workers) {
      // Workers the config does not know of would train with the others'
      // round numbers and weights as if they were not there.
      fail<ConfigError>(config.source, ":", me.line, ": site '", opt.site, "' runs ", size, " worker",
                        size == 1 ? "" : "s", " (its process group) but the config gives it workers: ", me.workers,
                        "; start that many (./strait launch does) or change workers");
    }
    if (!config.checkpoint.dir.empty()) checkpoint_root = resolveDir(config.checkpoint.dir, opt.config);
    if (leader && !config.checkpoint.dir.empty()) {
      checkpoints.emplace(checkpoint_root, opt.site, config.checkpoint.every, config.checkpoint.keep);
    }
  } catch (const std::exception& e) {
    // The other sites hear why this one stops, rather than wait for it.
    if (gateway) gateway->stop(e.what());
    throw;
  }
}

Session::Impl::~Impl() = default;

Compressor& Session::Impl::compressor(const std::string& key, const std::string& name, int64_t size,
                                      const std::string& pipeline, std::optional<float> decay, int64_t rule_size) {
  auto it = compressors.find(key);
  if (it != compressors.end()) {
    if (pipeline.empty() || it->second->pipeline() == core::Pipeline::parse(pipeline).toString()) return *it->second;
    // Another pipeline for the same tensor (adaptive compression): what the
    // old one had not sent yet carries over.
    auto next = std::make_unique<Compressor>(pipeline, seedOf(compressors.size()), it->second->errorFeedback(),
                                             it->second->decay());
    const at::Tensor r = it->second->residual();
    if (next->errorFeedback() && r.numel() > 0) next->setResidual(r.data_ptr<float>(), size_t(r.numel()));
    it->second = std::move(next);
    return *it->second;
  }
  std::string p = pipeline;
  bool error_feedback = config.compression.fallback.error_feedback;
  if (p.empty()) {
    const core::CompressionRule& rule =
        config.compression.ruleFor(name, static_cast<uint64_t>(rule_size >= 0 ? rule_size : size));
    p = rule.pipeline.toString();
    error_feedback = rule.error_feedback;
  }
  if (decay) error_feedback = true;
  auto made = std::make_unique<Compressor>(p, seedOf(compressors.size()), error_feedback, decay.value_or(1.0f));
  return *compressors.emplace(key, std::move(made)).first->second;
}

std::vector<std::tuple<std::string, std::string, at::Tensor>> Session::Impl::residuals(
    const std::string& prefix) const {
  std::vector<std::tuple<std::string, std::string, at::Tensor>> out;
  for (const auto& kv : compressors) {
    if (kv.first.rfind(prefix, 0) == 0 && kv.second->errorFeedback()) {
      out.emplace_back(kv.first, kv.second->pipeline(), kv.second->residual());
    }
  }
  return out;
}

void Session::Impl::restoreResiduals(const transport::State& state, const std::string& prefix) {
  for (const transport::StateSection& s : state.sections) {
    const std::string tag = "residual:";
    if (s.name.rfind(tag + prefix, 0) != 0 || s.type != transport::SectionType::kFloat32) continue;
    const std::string key = s.name.substr(tag.size());
    const auto p = state.strings.find("pipeline:" + key);
    const std::string pipeline = p == state.strings.end() ? "" : p->second;
    Compressor& c = compressor(key, key, int64_t(s.count()), pipeline);
    if (!c.errorFeedback() || s.count() == 0) continue;
    std::vector<float> values(s.count());
    std::memcpy(values.data(), s.data, s.size);
    c.setResidual(values.data(), values.size());
  }
}

// ------------------------------------------------------ inside the site ---

void Session::Impl::broadcast(at::Tensor& t) {
  if (size <= 1) return;
  if (!group) fail<Error>("site '", opt.site, "': the session is closed");
  std::vector<at::Tensor> ts{t};
  c10d::BroadcastOptions o;
  o.rootRank = 0;
  group->broadcast(ts, o)->wait();
}

namespace {

void allReduce(Session::Impl& s, at::Tensor& t, c10d::ReduceOp op) {
  if (s.size <= 1) return;
  if (!s.group) fail<Error>("site '", s.opt.site, "': the session is closed");
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.reduceOp = op;
  s.group->allreduce(ts, o)->wait();
}

}  // namespace

void Session::Impl::allReduceSum(at::Tensor& t) { allReduce(*this, t, c10d::ReduceOp::SUM); }
void Session::Impl::allReduceMax(at::Tensor& t) { allReduce(*this, t, c10d::ReduceOp::MAX); }

void Session::Impl::fromLeader(const std::function<void()>& fn, std::vector<at::Tensor> outs) {
  std::exception_ptr error;
  std::string text;
  if (leader) {
    try {
      fn();
      std::lock_guard<std::mutex> lock(log_mu);
      last_error.clear();
    } catch (const std::exception& e) {
      error = std::current_exception();
      text = e.what();
      std::lock_guard<std::mutex> lock(log_mu);
      last_error = text;  // what the other sites hear if this session ends now
    }
  }
  if (size > 1) {
    at::Tensor status = at::zeros({2}, at::TensorOptions(at::kLong));
    if (error) {
      status[0] = int64_t(codeOf(error));
      status[1] = int64_t(text.size());
    }
    at::Tensor s = status.to(control_device);
    broadcast(s);
    status = s.cpu();
    const int64_t code = status[0].item<int64_t>();
    if (code != kNoError) {
      at::Tensor message = at::zeros({status[1].item<int64_t>()}, at::TensorOptions(at::kByte));
      if (leader && !text.empty()) std::memcpy(message.data_ptr<uint8_t>(), text.data(), text.size());
      at::Tensor m = message.to(control_device);
      broadcast(m);
      if (!leader) {
        message = m.cpu();
        throwCoded(code, std::string(reinterpret_cast<const char*>(message.data_ptr<uint8_t>()), size_t(message.numel())));
      }
    } else {
      for (at::Tensor& o : outs) {
        if (o.device() == control_device) {
          broadcast(o);
        } else {
          at::Tensor t = o.to(control_device);
          broadcast(t);
          if (!leader) o.copy_(t);
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

// ------------------------------------------------------- across sites ---

Round Session::Impl::start(const std::string& tag, std::vector<uint8_t> payload, core::MessageKind kind,
                           std::optional<uint64_t> round) {
  STRAIT_CHECK(gateway != nullptr, "only the site leader starts rounds (rank ", rank, " of site '", opt.site, "')");
  Round r;
  r.round = round ? *round : nextRound(tag);
  r.tag = tag;
  r.start = Clock::now();
  r.bytes = payload.size();
  r.result = std::make_shared<std::future<transport::RoundResult>>(
      gateway->exchange(r.round, tag, std::move(payload), kind));
  return r;
}

bool Session::Impl::ready(const Round& r) const {
  return r.result && r.result->wait_for(std::chrono::seconds(0)) == std::future_status::ready;
}

RoundOutcome Session::Impl::finish(Round& r, const std::function<void()>& poll) {
  const auto deadline = r.start + timeout;
  // Polled before the first wait too: a round that completes at once (a
  // site that continues without a peer which refuses its rounds finishes
  // each in a millisecond) must still answer that peer's join request, or
  // the peer, which gave way to rejoin, is never answered and stops (seen
  // in the chaos suite's frozen-site test under load).
  auto next_poll = Clock::time_point{};
  for (;;) {
    const auto now = Clock::now();
    if (now >= next_poll) {
      next_poll = now + std::chrono::milliseconds(50);
      if (poll) poll();
      if (join_server && r.tag.rfind(join_prefix, 0) == 0) join_server(r.round);
      reapJoins();
    }
    if (r.result->wait_for(std::chrono::milliseconds(2)) == std::future_status::ready) break;
    if (Clock::now() > deadline) {
      fail<TimeoutError>("round ", r.round, " '", r.tag, "' did not complete within ",
                         std::chrono::duration_cast<std::chrono::seconds>(timeout).count(), " s");
    }
  }
  transport::RoundResult res = r.result->get();
  RoundOutcome out;
  out.missing = res.missing;
  out.payloads = std::move(res.payloads);
  uint64_t in = 0;
  for (size_t i = 0; i < out.payloads.size(); ++i) {
    if (i != site_index && out.payloads[i]) in += out.payloads[i]->size();
  }
  {
    std::lock_guard<std::mutex> lock(log_mu);
    pending.rounds += 1;
    pending.seconds += std::chrono::duration<double>(Clock::now() - r.start).count();
    pending.bytes_out += r.bytes * (names.size() - 1 - out.missing.size());
    pending.bytes_in += in;
    pending.missing.insert(out.missing.begin(), out.missing.end());
  }
  return out;
}

std::vector<std::pair<size_t, float>> Session::Impl::siteWeights(const RoundOutcome& o) const {
  double total = 0;
  for (size_t i = 0; i < o.payloads.size(); ++i) {
    if (o.payloads[i] && !o.payloads[i]->empty()) total += weights[i];
  }
  std::vector<std::pair<size_t, float>> out;
  for (size_t i = 0; i < o.payloads.size(); ++i) {
    if (o.payloads[i] && !o.payloads[i]->empty()) out.emplace_back(i, static_cast<float>(weights[i] / total));
  }
  return out;
}

void Session::Impl::accumulateParts(const RoundOutcome& o, const std::vector<at::Tensor>& outs,
                                    const std::string& what) const {
  for (const auto& [i, weight] : siteWeights(o)) {
    const std::vector<uint8_t>& blob = *o.payloads[i];
    std::vector<core::PartView> views;
    try {
      views = core::splitParts(blob.data(), blob.size(), outs.size());
    } catch (const ProtocolError& e) {
      fail<ProtocolError>("site '", names[i], "' sent ", what, ": ", e.what());
    }
    for (size_t k = 0; k < outs.size(); ++k) accumulateExact(views[k].data, views[k].size, outs[k], weight);
  }
}

void Session::Impl::checkSameEverywhere(const std::string& tag, const std::string& description) {
  fromLeader([&] {
    Round r = start(tag, std::vector<uint8_t>(description.begin(), description.end()), core::MessageKind::kControl);
    const RoundOutcome o = finish(r);
    auto lines = [](const std::string& s) {
      std::vector<std::string> out;
      std::istringstream in(s);
      for (std::string l; std::getline(in, l);) out.push_back(l);
      return out;
    };
    const std::vector<std::string> a = lines(description);
    for (size_t i = 0; i < o.payloads.size(); ++i) {
      if (!o.payloads[i] || o.payloads[i]->empty()) continue;
      const std::string theirs(o.payloads[i]->begin(), o.payloads[i]->end());
      if (theirs == description) continue;
      const std::vector<std::string> b = lines(theirs);
      size_t k = 0;
      while (k < a.size() && k < b.size() && a[k] == b[k]) ++k;
      fail<InvalidArgument>("the model differs between sites: site '", names[i], "' has '",
                            k < b.size() ? b[k] : "(nothing)", "' where site '", opt.site, "' has '",
                            k < a.size() ? a[k] : "(nothing)", "' (entry ", k, " of '", tag, "')");
    }
  });
}

// -------------------------------------------------------------- joins ---

std::string stateDigest(const transport::State& s) {
  std::vector<uint8_t> all;
  for (const transport::StateSection& sec : s.sections) all.insert(all.end(), sec.data, sec.data + sec.size);
  return transport::digestHex(all.data(), all.size());
}

namespace {

std::vector<uint8_t> heldBytes(const std::vector<std::pair<uint64_t, uint64_t>>& held) {
  std::vector<uint8_t> out(held.size() * 16);
  for (size_t i = 0; i < held.size(); ++i) {
    std::memcpy(out.data() + 16 * i, &held[i].first, 8);
    std::memcpy(out.data() + 16 * i + 8, &held[i].second, 8);
  }
  return out;
}

std::set<std::pair<uint64_t, uint64_t>> heldOf(const transport::State& s, const std::string& what) {
  std::set<std::pair<uint64_t, uint64_t>> out;
  if (!s.has("held")) return out;
  const transport::StateSection& h = s.section("held", transport::SectionType::kU64, what);
  for (size_t i = 0; i + 1 < h.count(); i += 2) {
    uint64_t r, d;
    std::memcpy(&r, h.data + 8 * i, 8);
    std::memcpy(&d, h.data + 8 * i + 8, 8);
    out.emplace(r, d);
  }
  return out;
}

}  // namespace

JoinOutcome Session::Impl::join(const std::string& model, const std::vector<std::pair<uint64_t, uint64_t>>& held) {
  std::random_device rd;
  const uint64_t nonce = (((uint64_t(rd()) << 32) ^ rd()) & ((uint64_t{1} << 62) - 1)) | 1;
  const std::vector<uint8_t> held_bytes = heldBytes(held);
  transport::State request;
  request.strings = {{"status", "resuming"}, {"model", model}};
  request.counters = {{"nonce", nonce}};
  request.sections.push_back({"held", transport::SectionType::kU64, held_bytes.data(), held_bytes.size()});
  const std::vector<uint8_t> message = transport::encodeState(request);
  answered.emplace(nonce, kJoinTag);
  char hex[32];
  std::snprintf(hex, sizeof hex, "%llx", static_cast<unsigned long long>(nonce));
  event(std::string("joining: asking the other sites for their state (request ") + hex + ")");

  auto answer = [&](uint64_t round) {
    if (!answered.emplace(round, kJoinTag).second) return;
    joins.push_back(start(kJoinTag, message, core::MessageKind::kControl, round));
  };
  // Other sites starting at the same time: tell them we are resuming too.
  auto answerResumers = [&] {
    for (const transport::PeerRound& p : gateway->peerRounds(kJoinTag)) {
      if (p.tag == kJoinTag) answer(p.round);
    }
  };
  Round r = start(kJoinTag, message, core::MessageKind::kControl, nonce);
  RoundOutcome o = finish(r, answerResumers);

  JoinOutcome out;
  std::vector<std::pair<size_t, transport::State>> resuming;
  std::vector<std::pair<size_t, std::vector<uint8_t>>> running_bytes;
  std::vector<std::set<std::pair<uint64_t, uint64_t>>> sets{{held.begin(), held.end()}};
  std::vector<std::string> holders{opt.site};
  for (size_t i = 0; i < o.payloads.size(); ++i) {
    if (i == site_index || !o.payloads[i] || o.payloads[i]->empty()) continue;
    const std::string what = "site '" + names[i] + "' sent a join message";
    const std::vector<uint8_t>& bytes = *o.payloads[i];
    const transport::State s = transport::decodeState(bytes.data(), bytes.size(), what);
    const std::string& status = s.string("status", what);
    if (status != "resuming" && status != "running") fail<ProtocolError>(what, " without a valid status");
    if (status == "running" && s.strings.count("no_state")) {
      running_bytes.emplace_back(i, bytes);  // a running job that cannot take a site in
      continue;
    }
    if (s.string("model", what) != model) {
      fail<InvalidArgument>("site '", names[i], "' trains another model (its parameter list differs from site '",
                            opt.site, "''s); cannot join");
    }
    if (status == "running") {
      running_bytes.emplace_back(i, bytes);
    } else {
      sets.push_back(heldOf(s, what));
      holders.push_back(names[i]);
      answer(s.counter("nonce", what));  // its request has not reached us yet: answer it now
    }
  }
  if (!running_bytes.empty()) {
    out.kind = JoinOutcome::Kind::kRunning;
    out.site = running_bytes[0].first;
    out.bytes = std::move(running_bytes[0].second);
    const std::string what = "site '" + names[out.site] + "' sent a join message";
    out.state = transport::decodeState(out.bytes.data(), out.bytes.size(), what);
    const auto ns = out.state.strings.find("no_state");
    if (ns != out.state.strings.end()) {
      out.no_state = ns->second;
      return out;
    }
    out.nonce = nonce;
    if (out.state.strings.count("deferred")) {
      // A running every-step site sends its state at its next step
      // boundary (EveryStep): here only the rounds of its step not
      // complete, which this site releases: every running site's, each
      // once (sites in step list the same). Every running site must be
      // able to take this one in.
      std::set<std::string> release;
      for (size_t k = 0; k < running_bytes.size(); ++k) {
        const std::vector<uint8_t>& bytes = k == 0 ? out.bytes : running_bytes[k].second;  // the first moved out
        const auto s = transport::decodeState(bytes.data(), bytes.size(),
                                              "site '" + names[running_bytes[k].first] + "' sent a join message");
        const auto ns = s.strings.find("no_state");
        if (ns != s.strings.end()) {
          out.site = running_bytes[k].first;
          out.no_state = ns->second;
          return out;
        }
        const auto r = s.strings.find("release");
        if (r == s.strings.end()) continue;
        std::istringstream lines(r->second);
        for (std::string line; std::getline(lines, line);) {
          if (!line.empty()) release.insert(line);
        }
      }
      std::string lines;
      for (const std::string& line : release) lines += (lines.empty() ? "" : "\n") + line;
      out.state.strings["release"] = lines;
      return out;
    }
    if (stateDigest(out.state) != out.state.string("state_digest", what)) {
      fail<ProtocolError>("the state sent by site '", names[out.site], "' does not match its digest (",
                          out.bytes.size(), " bytes): refusing it");
    }
    std::vector<std::string> others;
    for (size_t k = 1; k < running_bytes.size(); ++k) {
      const auto s = transport::decodeState(running_bytes[k].second.data(), running_bytes[k].second.size(), what);
      const auto p = s.strings.find("params");
      if (p == s.strings.end() || p->second != out.state.string("params", what)) {
        others.push_back(names[running_bytes[k].first]);
      }
    }
    if (!others.empty()) {
      event("joining: sites " + joinList(others) + " hold other parameters than '" + names[out.site] + "'; taking '" +
            names[out.site] + "''s");
    }
    out.state.counter("syncs", what);  // present, or ProtocolError
    return out;
  }
  std::set<std::pair<uint64_t, uint64_t>> common = sets[0];
  for (size_t k = 1; k < sets.size(); ++k) {
    std::set<std::pair<uint64_t, uint64_t>> both;
    for (const auto& h : common) {
      if (sets[k].count(h)) both.insert(h);
    }
    common = std::move(both);
  }
  if (!common.empty()) {
    out.kind = JoinOutcome::Kind::kCheckpoint;
    out.round = common.rbegin()->first;
    out.digest = common.rbegin()->second;
    out.absent = o.missing;
    return out;
  }
  bool any = false;
  std::string holdings;
  for (size_t k = 0; k < sets.size(); ++k) {
    any = any || !sets[k].empty();
    std::string rounds;
    for (const auto& h : sets[k]) rounds += (rounds.empty() ? "" : ", ") + std::to_string(h.first);
    holdings += (holdings.empty() ? "" : "; ") + ("'" + holders[k] + "' holds " + (rounds.empty() ? "none" : rounds));
  }
  if (any) {
    fail<Error>("--resume: no checkpoint round is held by every site (", holdings,
                "); restore a common one or start afresh without --resume");
  }
  out.kind = JoinOutcome::Kind::kFresh;
  return out;
}

void Session::Impl::setJoinServer(std::string prefix, std::function<void(uint64_t)> fn) {
  join_prefix = std::move(prefix);
  join_server = std::move(fn);
}

std::vector<std::string> Session::Impl::serveJoins(uint64_t round, const std::function<transport::State()>& make) {
  std::vector<std::string> served;
  for (const transport::PeerRound& p : newJoinRequests()) {
    const auto started = Clock::now();
    transport::State s = make();
    s.strings["status"] = "running";
    s.counters["round"] = round;
    s.strings["state_digest"] = stateDigest(s);
    std::vector<uint8_t> message = transport::encodeState(s);
    const size_t bytes = message.size();
    joins.push_back(start(kJoinTag, std::move(message), core::MessageKind::kModelState, p.round));
    served.push_back(p.site);
    event("site '" + p.site + "' asked to join: sending it the state of round " + std::to_string(round) + " (" +
          num("%.1f", bytes / 1e6) + " MB, " +
          num("%.2f", std::chrono::duration<double>(Clock::now() - started).count()) + " s to queue)");
  }
  return served;
}

std::vector<transport::PeerRound> Session::Impl::newJoinRequests(bool mark) {
  std::vector<transport::PeerRound> out;
  if (!gateway) return out;
  for (transport::PeerRound& p : gateway->peerRounds(kJoinTag)) {
    if (p.tag != kJoinTag || answered.count({p.round, p.tag})) continue;
    if (mark) answered.emplace(p.round, p.tag);
    out.push_back(std::move(p));
  }
  return out;
}

void Session::Impl::refuseJoins(const std::string& why) {
  for (const transport::PeerRound& p : newJoinRequests()) {
    transport::State s;
    s.strings = {{"status", "running"}, {"no_state", why}};
    joins.push_back(start(kJoinTag, transport::encodeState(s), core::MessageKind::kControl, p.round));
    event("site '" + p.site + "' asked to join; a running " + why +
          " job cannot take it in (restart every site with --resume)");
  }
}

void Session::Impl::reapJoins() {
  for (auto it = joins.begin(); it != joins.end();) {
    if (!ready(*it)) {
      ++it;
      continue;
    }
    try {
      it->result->get();  // of no use here; an error only means the asker left
    } catch (const std::exception&) {
    }
    it = joins.erase(it);
  }
}

void Session::Impl::restartGateway() {
  STRAIT_CHECK(leader, "only the site leader has a gateway");
  gateway.reset();  // stops the I/O thread, closes the sockets
  joins.clear();
  counters.clear();
  gateway = std::make_unique<transport::Gateway>(
      transport::GatewayOptions::fromConfig(config, opt.site, policy ? &*policy : nullptr));
}

std::vector<std::string> Session::Impl::takeDivergedPeers() {
  return gateway ? gateway->takeDivergedPeers() : std::vector<std::string>{};
}

std::vector<std::string> Session::Impl::takeReturnedPeers() {
  return gateway ? gateway->takeReturnedPeers() : std::vector<std::string>{};
}

at::Tensor Session::Impl::privatized(const at::Tensor& flat) {
  if (!policy || !policy->privacy.enabled) return flat;
  at::Tensor out = flat.clone();
  gateway->privatize(out.data_ptr<float>(), static_cast<size_t>(out.numel()));
  return out;
}

at::Tensor Session::Impl::encodable(const at::Tensor& flat) {
  const bool private_release = policy && policy->privacy.enabled;
  if (flat.is_cuda() && deviceCodecs() && !private_release) return flat.detach().to(at::kFloat).contiguous();
  return privatized(flat.detach().to(at::kCPU, at::kFloat).contiguous());
}

at::Device Session::Impl::decodeDevice(const at::Device& d) const {
  return d.is_cuda() && deviceCodecs() ? d : at::Device(at::kCPU);
}

// ---------------------------------------------------------------- log ---

void Session::Impl::appendJson(const std::string& line) {
  if (opt.json_log.empty()) return;
  // One write with O_APPEND: sites sharing a file never interleave within a line.
  const int fd = ::open(opt.json_log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  const std::string text = line + "\n";
  const ssize_t w = ::write(fd, text.data(), text.size());
  (void)w;
  ::close(fd);
}

void Session::Impl::event(const std::string& message) {
  if (opt.log) std::cerr << "strait " << opt.site << ": " << message << std::endl;
  appendJson("{\"time\": " + num("%.3f", wallTime()) + ", \"site\": " + jsonString(opt.site) +
             ", \"event\": " + jsonString(message) + "}");
}

Session::Session(SessionOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}
Session::~Session() = default;

const std::string& Session::site() const { return impl_->opt.site; }
int64_t Session::siteIndex() const { return int64_t(impl_->site_index); }
const std::vector<std::string>& Session::sites() const { return impl_->names; }
int64_t Session::rank() const { return impl_->rank; }
int64_t Session::size() const { return impl_->size; }
int64_t Session::jobRank() const {
  int64_t before = 0;
  for (size_t i = 0; i < impl_->site_index; ++i) before += impl_->config.sites[i].workers;
  return before + impl_->rank;
}
int64_t Session::jobSize() const {
  int64_t all = 0;
  for (const core::SiteConfig& s : impl_->config.sites) all += s.workers;
  return all;
}
bool Session::leader() const { return impl_->leader; }
bool Session::resuming() const { return impl_->opt.resume; }
const std::string& Session::configPath() const { return impl_->opt.config; }
uint64_t Session::bytesSent() const { return impl_->bytes_sent; }
std::vector<std::string> Session::lastMissing() const { return impl_->last_missing; }
std::string Session::auditHead() const { return impl_->gateway ? impl_->gateway->auditHead() : ""; }
int64_t Session::auditRecords() const { return impl_->gateway ? int64_t(impl_->gateway->auditRecords()) : 0; }
double Session::privacySpent() const { return impl_->gateway ? impl_->gateway->privacySpent() : 0.0; }
void Session::event(const std::string& message) { impl_->event(message); }

std::string Session::log(int64_t step, std::optional<double> loss, const std::string& fields_json) {
  Impl& s = *impl_;
  if (!s.leader) return "";
  Impl::Pending p;
  std::string pipeline, note;
  {
    std::lock_guard<std::mutex> lock(s.log_mu);
    std::swap(p, s.pending);
    if (p.rounds == 0) return "";
    if (s.adaptive) {
      pipeline = s.adaptive->pipeline();
      note.swap(s.adaptive_note);
    }
  }
  const std::vector<std::string> missing(p.missing.begin(), p.missing.end());
  std::string missing_json;
  for (const std::string& m : missing) missing_json += (missing_json.empty() ? "" : ", ") + jsonString(m);
  std::string record = "{\"time\": " + num("%.3f", wallTime()) + ", \"site\": " + jsonString(s.opt.site) +
                       ", \"step\": " + std::to_string(step) +
                       ", \"loss\": " + (loss ? num("%.9g", *loss) : std::string("null")) +
                       ", \"rounds\": " + std::to_string(p.rounds) + ", \"bytes_out\": " + std::to_string(p.bytes_out) +
                       ", \"bytes_in\": " + std::to_string(p.bytes_in) + ", \"round_s\": " + num("%.6f", p.seconds) +
                       ", \"missing\": [" + missing_json + "]";
  if (s.adaptive) {
    record += ", \"pipeline\": " + jsonString(pipeline);
    if (!note.empty()) record += ", \"adaptive\": " + jsonString(note);
  }
  const size_t open = fields_json.find('{'), close = fields_json.rfind('}');
  if (open != std::string::npos && close != std::string::npos && close > open + 1) {
    const std::string inner = fields_json.substr(open + 1, close - open - 1);
    if (inner.find_first_not_of(" \t\n") != std::string::npos) record += ", " + inner;
  }
  record += "}";
  if (s.opt.log) {
    if (!note.empty()) std::cerr << "strait " << s.opt.site << " step " << step << ": adaptive: " << note << "\n";
    std::cerr << "strait " << s.opt.site << " step " << step << ":" << (loss ? num(" loss %.4f", *loss) : "")
              << ", out " << sizeText(p.bytes_out) << ", in " << sizeText(p.bytes_in) << ", " << p.rounds
              << (p.rounds > 1 ? " rounds " : " round ") << num("%.1f", p.seconds * 1000) << " ms"
              << (missing.empty() ? "" : ", missing " + joinList(missing)) << std::endl;
  }
  s.appendJson(record);
  return record;
}

void Session::close() {
  Impl& s = *impl_;
  if (s.closed) return;
  s.closed = true;
  if (s.leader && s.closing_warning) {
    const std::string warning = s.closing_warning();
    if (!warning.empty()) std::cerr << "strait " << s.opt.site << ": warning: " << warning << std::endl;
  }
  if (s.gateway) {
    // Join requests answered: let them reach the sites that asked.
    const auto deadline = Clock::now() + std::chrono::seconds(10);
    while (!s.joins.empty() && Clock::now() < deadline) {
      s.reapJoins();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  s.joins.clear();
  if (s.gateway) {
    std::string why;
    {
      std::lock_guard<std::mutex> lock(s.log_mu);
      why = s.last_error.empty() ? "its session closed" : s.last_error;
    }
    s.gateway->stop(why);
  }
  s.gateway.reset();
  // The process group is the caller's: let it go now, not at interpreter
  // teardown (a gloo group destroyed there can abort the process).
  s.group.reset();
}

}  // namespace strait::torch
