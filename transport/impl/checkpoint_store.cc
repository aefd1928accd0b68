#include "transport/checkpoint_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <regex>

#include "core/digest.h"
#include "core/error.h"

namespace strait::transport {

namespace {

constexpr char kMagic[] = "strait checkpoint 1\n";
constexpr size_t kMagicBytes = sizeof(kMagic) - 1;

// Writes all of [data, data + n) or sets errno and returns false.
bool writeAll(int fd, const uint8_t* data, size_t n) {
  while (n > 0) {
    const ssize_t w = ::write(fd, data, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

void makeDirs(const std::string& path) {
  for (size_t at = 1; at <= path.size(); ++at) {
    if (at == path.size() || path[at] == '/') {
      const std::string part = path.substr(0, at);
      if (::mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) {
        fail<Error>("cannot create ", part, ": ", std::strerror(errno));
      }
    }
  }
}

void fsyncDir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

}  // namespace

CheckpointStore::CheckpointStore(std::string root, const std::string& site, int every, int keep)
    : dir_(std::move(root) + "/" + site), every_(every), keep_(keep) {
  // A crash while writing leaves a temporary file: never a checkpoint.
  if (DIR* d = ::opendir(dir_.c_str())) {
    std::vector<std::string> stale;
    while (dirent* e = ::readdir(d)) {
      if (std::strstr(e->d_name, ".tmp-")) stale.push_back(dir_ + "/" + e->d_name);
    }
    ::closedir(d);
    for (const std::string& p : stale) ::unlink(p.c_str());
  }
}

std::string CheckpointStore::path(uint64_t round, uint64_t digest) const {
  char name[64];
  std::snprintf(name, sizeof name, "round-%08llu-%s.ckpt", static_cast<unsigned long long>(round),
                core::digestHex(digest).c_str());
  return dir_ + "/" + name;
}

std::vector<std::pair<uint64_t, uint64_t>> CheckpointStore::held() const {
  static const std::regex kName("^round-([0-9]{8,})-([0-9a-f]{16})\\.ckpt$");
  std::vector<std::pair<uint64_t, uint64_t>> out;
  DIR* d = ::opendir(dir_.c_str());
  if (!d) return out;
  while (dirent* e = ::readdir(d)) {
    std::cmatch m;
    if (std::regex_match(e->d_name, m, kName)) {
      out.emplace_back(std::stoull(m[1].str()), std::stoull(m[2].str(), nullptr, 16));
    }
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

std::string CheckpointStore::save(uint64_t round, uint64_t digest, const State& state) {
  const std::string final_path = path(round, digest);
  const std::string tmp = final_path + ".tmp-" + std::to_string(::getpid());
  auto failed = [&](const std::string& why) {
    ::unlink(tmp.c_str());
    const auto have = held();
    fail<Error>("checkpoint of round ", round, " to ", final_path, " failed: ", why, "; ",
                have.empty() ? std::string("there is no earlier one")
                             : "round " + std::to_string(have.back().first) + " is the newest intact one");
  };
  try {
    makeDirs(dir_);
  } catch (const Error& e) {
    failed(e.what());
  }
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) failed(std::strerror(errno));
  const std::vector<uint8_t> header = encodeStateHeader(state);
  bool ok = writeAll(fd, reinterpret_cast<const uint8_t*>(kMagic), kMagicBytes) &&
            writeAll(fd, header.data(), header.size());
  for (size_t i = 0; ok && i < state.sections.size(); ++i) {
    ok = writeAll(fd, state.sections[i].data, state.sections[i].size);
  }
  if (ok) ok = ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!ok) failed(std::strerror(err));
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) failed(std::strerror(errno));
  fsyncDir(dir_);
  const auto have = held();
  for (size_t i = 0; i + keep_ < have.size(); ++i) ::unlink(path(have[i].first, have[i].second).c_str());
  return final_path;
}

LoadedState CheckpointStore::load(uint64_t round, uint64_t digest, const std::string& digest_of) const {
  const std::string p = path(round, digest);
  LoadedState out;
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail<Error>("checkpoint ", p, " cannot be read: ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) == 0) out.bytes.resize(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < out.bytes.size()) {
    const ssize_t r = ::read(fd, out.bytes.data() + got, out.bytes.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);
  if (got != out.bytes.size()) fail<Error>("checkpoint ", p, " cannot be read: short read");
  if (out.bytes.size() < kMagicBytes || std::memcmp(out.bytes.data(), kMagic, kMagicBytes) != 0) {
    fail<Error>("checkpoint ", p, " cannot be read: not a strait checkpoint");
  }
  try {
    out.state = decodeState(out.bytes.data() + kMagicBytes, out.bytes.size() - kMagicBytes, "checkpoint " + p);
  } catch (const ProtocolError& e) {
    fail<Error>("checkpoint ", p, " cannot be read: ", e.what());
  }
  const auto r = out.state.counters.find("round");
  if (r == out.state.counters.end() || r->second != round) {
    fail<Error>("checkpoint ", p, " is not a strait checkpoint of round ", round);
  }
  if (digest_of.empty()) return out;
  const StateSection* params = nullptr;
  for (const StateSection& s : out.state.sections) {
    if (s.name == digest_of && s.type == SectionType::kFloat32) params = &s;
  }
  if (!params || core::digestSum(reinterpret_cast<const float*>(params->data), params->count()) != digest) {
    fail<Error>("checkpoint ", p, " does not match its digest ", core::digestHex(digest), " (damaged?)");
  }
  return out;
}

}  // namespace strait::transport
