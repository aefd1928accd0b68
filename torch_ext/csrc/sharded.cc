// ShardedPieces (strait_torch.h): the pieces of an FSDP2-sharded model
// brought to their owners and back, over the site's process group.

#include <ATen/ATen.h>

#include <map>

#include "core/error.h"
#include "core/shards.h"
#include "torch_ext/strait_torch.h"

namespace strait::torch {

struct ShardedPieces::Layout {
  std::vector<core::TensorShape> shapes;
  std::vector<core::Piece> pieces;
  std::vector<core::PieceHolding> held;
  core::SiteTransfers transfers;
  std::vector<core::Range> shards;  // this rank's elements of each tensor
  std::map<int64_t, size_t> owned;  // piece -> position in owned()
  bool any_transfer = false;        // on any rank of the site
};

ShardedPieces::ShardedPieces(std::vector<std::vector<int64_t>> shapes, int64_t piece,
                             c10::intrusive_ptr<c10d::ProcessGroup> group)
    : group_(std::move(group)) {
  if (group_) {
    world_ = group_->getSize();
    rank_ = group_->getRank();
  }
  auto l = std::make_shared<Layout>();
  for (const auto& sizes : shapes) {
    int64_t numel = 1;
    for (int64_t d : sizes) numel *= d;
    l->shapes.push_back({sizes.empty() ? 1 : sizes[0], numel});
  }
  l->pieces = core::canonicalPieces(l->shapes, piece);
  l->held = core::holdings(l->shapes, l->pieces, world_);
  l->transfers = core::siteTransfers(l->pieces, l->held, world_, rank_);
  for (const auto& t : l->shapes) l->shards.push_back(core::shardRange(t, world_, rank_));
  for (size_t k = 0; k < l->held.size(); ++k) {
    if (l->held[k].parts.size() > 1) l->any_transfer = true;
    if (l->held[k].owner == rank_) {
      l->owned.emplace(int64_t(k), owned_.size());
      owned_.push_back(int64_t(k));
    }
  }
  layout_ = std::move(l);
}

std::vector<std::vector<int64_t>> ShardedPieces::pieces() const {
  std::vector<std::vector<int64_t>> out;
  for (const auto& p : layout_->pieces) out.push_back({p.tensor, p.range.begin, p.range.end});
  return out;
}

namespace {

int64_t total(const std::vector<core::Transfer>& ts) {
  int64_t n = 0;
  for (const auto& t : ts) n += t.range.size();
  return n;
}

// One all-to-all of float32 runs: `send[q]` to rank q; returns what came
// from every rank, in rank order, with `from[q]` elements from rank q.
at::Tensor allToAll(c10d::ProcessGroup& group, const std::vector<std::vector<at::Tensor>>& send,
                    const std::vector<int64_t>& from, const at::TensorOptions& options) {
  std::vector<at::Tensor> runs;
  std::vector<int64_t> in_splits, out_splits(from);
  for (const auto& to_q : send) {
    int64_t n = 0;
    for (const at::Tensor& t : to_q) {
      runs.push_back(t);
      n += t.numel();
    }
    in_splits.push_back(n);
  }
  at::Tensor input = runs.empty() ? at::empty({0}, options) : at::cat(runs);
  int64_t incoming = 0;
  for (int64_t n : from) incoming += n;
  at::Tensor output = at::empty({incoming}, options);
  group.alltoall_base(output, input, out_splits, in_splits)->wait();
  return output;
}

}  // namespace

std::vector<at::Tensor> ShardedPieces::gather(const std::vector<at::Tensor>& locals) const {
  const Layout& l = *layout_;
  if (locals.size() != l.shapes.size()) {
    fail<InvalidArgument>("ShardedPieces.gather: ", locals.size(), " local shards for a model of ", l.shapes.size(),
                          " parameters");
  }
  at::TensorOptions options = at::TensorOptions(at::kFloat);
  if (!locals.empty()) options = options.device(locals[0].device());
  std::vector<at::Tensor> flat;
  for (size_t i = 0; i < locals.size(); ++i) {
    if (locals[i].numel() != l.shards[i].size()) {
      fail<InvalidArgument>("ShardedPieces: parameter ", i, " has ", locals[i].numel(), " elements on rank ", rank_,
                            ", but FSDP2's Shard(0) of its ", l.shapes[i].numel, " elements (", l.shapes[i].rows,
                            " rows) over ", world_, " ranks gives it ", l.shards[i].size(),
                            ": is the model sharded with fully_shard along dim 0?");
    }
    flat.push_back(locals[i].detach().reshape({-1}).to(options));
  }
  auto ofShard = [&](int64_t tensor, const core::Range& r) {
    return flat[size_t(tensor)].narrow(0, r.begin - l.shards[size_t(tensor)].begin, r.size());
  };
  std::vector<at::Tensor> out;
  for (int64_t k : owned_) {
    const core::Piece& p = l.pieces[size_t(k)];
    at::Tensor whole = at::empty({p.range.size()}, options);
    const core::Range own = l.held[size_t(k)].parts.front().second;
    whole.narrow(0, 0, own.size()).copy_(ofShard(p.tensor, own));
    out.push_back(whole);
  }
  if (!l.any_transfer || world_ == 1) return out;
  std::vector<std::vector<at::Tensor>> send(static_cast<size_t>(world_));
  std::vector<int64_t> from;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.to[size_t(q)]) send[size_t(q)].push_back(ofShard(l.pieces[size_t(t.piece)].tensor, t.range));
    from.push_back(total(l.transfers.from[size_t(q)]));
  }
  const at::Tensor got = allToAll(*group_, send, from, options);
  int64_t cursor = 0;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.from[size_t(q)]) {
      const core::Piece& p = l.pieces[size_t(t.piece)];
      out[l.owned.at(t.piece)].narrow(0, t.range.begin - p.range.begin, t.range.size()).copy_(got.narrow(0, cursor, t.range.size()));
      cursor += t.range.size();
    }
  }
  return out;
}

