#pragma once
// One site's checkpoints on disk (docs/RELIABILITY.md): DIR/SITE/
// round-NNNNNNNN-DIGEST.ckpt, each a state document (transport/state.h)
// after a magic line. NNNNNNNN is the number of syncs (DiLoCo) or steps
// (every-step mode) the state follows, DIGEST the 16 hex digits of the
// parameters' digest (core/digest.h), identical on every site after a sync:
// sites tell from the names alone which rounds they hold in common.
//
// A write goes to a temporary name, is fsynced, renamed into place and the
// directory fsynced: a crash leaves the older checkpoints whole and at most
// a temporary file, which the next store on that directory removes. Only
// the newest `keep` are kept. Not thread-safe; one store per site leader.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "transport/state.h"

namespace strait::transport {

// A checkpoint read back: the file's bytes and the state viewing them.
struct LoadedState {
  std::vector<uint8_t> bytes;
  State state;
};

class CheckpointStore {
 public:
  // root: the config's checkpoint.dir (resolved); files go to root/site.
  CheckpointStore(std::string root, const std::string& site, int every, int keep);

  int every() const { return every_; }
  const std::string& dir() const { return dir_; }
  std::string path(uint64_t round, uint64_t digest) const;
  // (round, digest) of the checkpoints on disk, oldest first.
  std::vector<std::pair<uint64_t, uint64_t>> held() const;

  // Writes `state` as the checkpoint of (round, digest) and removes all but
  // the newest `keep`. Returns its path. A failure (a full disk, a
  // read-only directory) throws Error naming the file, the reason and the
  // newest intact checkpoint, and leaves the checkpoints on disk as they were.
  std::string save(uint64_t round, uint64_t digest, const State& state);

  // Reads the checkpoint of (round, digest). Throws Error naming the file
  // when it cannot be read, is not a strait checkpoint of that round, or
  // its float32 section `digest_of` does not digest to `digest` (damaged,
  // or renamed). An empty `digest_of`: the caller checks the digest (a
  // sharded job's, which is of the pieces of every rank's file together).
  LoadedState load(uint64_t round, uint64_t digest, const std::string& digest_of) const;

 private:
  std::string dir_;
  int every_;
  int keep_;
};

}  // namespace strait::transport
