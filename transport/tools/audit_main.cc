// strait_audit: checks a site's audit log offline (`./strait audit ...`).
//
//   strait_audit verify LOG --key SITE.sign.pub [--key OLD.sign.pub ...] [--head HEX] [--json]
//
// Exit status 0 and a summary when every record verifies; 1 and the first
// edited, dropped, inserted or reordered record otherwise; 2 for bad usage.

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/json.h"
#include "transport/audit.h"

namespace {

int usage() {
  std::fprintf(stderr, "usage: ./strait audit verify LOG --key SITE.sign.pub [--key MORE.pub] [--head HEX] [--json]\n");
  return 2;
}

std::string mb(uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f MB", double(b) / 1e6);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  namespace t = strait::transport;
  if (argc < 3 || std::strcmp(argv[1], "verify") != 0) return usage();
  const std::string log = argv[2];
  std::vector<std::string> keys;
  std::string head;
  bool json = false;
  for (int i = 3; i < argc; ++i) {
    if (std::strcmp(argv[i], "--key") == 0 && i + 1 < argc) {
      keys.push_back(argv[++i]);
    } else if (std::strcmp(argv[i], "--head") == 0 && i + 1 < argc) {
      head = argv[++i];
    } else if (std::strcmp(argv[i], "--json") == 0) {
      json = true;
    } else {
      return usage();
    }
  }
  if (keys.empty()) return usage();
  try {
    // Several keys: a log that spans a key rotation (each record must verify with one of them).
    std::vector<std::vector<uint8_t>> pubs;
    for (const std::string& k : keys) pubs.push_back(t::readSigningPublicKey(k));
    const t::AuditVerdict best = t::verifyAuditLog(log, pubs, head);
    const t::AuditSummary& s = best.summary;
    if (json) {
      std::printf("{\"ok\": %s, \"problem\": %s, \"line\": %llu, \"records\": %llu, \"head\": %s, \"bytes_out\": {",
                  best.ok ? "true" : "false", strait::jsonString(best.problem).c_str(), (unsigned long long)best.line,
                  (unsigned long long)s.records, strait::jsonString(s.head).c_str());
      bool comma = false;
      for (const auto& [key, bytes] : s.bytes_out) {
        std::printf("%s%s: %llu", comma ? ", " : "", strait::jsonString(key.first + "/" + key.second).c_str(),
                    (unsigned long long)bytes);
        comma = true;
      }
      std::printf("}, \"refused\": %llu, \"epsilon\": %g}\n", (unsigned long long)s.refused, s.epsilon);
      return best.ok ? 0 : 1;
    }
    if (!best.ok) {
      std::printf("%s: FAILED at %s\n", log.c_str(), best.problem.c_str());
      std::printf("(%llu records verified before it)\n", (unsigned long long)s.records);
      return 1;
    }
    std::printf("%s: OK, %llu records of site '%s' (%s), %s .. %s\n", log.c_str(), (unsigned long long)s.records,
                s.site.c_str(), s.jurisdiction.c_str(), s.first_time.c_str(), s.last_time.c_str());
    for (const auto& [key, bytes] : s.bytes_out) {
      std::printf("  out to %-16s %-13s %6llu messages %s\n", key.first.c_str(), key.second.c_str(),
                  (unsigned long long)s.messages_out.at(key), mb(bytes).c_str());
    }
    for (const auto& [key, bytes] : s.bytes_in) {
      std::printf("  in from %-15s %-13s %6llu messages %s\n", key.first.c_str(), key.second.c_str(),
                  (unsigned long long)s.messages_in.at(key), mb(bytes).c_str());
    }
    if (s.refused) std::printf("  refused by the egress or privacy policy: %llu\n", (unsigned long long)s.refused);
    if (s.epsilon > 0) std::printf("  differential privacy spent: epsilon %.4g at delta %.3g\n", s.epsilon, s.delta);
    std::printf("  head %s (keep it: a log cut after this record fails verify --head)\n", s.head.c_str());
    return 0;
  } catch (const strait::Error& e) {
    std::fprintf(stderr, "strait audit: %s\n", e.what());
    return 2;
  }
}
