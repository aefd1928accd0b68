// GatewayOptions from a job config, and CurveZMQ key files.

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <zmq.h>

#include "core/error.h"
#include "transport/audit.h"
#include "transport/gateway.h"
#include "transport/impl/key_file.h"

namespace strait::transport {

namespace {

// Relative key paths are relative to the config file's folder.
std::string resolve(const std::string& path, const std::string& config_source) {
  if (path.empty() || path[0] == '/') return path;
  const size_t slash = config_source.rfind('/');
  if (config_source == "<string>" || slash == std::string::npos) return path;
  return config_source.substr(0, slash + 1) + path;
}

bool isZ85Key(const std::string& s) {
  if (s.size() != 40) return false;
  uint8_t raw[32];
  return zmq_z85_decode(raw, s.c_str()) != nullptr;
}

}  // namespace

std::string readKeyLine(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail<ConfigError>("cannot read key file '", path, "': ", std::strerror(errno));
  std::string line;
  std::getline(in, line);
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
  return line;
}

void writeKeyLine(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) {
    fail<Error>("cannot create '", path, "': ", std::strerror(errno),
                errno == EEXIST ? " (refusing to overwrite an existing key)" : "");
  }
  ::fchmod(fd, mode);  // umask must not widen or narrow it
  const std::string line = text + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == ssize_t(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) fail<Error>("cannot write '", path, "': ", std::strerror(errno));
}

std::string readKeyFile(const std::string& path) {
  const std::string line = readKeyLine(path);
  if (!isZ85Key(line)) {
    fail<ConfigError>("key file '", path, "' does not hold a CurveZMQ key (one line of 40 Z85 characters)");
  }
  return line;
}

KeyPair generateKeyPair() {
  char pub[41], sec[41];
  if (zmq_curve_keypair(pub, sec) != 0) {
    fail<Error>("cannot generate a CurveZMQ key pair: ", zmq_strerror(zmq_errno()),
                " (libzmq built without CURVE?)");
  }
  return {pub, sec};
}

void writeKeyPair(const KeyPair& keys, const std::string& dir, const std::string& site) {
  ::mkdir(dir.c_str(), 0755);
  writeKeyLine(dir + "/" + site + ".key", keys.secret_key, 0600);
  writeKeyLine(dir + "/" + site + ".pub", keys.public_key, 0644);
}

GatewayOptions GatewayOptions::fromConfig(const core::JobConfig& config, const std::string& site,
                                          const core::SitePolicy* policy) {
  const core::SiteConfig& me = config.site(site);
  GatewayOptions o;
  if (policy != nullptr) {
    if (policy->site != site || policy->jurisdiction != me.jurisdiction) {
      fail<PolicyViolation>("policy file '", policy->source, "' governs site '", policy->site, "' (",
                            policy->jurisdiction, "), but this gateway is site '", site, "' (", me.jurisdiction,
                            ") in ", config.source);
    }
    o.policy_source = policy->source;
    o.egress_allow = policy->egress_allow;
    o.audit_log = policy->audit_log;
    if (!o.audit_log.empty()) o.signing_key = readSigningSecretKey(policy->signing_key);
    o.privacy = policy->privacy;
  }
  o.job_id = config.job_id;
  o.site = site;
  const core::TransportConfig& t = config.transport;
  o.insecure = t.insecure;
  for (const core::SiteConfig& s : config.sites) {
    SiteEndpoint e{s.name, s.jurisdiction, s.endpoint, s.bind, ""};
    if (!t.insecure) {
      if (s.public_key.empty()) {
        fail<ConfigError>(config.source, ":", s.line, ": site '", s.name,
                          "' has no public_key; CurveZMQ needs one per site (or transport.insecure: true "
                          "on loopback)");
      }
      e.public_key = readKeyFile(resolve(s.public_key, config.source));
    }
    o.sites.push_back(e);
  }
  if (!t.insecure) {
    if (me.secret_key.empty()) {
      fail<ConfigError>(config.source, ":", me.line, ": site '", site,
                        "' has no secret_key path; ./strait keys generate ", site, " writes one");
    }
    o.secret_key = readKeyFile(resolve(me.secret_key, config.source));
  }
  o.chunk_bytes = t.chunk_bytes;
  o.max_message_bytes = t.max_message_bytes;
  o.max_rounds_in_flight = t.max_rounds_in_flight;
  o.high_water_mark = t.high_water_mark;
  o.streams = t.streams;
  o.io_threads = t.io_threads;
  o.heartbeat = std::chrono::milliseconds(t.heartbeat_ms);
  o.peer_timeout = std::chrono::milliseconds(t.peer_timeout_ms);
  o.round_deadline = std::chrono::milliseconds(int64_t(t.round_deadline_s * 1000));
  o.hard_deadline = std::chrono::milliseconds(int64_t(t.hard_deadline_s * 1000));
  o.on_site_loss = t.on_site_loss_continue ? OnSiteLoss::kContinue : OnSiteLoss::kWait;
  const std::string shared = config.sharedText();
  o.config_fingerprint.resize(crypto_generichash_BYTES);
  crypto_generichash(o.config_fingerprint.data(), o.config_fingerprint.size(),
                     reinterpret_cast<const unsigned char*>(shared.data()), shared.size(), nullptr, 0);
  return o;
}

}  // namespace strait::transport
