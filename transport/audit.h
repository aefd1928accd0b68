#pragma once
// The site's audit log: one signed, hash-chained JSON line for every message
// that leaves or enters the site, written before the message leaves (or
// before a received one is handed to the caller) and flushed to disk with
// fdatasync. An auditor verifies it offline with the site's Ed25519 public
// key: `./strait audit verify LOG --key SITE.sign.pub`.
//
// Line format (docs/SECURITY.md has the full description):
//   {"seq":N,"time":"...Z","site":"...","event":"out",...,"prev":"<hex>","sig":"<hex>"}
// `sig` is the Ed25519 signature of the line's bytes before `,"sig":`;
// `prev` is the BLAKE2b-256 of the previous line (without its newline), or
// 64 zeros for the first. `seq` counts from 0 across restarts.

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace strait::transport {

// Ed25519 keys as lowercase hex (public 64 chars, secret 128 chars).
struct SigningKeys {
  std::string public_key;
  std::string secret_key;
};
SigningKeys generateSigningKeys();
// Writes DIR/SITE.sign (secret, 0600) and DIR/SITE.sign.pub (0644); refuses to overwrite.
void writeSigningKeys(const SigningKeys& keys, const std::string& dir, const std::string& site);
// Reads a key file written by writeSigningKeys; throws ConfigError naming the file.
std::vector<uint8_t> readSigningSecretKey(const std::string& path);  // 64 bytes
std::vector<uint8_t> readSigningPublicKey(const std::string& path);  // 32 bytes

// BLAKE2b-256 of bytes, as hex: the payload digest in audit records.
std::string digestHex(const uint8_t* data, size_t size);

struct AuditEvent {
  std::string event;              // "out", "in", "refused" or "charged"
  uint64_t round = 0;
  std::string tag;
  std::string peer;               // the other site ("*" for every site)
  std::string peer_jurisdiction;
  std::string kind;               // message kind ("model_update", ...)
  uint64_t bytes = 0;
  std::string digest;             // digestHex of the payload
  std::string codec;              // e.g. "topk(ratio=0.01) -> int8", or "" when not a codec payload
  double epsilon = -1;            // privacy spent so far by this site; < 0: no DP
  double delta = -1;
  std::string reason;             // why, for "refused"
};

class AuditLog {
 public:
  // Opens (creating it and its directory if needed) and appends an "open"
  // record. A torn last line (a crash mid-write) is cut off and noted in a
  // "recovered" record. Throws Error when the file cannot be opened or written.
  AuditLog(std::string path, std::string site, std::string jurisdiction, std::vector<uint8_t> secret_key);
  ~AuditLog();
  AuditLog(const AuditLog&) = delete;
  AuditLog& operator=(const AuditLog&) = delete;

  // Appends one record; returns after it is on disk (fdatasync). Thread-safe.
  // Throws Error (e.g. a full disk): the caller must not send or deliver.
  void append(const AuditEvent& e);

  uint64_t records() const;  // records in the file, this process's included
  // The largest privacy spend (epsilon) the file held when it was opened:
  // how a restarted gateway continues its site's privacy budget. 0: none.
  double epsilonRecorded() const { return epsilon_recorded_; }
  std::string head() const;  // BLAKE2b-256 hex of the last line
  const std::string& path() const { return path_; }

 private:
  void write(const std::string& body);  // body: the fields after seq/time/site, without braces

  std::string path_, site_, jurisdiction_;
  std::vector<uint8_t> secret_;
  int fd_ = -1;
  mutable std::mutex mu_;
  uint64_t seq_ = 0;
  std::string prev_;
  double epsilon_recorded_ = 0;
};

struct AuditSummary {
  uint64_t records = 0;
  std::string site, jurisdiction, head, first_time, last_time;
  std::map<std::pair<std::string, std::string>, uint64_t> bytes_out, bytes_in;  // (peer, kind) -> bytes
  std::map<std::pair<std::string, std::string>, uint64_t> messages_out, messages_in;
  uint64_t refused = 0;
  double epsilon = 0, delta = 0;  // the largest privacy spend recorded
};

struct AuditVerdict {
  bool ok = false;
  std::string problem;  // the first problem found, naming its line and record
  uint64_t line = 0;    // 1-based line of that problem (0: none or end of file)
  AuditSummary summary;
};

// Checks every line's signature, the sequence numbers and the hash chain;
// with `expected_head`, also that the log ends there (records cut from the
// end are otherwise undetectable). A record verifies with any of
// `public_keys` (32 bytes each): a log that spans a key rotation needs the
// retired key and the new one. Throws Error only when the file cannot be read.
AuditVerdict verifyAuditLog(const std::string& path, const std::vector<std::vector<uint8_t>>& public_keys,
                            const std::string& expected_head = "");
inline AuditVerdict verifyAuditLog(const std::string& path, const std::vector<uint8_t>& public_key,
                                   const std::string& expected_head = "") {
  return verifyAuditLog(path, std::vector<std::vector<uint8_t>>{public_key}, expected_head);
}

}  // namespace strait::transport
