// The libtorch C++ API (strait_torch.h): a site leader's cross-site sync.

#include "torch_ext/strait_torch.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "core/codec/error_feedback.h"
#include "core/config/config.h"
#include "core/error.h"
#include "transport/gateway.h"

namespace strait::torch {

namespace {

// Several payloads in one message: u32 count, then (u64 length, bytes) each.
std::vector<uint8_t> pack(const std::vector<std::vector<uint8_t>>& parts) {
  size_t total = 4;
  for (const auto& p : parts) total += 8 + p.size();
  std::vector<uint8_t> out(total);
  uint8_t* w = out.data();
  const uint32_t n = static_cast<uint32_t>(parts.size());
  std::memcpy(w, &n, 4);
  w += 4;
  for (const auto& p : parts) {
    const uint64_t len = p.size();
    std::memcpy(w, &len, 8);
    w += 8;
    if (len) std::memcpy(w, p.data(), len);
    w += len;
  }
  return out;
}

// The inverse of pack(), bounds-checked: the bytes came from another site.
std::vector<std::pair<const uint8_t*, size_t>> unpack(const std::vector<uint8_t>& bytes, size_t expect,
                                                      const std::string& site) {
  std::vector<std::pair<const uint8_t*, size_t>> parts;
  size_t at = 0;
  auto need = [&](size_t n) {
    if (n > bytes.size() - at) fail<ProtocolError>("site '", site, "' sent a truncated bundle of tensors");
  };
  need(4);
  uint32_t n;
  std::memcpy(&n, bytes.data(), 4);
  at = 4;
  if (n != expect) fail<ProtocolError>("site '", site, "' sent ", n, " tensors, expected ", expect);
  for (uint32_t i = 0; i < n; ++i) {
    need(8);
    uint64_t len;
    std::memcpy(&len, bytes.data() + at, 8);
    at += 8;
    need(len);
    parts.emplace_back(bytes.data() + at, static_cast<size_t>(len));
    at += len;
  }
  if (at != bytes.size()) fail<ProtocolError>("site '", site, "' sent trailing bytes after its tensors");
  return parts;
}

std::string describe(const std::vector<at::Tensor>& tensors) {
  std::ostringstream o;
  for (const at::Tensor& t : tensors) o << t.sizes() << " " << t.scalar_type() << "\n";
  return o.str();
}

at::Tensor flatCpu(const at::Tensor& t) {
  if (t.scalar_type() != at::kFloat) {
    fail<InvalidArgument>("strait::torch: tensors must be float32, got ", t.scalar_type());
  }
  return t.detach().to(at::kCPU).contiguous().view({-1});
}

}  // namespace

class Site::Impl {
 public:
  Impl(const std::string& config_path, const std::string& site, const std::string& policy_path)
      : config_(core::JobConfig::load(config_path)),
        policy_(policy_path.empty() ? std::optional<core::SitePolicy>()
                                    : std::optional<core::SitePolicy>(core::SitePolicy::load(policy_path))),
        gateway_(transport::GatewayOptions::fromConfig(config_, site, policy_ ? &*policy_ : nullptr)) {
    for (const core::SiteConfig& s : config_.sites) weights_.push_back(s.weight);
    timeout_ = std::chrono::milliseconds(int64_t(config_.transport.hard_deadline_s * 1000) + 30000);
  }

  // One round of `tag`: every site's bytes in site order (nullopt: missing).
  std::vector<std::optional<std::vector<uint8_t>>> exchange(const std::string& tag, std::vector<uint8_t> bytes,
                                                            core::MessageKind kind) {
    const uint64_t round = rounds_[tag]++;
    auto f = gateway_.exchange(round, tag, std::move(bytes), kind);
    if (f.wait_for(timeout_) != std::future_status::ready) {
      fail<TimeoutError>("strait::torch: round ", round, " '", tag, "' did not complete in time");
    }
    transport::RoundResult r = f.get();
    missing_ = r.missing;
    return std::move(r.payloads);
  }

  void checkSame(const std::string& tag, const std::vector<at::Tensor>& tensors) {
    if (!checked_.insert(tag).second) return;
    const std::string mine = describe(tensors);
    auto all = exchange(tag + ".shapes", std::vector<uint8_t>(mine.begin(), mine.end()), core::MessageKind::kControl);
    for (size_t i = 0; i < all.size(); ++i) {
      if (!all[i]) continue;
      const std::string theirs(all[i]->begin(), all[i]->end());
      if (theirs != mine) {
        fail<InvalidArgument>("strait::torch: the tensors of '", tag, "' differ between sites: site '",
                              config_.sites[i].name, "' has\n", theirs, "where site '", gateway_.options().site,
                              "' has\n", mine);
      }
    }
  }