void ShardedPieces::scatter(const std::vector<at::Tensor>& values, std::vector<at::Tensor>& out) const {
  const Layout& l = *layout_;
  if (values.size() != owned_.size()) {
    fail<InvalidArgument>("ShardedPieces.scatter: ", values.size(), " values for the ", owned_.size(),
                          " pieces rank ", rank_, " owns");
  }
  if (out.size() != l.shapes.size()) {
    fail<InvalidArgument>("ShardedPieces.scatter: ", out.size(), " outputs for a model of ", l.shapes.size(),
                          " parameters");
  }
  for (size_t j = 0; j < owned_.size(); ++j) {
    const int64_t n = l.pieces[size_t(owned_[j])].range.size();
    if (values[j].numel() != n || values[j].scalar_type() != at::kFloat || !values[j].is_contiguous()) {
      fail<InvalidArgument>("ShardedPieces.scatter: the value of owned piece ", j, " must be ", n,
                            " contiguous float32 elements (as gather returned it)");
    }
  }
  std::vector<at::Tensor> flat;
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i].numel() != l.shards[i].size() || !out[i].is_contiguous()) {
      fail<InvalidArgument>("ShardedPieces.scatter: output ", i, " must be contiguous with ", l.shards[i].size(),
                            " elements (this rank's shard), not ", out[i].numel());
    }
    flat.push_back(out[i].view({-1}));
  }
  auto intoShard = [&](int64_t tensor, const core::Range& r) {
    return flat[size_t(tensor)].narrow(0, r.begin - l.shards[size_t(tensor)].begin, r.size());
  };
  for (size_t j = 0; j < owned_.size(); ++j) {
    const core::Piece& p = l.pieces[size_t(owned_[j])];
    const core::Range own = l.held[size_t(owned_[j])].parts.front().second;
    intoShard(p.tensor, own).copy_(values[j].narrow(0, 0, own.size()));
  }
  if (!l.any_transfer || world_ == 1) return;
  const at::TensorOptions options = values.empty() ? at::TensorOptions(at::kFloat).device(out.empty() ? at::kCPU : out[0].device())
                                                   : values[0].options();
  std::vector<std::vector<at::Tensor>> send(static_cast<size_t>(world_));
  std::vector<int64_t> from;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.from[size_t(q)]) {
      const core::Piece& p = l.pieces[size_t(t.piece)];
      send[size_t(q)].push_back(values[l.owned.at(t.piece)].narrow(0, t.range.begin - p.range.begin, t.range.size()));
    }
    from.push_back(total(l.transfers.to[size_t(q)]));
  }
  const at::Tensor got = allToAll(*group_, send, from, options);
  int64_t cursor = 0;
  for (int64_t q = 0; q < world_; ++q) {
    for (const auto& t : l.transfers.to[size_t(q)]) {
      intoShard(l.pieces[size_t(t.piece)].tensor, t.range).copy_(got.narrow(0, cursor, t.range.size()));
      cursor += t.range.size();
    }
  }
}

}  // namespace strait::torch
