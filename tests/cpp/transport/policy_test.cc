// The site policy: egress kinds enforced by the gateway, the signed audit log
// of a real exchange (and every way of tampering with it), and site-level
// differential privacy (noise scale, clipping, the accountant, the budget).

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <sstream>

#include "core/config/config.h"
#include "transport/audit.h"
#include "transport/privacy.h"
#include "tests/cpp/transport/transport_test_util.h"

namespace strait::transport {
namespace {

using core::MessageKind;
using core::SitePolicy;
using namespace testing;

// Whether fn throws a PolicyViolation whose message holds `text` (else the
// failure says what it threw, or that nothing was refused).
::testing::AssertionResult refusedWith(const std::function<void()>& fn, const std::string& text) {
  try {
    fn();
  } catch (const PolicyViolation& e) {
    if (std::string(e.what()).find(text) != std::string::npos) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "refused, but with: " << e.what();
  }
  return ::testing::AssertionFailure() << "not refused";
}

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/strait-policy-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

std::vector<std::string> readLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(in, l);) lines.push_back(l);
  return lines;
}

void writeLines(const std::string& path, const std::vector<std::string>& lines) {
  std::ofstream out(path, std::ios::trunc);
  for (const auto& l : lines) out << l << "\n";
}

// ------------------------------------------------------------ policy file ---

TEST(SitePolicy, ParsesEveryKeyAndResolvesPathsBesideTheFile) {
  const SitePolicy p = SitePolicy::parse(R"(site: hangzhou
jurisdiction: CN
egress: {allow: [model_update, control]}
audit: {log: audit/hz.jsonl, signing_key: keys/hangzhou.sign}
privacy: {clip_norm: 2.5, noise_multiplier: 0.9, epsilon_budget: 8, delta: 1e-6}
data: [datasets/hz, /abs/other]
)", "/etc/strait/hz.yaml");
  EXPECT_EQ(p.site, "hangzhou");
  EXPECT_EQ(p.jurisdiction, "CN");
  EXPECT_TRUE(p.allows(MessageKind::kModelUpdate));
  EXPECT_TRUE(p.allows(MessageKind::kControl));
  EXPECT_FALSE(p.allows(MessageKind::kModelState));
  EXPECT_FALSE(p.allows(MessageKind::kMetrics));
  EXPECT_EQ(p.audit_log, "/etc/strait/audit/hz.jsonl");
  EXPECT_EQ(p.signing_key, "/etc/strait/keys/hangzhou.sign");
  EXPECT_TRUE(p.privacy.enabled);
  EXPECT_DOUBLE_EQ(p.privacy.clip_norm, 2.5);
  EXPECT_DOUBLE_EQ(p.privacy.delta, 1e-6);
  EXPECT_EQ(p.data, (std::vector<std::string>{"/etc/strait/datasets/hz", "/abs/other"}));
}

TEST(SitePolicy, DefaultsLetTrainingTrafficOutButNotMetrics) {
  const SitePolicy p = SitePolicy::parse("site: a\njurisdiction: SG\n");
  EXPECT_TRUE(p.allows(MessageKind::kModelUpdate));
  EXPECT_TRUE(p.allows(MessageKind::kModelState));
  EXPECT_TRUE(p.allows(MessageKind::kControl));
  EXPECT_FALSE(p.allows(MessageKind::kMetrics));
  EXPECT_FALSE(p.privacy.enabled);
  EXPECT_TRUE(p.audit_log.empty());
}

