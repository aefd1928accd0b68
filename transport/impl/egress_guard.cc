#include "transport/impl/egress_guard.h"

#include <algorithm>
#include <cstdio>

#include "core/codec/codec.h"
#include "core/error.h"
#include "transport/checksum.h"
#include "transport/privacy.h"

namespace strait::transport {

using core::MessageKind;

namespace {

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

constexpr size_t kEveryPeer = size_t(-1);

}  // namespace

EgressGuard::EgressGuard(const GatewayOptions& options, size_t self, Log log)
    : opt_(options), self_(self), log_(std::move(log)) {
  if (!opt_.audit_log.empty()) {
    audit_ = std::make_unique<AuditLog>(opt_.audit_log, opt_.site, opt_.sites[self_].jurisdiction, opt_.signing_key);
    if (opt_.privacy.enabled && audit_->epsilonRecorded() > 0) {
      // Continue the budget where the site's previous runs left it: the
      // fewest releases that account for the largest spend recorded.
      const auto& pr = opt_.privacy;
      const double recorded = audit_->epsilonRecorded();
      uint64_t k = 1;
      while (gaussianEpsilon(pr.noise_multiplier, k, pr.delta) < recorded * (1 - 1e-9) && k < (uint64_t{1} << 32)) {
        k = k < 1024 ? k + 1 : k + k / 64;
      }
      releases_ = k;
      spent_ = gaussianEpsilon(pr.noise_multiplier, k, pr.delta);
      log_("privacy: the audit log records epsilon " + fmt(recorded) + " already spent; continuing from " +
           std::to_string(k) + " releases (epsilon " + fmt(spent_) + " of the budget " + fmt(pr.epsilon_budget) + ")");
    }
  } else if (opt_.privacy.enabled) {
    log_("privacy: no audit log, so the epsilon spent is counted from zero in every run of this gateway");
  }
}

void EgressGuard::check(uint64_t round, const std::string& tag, const std::vector<uint8_t>& payload,
                        MessageKind kind) {
  const bool allowed = std::find(opt_.egress_allow.begin(), opt_.egress_allow.end(), kind) != opt_.egress_allow.end();
  const std::string source = opt_.policy_source.empty() ? "" : " (" + opt_.policy_source + ")";
  std::string why;
  if (!allowed) {
    std::string list;
    for (MessageKind k : opt_.egress_allow) list += (list.empty() ? "" : ", ") + std::string(core::messageKindName(k));
    why = "egress policy" + source + " of site '" + opt_.site + "' does not allow '" + core::messageKindName(kind) +
          "' to leave; allowed: " + (list.empty() ? "nothing" : list);
  } else if (kind == MessageKind::kModelUpdate && opt_.privacy.enabled && !payload.empty()) {
    // (An empty update releases nothing: a site that has just joined takes
    // part in a round so, with its budget spent or not.)
    std::lock_guard<std::mutex> lock(mu_);
    if (privatized_ == 0) {
      why = "privacy policy" + source + " of site '" + opt_.site +
            "': a model update must be privatized (clipped and noised) before it leaves";
    } else {
      --privatized_;
    }
  }
  if (why.empty()) return;
  log_("refused round " + std::to_string(round) + " '" + tag + "': " + why);
  if (audit_) {
    AuditEvent e;
    e.event = "refused";
    e.round = round;
    e.tag = tag;
    e.peer = "*";
    e.kind = core::messageKindName(kind);
    e.bytes = payload.size();
    e.digest = digestHex(payload.data(), payload.size());
    e.reason = why;
    audit_->append(e);
  }
  fail<PolicyViolation>(why);
}

void EgressGuard::recordOut(uint64_t round, const std::string& tag, const uint8_t* data, size_t size,
                            MessageKind kind) {
  record("out", round, tag, data, size, kind, kEveryPeer);
}

void EgressGuard::recordIn(uint64_t round, const std::string& tag, const uint8_t* data, size_t size,
                           MessageKind kind, size_t peer) {
  record("in", round, tag, data, size, kind, peer);
}

void EgressGuard::record(const char* event, uint64_t round, const std::string& tag, const uint8_t* data, size_t size,
                         MessageKind kind, size_t only) {
  if (!audit_) return;
  AuditEvent e;
  e.event = event;
  e.round = round;
  e.tag = tag;
  e.kind = core::messageKindName(kind);
  e.bytes = size;
  e.digest = digestHex(data, size);
  try {
    const core::PayloadInfo info = core::inspectPayload(data, size);
    e.codec = info.structure + "/" + info.values;
  } catch (const std::exception&) {
    e.codec = "";  // not a codec payload (a framed message, a description)
  }
  if (opt_.privacy.enabled) {
    std::lock_guard<std::mutex> lock(mu_);
    e.epsilon = spent_;
    e.delta = opt_.privacy.delta;
  }
  for (size_t i = 0; i < opt_.sites.size(); ++i) {
    if (i == self_ || (only != kEveryPeer && only != i)) continue;
    e.peer = opt_.sites[i].name;
    e.peer_jurisdiction = opt_.sites[i].jurisdiction;
    audit_->append(e);
  }
}

double EgressGuard::privatize(float* x, size_t n, double norm) {
  std::lock_guard<std::mutex> lock(mu_);
  const double next = nextRelease();
  clipAndNoise(x, n, opt_.privacy.clip_norm, opt_.privacy.noise_multiplier, norm);
  ++releases_;
  ++privatized_;
  spent_ = next;
  return spent_;
}

double EgressGuard::chargeRelease() {
  std::lock_guard<std::mutex> lock(mu_);
  const double next = nextRelease();
  if (audit_) {
    // On disk before it counts, as every record is: a restarted gateway
    // continues from the largest epsilon its log records.
    AuditEvent e;
    e.event = "charged";
    e.peer = "*";
    e.kind = core::messageKindName(MessageKind::kModelUpdate);
    e.epsilon = next;
    e.delta = opt_.privacy.delta;
    e.reason = "a release of the site none of whose share leaves through this gateway";
    audit_->append(e);
  }
  spent_ = next;
  ++releases_;
  return spent_;
}

// The epsilon after one more release; PolicyViolation past the budget,
// InvalidArgument without a privacy policy. Under mu_.
double EgressGuard::nextRelease() {
  if (!opt_.privacy.enabled) {
    fail<InvalidArgument>("privatize: site '", opt_.site, "' has no privacy section in its policy");
  }
  const auto& pr = opt_.privacy;
  const double next = gaussianEpsilon(pr.noise_multiplier, releases_ + 1, pr.delta);
  if (next > pr.epsilon_budget) {
    const std::string why = "privacy budget of site '" + opt_.site + "' exhausted: release " +
                            std::to_string(releases_ + 1) + " would bring epsilon to " + std::to_string(next) +
                            " > budget " + std::to_string(pr.epsilon_budget) + " (delta " + std::to_string(pr.delta) +
                            ", sigma " + std::to_string(pr.noise_multiplier) + "); spent so far: " +
                            std::to_string(spent_);
    log_(why);
    fail<PolicyViolation>(why);
  }
  return next;
}

double EgressGuard::spent() const {
  std::lock_guard<std::mutex> lock(mu_);
  return spent_;
}

uint64_t EgressGuard::releases() const {
  std::lock_guard<std::mutex> lock(mu_);
  return releases_;
}

}  // namespace strait::transport
