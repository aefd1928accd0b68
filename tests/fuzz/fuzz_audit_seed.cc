// Writes a validly signed audit log (the fuzz_audit key) to argv[1]: the
// seed of fuzz_audit's corpus.
#include <sodium.h>

#include <cstdio>
#include <vector>

#include "transport/audit.h"

int main(int argc, char** argv) {
  if (argc != 2 || sodium_init() < 0) return 2;
  std::vector<uint8_t> seed(crypto_sign_SEEDBYTES, 7), pk(crypto_sign_PUBLICKEYBYTES), sk(crypto_sign_SECRETKEYBYTES);
  crypto_sign_seed_keypair(pk.data(), sk.data(), seed.data());
  std::remove(argv[1]);
  strait::transport::AuditLog log(argv[1], "hangzhou", "CN", sk);
  strait::transport::AuditEvent e;
  e.event = "out";
  e.tag = "ddp.b0";
  e.peer = "singapore";
  e.peer_jurisdiction = "SG";
  e.kind = "model_update";
  e.digest = std::string(64, 'a');
  e.codec = "topk/int8";
  for (uint64_t r = 0; r < 3; ++r) {
    e.round = r;
    e.bytes = 100 + r;
    log.append(e);
  }
  e.event = "refused";
  e.kind = "metrics";
  e.reason = "egress policy";
  e.epsilon = 1.5;
  e.delta = 1e-5;
  log.append(e);
  return 0;
}
