// Gateways in separate processes (strait_test_peer), including a peer killed
// with SIGKILL mid-transfer and restarted. Every wait has a deadline; children
// are killed if a test fails.

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "tests/cpp/transport/transport_test_util.h"

extern char** environ;

namespace strait::transport {
namespace {

using Clock = std::chrono::steady_clock;

// A child process with its stdout on a pipe.
class Child {
 public:
  explicit Child(const std::vector<std::string>& args) {
    int fds[2];
    if (pipe(fds) != 0) throw Error("pipe failed");
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    if (posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ) != 0) throw Error("spawn failed");
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    out_ = fds[0];
  }
  ~Child() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    close(out_);
  }

  // Reads stdout until a line starting with `prefix` appears. False on EOF or deadline.
  bool waitForLine(const std::string& prefix, std::chrono::seconds limit) {
    const auto end = Clock::now() + limit;
    while (Clock::now() < end) {
      size_t nl;
      while ((nl = buf_.find('\n')) != std::string::npos) {
        const std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        lines_.push_back(line);
        if (line.rfind(prefix, 0) == 0) {
          matched_ = line;
          return true;
        }
      }
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, 100) > 0) {
        char tmp[4096];
        const ssize_t n = read(out_, tmp, sizeof tmp);
        if (n <= 0) return false;
        buf_.append(tmp, size_t(n));
      }
    }
    return false;
  }

  // Exit status, or -1 if it did not exit within the limit (then it is killed).
  int waitExit(std::chrono::seconds limit) {
    const auto end = Clock::now() + limit;
    while (Clock::now() < end) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  const std::string& matched() const { return matched_; }

  void killHard() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  std::string buf_;
  std::vector<std::string> lines_;
  std::string matched_;
};

// Key files for n sites in a fresh temporary folder.
std::string keyDir(size_t n) {
  char tmpl[] = "/tmp/strait-keys-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  for (size_t i = 0; i < n; ++i) writeKeyPair(generateKeyPair(), dir, "s" + std::to_string(i));
  return dir;
}

std::string portList(size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += (i ? "," : "") + std::to_string(testing::freePort());
  return s;
}

std::vector<std::string> peerArgs(size_t site, const std::string& ports, const std::string& keys,
                                  std::vector<std::string> extra) {
  std::vector<std::string> a = {STRAIT_TEST_PEER, "--site", std::to_string(site), "--ports", ports, "--keys", keys};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

class Processes : public ::testing::TestWithParam<int> {};

TEST_P(Processes, ExchangeEveryRoundAndExitCleanly) {
  const size_t n = size_t(GetParam());
  const std::string keys = keyDir(n), ports = portList(n);
  std::vector<std::unique_ptr<Child>> kids;
  for (size_t i = 0; i < n; ++i) {
    kids.push_back(std::make_unique<Child>(
        peerArgs(i, ports, keys, {"--rounds", "4", "--bytes", "3000000", "--chunk", "262144"})));
  }
  for (auto& k : kids) EXPECT_TRUE(k->waitForLine("round 3 ok", std::chrono::seconds(60)));
  for (auto& k : kids) EXPECT_EQ(k->waitExit(std::chrono::seconds(30)), 0);
}

INSTANTIATE_TEST_SUITE_P(Sites, Processes, ::testing::Values(2, 3, 4));

TEST(Processes, PeerKilledMidTransferRestartsAndTheJobCompletes) {
  const std::string keys = keyDir(2), ports = portList(2);
  const std::vector<std::string> common = {"--rounds", "5", "--bytes", "64000000", "--chunk", "65536"};
  Child a(peerArgs(0, ports, keys, common));
  auto b = std::make_unique<Child>(peerArgs(1, ports, keys, common));
  ASSERT_TRUE(b->waitForLine("round 1 ok", std::chrono::seconds(60)));
  std::this_thread::sleep_for(std::chrono::milliseconds(60));  // round 2 is on the wire
  b->killHard();
  // The replacement starts where the dead one was (checkpoints are a later
  // issue): round 2. Site 0 must resend what the new process never got.
  std::vector<std::string> again = common;
  again.insert(again.end(), {"--first-round", "2"});
  Child b2(peerArgs(1, ports, keys, again));
  EXPECT_TRUE(a.waitForLine("round 4 ok", std::chrono::seconds(90)));
  EXPECT_TRUE(b2.waitForLine("round 4 ok", std::chrono::seconds(90)));
  EXPECT_EQ(a.waitExit(std::chrono::seconds(30)), 0);
  EXPECT_EQ(b2.waitExit(std::chrono::seconds(30)), 0);
}

TEST(Processes, KilledPeerWithContinueIsReportedMissing) {
  const std::string keys = keyDir(3), ports = portList(3);
  const std::vector<std::string> common = {"--rounds", "3", "--bytes", "100000", "--continue",
                                           "--round-deadline-ms", "1500"};
  Child a(peerArgs(0, ports, keys, common));
  Child b(peerArgs(1, ports, keys, common));
  auto c = std::make_unique<Child>(peerArgs(2, ports, keys, {"--rounds", "1", "--bytes", "100000"}));
  // c does round 0 only, then exits (as good as dead for rounds 1 and 2).
  ASSERT_TRUE(a.waitForLine("round 2 ok", std::chrono::seconds(60)));
  EXPECT_NE(a.matched().find("missing s2"), std::string::npos) << a.matched();
  ASSERT_TRUE(b.waitForLine("round 2 ok", std::chrono::seconds(60)));
  EXPECT_NE(b.matched().find("missing s2"), std::string::npos) << b.matched();
  EXPECT_EQ(a.waitExit(std::chrono::seconds(30)), 0);
  EXPECT_EQ(b.waitExit(std::chrono::seconds(30)), 0);
}

}  // namespace
}  // namespace strait::transport
