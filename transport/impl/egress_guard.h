#pragma once
// A site's egress guard (transport-internal): the one owner of what may leave
// the site and of the record of what did. It holds the egress policy check,
// the signed audit log and the differential-privacy counters (releases,
// privatized updates not yet sent, epsilon spent) that the gateway used to
// keep beside its sockets. No sockets: the gateway asks it before a payload is
// handed to the I/O thread and tells it what arrived before a result is
// delivered.
//
// Thread-safe: exchange() threads call check() and recordOut(), the I/O
// thread calls recordIn(), any thread privatize() and the getters.
// Throws PolicyViolation (check, privatize) and the AuditLog's errors (a full
// disk) from the record calls.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "transport/audit.h"
#include "transport/gateway.h"

namespace strait::transport {

class EgressGuard {
 public:
  using Log = std::function<void(const std::string&)>;

  // Opens the audit log named by the options (if any) and continues the
  // privacy budget where the log says earlier runs left it.
  EgressGuard(const GatewayOptions& options, size_t self, Log log);

  // May `payload` of `kind` leave for (round, tag)? Returns, or records the
  // refusal in the audit log and throws PolicyViolation naming the policy.
  // A model update under a privacy policy uses up one privatize() call.
  void check(uint64_t round, const std::string& tag, const std::vector<uint8_t>& payload, core::MessageKind kind);

  // Audit records, written before the payload leaves (one per peer) or
  // before a received one is delivered (for `peer`, a site index). No-ops
  // without an audit log.
  void recordOut(uint64_t round, const std::string& tag, const uint8_t* data, size_t size, core::MessageKind kind);
  void recordIn(uint64_t round, const std::string& tag, const uint8_t* data, size_t size, core::MessageKind kind,
                size_t peer);
  bool audited() const { return audit_ != nullptr; }

  // Clips and noises x[0, n) (the site's privacy policy) and spends one
  // release of the budget: the new epsilon. Throws PolicyViolation when the
  // budget would be exceeded, InvalidArgument without a privacy policy.
  // `norm` >= 0: the L2 norm of the whole update x is a share of (Gateway::privatize).
  double privatize(float* x, size_t n, double norm = -1);
  // A release of the site none of whose share leaves here (a sharded
  // site's group without a piece of it): spends the budget as privatize()
  // does, and lets no model update out.
  double chargeRelease();
  double spent() const;
  uint64_t releases() const;

  std::string auditHead() const { return audit_ ? audit_->head() : ""; }
  uint64_t auditRecords() const { return audit_ ? audit_->records() : 0; }

 private:
  double nextRelease();
  void record(const char* event, uint64_t round, const std::string& tag, const uint8_t* data, size_t size,
              core::MessageKind kind, size_t only);

  const GatewayOptions& opt_;
  size_t self_;
  Log log_;
  std::unique_ptr<AuditLog> audit_;  // thread-safe itself
  mutable std::mutex mu_;
  uint64_t releases_ = 0;    // privatize() and chargeRelease() calls
  uint64_t privatized_ = 0;  // privatized updates not yet sent
  double spent_ = 0;         // epsilon after releases_
};

}  // namespace strait::transport