  // One tensor slot's compressor, created on first use from the config's
  // rule for "TAG.SLOT" (so per-tensor rules apply to the C++ API too).
  struct Slot;
  Slot& slot(const std::string& tag, size_t index, int64_t numel) {
    const auto key = std::make_pair(tag, index);
    auto it = compressors_.find(key);
    if (it == compressors_.end()) {
      const core::CompressionRule& rule =
          config_.compression.ruleFor(tag + "." + std::to_string(index), static_cast<uint64_t>(numel));
      const uint64_t seed = config_.compression.seed + 7919 * compressors_.size();
      it = compressors_.emplace(key, Slot{core::ErrorFeedback(rule.pipeline, seed), rule.error_feedback,
                                          core::CodecState(seed)}).first;
    }
    return it->second;
  }

  std::vector<uint8_t> encode(const std::string& tag, size_t index, const at::Tensor& flat,
                              const at::Tensor& original) {
    Slot& s = slot(tag, index, flat.numel());
    core::TensorShape shape;
    for (int64_t d : original.sizes()) shape.dims.push_back(d);
    std::vector<uint8_t> out;
    const float* data = flat.data_ptr<float>();
    const size_t n = static_cast<size_t>(flat.numel());
    if (s.error_feedback) {
      s.ef.encode(data, n, shape, out);
    } else {
      s.ef.pipeline().encode(data, n, shape, s.state, out);
    }
    return out;
  }

  struct Slot {
    core::ErrorFeedback ef;
    bool error_feedback;
    core::CodecState state;
  };

  core::JobConfig config_;
  std::optional<core::SitePolicy> policy_;
  transport::Gateway gateway_;
  std::vector<double> weights_;
  std::chrono::milliseconds timeout_;
  std::map<std::string, uint64_t> rounds_;
  std::set<std::string> checked_;
  std::map<std::pair<std::string, size_t>, Slot> compressors_;
  std::vector<std::string> missing_;
};

Site::Site(const std::string& config_path, const std::string& site, const std::string& policy_path)
    : impl_(std::make_unique<Impl>(config_path, site, policy_path)) {}
Site::~Site() = default;

const std::string& Site::name() const { return impl_->gateway_.options().site; }
size_t Site::index() const { return impl_->gateway_.siteIndex(); }
const std::vector<std::string>& Site::lastMissing() const { return impl_->missing_; }

void Site::averageAcrossSites(std::vector<at::Tensor>& tensors, const std::string& tag) {
  impl_->checkSame(tag, tensors);
  std::vector<at::Tensor> flats;
  std::vector<std::vector<uint8_t>> parts;
  for (size_t i = 0; i < tensors.size(); ++i) {
    flats.push_back(flatCpu(tensors[i]));
    parts.push_back(impl_->encode(tag, i, flats.back(), tensors[i]));
  }
  auto all = impl_->exchange(tag, pack(parts), core::MessageKind::kModelUpdate);
  double total = 0;
  for (size_t s = 0; s < all.size(); ++s) {
    if (all[s]) total += impl_->weights_[s];
  }
  std::vector<at::Tensor> means;
  for (const at::Tensor& f : flats) means.push_back(at::zeros_like(f));
  // Fixed site order: every site computes the same bits.
  for (size_t s = 0; s < all.size(); ++s) {
    if (!all[s]) continue;
    const auto unpacked = unpack(*all[s], tensors.size(), impl_->config_.sites[s].name);
    const float w = static_cast<float>(impl_->weights_[s] / total);
    for (size_t i = 0; i < tensors.size(); ++i) {
      core::decodeAccumulate(unpacked[i].first, unpacked[i].second, means[i].data_ptr<float>(),
                             static_cast<size_t>(means[i].numel()), w);
    }
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensors[i].detach().copy_(means[i].view(tensors[i].sizes()).to(tensors[i].device()));
  }
}

void Site::adoptFromFirstSite(std::vector<at::Tensor>& tensors, const std::string& tag) {
  impl_->checkSame(tag, tensors);
  std::vector<std::vector<uint8_t>> parts;
  for (const at::Tensor& t : tensors) {
    const at::Tensor f = flatCpu(t);
    const uint8_t* p = reinterpret_cast<const uint8_t*>(f.data_ptr<float>());
    parts.emplace_back(p, p + f.numel() * 4);
  }
  auto all = impl_->exchange(tag, pack(parts), core::MessageKind::kModelState);
  if (!all[0]) fail<TimeoutError>("strait::torch: site 0 did not send its tensors for '", tag, "'");
  const auto unpacked = unpack(*all[0], tensors.size(), impl_->config_.sites[0].name);
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (unpacked[i].second != size_t(tensors[i].numel()) * 4) {
      fail<ProtocolError>("site 0 sent ", unpacked[i].second, " bytes for tensor ", i, " of '", tag, "'");
    }
    at::Tensor src = at::empty({tensors[i].numel()}, at::kFloat);
    std::memcpy(src.data_ptr<float>(), unpacked[i].first, unpacked[i].second);
    tensors[i].detach().copy_(src.view(tensors[i].sizes()).to(tensors[i].device()));
  }
}