TEST(SitePolicy, ErrorsNameLineKeyAndWhatIsAllowed) {
  auto message = [](const std::string& yaml) {
    try {
      SitePolicy::parse(yaml, "p.yaml");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_NE(message("site: a\njurisdiction: CN\negress: {allow: [telemetry]}\n").find("p.yaml:3"), std::string::npos);
  EXPECT_NE(message("site: a\njurisdiction: CN\negress: {allow: [telemetry]}\n").find("model_update"),
            std::string::npos);
  EXPECT_NE(message("site: a\njurisdiction: CN\naudit: {log: x.jsonl}\n").find("needs signing_key"),
            std::string::npos);
  EXPECT_NE(message("site: a\njurisdiction: China\n").find("alpha-2"), std::string::npos);
  EXPECT_NE(message("site: a\njurisdiction: CN\nwiden: yes\n").find("unknown key 'widen'"), std::string::npos);
  EXPECT_NE(message("jurisdiction: CN\n").find("missing required key 'site'"), std::string::npos);
  EXPECT_NE(message("site: a\njurisdiction: CN\nprivacy: {clip_norm: 1, noise_multiplier: 0, epsilon_budget: 1}\n")
                .find("noise_multiplier"),
            std::string::npos);
}

TEST(SitePolicy, APolicyForAnotherSiteOrJurisdictionIsRefused) {
  const core::JobConfig job = core::JobConfig::parse(R"(job: {id: j}
sites:
  - {name: a, jurisdiction: CN, endpoint: "tcp://127.0.0.1:7001"}
  - {name: b, jurisdiction: SG, endpoint: "tcp://127.0.0.1:7002"}
transport: {insecure: true}
)");
  const SitePolicy other_site = SitePolicy::parse("site: b\njurisdiction: SG\n", "b.yaml");
  EXPECT_THROW(GatewayOptions::fromConfig(job, "a", &other_site), PolicyViolation);
  const SitePolicy wrong_place = SitePolicy::parse("site: a\njurisdiction: SG\n", "a.yaml");
  EXPECT_TRUE(refusedWith([&] { GatewayOptions::fromConfig(job, "a", &wrong_place); },
                          "governs site 'a' (SG), but this gateway is site 'a' (CN)"));
  const SitePolicy mine = SitePolicy::parse("site: a\njurisdiction: CN\negress: {allow: [control]}\n", "a.yaml");
  EXPECT_EQ(GatewayOptions::fromConfig(job, "a", &mine).egress_allow, std::vector<MessageKind>{MessageKind::kControl});
}

// --------------------------------------------------- a real audited run ---

struct AuditedJob {
  TempDir dir;
  Job job = makeJob(2, true);
  std::vector<SigningKeys> keys;
  std::vector<std::string> logs;

  AuditedJob() {
    for (size_t i = 0; i < 2; ++i) {
      keys.push_back(generateSigningKeys());
      writeSigningKeys(keys.back(), dir.path, "s" + std::to_string(i));
      logs.push_back(dir.path + "/audit/s" + std::to_string(i) + ".jsonl");
      job.sites[i].audit_log = logs.back();
      job.sites[i].signing_key = readSigningSecretKey(dir.path + "/s" + std::to_string(i) + ".sign");
    }
  }
  std::vector<uint8_t> pub(size_t i) { return readSigningPublicKey(dir.path + "/s" + std::to_string(i) + ".sign.pub"); }

  // `rounds` rounds of model updates plus one control message.
  void run(uint64_t rounds, uint64_t first_round = 0) {
    Gateway a(job.sites[0]), b(job.sites[1]);
    for (uint64_t r = first_round; r < first_round + rounds; ++r) {
      auto fa = a.exchange(r, "g", payloadFor(0, r, 3000 + r));
      auto fb = b.exchange(r, "g", payloadFor(1, r, 5000));
      getWithin(fa);
      getWithin(fb);
    }
    auto ca = a.exchange(first_round, "check", {1, 2, 3}, MessageKind::kControl);
    auto cb = b.exchange(first_round, "check", {1, 2, 3}, MessageKind::kControl);
    getWithin(ca);
    getWithin(cb);
  }
};

TEST(AuditLog, ARealExchangeIsRecordedOnBothSidesAndVerifies) {
  AuditedJob j;
  j.run(3);
  const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
  ASSERT_TRUE(v.ok) << v.problem;
  // open + 3 rounds x (out + in) + control (out + in).
  EXPECT_EQ(v.summary.records, 1u + 3 * 2 + 2);
  EXPECT_EQ(v.summary.site, "s0");
  EXPECT_EQ(v.summary.jurisdiction, "CN");
  EXPECT_EQ(v.summary.bytes_out.at({"s1", "model_update"}), 3000u + 3001 + 3002);
  EXPECT_EQ(v.summary.bytes_in.at({"s1", "model_update"}), 3u * 5000);
  EXPECT_EQ(v.summary.bytes_out.at({"s1", "control"}), 3u);
  // The digest in s0's "out" record is the digest of what s1 received.
  const auto out0 = readLines(j.logs[0]);
  const auto in1 = readLines(j.logs[1]);
  const std::string digest = "\"digest\":\"" + digestHex(payloadFor(0, 1, 3001).data(), 3001) + "\"";
  auto has = [&](const std::vector<std::string>& lines, const std::string& what, const std::string& event) {
    for (const auto& l : lines) {
      if (l.find(what) != std::string::npos && l.find("\"event\":\"" + event + "\"") != std::string::npos) return true;
    }
    return false;
  };
  EXPECT_TRUE(has(out0, digest, "out"));
  EXPECT_TRUE(has(in1, digest, "in"));
  EXPECT_TRUE(verifyAuditLog(j.logs[1], j.pub(1)).ok);
  // Another site's key does not verify this site's log.
  EXPECT_FALSE(verifyAuditLog(j.logs[0], j.pub(1)).ok);
}

TEST(AuditLog, EveryKindOfTamperingIsFoundAndNamed) {
  AuditedJob j;
  j.run(3);
  const std::vector<std::string> clean = readLines(j.logs[0]);
  ASSERT_GE(clean.size(), 6u);
  const std::string head = verifyAuditLog(j.logs[0], j.pub(0)).summary.head;
  struct Case {
    std::string name;
    std::vector<std::string> lines;
    std::string expect;
    uint64_t line;
  };
  std::vector<Case> cases;
  {  // edit: fewer bytes reported
    auto l = clean;
    const size_t at = l[3].find("\"bytes\":");
    l[3].replace(at, 9, "\"bytes\":1");
    cases.push_back({"edited", l, "signature does not verify", 4});
  }
  {  // drop a record in the middle
    auto l = clean;
    l.erase(l.begin() + 2);
    cases.push_back({"dropped", l, "record 2 is missing here", 3});
  }
  {  // drop the first (open) record
    auto l = clean;
    l.erase(l.begin());
    cases.push_back({"dropped first", l, "record 1 comes after the start: record 0 is missing", 1});
  }
  {  // reorder two records
    auto l = clean;
    std::swap(l[2], l[3]);
    cases.push_back({"reordered", l, "record 3 comes after record 1: record 2 is missing here", 3});
  }
  {  // insert a copy of a valid record
    auto l = clean;
    l.insert(l.begin() + 4, l[2]);
    cases.push_back({"replayed", l, "record 2 where record 4 belongs", 5});
  }
  {  // a signature re-encoded in upper case: the same bytes, another encoding
    auto l = clean;
    const size_t at = l[2].rfind("\"sig\":\"") + 7;
    for (size_t i = at; i < l[2].size(); ++i) l[2][i] = char(std::toupper(static_cast<unsigned char>(l[2][i])));
    cases.push_back({"upper-cased signature", l, "signature does not verify", 3});
    auto last = clean;
    const size_t end = last.back().rfind("\"sig\":\"") + 7;
    for (size_t i = end; i < last.back().size(); ++i) {
      last.back()[i] = char(std::toupper(static_cast<unsigned char>(last.back()[i])));
    }
    cases.push_back({"upper-cased last signature", last, "signature does not verify", last.size()});
  }
  {  // insert a forged record
    auto l = clean;
    l.insert(l.begin() + 1, "{\"seq\":1,\"event\":\"out\",\"bytes\":0}");
    cases.push_back({"forged", l, "not a signed audit record", 2});
  }
  for (const Case& c : cases) {
    writeLines(j.logs[0], c.lines);
    const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
    EXPECT_FALSE(v.ok) << c.name;
    EXPECT_NE(v.problem.find(c.expect), std::string::npos) << c.name << ": " << v.problem;
    EXPECT_EQ(v.line, c.line) << c.name << ": " << v.problem;
  }
  // Cutting records off the end is found against the head kept from before.
  auto cut = clean;
  cut.pop_back();
  writeLines(j.logs[0], cut);
  EXPECT_TRUE(verifyAuditLog(j.logs[0], j.pub(0)).ok);
  const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0), head);
  EXPECT_FALSE(v.ok);
  EXPECT_NE(v.problem.find("records are missing at the end"), std::string::npos) << v.problem;
  writeLines(j.logs[0], clean);
  EXPECT_TRUE(verifyAuditLog(j.logs[0], j.pub(0), head).ok);
}

