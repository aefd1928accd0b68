#pragma once
// The site gateway: one per site, run by the site leader. It exchanges opaque
// payloads with the gateways of every other site of the job — an all-gather
// per (round, tag) — over ZeroMQ, chunked and checksummed, encrypted and
// authenticated with CurveZMQ.
//
// Threads: a background I/O thread alone touches ZeroMQ. exchange() may be
// called from any thread; it hands the payload over and returns a future.
// Errors raised on the I/O thread (a peer refusing our handshake, a fatal
// socket error) are stored and rethrown by the next exchange() and by the
// futures still pending.
//
// Bounded resources: at most max_rounds_in_flight exchanges are open at a
// time (exchange() blocks for a free slot, up to hard_deadline), ZeroMQ queues
// are capped by high-water marks, every incoming payload is capped by
// max_message_bytes before its buffer is allocated.

#include <chrono>
#include <cstdint>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config/config.h"

namespace strait::transport {

// 3: parallel streams (docs/PROTOCOL.md, "Streams"): several connections
// per site, each with its own Hello. 2: the sync layer of the C++ engine
// ("Sync rounds"): join messages as state documents, the sum digest. Peers
// of other versions are refused in the handshake.
constexpr uint32_t kProtocolVersion = 3;

enum class OnSiteLoss { kWait, kContinue };

struct SiteEndpoint {
  std::string name;
  std::string jurisdiction;
  std::string endpoint;    // tcp://HOST:PORT where the other sites reach its gateway
  std::string bind;        // where it listens, if not at endpoint ("" = endpoint)
  std::string public_key;  // Z85 text (40 chars); empty with insecure
};

struct GatewayOptions {
  std::string job_id;
  std::string site;                  // this gateway's site
  std::string log_name;              // how its log lines name it ("" = the site)
  std::vector<SiteEndpoint> sites;   // every site of the job, in the job's fixed order
  std::vector<uint8_t> config_fingerprint;  // peers must present the same bytes

  bool insecure = false;       // plaintext; only allowed with loopback endpoints
  std::string secret_key;      // this site's CurveZMQ secret key, Z85

  size_t chunk_bytes = 1 << 20;
  size_t max_message_bytes = size_t{1} << 30;
  int max_rounds_in_flight = 4;
  int high_water_mark = 64;    // messages queued per socket and peer
  // TCP connections (CurveZMQ each) to every peer, payload chunks striped
  // over them; every peer must use the same number (it is in the config
  // fingerprint). One stream's window caps its rate at about its buffer /
  // the round trip, so a long fat link needs several.
  int streams = core::kDefaultStreams;
  // ZeroMQ I/O threads (encryption and TCP for the connections);
  // 0: max(2, min(streams + 1, hardware threads)).
  int io_threads = 0;
  std::chrono::milliseconds heartbeat{500};
  std::chrono::milliseconds peer_timeout{5000};     // silent this long = missing
  std::chrono::milliseconds round_deadline{60000};  // then on_site_loss decides
  std::chrono::milliseconds hard_deadline{600000};  // wait mode gives up here
  OnSiteLoss on_site_loss = OnSiteLoss::kWait;

  std::string metrics_path;    // JSON lines, one per round per peer ("" = none)

  // The site's policy (core::SitePolicy): kinds allowed to leave, the
  // signed audit log, differential privacy.
  std::vector<core::MessageKind> egress_allow{core::MessageKind::kModelUpdate, core::MessageKind::kModelState,
                                              core::MessageKind::kControl};
  std::string policy_source;          // the policy file, for messages ("" = none: defaults)
  std::string audit_log;              // "" = no audit log
  std::vector<uint8_t> signing_key;   // Ed25519 secret key (64 bytes), with audit_log
  core::SitePolicy::Privacy privacy;  // enabled: model updates must go through privatize()

  // Test hooks: corrupt the bytes of chunk `index` of every first send to
  // peers (retransmissions are clean); shut down the TCP connection of
  // stream 1 (once) right after a chunk with at least this index went on
  // it; pretend to speak another version.
  int64_t test_corrupt_chunk = -1;
  int64_t test_cut_stream = -1;
  uint32_t test_protocol_version = kProtocolVersion;

  // Builds options for `site` from a job config: endpoints, public keys read
  // from the key files the config names, transport settings, fingerprint.
  // Throws ConfigError on unreadable or malformed key files.
  // With a policy: its site and jurisdiction must match the config's entry
  // for `site` (else PolicyViolation); its egress list, audit log and privacy
  // settings apply.
  static GatewayOptions fromConfig(const core::JobConfig& config, const std::string& site,
                                   const core::SitePolicy* policy = nullptr);
};

// Per round, per peer.
struct PeerMetrics {
  std::string site;
  // Payload bytes, retransmissions included. Rounds complete on receipt: to
  // a peer still being sent to at completion, the whole payload is counted
  // (with the retransmissions so far), not just what has left.
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t retransmissions = 0;  // chunks sent again
  double goodput_mbps = 0;       // payload received / time from round start to its arrival
  bool missing = false;
};

// A round a peer has opened (sent at least a chunk of) and this site has not.
struct PeerRound {
  uint64_t round = 0;
  std::string tag;
  std::string site;
};

struct RoundResult {
  uint64_t round = 0;
  std::string tag;
  // One entry per site in the job's order, this site's own payload included.
  // nullopt for a site that was missing (only with on_site_loss = continue).
  std::vector<std::optional<std::vector<uint8_t>>> payloads;
  std::vector<std::string> missing;  // names of missing sites
  double seconds = 0;                // round latency: exchange() to completion
  std::vector<PeerMetrics> peers;    // one per other site
};

class Gateway {
 public:
  // Binds this site's endpoint, connects to every peer and starts the I/O
  // thread. Throws InvalidArgument on bad options (insecure with a
  // non-loopback endpoint, missing keys) and Error if the endpoint cannot be
  // bound.
  explicit Gateway(GatewayOptions options);
  ~Gateway();  // stops the I/O thread (as stop("closed")); pending futures fail with Error

