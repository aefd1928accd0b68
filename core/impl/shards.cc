#include "core/shards.h"

#include <algorithm>
#include <map>
#include <string>

#include "core/error.h"

namespace strait::core {
namespace {

void checkShape(const ParamSize& t, const std::string& what) {
  if (t.rows < 1 || t.numel < 0 || t.numel % t.rows != 0) {
    fail<InvalidArgument>("sharded exchange: ", what, " has ", t.rows, " rows and ", t.numel,
                          " elements: rows must be >= 1 and divide the elements");
  }
}

void checkWorld(int64_t world) {
  if (world < 1) fail<InvalidArgument>("sharded exchange: a site of ", world, " ranks: must be >= 1");
}

}  // namespace

Range shardRange(const ParamSize& t, int64_t world, int64_t rank) {
  checkWorld(world);
  checkShape(t, "a tensor");
  if (rank < 0 || rank >= world) fail<InvalidArgument>("sharded exchange: rank ", rank, " of ", world);
  // torch.chunk along dim 0, as FSDP2 shards: chunks of ceil(R / W) rows,
  // the last ones shorter or empty.
  const int64_t chunk = (t.rows + world - 1) / world;
  const int64_t cols = t.numel / t.rows;
  const int64_t first = std::min(rank * chunk, t.rows);
  const int64_t last = std::min((rank + 1) * chunk, t.rows);
  return {first * cols, last * cols};
}

std::vector<Piece> canonicalPieces(const std::vector<ParamSize>& shapes, int64_t piece) {
  if (piece < 1) fail<InvalidArgument>("sharded exchange: piece = ", piece, " elements: must be >= 1");
  std::vector<Piece> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    checkShape(shapes[i], "tensor " + std::to_string(i));
    for (int64_t b = 0; b < shapes[i].numel; b += piece) {
      out.push_back({int64_t(i), {b, std::min(b + piece, shapes[i].numel)}});
    }
  }
  return out;
}

std::vector<PieceHolding> holdings(const std::vector<ParamSize>& shapes, const std::vector<Piece>& pieces,
                                   int64_t world) {
  checkWorld(world);
  std::vector<PieceHolding> out;
  out.reserve(pieces.size());
  for (const Piece& p : pieces) {
    if (p.tensor < 0 || size_t(p.tensor) >= shapes.size()) {
      fail<InvalidArgument>("sharded exchange: a piece of tensor ", p.tensor, " of ", shapes.size());
    }
    const ParamSize& t = shapes[size_t(p.tensor)];
    PieceHolding h;
    // Ranks hold consecutive ranges in rank order, so the piece's holders
    // are consecutive ranks from the one holding its first element.
    for (int64_t r = 0; r < world; ++r) {
      const Range s = shardRange(t, world, r);
      const Range part{std::max(s.begin, p.range.begin), std::min(s.end, p.range.end)};
      if (part.size() <= 0) continue;
      if (h.parts.empty()) h.owner = r;
      h.parts.emplace_back(r, part);
    }
    out.push_back(std::move(h));
  }
  return out;
}

SiteTransfers siteTransfers(const std::vector<Piece>& pieces, const std::vector<PieceHolding>& held, int64_t world,
                            int64_t rank) {
  checkWorld(world);
  if (rank < 0 || rank >= world) fail<InvalidArgument>("sharded exchange: rank ", rank, " of ", world);
  if (held.size() != pieces.size()) {
    fail<InvalidArgument>("sharded exchange: ", held.size(), " holdings for ", pieces.size(), " pieces");
  }
  SiteTransfers t;
  t.to.resize(size_t(world));
  t.from.resize(size_t(world));
  for (size_t k = 0; k < held.size(); ++k) {
    const PieceHolding& h = held[k];
    for (const auto& [holder, range] : h.parts) {
      if (holder == h.owner) continue;
      if (holder == rank) t.to[size_t(h.owner)].push_back({int64_t(k), range});
      if (h.owner == rank) t.from[size_t(holder)].push_back({int64_t(k), range});
    }
  }
  return t;
}

std::vector<ExchangeGroup> exchangeGroups(const std::vector<ParamSize>& shapes, int64_t piece,
                                          const std::vector<int64_t>& worlds) {
  if (worlds.empty()) fail<InvalidArgument>("sharded exchange: no sites");
  const std::vector<Piece> pieces = canonicalPieces(shapes, piece);
  std::vector<std::vector<PieceHolding>> held;
  for (int64_t w : worlds) held.push_back(holdings(shapes, pieces, w));
  std::vector<ExchangeGroup> out;
  std::map<std::vector<int64_t>, size_t> index;  // owners -> group
  for (size_t k = 0; k < pieces.size(); ++k) {
    std::vector<int64_t> owners;
    for (const auto& h : held) owners.push_back(h[k].owner);
    const auto [it, fresh] = index.emplace(owners, out.size());
    if (fresh) out.push_back({owners, {}});
    out[it->second].pieces.push_back(int64_t(k));
  }
  return out;
}

}  // namespace strait::core
