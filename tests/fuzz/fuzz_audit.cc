// An audit log handed to an auditor may be anything: verify must report a
// problem or a summary, never crash. The signing key is derived from a fixed
// seed (fuzz_audit_seed writes validly signed logs with it for the corpus),
// so mutations of real records get past the signature check now and then
// and exercise the sequence, chain and summary code too.
#include <sodium.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "core/error.h"
#include "transport/audit.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<uint8_t> key = [] {
    if (sodium_init() < 0) __builtin_trap();
    std::vector<uint8_t> seed(crypto_sign_SEEDBYTES, 7), pk(crypto_sign_PUBLICKEYBYTES), sk(crypto_sign_SECRETKEYBYTES);
    crypto_sign_seed_keypair(pk.data(), sk.data(), seed.data());
    return pk;
  }();
  static const std::string path = "/tmp/strait-fuzz-audit-" + std::to_string(::getpid()) + ".jsonl";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  try {
    strait::transport::verifyAuditLog(path, key);
  } catch (const strait::Error&) {
  }
  return 0;
}