TEST(AuditLog, NothingThatIsNotALogVerifies) {
  AuditedJob j;
  j.run(1);
  // A directory is an error, not "OK, 0 records".
  EXPECT_THROW(verifyAuditLog(j.dir.path, j.pub(0)), Error);
  // An empty file is not a log: every log starts with its open record.
  const std::string empty = j.dir.path + "/empty.jsonl";
  writeLines(empty, {});
  const AuditVerdict e = verifyAuditLog(empty, j.pub(0));
  EXPECT_FALSE(e.ok);
  EXPECT_NE(e.problem.find("empty"), std::string::npos) << e.problem;
  // The expected head is a digest: any case, but only 64 hex characters.
  const std::string head = verifyAuditLog(j.logs[0], j.pub(0)).summary.head;
  std::string upper = head;
  for (char& c : upper) c = char(std::toupper(static_cast<unsigned char>(c)));
  EXPECT_TRUE(verifyAuditLog(j.logs[0], j.pub(0), upper).ok);
  EXPECT_THROW(verifyAuditLog(j.logs[0], j.pub(0), head.substr(0, 63) + "\""), InvalidArgument);
}

TEST(AuditLog, ARestartContinuesTheChainAndATornLastLineIsCutAndNoted) {
  AuditedJob j;
  j.run(1);
  // A crash in the middle of a write leaves half a line.
  const std::string torn = "{\"seq\":99,\"time\":\"2026";
  {
    std::ofstream out(j.logs[0], std::ios::app);
    out << torn;
  }
  EXPECT_FALSE(verifyAuditLog(j.logs[0], j.pub(0)).ok);
  j.run(1, 1);
  const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
  ASSERT_TRUE(v.ok) << v.problem;
  const auto lines = readLines(j.logs[0]);
  size_t opens = 0, recovered = 0;
  for (const auto& l : lines) {
    opens += l.find("\"event\":\"open\"") != std::string::npos;
    recovered += l.find("\"event\":\"recovered\",\"torn_bytes\":" + std::to_string(torn.size())) != std::string::npos;
  }
  EXPECT_EQ(opens, 2u);
  EXPECT_EQ(recovered, 1u);
}

