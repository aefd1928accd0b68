// The job configuration: every validation rule names source, line, key path,
// bad value and what is allowed; defaults; rule matching; files.

#include "core/config/config.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "core/error.h"

namespace strait::core {
namespace {

const char* kValid = R"(job:
  id: test-job
sites:
  - name: hangzhou
    jurisdiction: CN
    endpoint: tcp://127.0.0.1:7100
  - name: singapore
    jurisdiction: SG
    endpoint: tcp://[::1]:7200
    weight: 2.5
    workers: 3
    public_key: keys/sg.pub
)";

// The message of the ConfigError that parsing `yaml` throws.
std::string errorOf(const std::string& yaml) {
  try {
    JobConfig::parse(yaml, "job.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(accepted)";
}

// kValid with `extra` appended (top-level sections).
std::string withSection(const std::string& extra) { return std::string(kValid) + extra; }

void expectMentions(const std::string& msg, std::initializer_list<const char*> parts) {
  for (const char* p : parts) {
    EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

TEST(Config, ValidConfigAndDefaults) {
  const JobConfig c = JobConfig::parse(kValid, "job.yaml");
  EXPECT_EQ(c.source, "job.yaml");
  EXPECT_EQ(c.job_id, "test-job");
  ASSERT_EQ(c.sites.size(), 2u);
  EXPECT_EQ(c.sites[0].name, "hangzhou");
  EXPECT_EQ(c.sites[0].jurisdiction, "CN");
  EXPECT_EQ(c.sites[0].weight, 1.0);
  EXPECT_EQ(c.sites[0].workers, 1);
  EXPECT_EQ(c.sites[0].public_key, "");
  EXPECT_EQ(c.sites[0].line, 4);
  EXPECT_EQ(c.sites[1].endpoint, "tcp://[::1]:7200");
  EXPECT_EQ(c.sites[1].weight, 2.5);
  EXPECT_EQ(c.sites[1].workers, 3);
  EXPECT_EQ(c.sites[1].public_key, "keys/sg.pub");
  EXPECT_EQ(c.mode, SyncMode::kEveryStep);
  EXPECT_EQ(c.compression.fallback.pipeline.toString(), "fp32");
  EXPECT_TRUE(c.compression.fallback.error_feedback);
  EXPECT_EQ(c.compression.seed, 0u);
  EXPECT_TRUE(c.compression.rules.empty());
  EXPECT_EQ(&c.site("singapore"), &c.sites[1]);
}

TEST(Config, FullSyncAndCompressionSections) {
  const JobConfig c = JobConfig::parse(withSection(R"(sync:
  mode: diloco
  diloco:
    sync_every: 100
    outer_lr: 0.5
    outer_momentum: 0.8
    nesterov: false
    fragments: 4
compression:
  pipeline: topk(0.01) -> int8
  error_feedback: false
  seed: 18446744073709551615
  rules:
    - match: "*.bias"
      pipeline: fp32
    - match: "layer?.weight"
      min_size: 10
      max_size: 100
      pipeline: int4
      error_feedback: true
)"));
  EXPECT_EQ(c.mode, SyncMode::kDiLoCo);
  EXPECT_STREQ(syncModeName(c.mode), "diloco");
  EXPECT_EQ(c.diloco.sync_every, 100);
  EXPECT_EQ(c.diloco.outer_lr, 0.5);
  EXPECT_EQ(c.diloco.outer_momentum, 0.8);
  EXPECT_FALSE(c.diloco.nesterov);
  EXPECT_EQ(c.diloco.fragments, 4);
  EXPECT_EQ(c.compression.seed, 18446744073709551615ULL);
  EXPECT_FALSE(c.compression.fallback.error_feedback);
  ASSERT_EQ(c.compression.rules.size(), 2u);
  EXPECT_FALSE(c.compression.rules[0].error_feedback) << "inherits compression.error_feedback";
  EXPECT_TRUE(c.compression.rules[1].error_feedback);
  EXPECT_EQ(c.compression.rules[1].line, 28);

  // First match wins; globs and inclusive size ranges.
  const CompressionConfig& k = c.compression;
  EXPECT_EQ(k.ruleFor("fc.bias", 5).pipeline.toString(), "fp32");
  EXPECT_EQ(k.ruleFor("layer1.weight", 10).pipeline.toString(), "int4(block=256, rounding=nearest)");
  EXPECT_EQ(k.ruleFor("layer1.weight", 100).line, 28);
  EXPECT_EQ(k.ruleFor("layer1.weight", 101).line, 0) << "above max_size: the default";
  EXPECT_EQ(k.ruleFor("layer1.weight", 9).line, 0) << "below min_size: the default";
  EXPECT_EQ(k.ruleFor("layer12.weight", 50).line, 0) << "? matches one character";
  EXPECT_EQ(k.ruleFor("conv.weight", 50).pipeline.toString(),
            "topk(ratio=0.01, method=sample) -> int8(block=256, rounding=nearest)");
}

TEST(Config, ExampleConfigIsValid) {
  const JobConfig c = JobConfig::load(STRAIT_SOURCE_DIR "/examples/config.yaml");
  EXPECT_EQ(c.sites.size(), 2u);
  EXPECT_EQ(c.compression.ruleFor("fc.bias", 10).pipeline.toString(), "fp32");
  EXPECT_EQ(c.compression.ruleFor("embed.weight", 5000000).pipeline.toString(),
            "lowrank(rank=8) -> fp16");
}

struct Rule {
  const char* yaml;
  std::initializer_list<const char*> expect;
};

TEST(Config, EveryValidationRuleNamesLineKeyValueAndAllowed) {
  const Rule rules[] = {
      // job
      {"job: {id: \"bad id!\"}\nsites: []\n", {"job.yaml:1:", "job.id = bad id!", "1 to 64 characters"}},
      {"job: {}\nsites: []\n", {"job.yaml:1:", "job: missing required key 'id'"}},
      {"sites:\n  - {name: a, jurisdiction: CN, endpoint: tcp://h:1}\n", {"missing required key 'job'"}},
      {"job: {id: x}\n", {"missing required key 'sites'"}},
      {"job: {id: x}\nsites: []\n", {"job.yaml:2:", "sites:", "1 to 64 sites"}},
      {"job: {id: x}\nsites: {a: 1}\n", {"sites:", "must be a list"}},
      // sites
      {"job: {id: x}\nsites:\n  - name: Hangzhou\n    jurisdiction: CN\n    endpoint: tcp://h:1\n",
       {"job.yaml:3:", "sites[0].name = Hangzhou", "a-z, 0-9"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: China\n    endpoint: tcp://h:1\n",
       {"job.yaml:4:", "sites[0].jurisdiction = China", "two upper-case letters"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: cn\n    endpoint: tcp://h:1\n",
       {"sites[0].jurisdiction = cn"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: http://h:1\n",
       {"job.yaml:5:", "sites[0].endpoint = http://h:1", "tcp://HOST:PORT"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:70000\n",
       {"sites[0].endpoint = tcp://h:70000", "port in 1..65535"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://:80\n",
       {"sites[0].endpoint = tcp://:80"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n", {"job.yaml:3:", "sites[0]: missing required key 'endpoint'"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:1\n    weight: 0\n",
       {"job.yaml:6:", "sites[0].weight = 0", "a number > 0"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:1\n    weight: nan\n",
       {"sites[0].weight = nan"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:1\n    workers: 1.5\n",
       {"job.yaml:6:", "sites[0].workers = 1.5", "an integer in [1, 4096]"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:1\n    workers: [1]\n",
       {"sites[0].workers = (sequence)", "a single value"}},
      {"job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n    endpoint: tcp://h:1\n    wieght: 2\n",
       {"job.yaml:6:", "unknown key 'wieght' in sites[0]", "did you mean 'weight'?"}},
      {"job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
       "  - {name: a, jurisdiction: SG, endpoint: \"tcp://h:2\"}\n",
       {"job.yaml:4:", "duplicate site name 'a' (first defined at line 3)"}},
      {"job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
       "  - {name: b, jurisdiction: SG, endpoint: \"tcp://h:1\"}\n",
       {"job.yaml:4:", "endpoint tcp://h:1 is also site 'a'"}},
      // top level
      {"job: {id: x}\nsits: []\n", {"job.yaml:2:", "unknown key 'sits' at the top level", "did you mean 'sites'?"}},
  };
  for (const Rule& r : rules) expectMentions(errorOf(r.yaml), r.expect);

  const Rule sections[] = {
      {"sync:\n  mode: sometimes\n", {"job.yaml:14:", "sync.mode = sometimes", "one of every_step, diloco"}},
      {"sync:\n  diloco: {sync_every: 5}\n", {"job.yaml:14:", "sync.diloco", "only used with 'mode: diloco'"}},
      {"sync:\n  mode: diloco\n  diloco: {sync_every: 0}\n", {"sync.diloco.sync_every = 0", "[1, 1000000]"}},
      {"sync:\n  mode: diloco\n  diloco: {outer_lr: -1}\n", {"sync.diloco.outer_lr = -1", "a number > 0"}},
      {"sync:\n  mode: diloco\n  diloco: {outer_momentum: 1}\n", {"sync.diloco.outer_momentum = 1", "[0, 1)"}},
      {"sync:\n  mode: diloco\n  diloco: {nesterov: yes}\n", {"sync.diloco.nesterov = yes", "true or false"}},
      {"sync:\n  mode: diloco\n  diloco: {sync_every: 4, fragments: 5}\n", {"sync.diloco.fragments = 5", "at most sync_every (4)"}},
      {"sync:\n  mode: diloco\n  diloco: {lr: 1}\n", {"unknown key 'lr' in sync.diloco"}},
      {"compression:\n  pipeline: topk(2.0)\n", {"job.yaml:14:", "compression.pipeline: \"topk(2.0)\"", "ratio = 2.0"}},
      {"compression:\n  error_feedback: 1\n", {"compression.error_feedback = 1", "true or false"}},
      {"compression:\n  seed: -3\n", {"compression.seed = -3", "[0, 2^64)"}},
      {"compression:\n  rules: {match: x}\n", {"compression.rules: must be a list"}},
      {"compression:\n  rules:\n    - pipeline: fp16\n", {"job.yaml:15:", "compression.rules[0]: missing required key 'match'"}},
      {"compression:\n  rules:\n    - match: \"*\"\n", {"compression.rules[0]: missing required key 'pipeline'"}},
      {"compression:\n  rules:\n    - {match: \"*\", pipeline: fp16}\n    - {match: \"*\", pipeline: int9}\n",
       {"job.yaml:16:", "compression.rules[1].pipeline: \"int9\"", "unknown stage 'int9'"}},
      {"compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, max_size: -1}\n",
       {"compression.rules[0].max_size = -1", "an integer >= 0"}},
      {"compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, min_size: 10, max_size: 5}\n",
       {"compression.rules[0].max_size = 5", "an integer >= min_size (10)"}},
      {"compression:\n  rules:\n    - {match: \"\", pipeline: fp16}\n", {"compression.rules[0].match = \"\"", "non-empty glob"}},
      {"compression:\n  rules:\n    - {match: \"*\", pipline: fp16}\n", {"unknown key 'pipline' in compression.rules[0]", "did you mean 'pipeline'?"}},
  };
  for (const Rule& r : sections) expectMentions(errorOf(withSection(r.yaml)), r.expect);
}

TEST(Config, SyntaxErrorsAndEmptyDocuments) {
  expectMentions(errorOf("job: {id: x\nsites: [\n"), {"job.yaml:", "YAML syntax error"});
  expectMentions(errorOf(""), {"job.yaml", "empty"});
  expectMentions(errorOf("- just\n- a list\n"), {"must be a mapping"});
}

TEST(Config, UnknownSiteListsTheKnownOnes) {
  const JobConfig c = JobConfig::parse(kValid, "job.yaml");
  try {
    c.site("tokyo");
    FAIL();
  } catch (const ConfigError& e) {
    expectMentions(e.what(), {"no site named 'tokyo'", "sites: hangzhou, singapore"});
  }
}

TEST(Config, LoadsFilesAndReportsUnreadableOnes) {
  char path[] = "/tmp/strait-config-XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  {
    std::ofstream(path) << kValid << "sync:\n  mode: nope\n";
  }
  try {
    JobConfig::load(path);
    FAIL();
  } catch (const ConfigError& e) {
    expectMentions(e.what(), {path, ":14:", "sync.mode = nope"});
  }
  {
    std::ofstream(path) << kValid;
  }
  EXPECT_EQ(JobConfig::load(path).source, path);
  std::remove(path);
  try {
    JobConfig::load(path);
    FAIL();
  } catch (const ConfigError& e) {
    expectMentions(e.what(), {"cannot read config file", path, "No such file"});
  }
}

}  // namespace
}  // namespace strait::core
