#pragma once
// The canonical split of a model for a sharded exchange between sites whose
// workers shard the model with FSDP2 (fully_shard, Shard(0)), each site with
// its own number of ranks (docs/PROTOCOL.md, "Sharded exchange").
//
// Every parameter tensor, in model order, is cut into *pieces*: runs of
// `piece` elements of its row-major flattening, the last one shorter. The
// pieces depend only on the tensors' sizes and `piece`, never on a site's
// world size, so they are the unit every site encodes, exchanges and
// averages, and two sites of different sizes agree on them.
//
// Inside a site, FSDP2 gives rank r of W the rows [min(r c, R), min((r+1) c,
// R)) of a tensor of R rows, c = ceil(R / W): one contiguous range of its
// flat elements (shardRange). A piece's *owner* at a site is the rank that
// holds its first element; the owner gathers the piece's other elements
// from the ranks after it (only pieces that cross a shard boundary have
// any), encodes and exchanges the whole piece, and hands those ranks their
// part of the result. Across sites, the pieces with the same owner at every
// site form a *group*: one exchange between exactly those ranks.
//
// Pure functions of their arguments; thread-safe. They throw InvalidArgument
// on sizes that cannot describe a model or a site.

#include <cstdint>
#include <vector>

namespace strait::core {

// A parameter tensor: its size along dim 0 (1 for a 0-dim tensor) and its
// number of elements (a multiple of rows; 0 for an empty tensor).
struct ParamSize {
  int64_t rows = 1;
  int64_t numel = 0;
};

// [begin, end) of a tensor's flat elements.
struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool operator==(const Range& o) const { return begin == o.begin && end == o.end; }
};

// The elements rank `rank` of `world` holds under FSDP2's Shard(0) (empty
// for a rank past the last row).
Range shardRange(const ParamSize& t, int64_t world, int64_t rank);

struct Piece {
  int64_t tensor = 0;  // index into the shapes, model order
  Range range;         // of that tensor's flat elements
};

// Every piece of every tensor, in model order, then by offset. Empty
// tensors have none.
std::vector<Piece> canonicalPieces(const std::vector<ParamSize>& shapes, int64_t piece);

// Where one piece lives at a site of `world` ranks.
struct PieceHolding {
  int64_t owner = 0;  // the rank holding its first element
  // (rank, elements of the tensor it holds of this piece), in rank order,
  // the owner first; together they are exactly the piece.
  std::vector<std::pair<int64_t, Range>> parts;
};

// The holding of each of `pieces` (canonicalPieces(shapes, ...)) at a site
// of `world` ranks.
std::vector<PieceHolding> holdings(const std::vector<ParamSize>& shapes, const std::vector<Piece>& pieces,
                                   int64_t world);

// What moves inside a site around an exchange: before it, each rank sends
// the owner of every piece it holds part of (and does not own) that part;
// after it, the owner sends the same parts of the result back.
struct Transfer {
  int64_t piece = 0;  // index into the pieces
  Range range;        // of that piece's tensor
};
struct SiteTransfers {
  // Indexed by the other rank, each in piece order: what this rank sends
  // to it before the exchange (and receives back after), and what it
  // receives from it before (and sends back after). Sender and receiver
  // compute the same list, so a batch needs no framing beyond its length.
  std::vector<std::vector<Transfer>> to, from;
};
SiteTransfers siteTransfers(const std::vector<Piece>& pieces, const std::vector<PieceHolding>& held, int64_t world,
                            int64_t rank);

// Pieces with the same owner at every site: one exchange among exactly
// those ranks (owners[s] at site s).
struct ExchangeGroup {
  std::vector<int64_t> owners;  // per site, in the job's site order
  std::vector<int64_t> pieces;  // indices into the pieces, ascending
};

// The groups of a job whose sites have `worlds[s]` ranks, in the order of
// their first piece. Every rank of every site computes the same list from
// the same arguments, so a group's index names it on the wire.
std::vector<ExchangeGroup> exchangeGroups(const std::vector<ParamSize>& shapes, int64_t piece,
                                          const std::vector<int64_t>& worlds);

}  // namespace strait::core