  // Stops the I/O thread and tells every peer that welcomed this site why
  // (a Stopped message, best effort; docs/PROTOCOL.md): "finished", or the
  // error that ends this site's part of the job. Peers then stop waiting
  // for this site at once (on_site_loss: wait fails their rounds naming
  // the reason; continue goes on without it). Pending futures fail with
  // Error. Blocks up to about a second while the messages leave.
  void stop(const std::string& reason);
  Gateway(const Gateway&) = delete;
  Gateway& operator=(const Gateway&) = delete;

  // Sends payload to every other site for (round, tag) and returns a future
  // of every site's payload for the same (round, tag). Blocks only while
  // max_rounds_in_flight exchanges are open (join messages, tags starting
  // "strait.join", hold no slot and never wait). The future throws TimeoutError
  // (wait mode, hard deadline), ProtocolError (a peer's payload was refused)
  // or Error (the gateway failed). A repeated (round, tag) throws
  // InvalidArgument.
  //
  // `kind` must be in the site's egress list, else PolicyViolation (logged,
  // and recorded in the audit log) and nothing leaves. With an audit log, one
  // "out" record per peer is on disk before the payload is queued; received
  // payloads get an "in" record before the future is fulfilled (an audit
  // write failure fails the round). With privacy enabled, each model_update
  // must follow its own privatize() call.
  std::future<RoundResult> exchange(uint64_t round, const std::string& tag, std::vector<uint8_t> payload,
                                    core::MessageKind kind = core::MessageKind::kModelUpdate);

  // Differential privacy (the site policy's privacy section): clips x (n
  // values) to L2 norm clip_norm and adds Gaussian noise of standard
  // deviation noise_multiplier * clip_norm from libsodium's CSPRNG, after
  // checking that one more release stays within the epsilon budget (else
  // PolicyViolation, and x is untouched). Returns the epsilon spent so far,
  // this release included. InvalidArgument without a privacy section.
  // `norm` >= 0: x is this gateway's share of a site's update of that L2
  // norm (a sharded site: the ranks' squared norms summed inside the site),
  // and the whole update is what is clipped; the release is the site's.
  double privatize(float* x, size_t n, double norm = -1);
  // A release of the site none of whose share leaves through this gateway
  // (a sharded site's group holding no piece of it): counted and spent as
  // privatize() does, so that every gateway of the site keeps the site's
  // whole account; lets no model update out.
  double chargePrivacyRelease();
  // Epsilon spent so far (0 without privacy) and the number of releases.
  double privacySpent() const;
  uint64_t privacyReleases() const;

  // The audit log's path, record count and head hash ("" / 0 without one).
  std::string auditHead() const;
  uint64_t auditRecords() const;

  // Gives a payload buffer back for reuse by later receives, so that a
  // steady-state round allocates (and page-faults) nothing. Optional;
  // thread-safe; keeps at most a few buffers and frees the rest.
  void recycle(std::vector<uint8_t> buffer);

  // This site's position in the job's site order.
  size_t siteIndex() const;
  // Waits up to `within` until exchange() would start at once rather than
  // wait for one of the max_rounds_in_flight slots (join messages need
  // none), or the gateway failed (exchange() then throws); false if not.
  bool waitForSlot(std::chrono::milliseconds within);
  const GatewayOptions& options() const;

  // Sites heard from within peer_timeout (handshake done), by name.
  std::vector<std::string> livePeers() const;

  // Rounds whose tag starts with `prefix` that peers have opened and this
  // site has not (refreshed every heartbeat): how a restarted site's join
  // request reaches sites that are busy training. Answer one by calling
  // exchange() with the same (round, tag).
  std::vector<PeerRound> peerRounds(const std::string& prefix) const;

  // Sites that were silent for peer_timeout and have been heard again in
  // the same incarnation (a cut link, not a restart) since the last call.
  // Under on_site_loss continue both sides went on alone: the caller must
  // reconcile them (DiLoCo: the side without the lowest-index site rejoins).
  std::vector<std::string> takeReturnedPeers();

  // Sites this site has parted from since the last call: one of them ended
  // a round without the other's payload (on_site_loss: continue) while the
  // other went on with that round. Learnt on both sides: the site that
  // closed the round hears the other's late payload for it and answers
  // Closed; the other hears that Closed. Both now hold different state,
  // whatever the round counters say: the caller must reconcile them
  // (DiLoCo: the higher-index site fetches the other's state; every-step
  // mode: the higher-index site stops). Each site at most once per call.
  std::vector<std::string> takeDivergedPeers();

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// CurveZMQ keys as Z85 text.
struct KeyPair {
  std::string public_key;
  std::string secret_key;
};

KeyPair generateKeyPair();
// Writes DIR/SITE.pub (0644) and DIR/SITE.key (0600). Refuses to overwrite.
void writeKeyPair(const KeyPair& keys, const std::string& dir, const std::string& site);
// Reads a key file written by writeKeyPair (one Z85 line). Throws ConfigError.
std::string readKeyFile(const std::string& path);

}  // namespace strait::transport
