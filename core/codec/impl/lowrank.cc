// lowrank: PowerSGD rank-r factors of a 2-D view (Vogels, Karimireddy, Jaggi
// 2019, "PowerSGD: Practical Low-Rank Gradient Compression", Algorithm 1).
//
// One power iteration with warm start: P = M Q_prev, orthonormalise P's
// columns, Q = M^T P; send P and Q; the receiver reconstructs M ~ P Q^T. Q is
// kept in the CodecState and starts the next iteration, which is what lets a
// single iteration per step track the dominant subspace.
//
// The 2-D view is [dims[0], n / dims[0]] when the tensor has two or more
// dimensions (PowerSGD's choice for conv kernels), otherwise a near-square
// [ceil(n / c), c] with c = ceil(sqrt(n)) and the last row zero-padded.

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>

#include "core/codec/impl/kernels.h"
#include "core/random.h"
#include "core/codec/impl/stages.h"

namespace strait::core::codec_impl {

namespace {

// rank * max|P| * max|Q| bounds every element of P Q^T and every partial sum
// of it; half the float range leaves room for rounding.
constexpr double kMaxProductBound = 1.7e38;

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMap = Eigen::Map<RowMatrix>;
using ConstRowMap = Eigen::Map<const RowMatrix>;

struct View {
  uint64_t rows = 0;
  uint64_t cols = 0;
};

View viewFor(size_t n, const TensorShape& shape) {
  View v;
  if (n == 0) return v;
  if (shape.dims.size() >= 2 && shape.dims[0] > 0 &&
      n % static_cast<uint64_t>(shape.dims[0]) == 0) {
    int64_t prod = 1;
    for (int64_t d : shape.dims) prod *= d;
    if (prod == static_cast<int64_t>(n)) {
      v.rows = static_cast<uint64_t>(shape.dims[0]);
      v.cols = n / v.rows;
      return v;
    }
  }
  v.cols = static_cast<uint64_t>(std::ceil(std::sqrt(static_cast<double>(n))));
  v.rows = (n + v.cols - 1) / v.cols;
  return v;
}

// Orthonormalises the columns of P (rows x r) by modified Gram-Schmidt, in
// double precision and with a second pass ("twice is enough": Giraud,
// Langou, Rozloznik 2005), so the columns come out orthogonal to working
// precision even when P's columns are nearly dependent. A column whose part
// outside the span of the previous ones is below kDependent of its own norm
// is dependent (rounding noise in P = M Q when the rank exceeds M's) and
// becomes zero: normalising that noise would add a direction that is not
// orthogonal to the others, and P P^T M would no longer be a projection.
// Double precision also keeps the norms of very large (|x| ~ 1e19: squares
// overflow float) and very small (|x| ~ 1e-23: squares underflow) columns.
constexpr double kDependent = 1e-3;

void orthonormalize(RowMatrix& p) {
  Eigen::MatrixXd d = p.cast<double>();
  for (Eigen::Index c = 0; c < d.cols(); ++c) {
    const double before = d.col(c).norm();
    for (int pass = 0; pass < 2; ++pass) {
      for (Eigen::Index prev = 0; prev < c; ++prev) {
        d.col(c) -= d.col(prev).dot(d.col(c)) * d.col(prev);
      }
    }
    const double norm = d.col(c).norm();
    if (norm > 0 && std::isfinite(norm) && norm > kDependent * before) {
      d.col(c) /= norm;
    } else {
      d.col(c).setZero();
    }
  }
  p = d.cast<float>();
}

class LowRank final : public Structure {
 public:
  explicit LowRank(int rank) : rank_(rank) {}

  std::string text() const override { return "lowrank(rank=" + std::to_string(rank_) + ")"; }
  StructureKind kind() const override { return StructureKind::kLowRank; }

