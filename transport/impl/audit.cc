// The signed, hash-chained audit log and its verifier.

#include "transport/audit.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/json.h"
#include "transport/impl/key_file.h"

namespace strait::transport {

namespace {

const std::string kZeroHash(64, '0');
const std::string kSigField = ",\"sig\":\"";

void initSodium() {
  if (sodium_init() < 0) fail<Error>("libsodium failed to initialise");
}

std::string toHex(const uint8_t* p, size_t n) {
  std::string s(n * 2 + 1, '\0');
  sodium_bin2hex(s.data(), s.size(), p, n);
  s.pop_back();
  return s;
}

// Lowercase hex only, as toHex writes it: a log has exactly one encoding of
// each record, so an edited (say, upper-cased) signature is an edit.
bool fromHex(const std::string& hex, std::vector<uint8_t>& out, size_t expect) {
  out.assign(expect, 0);
  size_t len = 0;
  if (hex.size() != expect * 2) return false;
  for (char c : hex) {
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  }
  return sodium_hex2bin(out.data(), out.size(), hex.data(), hex.size(), nullptr, &len, nullptr) == 0 &&
         len == expect;
}

std::string hashHex(const std::string& line) {
  uint8_t h[32];
  crypto_generichash(h, sizeof h, reinterpret_cast<const uint8_t*>(line.data()), line.size(), nullptr, 0);
  return toHex(h, sizeof h);
}

std::string jsonNumber(double v) {
  if (v < 0 || !std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string nowIso() {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[96];
  std::snprintf(buf, sizeof buf, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                tm.tm_hour, tm.tm_min, tm.tm_sec, int(ms));
  return buf;
}

void writeAll(int fd, const std::string& s, const std::string& path) {
  size_t done = 0;
  while (done < s.size()) {
    const ssize_t n = ::write(fd, s.data() + done, s.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail<Error>("audit log '", path, "': cannot write: ", std::strerror(errno));
    done += size_t(n);
  }
}

// A flat JSON object of string, number and null values: what our records
// are. Returns false on anything else.
bool parseFlat(const std::string& s, std::map<std::string, std::string>& out) {
  size_t i = 0;
  auto ws = [&] {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t')) ++i;
  };
  auto str = [&](std::string& v) {
    if (i >= s.size() || s[i] != '"') return false;
    ++i;
    v.clear();
    while (i < s.size() && s[i] != '"') {
      if (s[i] == '\\') {
        if (++i >= s.size()) return false;
        if (s[i] == 'u') {
          if (i + 4 >= s.size()) return false;
          v += char(std::strtol(s.substr(i + 1, 4).c_str(), nullptr, 16));
          i += 5;
          continue;
        }
        v += s[i++];
        continue;
      }
      v += s[i++];
    }
    if (i >= s.size()) return false;
    ++i;
    return true;
  };
  ws();
  if (i >= s.size() || s[i++] != '{') return false;
  for (;;) {
    ws();
    std::string key, value;
    if (!str(key)) return false;
    ws();
    if (i >= s.size() || s[i++] != ':') return false;
    ws();
    if (i < s.size() && s[i] == '"') {
      if (!str(value)) return false;
    } else {
      const size_t start = i;
      while (i < s.size() && s[i] != ',' && s[i] != '}') ++i;
      value = s.substr(start, i - start);
      if (value.empty()) return false;
    }
    out[key] = value;
    ws();
    if (i >= s.size()) return false;
    if (s[i] == ',') {
      ++i;
      continue;
    }
    if (s[i] == '}') return i + 1 == s.size();
    return false;
  }
}

uint64_t toU64(const std::string& v, bool* ok) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
  *ok = !v.empty() && end && *end == '\0' && errno == 0 && v[0] != '-';
  return x;
}

}  // namespace

SigningKeys generateSigningKeys() {
  initSodium();
  uint8_t pk[crypto_sign_PUBLICKEYBYTES], sk[crypto_sign_SECRETKEYBYTES];
  crypto_sign_keypair(pk, sk);
  SigningKeys k{toHex(pk, sizeof pk), toHex(sk, sizeof sk)};
  sodium_memzero(sk, sizeof sk);
  return k;
}

void writeSigningKeys(const SigningKeys& keys, const std::string& dir, const std::string& site) {
  ::mkdir(dir.c_str(), 0755);
  writeKeyLine(dir + "/" + site + ".sign", keys.secret_key, 0600);
  writeKeyLine(dir + "/" + site + ".sign.pub", keys.public_key, 0644);
}

namespace {

// An Ed25519 key file: one line of 2 * bytes hex characters.
std::vector<uint8_t> readHexKey(const std::string& path, size_t bytes, const char* what, const char* file) {
  std::vector<uint8_t> k;
  if (!fromHex(readKeyLine(path), k, bytes)) {
    fail<ConfigError>("key file '", path, "' does not hold an Ed25519 ", what, " key (", 2 * bytes,
                      " hex characters); ./strait keys generate SITE writes ", file);
  }
  return k;
}

}  // namespace

std::vector<uint8_t> readSigningSecretKey(const std::string& path) {
  return readHexKey(path, crypto_sign_SECRETKEYBYTES, "secret", "SITE.sign");
}

std::vector<uint8_t> readSigningPublicKey(const std::string& path) {
  return readHexKey(path, crypto_sign_PUBLICKEYBYTES, "public", "SITE.sign.pub");
}

std::string digestHex(const uint8_t* data, size_t size) {
  initSodium();
  uint8_t h[32];
  crypto_generichash(h, sizeof h, data, size, nullptr, 0);
  return toHex(h, sizeof h);
}

// ----------------------------------------------------------------- writer ---

AuditLog::AuditLog(std::string path, std::string site, std::string jurisdiction, std::vector<uint8_t> secret_key)
    : path_(std::move(path)), site_(std::move(site)), jurisdiction_(std::move(jurisdiction)),
      secret_(std::move(secret_key)) {
  initSodium();
  if (secret_.size() != crypto_sign_SECRETKEYBYTES) {
    fail<InvalidArgument>("audit log '", path_, "': the signing key must be an Ed25519 secret key");
  }
  const size_t slash = path_.rfind('/');
  if (slash != std::string::npos && slash > 0) ::mkdir(path_.substr(0, slash).c_str(), 0750);
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
  if (fd_ < 0) fail<Error>("audit log '", path_, "': cannot open: ", std::strerror(errno));
  // Continue the chain: the last complete line gives seq and prev.
  std::string text;
  {
    std::ifstream in(path_, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  uint64_t torn = 0;
  if (!text.empty() && text.back() != '\n') {
    const size_t cut = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
    torn = text.size() - cut;
    text.resize(cut);
    if (::ftruncate(fd_, off_t(cut)) != 0) {
      ::close(fd_);
      fail<Error>("audit log '", path_, "': cannot cut a torn last line: ", std::strerror(errno));
    }
  }
  // The privacy already spent, as recorded (each record carries the spend
  // so far): a restart must not hand the site a fresh budget.
  for (size_t at = text.find("\"epsilon\":"); at != std::string::npos; at = text.find("\"epsilon\":", at + 1)) {
    const double e = std::strtod(text.c_str() + at + 10, nullptr);
    if (std::isfinite(e) && e > epsilon_recorded_) epsilon_recorded_ = e;
  }
  prev_ = kZeroHash;
  if (!text.empty()) {
    const size_t start = text.rfind('\n', text.size() - 2);
    const std::string last = text.substr(start == std::string::npos ? 0 : start + 1, std::string::npos);
    const std::string line = last.substr(0, last.size() - 1);
    std::map<std::string, std::string> f;
    const size_t sig = line.rfind(kSigField);
    bool ok = sig != std::string::npos && parseFlat(line.substr(0, sig) + "}", f) && f.count("seq");
    if (ok) seq_ = toU64(f["seq"], &ok) + 1;
    if (!ok) {
      ::close(fd_);
      fail<Error>("audit log '", path_, "': its last line is not a strait audit record; refusing to append to it");
    }
    prev_ = hashHex(line);
  }
  if (::lseek(fd_, 0, SEEK_END) < 0) fail<Error>("audit log '", path_, "': ", std::strerror(errno));
  uint8_t pk[crypto_sign_PUBLICKEYBYTES];
  crypto_sign_ed25519_sk_to_pk(pk, secret_.data());
  write("\"event\":\"open\",\"jurisdiction\":" + jsonString(jurisdiction_) + ",\"key\":\"" + toHex(pk, sizeof pk) +
        "\"");
  if (torn) write("\"event\":\"recovered\",\"torn_bytes\":" + std::to_string(torn));
}

AuditLog::~AuditLog() {
  if (fd_ >= 0) ::close(fd_);
  sodium_memzero(secret_.data(), secret_.size());
}

void AuditLog::write(const std::string& body) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string signed_part = "{\"seq\":" + std::to_string(seq_) + ",\"time\":\"" + nowIso() +
                                  "\",\"site\":" + jsonString(site_) + "," + body + ",\"prev\":\"" + prev_ + "\"";
  uint8_t sig[crypto_sign_BYTES];
  crypto_sign_detached(sig, nullptr, reinterpret_cast<const uint8_t*>(signed_part.data()), signed_part.size(),
                       secret_.data());
  const std::string line = signed_part + kSigField + toHex(sig, sizeof sig) + "\"}";
  const off_t before = ::lseek(fd_, 0, SEEK_END);
  try {
    writeAll(fd_, line + "\n", path_);
    if (::fdatasync(fd_) != 0) fail<Error>("audit log '", path_, "': cannot flush: ", std::strerror(errno));
  } catch (...) {
    // Leave no partial record behind: the next append (or the next start) must chain cleanly.
    if (before >= 0 && ::ftruncate(fd_, before) != 0) {
      // Nothing more to do: a restart cuts the torn tail and notes it.
    }
    throw;
  }
  prev_ = hashHex(line);
  ++seq_;
}

void AuditLog::append(const AuditEvent& e) {
  std::string body = "\"event\":" + jsonString(e.event) + ",\"round\":" + std::to_string(e.round) +
                     ",\"tag\":" + jsonString(e.tag) + ",\"peer\":" + jsonString(e.peer) +
                     ",\"peer_jurisdiction\":" + jsonString(e.peer_jurisdiction) + ",\"kind\":" + jsonString(e.kind) +
                     ",\"bytes\":" + std::to_string(e.bytes) + ",\"digest\":" + jsonString(e.digest) +
                     ",\"codec\":" + jsonString(e.codec) + ",\"epsilon\":" + jsonNumber(e.epsilon) +
                     ",\"delta\":" + jsonNumber(e.delta);
  if (!e.reason.empty()) body += ",\"reason\":" + jsonString(e.reason);
  write(body);
}

uint64_t AuditLog::records() const {
  std::lock_guard<std::mutex> lock(mu_);
  return seq_;
}

std::string AuditLog::head() const {
  std::lock_guard<std::mutex> lock(mu_);
  return prev_;
}

// --------------------------------------------------------------- verifier ---

AuditVerdict verifyAuditLog(const std::string& path, const std::vector<std::vector<uint8_t>>& public_keys,
                            const std::string& expected_head) {
  initSodium();
  AuditVerdict v;
  if (public_keys.empty()) fail<InvalidArgument>("verify: no public key");
  for (const auto& k : public_keys) {
    if (k.size() != crypto_sign_PUBLICKEYBYTES) fail<InvalidArgument>("verify: a public key must be 32 bytes (Ed25519)");
  }
  std::string want_head = expected_head;
  for (char& c : want_head) c = char(std::tolower(static_cast<unsigned char>(c)));
  if (!want_head.empty()) {
    std::vector<uint8_t> ignored;
    if (!fromHex(want_head, ignored, 32)) {
      fail<InvalidArgument>("verify: the expected head '", expected_head,
                            "' is not 64 hex characters (a BLAKE2b-256 digest, as verify prints it)");
    }
  }
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) fail<Error>("cannot read audit log '", path, "': ", std::strerror(errno));
  if (!S_ISREG(st.st_mode)) fail<Error>("audit log '", path, "' is not a regular file (a directory?): give the log itself");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail<Error>("cannot read audit log '", path, "': ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail<Error>("cannot read audit log '", path, "': ", std::strerror(errno));
  const std::string text = ss.str();
  AuditSummary& s = v.summary;
  std::string prev = kZeroHash;
  uint64_t expect = 0;
  uint64_t line_no = 0;
  size_t pos = 0;
  auto bad = [&](const std::string& what) {
    v.ok = false;
    v.line = line_no;
    v.problem = "line " + std::to_string(line_no) + ": " + what;
    return v;
  };
  while (pos < text.size()) {
    ++line_no;
    const size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) return bad("incomplete last line (a torn write?): the log was cut or is still open");
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t sig_at = line.rfind(kSigField);
    if (sig_at == std::string::npos || line.size() != sig_at + kSigField.size() + 2 * crypto_sign_BYTES + 2 ||
        line.compare(line.size() - 2, 2, "\"}") != 0) {
      return bad("not a signed audit record (inserted or edited)");
    }
    const std::string signed_part = line.substr(0, sig_at);
    std::vector<uint8_t> sig;
    bool verified = false;
    if (fromHex(line.substr(sig_at + kSigField.size(), 2 * crypto_sign_BYTES), sig, crypto_sign_BYTES)) {
      for (const auto& key : public_keys) {
        verified = verified || crypto_sign_verify_detached(sig.data(), reinterpret_cast<const uint8_t*>(signed_part.data()),
                                                           signed_part.size(), key.data()) == 0;
      }
    }
    if (!verified) {
      return bad(std::string("the signature does not verify with ") + (public_keys.size() > 1 ? "any of these keys" : "this key") +
                 ": the record was edited, or inserted by someone without the site's signing key");
    }
    std::map<std::string, std::string> f;
    if (!parseFlat(signed_part + "}", f)) return bad("a signed record that is not valid JSON");
    bool ok = false;
    const uint64_t seq = toU64(f["seq"], &ok);
    if (!ok) return bad("a record without a valid seq");
    if (seq > expect) {
      return bad("record " + std::to_string(seq) + " comes after " +
                 (expect == 0 ? std::string("the start") : "record " + std::to_string(expect - 1)) + ": record" +
                 (seq - expect > 1 ? "s " + std::to_string(expect) + ".." + std::to_string(seq - 1) + " are"
                                   : " " + std::to_string(expect) + " is") +
                 " missing here (dropped, or moved elsewhere)");
    }
    if (seq < expect) {
      return bad("record " + std::to_string(seq) + " where record " + std::to_string(expect) +
                 " belongs: records were reordered or one was inserted again");
    }
    if (f["prev"] != prev) {
      return bad("record " + std::to_string(seq) + " does not chain to the line before it: a record was dropped, "
                 "inserted or reordered");
    }
    const std::string& event = f["event"];
    if (seq == 0 && event != "open") {
      return bad("record 0 is a '" + event + "' record: every audit log starts with its 'open' record");
    }
    prev = hashHex(line);
    ++expect;
    // Summary.
    if (s.records == 0) s.first_time = f["time"];
    s.last_time = f["time"];
    if (event == "open") {
      s.site = f["site"];
      s.jurisdiction = f["jurisdiction"];
    } else if (event == "out" || event == "in") {
      bool okb = false;
      const uint64_t bytes = toU64(f["bytes"], &okb);
      const auto key = std::make_pair(f["peer"], f["kind"]);
      (event == "out" ? s.bytes_out : s.bytes_in)[key] += bytes;
      (event == "out" ? s.messages_out : s.messages_in)[key] += 1;
      if (f["epsilon"] != "null") s.epsilon = std::max(s.epsilon, std::atof(f["epsilon"].c_str()));
      if (f["delta"] != "null") s.delta = std::max(s.delta, std::atof(f["delta"].c_str()));
    } else if (event == "refused") {
      ++s.refused;
    } else if (event == "charged" && f["epsilon"] != "null") {
      s.epsilon = std::max(s.epsilon, std::atof(f["epsilon"].c_str()));
    }
    ++s.records;
  }
  s.head = prev;
  line_no = 0;
  if (s.records == 0) {
    v.ok = false;
    v.problem = "the file is empty: not an audit log (every log starts with its 'open' record)";
    return v;
  }
  if (!want_head.empty() && want_head != prev) {
    v.ok = false;
    v.problem = "the log ends at record " + (expect ? std::to_string(expect - 1) : std::string("(none)")) +
                " with head " + prev + ", not at the expected head " + expected_head +
                ": records are missing at the end, or it is another log";
    return v;
  }
  v.ok = true;
  return v;
}

}  // namespace strait::transport