DiLoCo::DiLoCo(Site& site, std::vector<at::Tensor> params, DiLoCoOptions options)
    : site_(site), params_(std::move(params)), opt_(options) {
  if (opt_.sync_every < 1) fail<InvalidArgument>("DiLoCo: sync_every = ", opt_.sync_every, ": must be >= 1");
  if (!(opt_.outer_lr > 0)) fail<InvalidArgument>("DiLoCo: outer_lr = ", opt_.outer_lr, ": must be > 0");
  if (!(opt_.outer_momentum >= 0 && opt_.outer_momentum < 1)) {
    fail<InvalidArgument>("DiLoCo: outer_momentum = ", opt_.outer_momentum, ": must be in [0, 1)");
  }
  if (opt_.fragments < 1 || opt_.sync_every % opt_.fragments != 0) {
    fail<InvalidArgument>("DiLoCo: fragments = ", opt_.fragments, ": must be a divisor of sync_every (",
                          opt_.sync_every, ")");
  }
  if (size_t(opt_.fragments) > params_.size()) {
    fail<InvalidArgument>("DiLoCo: fragments = ", opt_.fragments, ", but there are only ", params_.size(),
                          " parameter tensors");
  }
  // The Python API's split (strait.diloco.split_fragments): largest tensor
  // first, to the lightest fragment (then the one with fewer tensors, then
  // the lower index); each fragment in parameter order.
  std::vector<size_t> order(params_.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return params_[a].numel() > params_[b].numel(); });
  fragments_.assign(opt_.fragments, {});
  std::vector<int64_t> load(opt_.fragments, 0);
  for (size_t i : order) {
    size_t best = 0;
    for (size_t f = 1; f < fragments_.size(); ++f) {
      if (std::make_pair(load[f], fragments_[f].size()) < std::make_pair(load[best], fragments_[best].size())) {
        best = f;
      }
    }
    fragments_[best].push_back(i);
    load[best] += params_[i].numel();
  }
  for (auto& g : fragments_) std::sort(g.begin(), g.end());
  site_.adoptFromFirstSite(params_, "diloco.init");
  for (const at::Tensor& p : params_) {
    global_.push_back(p.detach().to(at::kCPU, at::kFloat).clone());
    momentum_.push_back(at::zeros_like(global_.back()));
  }
}

void DiLoCo::step() {
  if (++steps_ % (opt_.sync_every / opt_.fragments) == 0) sync();
}

void DiLoCo::sync() {
  at::NoGradGuard no_grad;
  const std::vector<size_t>& members = fragments_[syncs_ % fragments_.size()];
  std::vector<at::Tensor> outer;
  for (size_t i : members) outer.push_back(global_[i] - params_[i].detach().to(at::kCPU, at::kFloat));
  // Each fragment its own tag: its own compressor slots and shape check.
  site_.averageAcrossSites(outer, fragments_.size() == 1 ? "diloco"
                                                         : "diloco.f" + std::to_string(syncs_ % fragments_.size()));
  for (size_t k = 0; k < members.size(); ++k) {
    const size_t i = members[k];
    momentum_[i].mul_(opt_.outer_momentum).add_(outer[k]);
    const at::Tensor update = opt_.nesterov ? outer[k].add(momentum_[i], opt_.outer_momentum) : momentum_[i];
    global_[i].sub_(update, opt_.outer_lr);
    params_[i].detach().copy_(global_[i].to(params_[i].device(), params_[i].scalar_type()));
  }
  ++syncs_;
}

void DiLoCo::flush() {
  if (fragments_.size() == 1) return;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    params_[i].detach().copy_(global_[i].to(params_[i].device(), params_[i].scalar_type()));
  }
}

}  // namespace strait::torch