  size_t maxBodyBytes(size_t n, const ValueCodec& values) const override {
    // Any view [a, b] (a*b >= n, padding < b) with r <= min(a, b) sends
    // (a + b) * r <= 2 * a * b values: at most 2n plus twice the padding.
    const View v = viewFor(n, TensorShape{});
    return 12 + values.sectionBytes(2 * n + 2 * v.cols + 4);
  }

  void encode(const float* in, size_t n, const TensorShape& shape, CodecState& st,
              const ValueCodec& values, std::vector<uint8_t>& out) const override {
    const uint32_t amax_bits = absMaxBits(in, n);
    if (amax_bits >= kernels::kExpMask) failNonFinite(in, n, 0);
    const View v = viewFor(n, shape);
    if (v.rows > 0xffffffffULL || v.cols > 0xffffffffULL) {
      fail<InvalidArgument>("lowrank: view ", v.rows, " x ", v.cols, " exceeds 2^32-1 per side");
    }
    const uint64_t seed = st.nextSeed();
    const Eigen::Index rows = static_cast<Eigen::Index>(v.rows);
    const Eigen::Index cols = static_cast<Eigen::Index>(v.cols);
    const Eigen::Index r = std::min<Eigen::Index>(rank_, std::min(rows, cols));

    ByteWriter w(out);
    w.put<uint32_t>(static_cast<uint32_t>(v.rows));
    w.put<uint32_t>(static_cast<uint32_t>(v.cols));
    w.put<uint32_t>(static_cast<uint32_t>(r));
    if (n == 0) {
      appendValues(values, nullptr, 0, seed, out, 0);
      return;
    }

    // Far from 1 (max|x| outside [2^-60, 2^60]) the products below would
    // overflow or lose their digits in float: work on M * 2^shift (exact in
    // binary) and scale Q back at the end. P does not depend on M's scale.
    const int exponent = amax_bits == 0 ? 0 : std::ilogb(kernels::bitsFloat(amax_bits));
    const int shift = exponent > 60 || exponent < -60 ? -exponent : 0;
    const float* m_data = in;
    if (v.rows * v.cols != n || shift != 0) {
      st.matrix.assign(v.rows * v.cols, 0.0f);
      if (shift == 0) {
        std::copy(in, in + n, st.matrix.begin());
      } else {
        for (size_t i = 0; i < n; ++i) st.matrix[i] = std::ldexp(in[i], shift);
      }
      m_data = st.matrix.data();
    }
    ConstRowMap m(m_data, rows, cols);

    // Warm start: reuse Q if it belongs to this view, else draw it afresh.
    // A column that collapsed to zero is redrawn so it can recover.
    const bool fresh = st.warm_rows != rows || st.warm_cols != cols ||
                       st.warm_q.size() != static_cast<size_t>(cols * r);
    if (fresh) st.warm_q.resize(static_cast<size_t>(cols * r));
    RowMap q(st.warm_q.data(), cols, r);
    for (Eigen::Index c = 0; c < r; ++c) {
      // Unit columns: only Q's directions matter for P, and M Q must not
      // overflow when the previous Q carried M's magnitude.
      const double norm = q.col(c).cast<double>().norm();
      if (fresh || !(norm > 0) || !std::isfinite(norm)) {
        for (Eigen::Index i = 0; i < cols; ++i) {
          q(i, c) = random::normal(seed ^ 0x10e7a4cULL, static_cast<uint64_t>(i * r + c));
        }
      } else {
        q.col(c) = (q.col(c).cast<double>() / norm).cast<float>();
      }
    }
    st.warm_rows = rows;
    st.warm_cols = cols;

    RowMatrix p = m * q;  // rows x r
    orthonormalize(p);
    q.noalias() = m.transpose() * p;  // cols x r (of M * 2^shift; kept as the next warm start)

    // Payload values: P then Q (of M itself), both row-major.
    st.values.resize(static_cast<size_t>((rows + cols) * r));
    std::copy(p.data(), p.data() + rows * r, st.values.begin());
    float* q_sent = st.values.data() + rows * r;
    float q_max = 0.0f;
    for (Eigen::Index i = 0; i < cols * r; ++i) {
      q_sent[i] = shift == 0 ? q.data()[i] : std::ldexp(q.data()[i], -shift);
      q_max = std::max(q_max, std::fabs(q_sent[i]));
    }
    // Receivers refuse factors whose product could overflow (see decode).
    const double bound = static_cast<double>(r) * p.cwiseAbs().maxCoeff() * q_max;
    if (!(bound <= kMaxProductBound)) {
      fail<InvalidArgument>("lowrank: factors of this tensor could overflow float32 (rank * max|P| * "
                            "max|Q| = ", bound, "); scale the input down");
    }
    appendValues(values, st.values.data(), st.values.size(), seed, out, 0);
  }