TEST(AuditLog, ALogSpanningAKeyRotationVerifiesWithBothKeysOnly) {
  AuditedJob j;
  j.run(1);
  const std::vector<uint8_t> old_pub = j.pub(0);
  const SigningKeys fresh = generateSigningKeys();
  writeSigningKeys(fresh, j.dir.path + "/new", "s0");
  j.job.sites[0].signing_key = readSigningSecretKey(j.dir.path + "/new/s0.sign");
  j.run(1, 1);
  const std::vector<uint8_t> new_pub = readSigningPublicKey(j.dir.path + "/new/s0.sign.pub");
  const AuditVerdict old_only = verifyAuditLog(j.logs[0], old_pub);
  EXPECT_FALSE(old_only.ok);
  EXPECT_NE(old_only.problem.find("does not verify with this key"), std::string::npos) << old_only.problem;
  EXPECT_FALSE(verifyAuditLog(j.logs[0], new_pub).ok);
  const AuditVerdict both = verifyAuditLog(j.logs[0], std::vector<std::vector<uint8_t>>{old_pub, new_pub});
  EXPECT_TRUE(both.ok) << both.problem;
}

TEST(AuditLog, AnUnwritableLogStopsTheGatewayFromStarting) {
  AuditedJob j;
  j.job.sites[0].audit_log = "/proc/strait-cannot-write-here/audit.jsonl";
  try {
    Gateway g(j.job.sites[0]);
    FAIL() << "started";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("audit log '/proc/strait-cannot-write-here/audit.jsonl'"),
              std::string::npos)
        << e.what();
  }
}

