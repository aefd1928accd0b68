#pragma once
// What the sharded engines (sharded.cc: DiLoCo; sharded_every_step.cc:
// every-step mode under FSDP2) share: the canonical pieces of the model,
// the exchange groups of the job, this rank's gateway per group, and the
// rounds every rank of the site waits for together. Not a public API.

#include <ATen/ATen.h>

#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "core/shards.h"
#include "torch_ext/csrc/session_impl.h"
#include "torch_ext/strait_torch.h"
#include "transport/gateway.h"

namespace strait::torch {

// Each parameter's rows and elements, from its full sizes: a 0-dim tensor
// has one row, a (0, d) one is empty.
std::vector<core::ParamSize> paramSizes(const std::vector<std::vector<int64_t>>& shapes);

std::vector<uint8_t> u64Bytes(uint64_t v);

struct ShardedGroups {
  using Futures = std::vector<std::optional<std::future<transport::RoundResult>>>;
  // A round completed for group mine[j] (applied as soon as it is in).
  using Done = std::function<void(size_t j, const transport::RoundResult&)>;
  // Called while the site waits for rounds (answering joins); may settle
  // group j's round first.
  using Serve = std::function<void(const std::function<void(size_t)>& settle)>;

  // `engine` names the engine in messages ("sharded DiLoCo").
  ShardedGroups(Session::Impl& s, std::string engine, std::vector<std::string> names,
                std::vector<std::vector<int64_t>> shapes);

  Session::Impl& s;
  std::string engine;
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::unique_ptr<ShardedPieces> pieces;     // the whole model's, over the site's group
  std::vector<std::vector<int64_t>> table;  // every piece: tensor, begin, end
  std::vector<core::ParamSize> sizes;       // each parameter's rows and elements
  std::vector<int64_t> worlds;              // every site's number of ranks
  std::vector<core::ExchangeGroup> groups;  // every group of the job
  std::vector<size_t> mine;                 // the groups this rank owns its site's pieces of
  std::map<size_t, std::unique_ptr<transport::Gateway>> gateways;
  std::map<int64_t, size_t> position;       // owned piece -> index into pieces->owned()

  // The pieces of group g (in piece order) of a per-owned-piece list.
  std::vector<at::Tensor> ofGroup(const std::vector<at::Tensor>& perPiece, size_t g) const;
  int64_t groupElements(size_t g) const;
  // Raises on every rank of the site when fn raised on any (the same
  // message on the ranks where it did; a pointer to them elsewhere).
  void together(const std::string& what, const std::function<void()>& fn);
  // Every group of this rank (but those in `skip`) exchanges (round, tag)
  // at once: startRounds(), then awaitRounds().
  std::vector<transport::RoundResult> exchange(uint64_t round, const std::string& tag,
                                               const std::function<std::vector<uint8_t>(size_t)>& payload,
                                               core::MessageKind kind, const Done& done = {},
                                               const Serve& serve = {}, const std::set<size_t>& skip = {});
  // Starts (round, tag) on the gateway of every group of mine (but those in
  // skip) with payload(group). A failure is left in `error` (the rounds
  // started so far stay started) for awaitRounds to raise on every rank.
  Futures startRounds(uint64_t round, const std::string& tag,
                      const std::function<std::vector<uint8_t>(size_t)>& payload, core::MessageKind kind,
                      std::exception_ptr& error, const std::set<size_t>& skip = {});
  // The ranks of the site wait together, agreeing every 20 ms on whether
  // all are done or any failed (so that none sits in a collective while
  // another could still answer a join); `done(j, result)` runs as mine[j]'s
  // round completes, `serve` meanwhile. Returns each group's result in
  // mine's order (empty for groups without a future). Raises on every rank
  // when any failed (or `error` was set), naming `what`.
  std::vector<transport::RoundResult> awaitRounds(const std::string& what, Futures& futures, std::exception_ptr error,
                                                  const Done& done = {}, const Serve& serve = {});
  // Every site's number of ranks, in a control round of `tag`.
  void agreeWorlds(const std::string& tag);
  // pieces, table, sizes, groups, mine, position and this rank's gateways,
  // from worlds; each gateway with room for at least `rounds_in_flight`
  // open rounds (the config's max_rounds_in_flight otherwise).
  void openGateways(int rounds_in_flight = 0);
  // `values` (per owned piece) become site 0's where any site's differ
  // (compared by digest first), in rounds `tag`.digest and `tag`.
  void agreeInitial(std::vector<at::Tensor>& values, const std::string& tag);

  // The weighted mean, in site order, of every site's parts in a group's
  // round `r`: one float32 tensor per piece, shaped and placed like
  // `like` (on the decoding device). `what` names the message in errors.
  std::vector<at::Tensor> groupMean(const transport::RoundResult& r, const std::vector<at::Tensor>& like,
                                    const std::string& what) const;
  // Every rank's shard of each parameter (`locals`, updated in place)
  // takes the owners' `values` (per owned piece): one scatter in the site.
  void scatterToLocals(const std::vector<at::Tensor>& values, std::vector<at::Tensor>& locals) const;

  // The start of the description the sites agree on: "`engine_line`,
  // pieces of P elements", then "NAME (d0, d1, ...)" per parameter.
  std::string describePieces(const std::string& engine_line) const;
  // The L2 norm of the site's update, whose owned pieces are `values` on
  // each rank (squares summed across the site; every rank together).
  double siteNorm(const std::vector<at::Tensor>& values);
  // The payload of group g: pieces `ks` (ascending) with values `values`,
  // under a privacy policy (`site_norm` given) clipped by the site's norm
  // and noised as this group's share, each then compressed by the config's
  // rule for its parameter (whole size) with error feedback kept under
  // `key` + the piece's number, `pipeline` if not empty; framed as parts.
  std::vector<uint8_t> encodeGroup(size_t g, const std::vector<int64_t>& ks, const std::vector<at::Tensor>& values,
                                   const std::string& key, const std::string& pipeline,
                                   std::optional<double> site_norm);
};

}  // namespace strait::torch
