// The canonical split of a sharded model (core/shards.h): pieces that do not
// depend on any site's world size, who holds them under FSDP2, and which
// ranks of which sites exchange them.

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "core/error.h"
#include "core/shards.h"

namespace strait::core {
namespace {

// torch.chunk(t, world, dim=0) written out plainly: the rank holding each row.
std::vector<int64_t> rowHolders(int64_t rows, int64_t world) {
  const int64_t chunk = (rows + world - 1) / world;
  std::vector<int64_t> out;
  for (int64_t r = 0; r < world; ++r) {
    for (int64_t i = 0; i < chunk && int64_t(out.size()) < rows; ++i) out.push_back(r);
  }
  return out;
}

// Shapes with 0 and 1, rows that do not divide by the world sizes, a
// scalar, an empty tensor, and tensors smaller and larger than a piece.
const std::vector<ParamSize> kModel = {
    {7, 7 * 5}, {1, 1}, {3, 3}, {1, 0}, {10, 10 * 13}, {2, 2 * 40}, {33, 33}, {5, 5 * 64},
};

TEST(Shards, ShardRangeIsTorchChunkAlongDimZero) {
  for (int64_t rows : {1, 2, 3, 7, 10, 33}) {
    for (int64_t world : {1, 2, 3, 4, 5, 8, 16}) {
      const ParamSize t{rows, rows * 6};
      const std::vector<int64_t> holder = rowHolders(rows, world);
      int64_t next = 0;
      for (int64_t r = 0; r < world; ++r) {
        const Range s = shardRange(t, world, r);
        ASSERT_EQ(s.begin, next) << rows << " rows, rank " << r << " of " << world;
        for (int64_t e = s.begin; e < s.end; ++e) ASSERT_EQ(holder[size_t(e / 6)], r);
        next = s.end;
      }
      EXPECT_EQ(next, t.numel) << rows << " rows over " << world;
    }
  }
  // Ranks past the last row hold nothing: 2 rows over 4 ranks.
  EXPECT_EQ(shardRange({2, 8}, 4, 1), (Range{4, 8}));
  EXPECT_EQ(shardRange({2, 8}, 4, 2).size(), 0);
  EXPECT_EQ(shardRange({2, 8}, 4, 3).size(), 0);
}

TEST(Shards, PiecesTileEveryTensorAndDependOnlyOnSizes) {
  for (int64_t piece : {1, 4, 16, 64, 1000}) {
    const auto pieces = canonicalPieces(kModel, piece);
    std::vector<int64_t> next(kModel.size(), 0);
    int64_t last_tensor = -1;
    for (const Piece& p : pieces) {
      ASSERT_GE(p.tensor, last_tensor);  // model order
      last_tensor = p.tensor;
      ASSERT_EQ(p.range.begin, next[size_t(p.tensor)]);
      ASSERT_GT(p.range.size(), 0);
      ASSERT_LE(p.range.size(), piece);
      // Only a tensor's last piece is short.
      if (p.range.end != kModel[size_t(p.tensor)].numel) {
        ASSERT_EQ(p.range.size(), piece);
      }
      next[size_t(p.tensor)] = p.range.end;
    }
    for (size_t i = 0; i < kModel.size(); ++i) EXPECT_EQ(next[i], kModel[i].numel);
  }
  EXPECT_TRUE(canonicalPieces({{1, 0}, {4, 0}}, 8).empty());
}

TEST(Shards, EachPieceIsHeldByConsecutiveRanksFromItsOwner) {
  for (int64_t piece : {1, 5, 16, 100}) {
    const auto pieces = canonicalPieces(kModel, piece);
    for (int64_t world : {1, 2, 3, 4, 7, 64}) {
      const auto held = holdings(kModel, pieces, world);
      ASSERT_EQ(held.size(), pieces.size());
      for (size_t k = 0; k < pieces.size(); ++k) {
        const PieceHolding& h = held[k];
        ASSERT_FALSE(h.parts.empty());
        EXPECT_EQ(h.parts.front().first, h.owner);
        int64_t at = pieces[k].range.begin;
        for (size_t j = 0; j < h.parts.size(); ++j) {
          const auto& [rank, part] = h.parts[j];
          EXPECT_EQ(rank, h.owner + int64_t(j));
          EXPECT_EQ(part.begin, at);
          // The rank really holds it.
          const Range s = shardRange(kModel[size_t(pieces[k].tensor)], world, rank);
          EXPECT_TRUE(s.begin <= part.begin && part.end <= s.end);
          at = part.end;
        }
        EXPECT_EQ(at, pieces[k].range.end) << "piece " << k << " over " << world;
        if (world == 1) {
          EXPECT_EQ(h.parts.size(), 1u);
        }
      }
    }
  }
}

TEST(Shards, WhatARankSendsItsOwnersIsWhatTheyExpectAndCompletesTheirPieces) {
  for (int64_t world : {1, 2, 3, 5}) {
    const auto pieces = canonicalPieces(kModel, 16);
    const auto held = holdings(kModel, pieces, world);
    std::vector<SiteTransfers> all;
    for (int64_t r = 0; r < world; ++r) all.push_back(siteTransfers(pieces, held, world, r));
    // Elements of each piece its owner has: its own part plus what came in.
    std::vector<int64_t> got(pieces.size(), 0);
    for (int64_t r = 0; r < world; ++r) {
      EXPECT_TRUE(all[size_t(r)].to[size_t(r)].empty());
      for (int64_t q = 0; q < world; ++q) {
        const auto& sent = all[size_t(r)].to[size_t(q)];
        const auto& expected = all[size_t(q)].from[size_t(r)];
        ASSERT_EQ(sent.size(), expected.size()) << r << " -> " << q << " of " << world;
        for (size_t j = 0; j < sent.size(); ++j) {
          EXPECT_EQ(sent[j].piece, expected[j].piece);
          EXPECT_EQ(sent[j].range, expected[j].range);
          EXPECT_EQ(held[size_t(sent[j].piece)].owner, q);
          const Range s = shardRange(kModel[size_t(pieces[size_t(sent[j].piece)].tensor)], world, r);
          EXPECT_TRUE(s.begin <= sent[j].range.begin && sent[j].range.end <= s.end);  // r holds it
          got[size_t(sent[j].piece)] += sent[j].range.size();
          if (j > 0) {
            EXPECT_LT(sent[j - 1].piece, sent[j].piece);  // piece order
          }
        }
      }
    }
    for (size_t k = 0; k < pieces.size(); ++k) {
      EXPECT_EQ(got[k] + held[k].parts.front().second.size(), pieces[k].range.size()) << "piece " << k;
    }
  }
}

TEST(Shards, GroupsPairTheOwnersOfEachPieceAtEverySite) {
  // A domestic site of 1 rank, offshore ones of 2 and 3.
  const std::vector<int64_t> worlds = {1, 2, 3};
  const int64_t piece = 16;
  const auto pieces = canonicalPieces(kModel, piece);
  std::vector<std::vector<PieceHolding>> held;
  for (int64_t w : worlds) held.push_back(holdings(kModel, pieces, w));
  const auto groups = exchangeGroups(kModel, piece, worlds);
  std::vector<int> seen(pieces.size(), 0);
  std::set<std::vector<int64_t>> owner_sets;
  int64_t first = -1;
  for (const ExchangeGroup& g : groups) {
    ASSERT_EQ(g.owners.size(), worlds.size());
    ASSERT_FALSE(g.pieces.empty());
    EXPECT_TRUE(std::is_sorted(g.pieces.begin(), g.pieces.end()));
    EXPECT_GT(g.pieces.front(), first);  // in the order of their first piece
    first = g.pieces.front();
    EXPECT_TRUE(owner_sets.insert(g.owners).second) << "two groups of the same owners";
    for (int64_t k : g.pieces) {
      ++seen[size_t(k)];
      for (size_t s = 0; s < worlds.size(); ++s) EXPECT_EQ(g.owners[s], held[s][size_t(k)].owner);
    }
  }
  for (int n : seen) EXPECT_EQ(n, 1);
  // Every rank of the 2- and 3-rank sites owns something here, and the
  // 1-rank site's only rank takes part in every group.
  for (size_t s = 1; s < worlds.size(); ++s) {
    std::set<int64_t> owners;
    for (const auto& g : groups) owners.insert(g.owners[s]);
    EXPECT_EQ(int64_t(owners.size()), worlds[s]);
  }
  for (const auto& g : groups) EXPECT_EQ(g.owners[0], 0);
}

TEST(Shards, EqualSitesExchangeRankWithRank) {
  // The common case: the same world size at both sites, so each rank's
  // group is with the rank of the same index.
  const auto groups = exchangeGroups({{64, 64 * 32}, {4, 4 * 256}}, 128, {4, 4});
  ASSERT_EQ(groups.size(), 4u);
  for (size_t i = 0; i < groups.size(); ++i) EXPECT_EQ(groups[i].owners, (std::vector<int64_t>{int64_t(i), int64_t(i)}));
}

TEST(Shards, SizesThatCannotBeAModelOrASiteAreClearErrors) {
  try {
    canonicalPieces({{3, 10}}, 4);
    FAIL();
  } catch (const InvalidArgument& e) {
    EXPECT_STREQ(e.what(),
                 "sharded exchange: tensor 0 has 3 rows and 10 elements: rows must be >= 1 and divide the elements");
  }
  EXPECT_THROW(canonicalPieces({{4, 8}}, 0), InvalidArgument);
  EXPECT_THROW(canonicalPieces({{0, 0}}, 4), InvalidArgument);
  EXPECT_THROW(shardRange({4, 8}, 0, 0), InvalidArgument);
  EXPECT_THROW(shardRange({4, 8}, 2, 2), InvalidArgument);
  EXPECT_THROW(exchangeGroups({{4, 8}}, 4, {}), InvalidArgument);
  EXPECT_THROW(exchangeGroups({{4, 8}}, 4, {2, 0}), InvalidArgument);
}

}  // namespace
}  // namespace strait::core