 private:
  int rank_;
};

}  // namespace

void decodeLowRankBody(ByteReader& r, const DecodeTarget& t) {
  const uint64_t rows = r.get<uint32_t>("lowrank rows");
  const uint64_t cols = r.get<uint32_t>("lowrank cols");
  const uint64_t rank = r.get<uint32_t>("lowrank rank");
  if (t.n == 0) {
    if (rows != 0 || cols != 0 || rank != 0) {
      fail<ProtocolError>("lowrank: empty payload must have a 0 x 0 view of rank 0, got ", rows,
                          " x ", cols, " rank ", rank);
    }
  } else {
    if (cols == 0 || rows != (t.n + cols - 1) / cols) {
      fail<ProtocolError>("lowrank: view ", rows, " x ", cols, " does not fit ", t.n,
                          " values (rows must be ceil(n / cols))");
    }
    if (rank == 0 || rank > std::min(rows, cols)) {
      fail<ProtocolError>("lowrank: rank ", rank, " must be in [1, min(", rows, ", ", cols, ")]");
    }
  }
  // The value section's own length check proves the sender paid for every
  // factor value, which bounds the scratch allocated below by the payload size.
  const ValueSection values = ValueSection::read(r, (rows + cols) * rank);
  r.expectEnd("lowrank payload");
  values.validate();
  if (t.n == 0) return;

  thread_local std::vector<float> factors;
  factors.resize(static_cast<size_t>((rows + cols) * rank));
  values.decode(0, factors.size(), factors.data());
  const Eigen::Index er = static_cast<Eigen::Index>(rank);
  ConstRowMap p(factors.data(), static_cast<Eigen::Index>(rows), er);
  ConstRowMap q(factors.data() + rows * rank, static_cast<Eigen::Index>(cols), er);

  const double bound = static_cast<double>(rank) * p.cwiseAbs().maxCoeff() * q.cwiseAbs().maxCoeff();
  if (!(bound <= kMaxProductBound)) {
    fail<ProtocolError>("lowrank: factors could overflow float32 (rank * max|P| * max|Q| = ", bound,
                        ", limit ", kMaxProductBound, ")");
  }

  const Eigen::Index full = static_cast<Eigen::Index>(t.n / cols);
  const Eigen::Index tail = static_cast<Eigen::Index>(t.n % cols);
  const Eigen::Index ec = static_cast<Eigen::Index>(cols);
  RowMap body(t.data, full, ec);
  if (t.accumulate) {
    body.noalias() += t.weight * (p.topRows(full) * q.transpose());
  } else {
    body.noalias() = p.topRows(full) * q.transpose();
  }
  if (tail > 0) {
    RowMap last(t.data + full * ec, 1, tail);
    if (t.accumulate) {
      last.noalias() += t.weight * (p.row(full) * q.topRows(tail).transpose());
    } else {
      last.noalias() = p.row(full) * q.topRows(tail).transpose();
    }
  }
}

std::shared_ptr<const Structure> makeLowRank(const StageArgs& args) {
  ArgReader a(args);
  const int rank = static_cast<int>(a.integer("rank", 4, 1, 1024, 0));
  a.finish();
  return std::make_shared<LowRank>(rank);
}

}  // namespace strait::core::codec_impl