// ---------------------------------------------------------------- egress ---

TEST(Egress, AKindOutsideThePolicyIsRefusedLoggedAndNeverSent) {
  AuditedJob j;
  j.job.sites[0].egress_allow = {MessageKind::kModelUpdate};
  j.job.sites[0].policy_source = "hz-policy.yaml";
  Gateway a(j.job.sites[0]), b(j.job.sites[1]);
  EXPECT_TRUE(refusedWith([&] { a.exchange(0, "loss", {1, 2, 3, 4}, MessageKind::kMetrics); },
                          "egress policy (hz-policy.yaml) of site 's0' does not allow 'metrics' to "
                          "leave; allowed: model_update"));
  EXPECT_THROW(a.exchange(0, "init", {1}, MessageKind::kModelState), PolicyViolation);
  // Nothing reached the peer: its round for the tag never completes.
  auto fb = b.exchange(0, "loss", {9});
  EXPECT_EQ(fb.wait_for(std::chrono::milliseconds(1500)), std::future_status::timeout);
  // The gateway still works for allowed kinds, and the refusals are on record.
  auto fa = a.exchange(0, "g", {5, 6});
  auto fb2 = b.exchange(0, "g", {7});
  EXPECT_EQ(*getWithin(fa).payloads[1], std::vector<uint8_t>{7});
  getWithin(fb2);
  const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
  ASSERT_TRUE(v.ok) << v.problem;
  EXPECT_EQ(v.summary.refused, 2u);
  EXPECT_EQ(v.summary.bytes_out.count({"s1", "metrics"}), 0u);
}

// --------------------------------------------------------------- privacy ---

TEST(Privacy, NoiseHasStandardDeviationSigmaTimesClip) {
  const size_t n = 1 << 20;
  std::vector<float> x(n, 0.0f);
  clipAndNoise(x.data(), n, 2.0, 0.75);
  double sum = 0, sq = 0;
  for (float v : x) {
    sum += v;
    sq += double(v) * v;
  }
  const double mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  // sigma * C = 1.5; the sample sd of 2^20 normals is within 0.5% with
  // overwhelming probability (its standard error is 0.07%).
  EXPECT_NEAR(sd, 1.5, 1.5 * 0.005);
  EXPECT_NEAR(mean, 0.0, 5 * 1.5 / std::sqrt(double(n)));
  // Two releases draw different noise (a CSPRNG, not a fixed seed).
  std::vector<float> y(16, 0.0f), z(16, 0.0f);
  clipAndNoise(y.data(), 16, 1.0, 1.0);
  clipAndNoise(z.data(), 16, 1.0, 1.0);
  EXPECT_NE(y, z);
}

TEST(Privacy, UpdatesAreClippedToTheNormButNeverScaledUp) {
  std::vector<float> big(1000, 1.0f);  // norm sqrt(1000)
  const double norm = clipAndNoise(big.data(), big.size(), 3.0, 1e-9);
  EXPECT_NEAR(norm, std::sqrt(1000.0), 1e-6);
  double sq = 0;
  for (float v : big) sq += double(v) * v;
  EXPECT_NEAR(std::sqrt(sq), 3.0, 1e-4);
  std::vector<float> small(4, 0.5f);  // norm 1
  clipAndNoise(small.data(), small.size(), 3.0, 1e-9);
  for (float v : small) EXPECT_NEAR(v, 0.5f, 1e-6);
}

