// GatewayOptions from a real config file and real key files; the chunk checksum.

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <random>

#include "core/error.h"
#include "transport/checksum.h"
#include "transport/gateway.h"

namespace strait::transport {
namespace {

TEST(Checksum, IsXxh3WithSeedZero) {
  // Published XXH3-64 values (xxHash's sanity tests): empty input, seed 0.
  EXPECT_EQ(chunkChecksum("", 0), 0x2d06800538d394c2ULL);
  std::vector<uint8_t> d(1000, 7);
  const uint64_t h = chunkChecksum(d.data(), d.size());
  d[999] ^= 1;
  EXPECT_NE(chunkChecksum(d.data(), d.size()), h) << "one flipped bit changes it";
}

class FromConfig : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/strait-cfg-XXXXXX";
    dir_ = mkdtemp(tmpl);
    writeKeyPair(generateKeyPair(), dir_ + "/keys", "a");
    writeKeyPair(generateKeyPair(), dir_ + "/keys", "b");
  }
  std::string write(const std::string& name, const std::string& extra) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << "job: {id: j}\n"
                           "sites:\n"
                           "  - {name: a, jurisdiction: CN, endpoint: \"tcp://127.0.0.1:7100\",\n"
                           "     public_key: keys/a.pub, secret_key: keys/a.key}\n"
                           "  - {name: b, jurisdiction: SG, endpoint: \"tcp://127.0.0.1:7200\",\n"
                           "     public_key: keys/b.pub, secret_key: keys/b.key}\n"
                        << extra;
    return path;
  }
  std::string dir_;
};

TEST_F(FromConfig, ReadsKeysRelativeToTheConfigAndMapsTransportSettings) {
  const auto cfg = core::JobConfig::load(write("job.yaml",
                                               "transport:\n  chunk_bytes: 65536\n  on_site_loss: continue\n"
                                               "  round_deadline_s: 2.5\n  heartbeat_ms: 100\n"));
  const GatewayOptions o = GatewayOptions::fromConfig(cfg, "b");
  EXPECT_EQ(o.site, "b");
  ASSERT_EQ(o.sites.size(), 2u);
  EXPECT_EQ(o.sites[0].public_key, readKeyFile(dir_ + "/keys/a.pub"));
  EXPECT_EQ(o.secret_key, readKeyFile(dir_ + "/keys/b.key"));
  EXPECT_EQ(o.chunk_bytes, 65536u);
  EXPECT_EQ(o.on_site_loss, OnSiteLoss::kContinue);
  EXPECT_EQ(o.round_deadline.count(), 2500);
  EXPECT_EQ(o.heartbeat.count(), 100);
  EXPECT_EQ(o.config_fingerprint.size(), 32u);
}

TEST_F(FromConfig, FingerprintIgnoresKeyPathsButNotSharedSettings) {
  const auto a = GatewayOptions::fromConfig(core::JobConfig::load(write("a.yaml", "")), "a");
  const auto b = GatewayOptions::fromConfig(core::JobConfig::load(write("b.yaml", "")), "b");
  EXPECT_EQ(a.config_fingerprint, b.config_fingerprint) << "same job seen from two sites";
  const auto c = GatewayOptions::fromConfig(
      core::JobConfig::load(write("c.yaml", "compression: {pipeline: int8}\n")), "a");
  EXPECT_NE(a.config_fingerprint, c.config_fingerprint);
}

TEST_F(FromConfig, KeyFilesAreCheckedAndSecretsAreOwnerOnly) {
  struct stat st;
  ASSERT_EQ(stat((dir_ + "/keys/a.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  EXPECT_THROW(writeKeyPair(generateKeyPair(), dir_ + "/keys", "a"), Error) << "never overwrites";
  std::ofstream(dir_ + "/keys/a.pub") << "not a key\n";
  try {
    GatewayOptions::fromConfig(core::JobConfig::load(write("d.yaml", "")), "a");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("does not hold a CurveZMQ key"), std::string::npos) << e.what();
  }
}

TEST(Config, TransportSectionIsValidated) {
  const std::string base =
      "job: {id: j}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://127.0.0.1:1\"}\ntransport:\n";
  auto error = [&](const std::string& t) {
    try {
      core::JobConfig::parse(base + t, "job.yaml");
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  EXPECT_NE(error("  chunk_bytes: 100\n").find("job.yaml:5: transport.chunk_bytes = 100: must be an integer in [4096"),
            std::string::npos);
  EXPECT_NE(error("  max_message_bytes: 5000\n").find("transport.max_message_bytes = 5000: must be an integer >= chunk_bytes"),
            std::string::npos);
  EXPECT_NE(error("  heartbeat_ms: 500\n  peer_timeout_ms: 400\n").find("peer_timeout_ms = 400: must be greater than heartbeat_ms"),
            std::string::npos);
  EXPECT_NE(error("  round_deadline_s: 10\n  hard_deadline_s: 5\n").find("hard_deadline_s = 5: must be at least round_deadline_s"),
            std::string::npos);
  EXPECT_NE(error("  on_site_loss: retry\n").find("transport.on_site_loss = retry: must be one of wait, continue"),
            std::string::npos);
  EXPECT_NE(error("  insecure: yes\n").find("transport.insecure = yes: must be true or false"), std::string::npos);
  EXPECT_NE(error("  chunk: 1\n").find("unknown key 'chunk' in transport"), std::string::npos);
}

}  // namespace
}  // namespace strait::transport
