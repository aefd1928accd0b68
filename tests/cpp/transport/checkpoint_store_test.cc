// Checkpoint files (transport/checkpoint_store.h): atomic writes, a full
// disk, a crash mid-write, damaged and renamed files.

#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <fstream>

#include "core/digest.h"
#include "core/error.h"
#include "transport/checkpoint_store.h"

namespace strait::transport {
namespace {

std::string tempDir() {
  char tmpl[] = "/tmp/strait-ckpt-XXXXXX";
  return mkdtemp(tmpl);
}

std::vector<std::string> listDir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      if (e->d_name[0] != '.') out.push_back(e->d_name);
    }
    closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A state after `round` syncs whose parameters are all `value` (n of them).
struct Ckpt {
  std::vector<float> global;
  State state;
  uint64_t digest;
  Ckpt(uint64_t round, float value, size_t n = 10) : global(n, value) {
    state.counters = {{"round", round}, {"local_steps", round * 5}};
    state.sections = {{"global", SectionType::kFloat32, reinterpret_cast<const uint8_t*>(global.data()), n * 4}};
    digest = core::digestSum(global.data(), n);
  }
};

TEST(CheckpointStore, NamedByRoundAndDigestAndOnlyTheNewestAreKept) {
  const std::string root = tempDir();
  CheckpointStore store(root, "alpha", 1, 2);
  EXPECT_TRUE(store.held().empty());
  for (uint64_t r = 0; r < 4; ++r) {
    const Ckpt c(r, float(r));
    store.save(r, c.digest, c.state);
  }
  const auto held = store.held();
  ASSERT_EQ(held.size(), 2u);
  EXPECT_EQ(held[0].first, 2u);
  EXPECT_EQ(held[1].first, 3u);
  EXPECT_EQ(held[1].second, Ckpt(3, 3.0f).digest);
  const LoadedState loaded = store.load(3, held[1].second, "global");
  EXPECT_EQ(loaded.state.counter("local_steps", "x"), 15u);
  float first;
  std::memcpy(&first, loaded.state.section("global", SectionType::kFloat32, "x", 10).data, 4);
  EXPECT_EQ(first, 3.0f);
  EXPECT_EQ(listDir(root + "/alpha"),
            (std::vector<std::string>{"round-00000002-" + core::digestHex(held[0].second) + ".ckpt",
                                      "round-00000003-" + core::digestHex(held[1].second) + ".ckpt"}));
}

// A full disk (here: a file size limit, so a write fails with EFBIG) is a
// clear error that keeps the checkpoints already written and leaves no
// temporary file. In a child process: the limit is per process.
TEST(CheckpointStore, AFullDiskIsAClearErrorAndKeepsTheCheckpointsAlreadyWritten) {
  const std::string root = tempDir();
  {
    CheckpointStore store(root, "alpha", 1, 2);
    const Ckpt c(1, 1.0f);
    store.save(1, c.digest, c.state);
  }
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    signal(SIGXFSZ, SIG_IGN);
    rlimit limit{4096, 4096};
    setrlimit(RLIMIT_FSIZE, &limit);
    CheckpointStore store(root, "alpha", 1, 2);
    const Ckpt big(2, 2.0f, 100000);  // 400 KB
    try {
      store.save(2, big.digest, big.state);
      _exit(10);
    } catch (const Error& e) {
      const std::string m = e.what();
      const bool ok = m.find("checkpoint of round 2 to " + root + "/alpha/round-00000002-") == 0 &&
                      m.find(".ckpt failed: File too large; round 1 is the newest intact one") != std::string::npos;
      if (!ok) fprintf(stderr, "message: %s\n", m.c_str());
      _exit(ok ? 0 : 11);
    }
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  CheckpointStore store(root, "alpha", 1, 2);
  ASSERT_EQ(store.held().size(), 1u);
  EXPECT_EQ(store.held()[0].first, 1u);
  for (const std::string& name : listDir(root + "/alpha")) EXPECT_EQ(name.find(".tmp-"), std::string::npos) << name;
  EXPECT_NO_THROW(store.load(1, Ckpt(1, 1.0f).digest, "global"));
}

TEST(CheckpointStore, ACrashMidWriteLeavesATemporaryFileThatTheNextStartRemoves) {
  const std::string root = tempDir();
  mkdir((root + "/alpha").c_str(), 0755);
  std::ofstream(root + "/alpha/round-00000004-0123456789abcdef.ckpt.tmp-999") << "half a checkpoint";
  CheckpointStore store(root, "alpha", 1, 2);
  EXPECT_TRUE(store.held().empty());
  EXPECT_TRUE(listDir(root + "/alpha").empty());
}

TEST(CheckpointStore, ADamagedOrRenamedCheckpointIsRefusedNamingTheFile) {
  const std::string root = tempDir();
  CheckpointStore store(root, "alpha", 1, 2);
  const Ckpt c(3, 0.5f);
  const std::string path = store.save(3, c.digest, c.state);
  // The same bytes under another digest: the contents do not match the name.
  const std::string wrong = store.path(3, 0);
  ASSERT_EQ(rename(path.c_str(), wrong.c_str()), 0);
  try {
    store.load(3, 0, "global");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not match its digest 0000000000000000"), std::string::npos) << e.what();
  }
  ASSERT_EQ(truncate(wrong.c_str(), 40), 0);
  try {
    store.load(3, 0, "global");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("round-00000003-0000000000000000.ckpt cannot be read"), std::string::npos)
        << e.what();
  }
  // A checkpoint of another round under this round's name.
  const Ckpt other(4, 0.5f);
  const std::string p4 = store.save(4, other.digest, other.state);
  ASSERT_EQ(rename(p4.c_str(), store.path(5, other.digest).c_str()), 0);
  EXPECT_THROW(store.load(5, other.digest, "global"), Error);
}

// A sharded job's rank file: its digest is of every rank's pieces together,
// so the store leaves the check to the caller (digest_of empty) and still
// refuses what is not a checkpoint of that round.
TEST(CheckpointStore, WithoutASectionToDigestTheCallerChecksButTheRoundIsStillChecked) {
  const std::string root = tempDir();
  CheckpointStore store(root, "beta/rank1", 1, 2);
  const Ckpt c(6, 0.25f);
  const uint64_t model = c.digest + 12345;  // the whole model's, not this file's
  const std::string path = store.save(6, model, c.state);
  EXPECT_NE(path.find(root + "/beta/rank1/round-00000006-"), std::string::npos) << path;
  EXPECT_THROW(store.load(6, model, "global"), Error);
  const LoadedState loaded = store.load(6, model, "");
  EXPECT_EQ(loaded.state.counter("round", "test"), 6u);
  ASSERT_EQ(rename(path.c_str(), store.path(7, model).c_str()), 0);
  EXPECT_THROW(store.load(7, model, ""), Error);
}

}  // namespace
}  // namespace strait::transport
