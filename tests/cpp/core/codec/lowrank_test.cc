// lowrank (PowerSGD): exact on low-rank matrices, converges to the best rank-r
// approximation under warm start, handles every size and view.

#include <Eigen/Dense>

#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

std::vector<float> lowRankMatrix(int rows, int cols, int rank, uint64_t seed) {
  const auto a = gaussian(size_t(rows) * rank, seed);
  const auto b = gaussian(size_t(cols) * rank, seed + 1);
  Eigen::Map<const Matrix> A(a.data(), rows, rank), B(b.data(), cols, rank);
  Matrix m = A * B.transpose();
  return std::vector<float>(m.data(), m.data() + m.size());
}

double relError(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += double(x[i] - y[i]) * (x[i] - y[i]);
    den += double(x[i]) * x[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

TEST(LowRank, RecoversAMatrixOfAtMostItsRankInOneStep) {
  for (int rank : {1, 2, 4}) {
    const auto x = lowRankMatrix(64, 48, rank, 10 + rank);
    const Pipeline p = Pipeline::parse("lowrank(rank=" + std::to_string(rank) + ")");
    const auto y = roundTrip(p, x, 3, TensorShape{{64, 48}});
    EXPECT_LT(relError(x, y), 1e-4) << "rank " << rank;
  }
}

// P's columns stay orthonormal however dependent M Q's are, so P P^T M is a
// projection: exact (up to rounding) once the rank reaches M's, and never
// further from M than M is from zero. Before the fix a constant 32x32 matrix
// at rank 4 came back 3x the input, a rank-1 64x48 one at rank 4 with
// relative error 0.51.
TEST(LowRank, RanksAboveTheInputsRankStayExact) {
  struct Case {
    int rows, cols, true_rank;
  };
  for (const Case c : {Case{32, 32, 0}, Case{64, 48, 1}, Case{64, 48, 2}, Case{7, 300, 1}}) {
    std::vector<float> x = c.true_rank == 0 ? std::vector<float>(size_t(c.rows) * c.cols, 0.37f)
                                            : lowRankMatrix(c.rows, c.cols, c.true_rank, 5 + c.true_rank);
    const int have = std::max(1, c.true_rank);
    for (int rank = have; rank <= std::min({8, c.rows, c.cols}); ++rank) {
      const Pipeline p = Pipeline::parse("lowrank(rank=" + std::to_string(rank) + ")");
      CodecState st(3);
      std::vector<uint8_t> payload;
      for (int step = 0; step < 3; ++step) {  // warm starts too
        p.encode(x.data(), x.size(), TensorShape{{c.rows, c.cols}}, st, payload);
        const auto y = decodeAll(payload, x.size());
        EXPECT_LT(relError(x, y), 1e-4) << c.rows << "x" << c.cols << " of rank " << c.true_rank << " at rank "
                                        << rank << ", step " << step;
      }
    }
  }
  // Full rank: a projection never leaves more than the input.
  const auto x = gaussian(40 * 30, 9);
  for (int rank : {1, 4, 16, 30}) {
    const auto y = roundTrip(Pipeline::parse("lowrank(rank=" + std::to_string(rank) + ")"), x, 2, TensorShape{{40, 30}});
    EXPECT_LE(relError(x, y), 1.0 + 1e-5) << "rank " << rank;
  }
}

// Scale invariance from denormal to near float max: before the fix values
// of 1e18 or more, or 1e-25 or less, were sent as all-zero factors.
TEST(LowRank, EveryMagnitudeIsSentNotZeroed) {
  const auto base = lowRankMatrix(24, 20, 2, 31);
  double amax = 0;
  for (float v : base) amax = std::max(amax, double(std::fabs(v)));
  for (int e = -140; e <= 120; e += 10) {
    std::vector<float> x(base.size());
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(std::ldexp(base[i] / amax, e));
    const Pipeline p = Pipeline::parse("lowrank(rank=4)");
    CodecState st(4);
    std::vector<uint8_t> payload;
    for (int step = 0; step < 3; ++step) {
      p.encode(x.data(), x.size(), TensorShape{{24, 20}}, st, payload);
      const auto y = decodeAll(payload, x.size());
      // Subnormal inputs carry few digits themselves: a looser bound there.
      EXPECT_LT(relError(x, y), e < -126 ? 0.05 : 1e-4) << "max|x| = 2^" << e << ", step " << step;
    }
  }
}

TEST(LowRank, WarmStartConvergesToTheBestRankRApproximation) {
  // A full-rank matrix with a clear spectral gap after the 4th singular value.
  const int rows = 80, cols = 60, r = 4;
  auto x = lowRankMatrix(rows, cols, r, 77);
  const auto noise = gaussian(size_t(rows) * cols, 78, 0.05f);
  for (size_t i = 0; i < x.size(); ++i) x[i] += noise[i];
  // Reference: the truncated SVD (Eckart-Young optimum).
  Eigen::Map<const Matrix> M(x.data(), rows, cols);
  Eigen::JacobiSVD<Eigen::MatrixXf> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  Eigen::MatrixXf best = svd.matrixU().leftCols(r) * svd.singularValues().head(r).asDiagonal() *
                         svd.matrixV().leftCols(r).transpose();
  Matrix best_rm = best;
  const std::vector<float> best_v(best_rm.data(), best_rm.data() + best_rm.size());
  const double optimal = relError(x, best_v);

  const Pipeline p = Pipeline::parse("lowrank(rank=4)");
  CodecState st(5);
  std::vector<uint8_t> payload;
  std::vector<float> y(x.size());
  double first = 0, last = 0;
  for (int step = 0; step < 10; ++step) {
    p.encode(x.data(), x.size(), TensorShape{{rows, cols}}, st, payload);
    decode(payload.data(), payload.size(), y.data(), y.size());
    last = relError(x, y);
    if (step == 0) first = last;
  }
  EXPECT_LE(last, first + 1e-6);
  EXPECT_LE(last, optimal * 1.01) << "optimal " << optimal;
}

TEST(LowRank, EverySizeDecodesFiniteAndShapesAreHonoured) {
  const Pipeline p = Pipeline::parse("lowrank(rank=3)");
  for (size_t n : allSizes()) {
    const auto x = gaussian(n, n);
    const auto y = roundTrip(p, x);
    ASSERT_EQ(y.size(), n);
    for (float v : y) ASSERT_TRUE(std::isfinite(v));
    // Rank >= min(rows, cols) of the near-square view: exact up to rounding.
    if (n > 0 && n <= 8) {
      EXPECT_LT(relError(x, y), 1e-5) << n;
    }
  }
  // A conv-like 4-D shape is viewed as [dims0, rest].
  const auto x = lowRankMatrix(16, 3 * 3 * 4, 2, 9);
  const auto y = roundTrip(Pipeline::parse("lowrank(rank=2)"), x, 1, TensorShape{{16, 4, 3, 3}});
  EXPECT_LT(relError(x, y), 1e-4);
}

TEST(LowRank, PayloadIsRowsPlusColsTimesRank) {
  const auto x = gaussian(1000 * 200, 1);
  const auto payload = encodeOnce(Pipeline::parse("lowrank(rank=4) -> fp16"), x, 1,
                                  TensorShape{{1000, 200}});
  EXPECT_EQ(payload.size(), 16u + 12u + 8u + (1000u + 200u) * 4u * 2u);
}

}  // namespace
}  // namespace strait::core