// A sharded site's update is clipped whole: each rank's share is scaled by
// the same factor, from the norm summed across them, so the shares together
// are what one clip of the whole update gives.
TEST(Privacy, SharesOfAnUpdateAreClippedByTheWholeUpdatesNorm) {
  std::vector<float> whole(1000, 1.0f), a(600, 1.0f), b(400, 1.0f);
  clipAndNoise(whole.data(), whole.size(), 3.0, 1e-9);
  const double norm = std::sqrt(1000.0);
  EXPECT_NEAR(clipAndNoise(a.data(), a.size(), 3.0, 1e-9, norm), norm, 1e-9);
  clipAndNoise(b.data(), b.size(), 3.0, 1e-9, norm);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], whole[i], 1e-6);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(b[i], whole[600 + i], 1e-6);
  // A share of a small update is not scaled up, whatever its own norm.
  std::vector<float> c(4, 0.5f);
  clipAndNoise(c.data(), c.size(), 3.0, 1e-9, 2.0);
  for (float v : c) EXPECT_NEAR(v, 0.5f, 1e-6);
}

// The exact privacy curve of T Gaussian mechanisms of noise multiplier
// sigma (sensitivity 1): a Gaussian mechanism with mu = sqrt(T)/sigma,
// delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
// (Balle and Wang 2018; Dong, Roth and Su 2019).
double exactEpsilon(double sigma, double releases, double delta) {
  const double mu = std::sqrt(releases) / sigma;
  auto phi = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
  auto d = [&](double eps) { return phi(-eps / mu + mu / 2) - std::exp(eps) * phi(-eps / mu - mu / 2); };
  double lo = 0, hi = 1000;
  for (int i = 0; i < 200; ++i) {
    const double mid = (lo + hi) / 2;
    (d(mid) > delta ? lo : hi) = mid;
  }
  return hi;
}

TEST(Privacy, TheAccountantIsASoundAndTightBoundOnTheGaussianMechanism) {
  EXPECT_DOUBLE_EQ(gaussianRdp(2.0, 10, 3.0), 10 * 3.0 / 8.0);
  EXPECT_EQ(gaussianEpsilon(1.0, 0, 1e-5), 0.0);
  struct Point {
    double sigma;
    uint64_t releases;
    double delta;
  };
  for (const Point& p : {Point{1, 1, 1e-5}, Point{2, 10, 1e-5}, Point{5, 100, 1e-6}, Point{0.8, 50, 1e-5},
                         Point{10, 1000, 1e-5}}) {
    const double rdp = gaussianEpsilon(p.sigma, p.releases, p.delta);
    const double exact = exactEpsilon(p.sigma, double(p.releases), p.delta);
    EXPECT_GE(rdp, exact) << p.sigma << " " << p.releases;           // sound: never claims less than spent
    EXPECT_LE(rdp, exact * 1.10) << p.sigma << " " << p.releases;    // tight: within 10% of the truth
  }
  // A known value: sigma 1, one release, delta 1e-5 is (4.38, 1e-5)-DP exactly.
  EXPECT_NEAR(exactEpsilon(1, 1, 1e-5), 4.377, 0.01);
}

TEST(Privacy, TheGatewayEnforcesPrivatizationAndTheBudget) {
  AuditedJob j;
  j.job.sites[0].privacy.enabled = true;
  j.job.sites[0].privacy.clip_norm = 1.0;
  j.job.sites[0].privacy.noise_multiplier = 2.0;
  j.job.sites[0].privacy.delta = 1e-5;
  // sigma 2: epsilon after 1, 2, 3 releases is about 2.66, 3.77, 4.67 (RDP).
  j.job.sites[0].privacy.epsilon_budget = 4.0;
  Gateway a(j.job.sites[0]), b(j.job.sites[1]);
  EXPECT_TRUE(refusedWith([&] { a.exchange(0, "g", {1}, MessageKind::kModelUpdate); },
                          "must be privatized"));
  std::vector<float> u(100, 1.0f);
  double spent = 0;
  for (uint64_t r = 0; r < 2; ++r) {
    spent = a.privatize(u.data(), u.size());
    auto fa = a.exchange(r, "g", {1}, MessageKind::kModelUpdate);
    auto fb = b.exchange(r, "g", {2});
    getWithin(fa);
    getWithin(fb);
  }
  EXPECT_NEAR(spent, gaussianEpsilon(2.0, 2, 1e-5), 1e-12);
  const std::vector<float> before = u;
  EXPECT_TRUE(refusedWith([&] { a.privatize(u.data(), u.size()); },
                          "privacy budget of site 's0' exhausted"));
  EXPECT_EQ(u, before);  // a refused release touches nothing
  EXPECT_EQ(a.privacyReleases(), 2u);
  // An empty update (a site that has just joined takes part in a round
  // without a contribution) releases nothing: it leaves unprivatized, even
  // with the budget spent.
  auto fa = a.exchange(2, "g", {}, MessageKind::kModelUpdate);
  auto fb = b.exchange(2, "g", {2});
  getWithin(fa);
  getWithin(fb);
  EXPECT_EQ(a.privacyReleases(), 2u);
  const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
  ASSERT_TRUE(v.ok) << v.problem;
  EXPECT_NEAR(v.summary.epsilon, spent, 1e-4);
  EXPECT_EQ(v.summary.refused, 1u);
}

