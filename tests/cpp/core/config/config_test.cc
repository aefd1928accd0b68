// The job configuration: every validation rule names source, line, key path,
// bad value and what is allowed; defaults; rule matching; files; the example.

#include "core/config/config.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"

namespace strait::core {
namespace {

// Twelve lines; sections appended by withSection() start at line 13.
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

std::string withSection(const std::string& extra) { return std::string(kValid) + extra; }

// A job with one site: name on line 3, jurisdiction on 4, endpoint on 5, and
// `more` (further keys of the site) from line 6.
std::string oneSite(const std::string& name, const std::string& jurisdiction, const std::string& endpoint,
                    const std::string& more = "") {
  return "job: {id: x}\nsites:\n  - name: " + name + "\n    jurisdiction: " + jurisdiction +
         "\n    endpoint: " + endpoint + "\n" + more;
}

std::string siteWith(const std::string& more) { return oneSite("a", "CN", "tcp://h:1", more); }

std::string manySites(int n) {
  std::string y = "job: {id: x}\nsites:\n";
  for (int i = 0; i < n; ++i) {
    y += "  - {name: s" + std::to_string(i) + ", jurisdiction: CN, endpoint: \"tcp://h:" +
         std::to_string(1000 + i) + "\"}\n";
  }
  return y;
}

// The message of the ConfigError that parsing `yaml` throws.
std::string errorOf(const std::string& yaml) {
  try {
    JobConfig::parse(yaml, "job.yaml");
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(accepted)";
}

::testing::AssertionResult mentions(const std::string& msg, const std::vector<std::string>& parts) {
  for (const std::string& p : parts) {
    if (msg.find(p) == std::string::npos) {
      return ::testing::AssertionFailure() << "\"" << p << "\" is not in: " << msg;
    }
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------- rejects ---

struct Bad {
  std::string name;               // the test's name
  std::string yaml;
  std::vector<std::string> parts;  // each must appear in the message
};

std::ostream& operator<<(std::ostream& os, const Bad& b) { return os << b.name; }

class Rejects : public ::testing::TestWithParam<Bad> {};

TEST_P(Rejects, NamingLineKeyValueAndWhatIsAllowed) {
  EXPECT_TRUE(mentions(errorOf(GetParam().yaml), GetParam().parts));
}

std::string instanceName(const ::testing::TestParamInfo<Bad>& info) { return info.param.name; }

const std::string kSiteKeys =
    "must be a mapping with keys name, jurisdiction, endpoint, bind, public_key, secret_key, weight, workers";
const std::string kEndpointRule = "must be tcp://HOST:PORT, with HOST a host name, an IPv4 address or an IPv6 "
                                  "address in [ ], and a port in 1..65535";

INSTANTIATE_TEST_SUITE_P(Document, Rejects, ::testing::Values(
    Bad{"NotAMapping", "- just\n- a list\n",
        {"job.yaml:1: document = (sequence): must be a mapping with keys job, sites, sync, compression, transport"}},
    Bad{"UnknownTopLevelKey", "job: {id: x}\nsits: []\n",
        {"job.yaml:2: unknown key 'sits' at the top level; allowed: job, sites, sync, compression, transport, checkpoint; "
         "did you mean 'sites'?"}},
    Bad{"DuplicateKey", withSection("job: {id: y}\n"),
        {"job.yaml:13: duplicate key 'job' at the top level (first at line 1)"}},
    Bad{"DuplicateKeyInASite", siteWith("    weight: 1\n    weight: 2\n"),
        {"job.yaml:7: duplicate key 'weight' in sites[0] (first at line 6)"}},
    Bad{"NonScalarKey", "job: {id: x}\n? [a, b]\n: 1\n",
        {"job.yaml:2: a key at the top level is not a plain name; allowed: job, sites"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Job, Rejects, ::testing::Values(
    Bad{"MissingJob", "sites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n",
        {"job.yaml:1: document: missing required key 'job'"}},
    Bad{"JobNotAMapping", "job: digits\nsites: []\n", {"job.yaml:1: job = digits: must be a mapping with keys id"}},
    Bad{"MissingId", "job: {}\nsites: []\n", {"job.yaml:1: job: missing required key 'id'"}},
    Bad{"IdWithoutValue", "job:\n  id:\nsites: []\n", {"job.yaml:2: job.id: required, but has no value"}},
    Bad{"IdWithSpace", "job: {id: \"bad id!\"}\nsites: []\n",
        {"job.yaml:1: job.id = \"bad id!\": must be 1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'"}},
    Bad{"IdTooLong", "job:\n  id: " + std::string(65, 'a') + "\n",
        {"job.yaml:2: job.id = " + std::string(65, 'a') + ": must be 1 to 64 characters"}},
    Bad{"IdAsList", "job:\n  id: [a]\n", {"job.yaml:2: job.id = (sequence): must be a single value, not a sequence"}},
    Bad{"UnknownJobKey", "job: {id: x, ide: y}\n",
        {"job.yaml:1: unknown key 'ide' in job; allowed: id; did you mean 'id'?"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Sites, Rejects, ::testing::Values(
    Bad{"MissingSites", "job: {id: x}\n", {"job.yaml:1: document: missing required key 'sites'"}},
    Bad{"SitesWithoutValue", "job: {id: x}\nsites:\n", {"job.yaml:2: sites: required, but has no value"}},
    Bad{"NoSites", "job: {id: x}\nsites: []\n",
        {"job.yaml:2: sites = (0 items): must be a list of 1 to 64 sites (- name: ...)"}},
    Bad{"SixtyFiveSites", manySites(65), {"job.yaml:3: sites = (65 items): must be a list of 1 to 64 sites"}},
    Bad{"SitesAsMapping", "job: {id: x}\nsites: {a: 1}\n",
        {"job.yaml:2: sites = (mapping): must be a list of 1 to 64 sites"}},
    Bad{"SiteAsScalar", "job: {id: x}\nsites:\n  - hangzhou\n", {"job.yaml:3: sites[0] = hangzhou: " + kSiteKeys}},
    Bad{"UnknownSiteKey", siteWith("    wieght: 2\n"),
        {"job.yaml:6: unknown key 'wieght' in sites[0]; allowed: name, jurisdiction, endpoint, bind, public_key, "
         "secret_key, weight, workers; did you mean 'weight'?"}},
    Bad{"MissingName", "job: {id: x}\nsites:\n  - jurisdiction: CN\n    endpoint: tcp://h:1\n",
        {"job.yaml:3: sites[0]: missing required key 'name'"}},
    Bad{"NameUpperCase", oneSite("Hangzhou", "CN", "tcp://h:1"),
        {"job.yaml:3: sites[0].name = Hangzhou: must be 1 to 32 characters from a-z, 0-9, '_' and '-'"}},
    Bad{"NameTooLong", oneSite(std::string(33, 'a'), "CN", "tcp://h:1"),
        {"job.yaml:3: sites[0].name = " + std::string(33, 'a') + ": must be 1 to 32 characters"}},
    Bad{"NameEmpty", oneSite("\"\"", "CN", "tcp://h:1"), {"job.yaml:3: sites[0].name = \"\": must be 1 to 32"}},
    Bad{"DuplicateName",
        "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
        "  - {name: a, jurisdiction: SG, endpoint: \"tcp://h:2\"}\n",
        {"job.yaml:4: sites[1].name = a: must be unique in the job: sites[0] at line 3 has the same name"}},
    Bad{"MissingJurisdiction", "job: {id: x}\nsites:\n  - name: a\n    endpoint: tcp://h:1\n",
        {"job.yaml:3: sites[0]: missing required key 'jurisdiction'"}},
    Bad{"JurisdictionName", oneSite("a", "China", "tcp://h:1"),
        {"job.yaml:4: sites[0].jurisdiction = China: must be an ISO 3166-1 alpha-2 code: two upper-case letters"}},
    Bad{"JurisdictionLowerCase", oneSite("a", "cn", "tcp://h:1"),
        {"job.yaml:4: sites[0].jurisdiction = cn: must be an ISO 3166-1 alpha-2 code"}},
    Bad{"JurisdictionDigits", oneSite("a", "\"86\"", "tcp://h:1"),
        {"job.yaml:4: sites[0].jurisdiction = 86: must be an ISO 3166-1 alpha-2 code"}},
    Bad{"MissingEndpoint", "job: {id: x}\nsites:\n  - name: a\n    jurisdiction: CN\n",
        {"job.yaml:3: sites[0]: missing required key 'endpoint'"}},
    Bad{"EndpointNotTcp", oneSite("a", "CN", "http://h:1"),
        {"job.yaml:5: sites[0].endpoint = http://h:1: " + kEndpointRule}},
    Bad{"EndpointPortTooLarge", oneSite("a", "CN", "tcp://h:70000"),
        {"job.yaml:5: sites[0].endpoint = tcp://h:70000: " + kEndpointRule}},
    Bad{"EndpointPortZero", oneSite("a", "CN", "tcp://h:0"),
        {"job.yaml:5: sites[0].endpoint = tcp://h:0: " + kEndpointRule}},
    Bad{"EndpointPortNotANumber", oneSite("a", "CN", "tcp://h:80x"),
        {"job.yaml:5: sites[0].endpoint = tcp://h:80x: " + kEndpointRule}},
    Bad{"EndpointWithoutPort", oneSite("a", "CN", "tcp://h"),
        {"job.yaml:5: sites[0].endpoint = tcp://h: " + kEndpointRule}},
    Bad{"EndpointWithoutHost", oneSite("a", "CN", "tcp://:80"),
        {"job.yaml:5: sites[0].endpoint = tcp://:80: " + kEndpointRule}},
    Bad{"EndpointIPv6WithoutBrackets", oneSite("a", "CN", "tcp://::1:80"),
        {"job.yaml:5: sites[0].endpoint = tcp://::1:80: " + kEndpointRule}},
    Bad{"EndpointWithPath", oneSite("a", "CN", "tcp://h/x:80"),
        {"job.yaml:5: sites[0].endpoint = tcp://h/x:80: " + kEndpointRule}},
    Bad{"AdaptiveBits", "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
                        "compression:\n  adaptive: {min_bits: 3}\n",
        {"job.yaml:5: compression.adaptive.min_bits = 3: must be 2, 4 or 8"}},
    Bad{"AdaptiveDensityZero", "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
                               "compression:\n  adaptive: {min_density: 0}\n",
        {"job.yaml:5: compression.adaptive.min_density = 0: must be a number in (0, 1]"}},
    Bad{"AdaptiveMaxBelowMin", "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
                               "compression:\n  adaptive: {min_density: 0.5, max_density: 0.1}\n",
        {"job.yaml:5: compression.adaptive.max_density = 0.1: must be a number in [0.5, 1]"}},
    Bad{"BindNotTcp", siteWith("    bind: udp://h:1\n"),
        {"job.yaml:6: sites[0].bind = udp://h:1: must be tcp://HOST:PORT like endpoint"}},
    Bad{"DuplicateEndpoint",
        "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n"
        "  - {name: b, jurisdiction: SG, endpoint: \"tcp://h:1\"}\n",
        {"job.yaml:4: sites[1].endpoint = tcp://h:1: must be unique in the job: sites[0] at line 3 ('a') already "
         "listens there"}},
    Bad{"PublicKeyAsList", siteWith("    public_key: [a, b]\n"),
        {"job.yaml:6: sites[0].public_key = (sequence): must be a single value, not a sequence"}},
    Bad{"WeightZero", siteWith("    weight: 0\n"), {"job.yaml:6: sites[0].weight = 0: must be a number > 0"}},
    Bad{"WeightNegative", siteWith("    weight: -1.5\n"), {"job.yaml:6: sites[0].weight = -1.5: must be a number > 0"}},
    Bad{"WeightNan", siteWith("    weight: .nan\n"), {"job.yaml:6: sites[0].weight = .nan: must be a number > 0"}},
    Bad{"WeightInfinite", siteWith("    weight: .inf\n"), {"job.yaml:6: sites[0].weight = .inf: must be a number > 0"}},
    Bad{"WeightOverflows", siteWith("    weight: 1e999\n"),
        {"job.yaml:6: sites[0].weight = 1e999: must be a number > 0"}},
    Bad{"WeightText", siteWith("    weight: heavy\n"), {"job.yaml:6: sites[0].weight = heavy: must be a number > 0"}},
    Bad{"WorkersZero", siteWith("    workers: 0\n"),
        {"job.yaml:6: sites[0].workers = 0: must be an integer in [1, 4096]"}},
    Bad{"WorkersTooMany", siteWith("    workers: 4097\n"),
        {"job.yaml:6: sites[0].workers = 4097: must be an integer in [1, 4096]"}},
    Bad{"WorkersNegative", siteWith("    workers: -2\n"),
        {"job.yaml:6: sites[0].workers = -2: must be an integer in [1, 4096]"}},
    Bad{"WorkersFraction", siteWith("    workers: 1.5\n"),
        {"job.yaml:6: sites[0].workers = 1.5: must be an integer in [1, 4096]"}},
    Bad{"WorkersText", siteWith("    workers: two\n"),
        {"job.yaml:6: sites[0].workers = two: must be an integer in [1, 4096]"}},
    Bad{"WorkersHex", siteWith("    workers: 0x10\n"),
        {"job.yaml:6: sites[0].workers = 0x10: must be an integer in [1, 4096]"}},
    Bad{"WorkersAsList", siteWith("    workers: [1]\n"),
        {"job.yaml:6: sites[0].workers = (sequence): must be a single value, not a sequence"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Sync, Rejects, ::testing::Values(
    Bad{"SyncAsScalar", withSection("sync: every_step\n"),
        {"job.yaml:13: sync = every_step: must be a mapping with keys mode, diloco"}},
    Bad{"UnknownSyncKey", withSection("sync:\n  mdoe: diloco\n"),
        {"job.yaml:14: unknown key 'mdoe' in sync; allowed: mode, diloco; did you mean 'mode'?"}},
    Bad{"UnknownMode", withSection("sync:\n  mode: sometimes\n"),
        {"job.yaml:14: sync.mode = sometimes: must be one of every_step, diloco"}},
    Bad{"DilocoWithoutDilocoMode", withSection("sync:\n  diloco: {sync_every: 5}\n"),
        {"job.yaml:14: sync.diloco: is ignored unless mode: diloco (mode is every_step)"}},
    Bad{"DilocoWithEveryStepMode", withSection("sync:\n  mode: every_step\n  diloco:\n    sync_every: 5\n"),
        {"job.yaml:16: sync.diloco: is ignored unless mode: diloco"}},
    Bad{"DilocoAsScalar", withSection("sync:\n  mode: diloco\n  diloco: 50\n"),
        {"job.yaml:15: sync.diloco = 50: must be a mapping with keys sync_every, outer_lr, outer_momentum, nesterov, "
         "fragments"}},
    Bad{"UnknownDilocoKey", withSection("sync:\n  mode: diloco\n  diloco: {outer_lr: 1, lr: 1}\n"),
        {"job.yaml:15: unknown key 'lr' in sync.diloco; allowed: sync_every, outer_lr"}},
    Bad{"SyncEveryZero", withSection("sync:\n  mode: diloco\n  diloco:\n    sync_every: 0\n"),
        {"job.yaml:16: sync.diloco.sync_every = 0: must be an integer in [1, 1000000]"}},
    Bad{"SyncEveryFraction", withSection("sync:\n  mode: diloco\n  diloco:\n    sync_every: 2.5\n"),
        {"job.yaml:16: sync.diloco.sync_every = 2.5: must be an integer in [1, 1000000]"}},
    Bad{"OuterLrZero", withSection("sync:\n  mode: diloco\n  diloco:\n    outer_lr: 0\n"),
        {"job.yaml:16: sync.diloco.outer_lr = 0: must be a number > 0"}},
    Bad{"OuterLrNegative", withSection("sync:\n  mode: diloco\n  diloco:\n    outer_lr: -1\n"),
        {"job.yaml:16: sync.diloco.outer_lr = -1: must be a number > 0"}},
    Bad{"OuterMomentumOne", withSection("sync:\n  mode: diloco\n  diloco:\n    outer_momentum: 1\n"),
        {"job.yaml:16: sync.diloco.outer_momentum = 1: must be a number in [0, 1)"}},
    Bad{"OuterMomentumNegative", withSection("sync:\n  mode: diloco\n  diloco:\n    outer_momentum: -0.1\n"),
        {"job.yaml:16: sync.diloco.outer_momentum = -0.1: must be a number in [0, 1)"}},
    Bad{"NesterovYes", withSection("sync:\n  mode: diloco\n  diloco:\n    nesterov: yes\n"),
        {"job.yaml:16: sync.diloco.nesterov = yes: must be true or false"}},
    Bad{"NesterovOn", withSection("sync:\n  mode: diloco\n  diloco:\n    nesterov: on\n"),
        {"job.yaml:16: sync.diloco.nesterov = on: must be true or false"}},
    Bad{"NesterovCapitalised", withSection("sync:\n  mode: diloco\n  diloco:\n    nesterov: True\n"),
        {"job.yaml:16: sync.diloco.nesterov = True: must be true or false"}},
    Bad{"FragmentsZero", withSection("sync:\n  mode: diloco\n  diloco:\n    fragments: 0\n"),
        {"job.yaml:16: sync.diloco.fragments = 0: must be an integer in [1, 1024] and at most sync_every (50)"}},
    Bad{"FragmentsAboveSyncEvery",
        withSection("sync:\n  mode: diloco\n  diloco:\n    sync_every: 4\n    fragments: 5\n"),
        {"job.yaml:17: sync.diloco.fragments = 5: must be an integer in [1, 1024] and at most sync_every (4)"}},
    Bad{"FragmentsNotADivisor",
        withSection("sync:\n  mode: diloco\n  diloco:\n    sync_every: 50\n    fragments: 3\n"),
        {"job.yaml:17: sync.diloco.fragments = 3: must be a divisor of sync_every (50): one fragment syncs every "
         "sync_every / fragments steps"}},
    Bad{"SparseLoCoWithOuterMomentum",
        withSection("sync:\n  mode: diloco\n  diloco:\n    outer_momentum: 0.9\n    sparseloco: {}\n"),
        {"job.yaml:16: sync.diloco.outer_momentum", "cannot be set with sparseloco: its error-feedback buffer takes "
         "the place of outer momentum"}},
    Bad{"SparseLoCoBits", withSection("sync:\n  mode: diloco\n  diloco:\n    sparseloco: {bits: 3}\n"),
        {"job.yaml:16: sync.diloco.sparseloco.bits = 3: must be 2, 4 or 8"}},
    Bad{"SparseLoCoDensity", withSection("sync:\n  mode: diloco\n  diloco:\n    sparseloco: {density: 0}\n"),
        {"job.yaml:16: sync.diloco.sparseloco.density = 0: must be a number in (0, 1]"}},
    Bad{"SparseLoCoDecay", withSection("sync:\n  mode: diloco\n  diloco:\n    sparseloco: {decay: 1.5}\n"),
        {"job.yaml:16: sync.diloco.sparseloco.decay = 1.5: must be a number in [0, 1]"}},
    Bad{"SparseLoCoUnknownKey", withSection("sync:\n  mode: diloco\n  diloco:\n    sparseloco: {top_k: 3}\n"),
        {"job.yaml:16: unknown key 'top_k' in sync.diloco.sparseloco; allowed: density, chunk, bits, decay"}},
    Bad{"SparseLoCoWithAdaptive",
        withSection("sync:\n  mode: diloco\n  diloco:\n    sparseloco: {}\ncompression:\n  adaptive: {}\n"),
        {"compression.adaptive", "cannot be combined with sync.diloco.sparseloco"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Compression, Rejects, ::testing::Values(
    Bad{"CompressionAsScalar", withSection("compression: int8\n"),
        {"job.yaml:13: compression = int8: must be a mapping with keys pipeline, error_feedback, seed, rules, adaptive"}},
    Bad{"UnknownCompressionKey", withSection("compression:\n  rule: []\n"),
        {"job.yaml:14: unknown key 'rule' in compression; allowed: pipeline, error_feedback, seed, rules, adaptive; did you "
         "mean 'rules'?"}},
    Bad{"PipelineArgumentOutOfRange", withSection("compression:\n  pipeline: topk(2.0)\n"),
        {"job.yaml:14: compression.pipeline = \"topk(2.0)\": ", "ratio = 2.0", "(0, 1]"}},
    Bad{"PipelineUnknownStage", withSection("compression:\n  pipeline: topk(0.01) -> int9\n"),
        {"job.yaml:14: compression.pipeline = \"topk(0.01) -> int9\": pipeline \"topk(0.01) -> int9\"",
         "unknown stage 'int9'", "known stages: topk"}},
    Bad{"PipelineTwoStructures", withSection("compression:\n  pipeline: topk(0.01) -> randomk(0.1)\n"),
        {"job.yaml:14: compression.pipeline = \"topk(0.01) -> randomk(0.1)\": ",
         "at most one of topk, randomk, lowrank"}},
    Bad{"PipelineAsList", withSection("compression:\n  pipeline: [topk, int8]\n"),
        {"job.yaml:14: compression.pipeline = (sequence): must be a single value, not a sequence"}},
    Bad{"ErrorFeedbackNumber", withSection("compression:\n  error_feedback: 1\n"),
        {"job.yaml:14: compression.error_feedback = 1: must be true or false"}},
    Bad{"ErrorFeedbackNo", withSection("compression:\n  error_feedback: no\n"),
        {"job.yaml:14: compression.error_feedback = no: must be true or false"}},
    Bad{"SeedNegative", withSection("compression:\n  seed: -3\n"),
        {"job.yaml:14: compression.seed = -3: must be an integer in [0, 2^64-1]"}},
    Bad{"SeedFraction", withSection("compression:\n  seed: 1.5\n"),
        {"job.yaml:14: compression.seed = 1.5: must be an integer in [0, 2^64-1]"}},
    Bad{"SeedOverflows", withSection("compression:\n  seed: 18446744073709551616\n"),
        {"job.yaml:14: compression.seed = 18446744073709551616: must be an integer in [0, 2^64-1]"}},
    Bad{"RulesAsMapping", withSection("compression:\n  rules: {match: x}\n"),
        {"job.yaml:14: compression.rules = (mapping): must be a list of rules (- match: ...)"}},
    Bad{"RuleAsScalar", withSection("compression:\n  rules:\n    - fp32\n"),
        {"job.yaml:15: compression.rules[0] = fp32: must be a mapping with keys match, min_size, max_size, pipeline, "
         "error_feedback"}},
    Bad{"UnknownRuleKey", withSection("compression:\n  rules:\n    - match: \"*\"\n      pipline: fp16\n"),
        {"job.yaml:16: unknown key 'pipline' in compression.rules[0]; allowed: match, min_size, max_size, pipeline, "
         "error_feedback; did you mean 'pipeline'?"}},
    Bad{"RuleWithoutMatch", withSection("compression:\n  rules:\n    - pipeline: fp16\n"),
        {"job.yaml:15: compression.rules[0]: missing required key 'match'"}},
    Bad{"RuleWithEmptyMatch", withSection("compression:\n  rules:\n    - {match: \"\", pipeline: fp16}\n"),
        {"job.yaml:15: compression.rules[0].match = \"\": must be a non-empty glob such as \"*.bias\""}},
    Bad{"RuleWithoutPipeline", withSection("compression:\n  rules:\n    - match: \"*\"\n"),
        {"job.yaml:15: compression.rules[0]: missing required key 'pipeline'"}},
    Bad{"RuleWithBadPipeline",
        withSection("compression:\n  rules:\n    - {match: \"*\", pipeline: fp16}\n"
                    "    - {match: \"*\", pipeline: int9}\n"),
        {"job.yaml:16: compression.rules[1].pipeline = \"int9\": pipeline \"int9\"", "unknown stage 'int9'"}},
    Bad{"RuleWithBadPipelineArgument",
        withSection("compression:\n  rules:\n    - match: \"*\"\n      pipeline: int8(block=12)\n"),
        {"job.yaml:16: compression.rules[0].pipeline = \"int8(block=12)\": ", "block = 12",
         "a multiple of 8 in [8, 65536]"}},
    Bad{"MinSizeNegative", withSection("compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, min_size: -1}\n"),
        {"job.yaml:15: compression.rules[0].min_size = -1: must be an integer >= 0"}},
    Bad{"MinSizeText", withSection("compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, min_size: big}\n"),
        {"job.yaml:15: compression.rules[0].min_size = big: must be an integer >= 0"}},
    Bad{"MaxSizeNegative",
        withSection("compression:\n  rules:\n    - match: \"*\"\n      pipeline: fp16\n      max_size: -1\n"),
        {"job.yaml:17: compression.rules[0].max_size = -1: must be an integer >= min_size (0)"}},
    Bad{"MaxSizeBelowMinSize",
        withSection("compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, min_size: 10, max_size: 5}\n"),
        {"job.yaml:15: compression.rules[0].max_size = 5: must be an integer >= min_size (10)"}},
    Bad{"RuleErrorFeedbackOff",
        withSection("compression:\n  rules:\n    - {match: \"*\", pipeline: fp16, error_feedback: off}\n"),
        {"job.yaml:15: compression.rules[0].error_feedback = off: must be true or false"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Transport, Rejects, ::testing::Values(
    Bad{"UnknownTransportKey", withSection("transport:\n  heartbeat_s: 1\n"),
        {"job.yaml:14: unknown key 'heartbeat_s' in transport", "did you mean 'heartbeat_ms'?"}},
    Bad{"ChunkTooSmall", withSection("transport:\n  chunk_bytes: 100\n"),
        {"job.yaml:14: transport.chunk_bytes = 100: must be an integer in [4096, 268435456]"}},
    Bad{"MessageSmallerThanChunk", withSection("transport:\n  max_message_bytes: 5000\n"),
        {"job.yaml:14: transport.max_message_bytes = 5000: must be an integer >= chunk_bytes (1048576)"}},
    Bad{"MessageOfMoreThanTwoToThe32Chunks",
        withSection("transport:\n  chunk_bytes: 4096\n  max_message_bytes: 17592186044416\n"),
        {"job.yaml:15: transport.max_message_bytes = 17592186044416: must be an integer >= chunk_bytes (4096)",
         "at most 2^32 - 1 chunks"}},
    Bad{"RoundsInFlightZero", withSection("transport:\n  max_rounds_in_flight: 0\n"),
        {"job.yaml:14: transport.max_rounds_in_flight = 0: must be an integer in [1, 1024]"}},
    Bad{"HighWaterMarkZero", withSection("transport:\n  high_water_mark: 0\n"),
        {"job.yaml:14: transport.high_water_mark = 0: must be an integer in [1, 1000000]"}},
    Bad{"NoStreams", withSection("transport:\n  streams: 0\n"),
        {"job.yaml:14: transport.streams = 0: must be an integer in [1, 64]"}},
    Bad{"TooManyIoThreads", withSection("transport:\n  io_threads: 65\n"),
        {"job.yaml:14: transport.io_threads = 65: must be an integer in [0, 64]"}},
    Bad{"HeartbeatTooFast", withSection("transport:\n  heartbeat_ms: 5\n"),
        {"job.yaml:14: transport.heartbeat_ms = 5: must be an integer in [10, 60000]"}},
    Bad{"PeerTimeoutNotAboveHeartbeat", withSection("transport:\n  heartbeat_ms: 500\n  peer_timeout_ms: 500\n"),
        {"job.yaml:15: transport.peer_timeout_ms = 500: must be greater than heartbeat_ms (500)"}},
    Bad{"RoundDeadlineZero", withSection("transport:\n  round_deadline_s: 0\n"),
        {"job.yaml:14: transport.round_deadline_s = 0: must be a number of seconds > 0"}},
    Bad{"HardDeadlineBelowRoundDeadline", withSection("transport:\n  round_deadline_s: 10\n  hard_deadline_s: 5\n"),
        {"job.yaml:15: transport.hard_deadline_s = 5: must be at least round_deadline_s (10)"}},
    Bad{"UnknownOnSiteLoss", withSection("transport:\n  on_site_loss: retry\n"),
        {"job.yaml:14: transport.on_site_loss = retry: must be one of wait, continue"}},
    Bad{"InsecureYes", withSection("transport:\n  insecure: yes\n"),
        {"job.yaml:14: transport.insecure = yes: must be true or false"}}),
    instanceName);

INSTANTIATE_TEST_SUITE_P(Checkpoint, Rejects, ::testing::Values(
    Bad{"CheckpointWithoutDir", withSection("checkpoint:\n  every: 5\n"),
        {"job.yaml:14: checkpoint: missing required key 'dir'"}},
    Bad{"CheckpointEveryZero", withSection("checkpoint:\n  dir: ckpt\n  every: 0\n"),
        {"job.yaml:15: checkpoint.every = 0: must be an integer in [1, 1000000]"}},
    Bad{"CheckpointKeepZero", withSection("checkpoint:\n  dir: ckpt\n  keep: 0\n"),
        {"job.yaml:15: checkpoint.keep = 0: must be an integer in [1, 1000]"}},
    Bad{"CheckpointUnknownKey", withSection("checkpoint:\n  dir: ckpt\n  interval: 3\n"),
        {"unknown key 'interval' in checkpoint"}}),
    instanceName);

// ------------------------------------------------------------ the rest ---

TEST(Config, CheckpointDirIsBesideTheConfigAndEveryIsShared) {
  const std::string base = "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n";
  EXPECT_TRUE(JobConfig::parse(base).checkpoint.dir.empty());
  const JobConfig c = JobConfig::parse(base + "checkpoint: {dir: ckpt, every: 3}\n", "/etc/jobs/job.yaml");
  EXPECT_EQ(c.checkpoint.dir, "/etc/jobs/ckpt");
  EXPECT_EQ(c.checkpoint.every, 3);
  EXPECT_EQ(c.checkpoint.keep, 2);
  // The interval must agree between sites; the directory is each site's own.
  const JobConfig elsewhere = JobConfig::parse(base + "checkpoint: {dir: /srv/x, every: 3}\n");
  EXPECT_EQ(c.sharedText(), elsewhere.sharedText());
  EXPECT_NE(c.sharedText(), JobConfig::parse(base + "checkpoint: {dir: ckpt, every: 4}\n").sharedText());
}

TEST(Config, MinimalConfigGetsEveryDefault) {
  const JobConfig c =
      JobConfig::parse("job: {id: j}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n");
  EXPECT_EQ(c.source, "<string>");
  EXPECT_EQ(c.job_id, "j");
  ASSERT_EQ(c.sites.size(), 1u);
  EXPECT_EQ(c.sites[0].public_key, "");
  EXPECT_EQ(c.sites[0].secret_key, "");
  EXPECT_EQ(c.sites[0].weight, 1.0);
  EXPECT_EQ(c.sites[0].workers, 1);
  EXPECT_EQ(c.sites[0].line, 3);
  EXPECT_EQ(c.mode, SyncMode::kEveryStep);
  EXPECT_EQ(c.diloco.sync_every, 50);
  EXPECT_EQ(c.diloco.outer_lr, 0.7);
  EXPECT_EQ(c.diloco.outer_momentum, 0.9);
  EXPECT_TRUE(c.diloco.nesterov);
  EXPECT_EQ(c.diloco.fragments, 1);
  const CompressionRule& f = c.compression.fallback;
  EXPECT_EQ(f.match, "*");
  EXPECT_EQ(f.min_size, 0u);
  EXPECT_EQ(f.max_size, UINT64_MAX);
  EXPECT_EQ(f.pipeline.toString(), "fp32");
  EXPECT_TRUE(f.error_feedback);
  EXPECT_EQ(f.line, 0);
  EXPECT_TRUE(c.compression.rules.empty());
  EXPECT_EQ(c.compression.seed, 0u);
  EXPECT_EQ(c.transport.chunk_bytes, 1u << 20);
  EXPECT_EQ(c.transport.max_message_bytes, uint64_t{1} << 30);
  EXPECT_EQ(c.transport.on_site_loss_continue, false);
  EXPECT_EQ(c.transport.insecure, false);
}

TEST(Config, EmptyValuesMeanTheDefault) {
  const JobConfig c = JobConfig::parse(siteWith("    weight:\n    workers: ~\nsync:\ncompression:\n  rules:\n"));
  EXPECT_EQ(c.sites[0].weight, 1.0);
  EXPECT_EQ(c.sites[0].workers, 1);
  EXPECT_EQ(c.mode, SyncMode::kEveryStep);
  EXPECT_TRUE(c.compression.rules.empty());
}

const char* kFull = R"yaml(job:
  id: Full.Job_1
sites:
  - name: hangzhou
    jurisdiction: CN
    endpoint: tcp://127.0.0.1:7100
    public_key: keys/hangzhou.pub
    secret_key: keys/hangzhou.key
    weight: 3
    workers: 4096
  - name: singapore-2
    jurisdiction: SG
    endpoint: tcp://[::1]:65535
    weight: 0.25
sync:
  mode: diloco
  diloco:
    sync_every: 100
    outer_lr: 0.5
    outer_momentum: 0
    nesterov: false
    fragments: 4
compression:
  pipeline: "topk(0.01) -> int8"
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
transport:
  chunk_bytes: 65536
  max_message_bytes: 65536
  max_rounds_in_flight: 8
  high_water_mark: 16
  heartbeat_ms: 100
  peer_timeout_ms: 101
  round_deadline_s: 2.5
  hard_deadline_s: 2.5
  on_site_loss: continue
  insecure: true
  streams: 3
  io_threads: 5
)yaml";

TEST(Config, FullConfigSetsEveryField) {
  const JobConfig c = JobConfig::parse(kFull, "full.yaml");
  EXPECT_EQ(c.source, "full.yaml");
  EXPECT_EQ(c.job_id, "Full.Job_1");
  ASSERT_EQ(c.sites.size(), 2u);
  const SiteConfig& h = c.sites[0];
  EXPECT_EQ(h.name, "hangzhou");
  EXPECT_EQ(h.jurisdiction, "CN");
  EXPECT_EQ(h.endpoint, "tcp://127.0.0.1:7100");
  EXPECT_EQ(h.public_key, "keys/hangzhou.pub");
  EXPECT_EQ(h.secret_key, "keys/hangzhou.key");
  EXPECT_EQ(h.weight, 3.0);
  EXPECT_EQ(h.workers, 4096);
  EXPECT_EQ(h.line, 4);
  const SiteConfig& s = c.sites[1];
  EXPECT_EQ(s.name, "singapore-2");
  EXPECT_EQ(s.endpoint, "tcp://[::1]:65535");
  EXPECT_EQ(s.weight, 0.25);
  EXPECT_EQ(s.workers, 1);
  EXPECT_EQ(s.line, 11);

  EXPECT_EQ(c.mode, SyncMode::kDiLoCo);
  EXPECT_STREQ(syncModeName(c.mode), "diloco");
  EXPECT_EQ(c.diloco.sync_every, 100);
  EXPECT_EQ(c.diloco.outer_lr, 0.5);
  EXPECT_EQ(c.diloco.outer_momentum, 0.0);
  EXPECT_FALSE(c.diloco.nesterov);
  EXPECT_EQ(c.diloco.fragments, 4);

  const CompressionConfig& k = c.compression;
  EXPECT_EQ(k.fallback.pipeline.toString(), "topk(ratio=0.01, method=sample) -> int8(block=256, rounding=nearest)");
  EXPECT_FALSE(k.fallback.error_feedback);
  EXPECT_EQ(k.seed, UINT64_MAX);
  ASSERT_EQ(k.rules.size(), 2u);
  EXPECT_EQ(k.rules[0].match, "*.bias");
  EXPECT_EQ(k.rules[0].line, 28);
  EXPECT_EQ(k.rules[0].pipeline.toString(), "fp32");
  EXPECT_FALSE(k.rules[0].error_feedback) << "inherits compression.error_feedback";
  EXPECT_EQ(k.rules[1].match, "layer?.weight");
  EXPECT_EQ(k.rules[1].min_size, 10u);
  EXPECT_EQ(k.rules[1].max_size, 100u);
  EXPECT_EQ(k.rules[1].pipeline.toString(), "int4(block=256, rounding=nearest)");
  EXPECT_TRUE(k.rules[1].error_feedback);
  EXPECT_EQ(k.rules[1].line, 30);

  const TransportConfig& t = c.transport;
  EXPECT_EQ(t.chunk_bytes, 65536u);
  EXPECT_EQ(t.max_message_bytes, 65536u);
  EXPECT_EQ(t.max_rounds_in_flight, 8);
  EXPECT_EQ(t.high_water_mark, 16);
  EXPECT_EQ(t.heartbeat_ms, 100);
  EXPECT_EQ(t.peer_timeout_ms, 101);
  EXPECT_EQ(t.round_deadline_s, 2.5);
  EXPECT_EQ(t.hard_deadline_s, 2.5);
  EXPECT_TRUE(t.on_site_loss_continue);
  EXPECT_TRUE(t.insecure);
  EXPECT_EQ(t.streams, 3);
  EXPECT_EQ(t.io_threads, 5);
}

TEST(Config, LayoutKeyOrderAndKeyPathsDoNotChangeTheSharedText) {
  const JobConfig a = JobConfig::parse(kFull);
  // The same job in flow style with keys reordered, as another site's copy
  // with its own key paths and listen address (bind) might be.
  const JobConfig b = JobConfig::parse(R"yaml(
transport: {insecure: true, on_site_loss: continue, hard_deadline_s: 2.5, round_deadline_s: 2.5,
            peer_timeout_ms: 101, heartbeat_ms: 100, high_water_mark: 16, max_rounds_in_flight: 8,
            chunk_bytes: 65536, max_message_bytes: 65536, streams: 3, io_threads: 1}
compression:
  rules:
    - {pipeline: fp32, match: "*.bias"}
    - {error_feedback: true, pipeline: "int4(block=256)", max_size: 100, min_size: 10, match: "layer?.weight"}
  seed: 18446744073709551615
  error_feedback: false
  pipeline: "topk(ratio=0.01) -> int8(rounding=nearest)"
sync: {diloco: {fragments: 4, nesterov: false, outer_momentum: 0.0, outer_lr: 0.5, sync_every: 100}, mode: diloco}
sites:
  - {workers: 4096, weight: 3.0, endpoint: "tcp://127.0.0.1:7100", jurisdiction: CN, name: hangzhou,
     bind: "tcp://0.0.0.0:7100"}
  - {weight: 0.25, endpoint: "tcp://[::1]:65535", jurisdiction: SG, name: singapore-2, secret_key: mine.key}
job: {id: Full.Job_1}
)yaml");
  EXPECT_EQ(a.sharedText(), b.sharedText());
  // Each pipeline's canonical text parses back to itself.
  for (const CompressionRule* r : {&a.compression.fallback, &a.compression.rules[0], &a.compression.rules[1]}) {
    EXPECT_EQ(Pipeline::parse(r->pipeline.toString()).toString(), r->pipeline.toString());
  }
  const JobConfig c = JobConfig::parse(std::string(kFull).replace(std::string(kFull).find("outer_lr: 0.5"), 13,
                                                                  "outer_lr: 0.6"));
  EXPECT_NE(a.sharedText(), c.sharedText()) << "a setting every site must agree on";
  // Streams are too (a receiver admits only the job's); I/O threads are each site's own.
  const JobConfig d = JobConfig::parse(std::string(kFull).replace(std::string(kFull).find("streams: 3"), 10,
                                                                  "streams: 4"));
  EXPECT_NE(a.sharedText(), d.sharedText());
}

// docs/PROTOCOL.md's example of the canonical text (what the handshake's
// config fingerprint hashes), byte for byte: a peer written from the
// document computes the same fingerprint.
TEST(Config, TheCanonicalTextIsTheOneDocumentedInProtocolMd) {
  const JobConfig c = JobConfig::parse(R"yaml(
job: {id: demo}
sites:
  - {name: hangzhou, jurisdiction: CN, endpoint: "tcp://10.0.0.1:5555", bind: "tcp://0.0.0.0:5555"}
  - {name: singapore, jurisdiction: SG, endpoint: "tcp://10.0.0.2:5555", public_key: keys/sg.pub}
sync: {mode: diloco}
compression: {pipeline: "topk(0.01) -> int8", adaptive: {min_bits: 8}}
)yaml");
  EXPECT_EQ(c.sharedText(),
            "job demo\n"
            "site hangzhou CN tcp://10.0.0.1:5555 1 1\n"
            "site singapore SG tcp://10.0.0.2:5555 1 1\n"
            "sync diloco 50 0.69999999999999996 0.90000000000000002 1 1\n"
            "compression topk(ratio=0.01, method=sample) -> int8(block=256, rounding=nearest) 1 0\n"
            "transport 1048576 1073741824 4 64 500 5000 60 600 0 0 8\n");
}

TEST(Config, AdaptiveCompressionIsOffByDefaultAndParses) {
  const std::string base = "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n";
  EXPECT_FALSE(JobConfig::parse(base).compression.adaptive.enabled);
  const JobConfig c = JobConfig::parse(base + "compression:\n  adaptive: {min_density: 0.01, min_bits: 8}\n");
  EXPECT_TRUE(c.compression.adaptive.enabled);
  EXPECT_DOUBLE_EQ(c.compression.adaptive.min_density, 0.01);
  EXPECT_DOUBLE_EQ(c.compression.adaptive.max_density, 0.1);
  EXPECT_EQ(c.compression.adaptive.min_bits, 8);
  // Each site may adapt on its own: not part of what sites must agree on.
  EXPECT_EQ(c.sharedText(), JobConfig::parse(base).sharedText());
}

TEST(Config, DilocoOverlapIsOffByDefaultAndSharedBetweenSites) {
  const std::string base = "job: {id: x}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://h:1\"}\n";
  const JobConfig off = JobConfig::parse(base + "sync: {mode: diloco}\n");
  const JobConfig on = JobConfig::parse(base + "sync: {mode: diloco, diloco: {overlap: true}}\n");
  EXPECT_FALSE(off.diloco.overlap);
  EXPECT_TRUE(on.diloco.overlap);
  EXPECT_NE(off.sharedText(), on.sharedText());
}

TEST(Config, DilocoModeWithoutItsBlockUsesTheDefaults) {
  const JobConfig c = JobConfig::parse(withSection("sync:\n  mode: diloco\n"));
  EXPECT_EQ(c.mode, SyncMode::kDiLoCo);
  EXPECT_EQ(c.diloco.sync_every, 50);
  EXPECT_EQ(c.diloco.fragments, 1);
  EXPECT_STREQ(syncModeName(SyncMode::kEveryStep), "every_step");
}

TEST(Config, SparseLoCoTakesThePlaceOfOuterMomentumAndIsShared) {
  const JobConfig plain = JobConfig::parse(withSection("sync:\n  mode: diloco\n"));
  const JobConfig c = JobConfig::parse(withSection("sync:\n  mode: diloco\n  diloco: {sparseloco: {}}\n"));
  EXPECT_FALSE(plain.diloco.sparseloco.enabled);
  ASSERT_TRUE(c.diloco.sparseloco.enabled);
  EXPECT_EQ(c.diloco.outer_momentum, 0.0);
  EXPECT_FALSE(c.diloco.nesterov);
  EXPECT_EQ(c.diloco.outer_lr, 1.0);
  EXPECT_EQ(c.diloco.sparseloco.pipeline(), "topk(ratio=0.03125, chunk=4096) -> int2(block=256, rounding=nearest)");
  EXPECT_NE(c.sharedText(), plain.sharedText());
  const JobConfig d = JobConfig::parse(withSection(
      "sync:\n  mode: diloco\n  diloco: {outer_lr: 0.8, sparseloco: {density: 0.01, chunk: 64, bits: 4, decay: 0.9}}\n"));
  EXPECT_EQ(d.diloco.outer_lr, 0.8);
  EXPECT_EQ(d.diloco.sparseloco.pipeline(), "topk(ratio=0.01, chunk=64) -> int4(block=256, rounding=nearest)");
  EXPECT_NE(d.sharedText(), c.sharedText());
}

TEST(Config, FragmentsMayEqualSyncEvery) {
  const JobConfig c = JobConfig::parse(withSection("sync:\n  mode: diloco\n  diloco: {sync_every: 3, fragments: 3}\n"));
  EXPECT_EQ(c.diloco.fragments, 3);
}

TEST(Config, SixtyFourSitesAreAccepted) {
  EXPECT_EQ(JobConfig::parse(manySites(64)).sites.size(), 64u);
}

TEST(Config, UnknownKeyFarFromEveryAllowedOneGetsNoSuggestion) {
  const std::string msg = errorOf(withSection("zzzzzz: 1\n"));
  EXPECT_TRUE(mentions(msg, {"job.yaml:13: unknown key 'zzzzzz' at the top level; allowed: job, sites"}));
  EXPECT_EQ(msg.find("did you mean"), std::string::npos) << msg;
}

// ---------------------------------------------------------- rule matching ---

CompressionConfig rulesFrom(const std::string& rules) {
  return JobConfig::parse(withSection("compression:\n  pipeline: int8\n  rules:\n" + rules)).compression;
}

TEST(CompressionRules, FirstMatchWins) {
  const CompressionConfig k = rulesFrom(
      "    - {match: \"*.bias\", pipeline: fp32}\n"      // line 16
      "    - {match: \"*\", max_size: 4096, pipeline: fp16}\n"  // line 17
      "    - {match: \"fc.*\", pipeline: bf16}\n");       // line 18
  EXPECT_EQ(k.ruleFor("fc.bias", 10).line, 16) << "matched by rules 1 and 2: the first wins";
  EXPECT_EQ(k.ruleFor("fc.bias", 1 << 20).line, 16);
  EXPECT_EQ(k.ruleFor("fc.weight", 10).line, 17) << "rule 3 matches too, but comes later";
  EXPECT_EQ(k.ruleFor("fc.weight", 5000).line, 18);
  const CompressionRule& fallback = k.ruleFor("conv.weight", 5000);
  EXPECT_EQ(&fallback, &k.fallback);
  EXPECT_EQ(fallback.line, 0);
  EXPECT_EQ(fallback.pipeline.toString(), "int8(block=256, rounding=nearest)");
}

TEST(CompressionRules, SizeRangesAreInclusive) {
  const CompressionConfig k = rulesFrom("    - {match: \"*\", min_size: 10, max_size: 100, pipeline: fp16}\n");
  EXPECT_EQ(k.ruleFor("w", 9).line, 0);
  EXPECT_EQ(k.ruleFor("w", 10).line, 16);
  EXPECT_EQ(k.ruleFor("w", 100).line, 16);
  EXPECT_EQ(k.ruleFor("w", 101).line, 0);
  const CompressionConfig single = rulesFrom("    - {match: \"*\", min_size: 7, max_size: 7, pipeline: fp16}\n");
  EXPECT_EQ(single.ruleFor("w", 7).line, 16);
  EXPECT_EQ(single.ruleFor("w", 6).line, 0);
  EXPECT_EQ(single.ruleFor("w", 8).line, 0);
  const CompressionConfig empty_tensor = rulesFrom("    - {match: \"*\", max_size: 0, pipeline: fp16}\n");
  EXPECT_EQ(empty_tensor.ruleFor("w", 0).line, 16);
  EXPECT_EQ(empty_tensor.ruleFor("w", 1).line, 0);
}

TEST(CompressionRules, GlobsAreFnmatchWithoutFlags) {
  CompressionRule r;
  r.match = "layer?.weight";
  EXPECT_TRUE(r.matches("layer1.weight", 0));
  EXPECT_FALSE(r.matches("layer12.weight", 0)) << "? is exactly one character";
  r.match = "layer[12].*";
  EXPECT_TRUE(r.matches("layer2.bias", 0));
  EXPECT_FALSE(r.matches("layer3.bias", 0));
  r.match = "layer[!1].*";
  EXPECT_TRUE(r.matches("layer3.bias", 0));
  EXPECT_FALSE(r.matches("layer1.bias", 0));
  r.match = "*norm*";
  EXPECT_TRUE(r.matches("encoder.layers.0/norm1.weight", 0)) << "* also matches '.' and '/'";
  EXPECT_FALSE(r.matches("encoder.layers.0.NORM.weight", 0)) << "case-sensitive";
  r.match = "*";
  EXPECT_TRUE(r.matches("", 0));
  EXPECT_TRUE(r.matches(".hidden", 0)) << "a leading '.' is not special";
  r.match = "fc.weight";
  EXPECT_TRUE(r.matches("fc.weight", 0));
  EXPECT_FALSE(r.matches("fc.weight2", 0)) << "globs match the whole name";
}

TEST(CompressionRules, RuleErrorFeedbackDefaultsToTheSectionsValue) {
  const std::string rule = "    - {match: \"*\", pipeline: fp16}\n";
  EXPECT_TRUE(JobConfig::parse(withSection("compression:\n  rules:\n" + rule)).compression.rules[0].error_feedback);
  EXPECT_FALSE(JobConfig::parse(withSection("compression:\n  error_feedback: false\n  rules:\n" + rule))
                   .compression.rules[0].error_feedback);
}

// ------------------------------------------------------------------ sites ---

TEST(Config, SiteLookupListsTheKnownSites) {
  const JobConfig c = JobConfig::parse(kValid, "job.yaml");
  EXPECT_EQ(&c.site("singapore"), &c.sites[1]);
  try {
    c.site("tokyo");
    FAIL() << "no such site";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(mentions(e.what(), {"job.yaml", "no site named 'tokyo'", "sites: hangzhou, singapore"}));
  }
}

TEST(Config, EndpointForms) {
  for (const char* e : {"tcp://127.0.0.1:1", "tcp://[::1]:65535", "tcp://[fe80::1]:7100", "tcp://gw-1.example.org:443",
                        "tcp://localhost:7100"}) {
    EXPECT_EQ(JobConfig::parse(oneSite("a", "CN", e)).sites[0].endpoint, e);
  }
}

// ----------------------------------------------------------- YAML and files ---

TEST(Config, SyntaxErrorsNameLineAndColumn) {
  EXPECT_TRUE(mentions(errorOf("job: {id: x\nsites: [\n"), {"job.yaml:2:6: YAML syntax error"}));
  EXPECT_TRUE(mentions(errorOf("job:\n  id: x\n  - y\n"), {"job.yaml:3:3: YAML syntax error: end of map not found"}));
  EXPECT_TRUE(mentions(errorOf("job: &a {id: x}\nsites: *b\n"), {"job.yaml:2:8: YAML syntax error", "anchor"}));
}

TEST(Config, EmptyDocumentsAndSecondDocumentsAreErrors) {
  EXPECT_TRUE(mentions(errorOf(""), {"job.yaml:1: the document is empty"}));
  EXPECT_TRUE(mentions(errorOf("# only a comment\n\n"), {"job.yaml:1: the document is empty"}));
  EXPECT_TRUE(mentions(errorOf("~\n"), {"job.yaml:1: the document is empty"}));
  // The second document's "---" marker is named.
  EXPECT_TRUE(mentions(errorOf(std::string("---\n") + kValid + "---\njob: {id: other}\n"),
                       {"job.yaml:14: a second YAML document; a config file holds exactly one"}));
  EXPECT_TRUE(mentions(errorOf(std::string(kValid) + "...\n# a comment\njob: {id: other}\n"),
                       {"a second YAML document"}));
  EXPECT_EQ(errorOf(std::string("--- # one document\n") + kValid + "...\n"), "(accepted)");
}

// Found by tests/fuzz/fuzz_config: yaml-cpp's LoadAll never returned on this.
TEST(Config, MalformedFlowTextFailsInsteadOfHanging) {
  EXPECT_TRUE(mentions(errorOf(",a ] 01\"}\n"), {"job.yaml:"}));
}

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/strait-config-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    for (const std::string& f : files_) std::remove(f.c_str());
    rmdir(dir_.c_str());
  }
  std::string write(const std::string& name, const std::string& text) {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << text;
    files_.push_back(path);
    return path;
  }
  std::string dir_;
  std::vector<std::string> files_;
};

TEST_F(TempDir, LoadsAFileAndNamesItInMessages) {
  const std::string good = write("job.yaml", kValid);
  const JobConfig c = JobConfig::load(good);
  EXPECT_EQ(c.source, good);
  EXPECT_EQ(c.sites.size(), 2u);
  EXPECT_EQ(c.sharedText(), JobConfig::parse(kValid).sharedText());

  const std::string bad = write("bad.yaml", withSection("sync:\n  mode: nope\n"));
  try {
    JobConfig::load(bad);
    FAIL() << "bad mode";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(mentions(e.what(), {bad + ":14: sync.mode = nope: must be one of every_step, diloco"}));
  }
  const std::string syntax = write("syntax.yaml", "job: [\n");
  try {
    JobConfig::load(syntax);
    FAIL() << "syntax error";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(mentions(e.what(), {syntax + ":2:1: YAML syntax error"}));
  }
}

TEST_F(TempDir, UnreadableFilesAreConfigErrors) {
  const std::string missing = dir_ + "/missing.yaml";
  try {
    JobConfig::load(missing);
    FAIL() << "missing file";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(mentions(e.what(), {"cannot read config file '" + missing + "': No such file or directory"}));
  }
  try {
    JobConfig::load(dir_);
    FAIL() << "a directory";
  } catch (const ConfigError& e) {
    EXPECT_TRUE(mentions(e.what(), {"cannot read config file '" + dir_ + "': Is a directory"}));
  }
  const std::string empty = write("empty.yaml", "");
  EXPECT_TRUE(mentions(
      [&] {
        try {
          JobConfig::load(empty);
        } catch (const ConfigError& e) {
          return std::string(e.what());
        }
        return std::string("(accepted)");
      }(),
      {empty + ":1: the document is empty"}));
}

TEST(Config, ExampleConfigIsValidAndSaysWhatItsCommentsSay) {
  const JobConfig c = JobConfig::load(STRAIT_SOURCE_DIR "/examples/config.yaml");
  EXPECT_EQ(c.job_id, "digits-demo");
  ASSERT_EQ(c.sites.size(), 2u);
  EXPECT_EQ(c.sites[0].name, "hangzhou");
  EXPECT_EQ(c.sites[0].jurisdiction, "CN");
  EXPECT_EQ(c.sites[0].endpoint, "tcp://127.0.0.1:7100");
  EXPECT_EQ(c.sites[1].name, "singapore");
  EXPECT_EQ(c.sites[1].jurisdiction, "SG");
  EXPECT_EQ(c.sites[1].endpoint, "tcp://127.0.0.1:7200");
  EXPECT_EQ(c.mode, SyncMode::kEveryStep);
  const CompressionConfig& k = c.compression;
  EXPECT_EQ(k.fallback.pipeline.toString(), Pipeline::parse("topk(0.01) -> int8").toString());
  EXPECT_EQ(k.ruleFor("fc.bias", 10).pipeline.toString(), "fp32");
  EXPECT_EQ(k.ruleFor("encoder.layer_norm.weight", 1 << 20).pipeline.toString(), "fp32");
  EXPECT_EQ(k.ruleFor("conv1.weight", 4096).pipeline.toString(), "fp16");
  EXPECT_EQ(k.ruleFor("embed.weight", 5000000).pipeline.toString(), "lowrank(rank=8) -> fp16");
  EXPECT_EQ(&k.ruleFor("fc.weight", 1 << 20), &k.fallback);
}

}  // namespace
}  // namespace strait::core