// A sharded site's gateway whose group holds no piece of a release (every-
// step mode: a unit none of whose pieces this group owns) still counts it:
// every gateway of the site keeps the site's whole account, and the charge
// lets nothing out.
TEST(Privacy, AChargedReleaseIsSpentAndCountedButLetsNoUpdateOut) {
  AuditedJob j;
  auto& pr = j.job.sites[0].privacy;
  pr.enabled = true;
  pr.noise_multiplier = 2.0;
  pr.delta = 1e-5;
  pr.epsilon_budget = 4.0;  // room for 2 releases
  Gateway a(j.job.sites[0]), b(j.job.sites[1]);
  EXPECT_NEAR(a.chargePrivacyRelease(), gaussianEpsilon(2.0, 1, 1e-5), 1e-12);
  EXPECT_EQ(a.privacyReleases(), 1u);
  {
    // On record, so that a restarted gateway and the verifier count it.
    const AuditVerdict v = verifyAuditLog(j.logs[0], j.pub(0));
    ASSERT_TRUE(v.ok) << v.problem;
    EXPECT_NEAR(v.summary.epsilon, gaussianEpsilon(2.0, 1, 1e-5), 1e-4);
  }
  EXPECT_TRUE(refusedWith([&] { a.exchange(0, "g", {1}, MessageKind::kModelUpdate); },
                          "must be privatized"));
  std::vector<float> u(10, 1.0f);
  EXPECT_NEAR(a.privatize(u.data(), u.size()), gaussianEpsilon(2.0, 2, 1e-5), 1e-12);
  EXPECT_TRUE(refusedWith([&] { a.chargePrivacyRelease(); },
                          "privacy budget of site 's0' exhausted"));
  EXPECT_EQ(a.privacyReleases(), 2u);
  EXPECT_THROW(b.chargePrivacyRelease(), InvalidArgument);  // no privacy section
}

TEST(Privacy, ARestartedGatewayContinuesTheBudgetRecordedInItsAuditLog) {
  AuditedJob j;
  auto& pr = j.job.sites[0].privacy;
  pr.enabled = true;
  pr.noise_multiplier = 2.0;
  pr.delta = 1e-5;
  pr.epsilon_budget = 4.0;  // room for 2 releases (about 2.66, 3.77; a third would be 4.67)
  std::vector<float> u(100, 1.0f);
  {
    Gateway a(j.job.sites[0]), b(j.job.sites[1]);
    a.privatize(u.data(), u.size());
    auto fa = a.exchange(0, "g", {1});
    auto fb = b.exchange(0, "g", {2});
    getWithin(fa);
    getWithin(fb);
  }
  ::testing::internal::CaptureStderr();
  Gateway again(j.job.sites[0]);
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(again.privacyReleases(), 1u);
  EXPECT_NEAR(again.privacySpent(), gaussianEpsilon(2.0, 1, 1e-5), 1e-9);
  EXPECT_NE(log.find("privacy: the audit log records epsilon"), std::string::npos) << log;
  again.privatize(u.data(), u.size());  // the second release fits
  EXPECT_THROW(again.privatize(u.data(), u.size()), PolicyViolation);  // the third does not, restart or not
}

}  // namespace
}  // namespace strait::transport
