// Error feedback: what was sent plus the residual equals what came in;
// nothing is lost over many steps; a failed step changes nothing.

#include "core/codec/error_feedback.h"
#include "tests/cpp/core/codec/test_util.h"

namespace strait::core {
namespace {

using namespace testing;

TEST(ErrorFeedback, SentPlusResidualEqualsInputPlusOldResidual) {
  for (const std::string& text : allPipelines()) {
    ErrorFeedback ef(Pipeline::parse(text), 3);
    const size_t n = 1029;
    std::vector<uint8_t> payload;
    std::vector<float> sent(n);
    for (int step = 0; step < 12; ++step) {
      const auto g = gaussian(n, 100 + step);
      const std::vector<float> before = ef.residual().empty() ? std::vector<float>(n, 0.0f) : ef.residual();
      ef.encode(g.data(), n, payload);
      decode(payload.data(), payload.size(), sent.data(), n);
      const auto& r = ef.residual();
      for (size_t i = 0; i < n; ++i) {
        // c = fl(old + g) is what was encoded; residual' = fl(c - sent), so
        // sent + residual' equals c to within half an ulp of (c - sent).
        const float c = before[i] + g[i];
        const double err = std::fabs(double(sent[i]) + double(r[i]) - double(c));
        ASSERT_LE(err, std::ldexp(std::fabs(double(c) - sent[i]), -24) + 1e-30)
            << text << " step " << step << " i " << i;
      }
    }
  }
}

// SparseLoCo's buffer: c = g + beta * old; what was sent plus the new
// buffer is exactly c, element by element. Exact, not to within a rounding:
// a value the chunk's top-k dropped stays in the buffer as it was, and a
// kept one is sent as int2's 0 (the buffer keeps it whole) or +-scale with
// |c| >= scale / 2, where c - sent is exact (Sterbenz).
TEST(ErrorFeedback, WithADecaySentPlusBufferIsExactlyWhatCameIn) {
  for (float decay : {0.95f, 0.5f, 0.0f}) {
    for (float magnitude : {1e-30f, 1e-3f, 1.0f, 1e20f}) {
      ErrorFeedback ef(Pipeline::parse("topk(0.03125, chunk=64) -> int2"), 7, decay);
      EXPECT_EQ(ef.decay(), decay);
      const size_t n = 64 * 40 + 9;
      std::vector<uint8_t> payload;
      std::vector<float> sent(n);
      for (int step = 0; step < 20; ++step) {
        auto g = gaussian(n, 1000 + step);
        for (float& v : g) v *= magnitude;
        const std::vector<float> old = ef.residual().empty() ? std::vector<float>(n, 0.0f) : ef.residual();
        ef.encode(g.data(), n, payload);
        decode(payload.data(), payload.size(), sent.data(), n);
        const auto& r = ef.residual();
        size_t kept = 0;
        for (size_t i = 0; i < n; ++i) {
          const float kept_part = decay * old[i];
          const float c = kept_part + g[i];
          ASSERT_EQ(double(sent[i]) + double(r[i]), double(c))
              << "decay " << decay << " magnitude " << magnitude << " step " << step << " i " << i;
          kept += sent[i] != 0.0f;
        }
        EXPECT_LE(kept, size_t(41 * 2));  // two a chunk of 64, one in the last 9
      }
    }
  }
  EXPECT_THROW(ErrorFeedback(Pipeline::parse("int8"), 1, 1.5f), InvalidArgument);
  EXPECT_THROW(ErrorFeedback(Pipeline::parse("int8"), 1, -0.1f), InvalidArgument);
}

TEST(ErrorFeedback, TopKAtFp32IsExact) {
  ErrorFeedback ef(Pipeline::parse("topk(0.1)"));
  const auto g = gaussian(500, 1);
  std::vector<uint8_t> payload;
  ef.encode(g.data(), g.size(), payload);
  const auto sent = decodeAll(payload, g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    if (sent[i] != 0.0f) {
      EXPECT_EQ(ef.residual()[i], 0.0f);
      EXPECT_EQ(sent[i], g[i]);
    } else {
      EXPECT_EQ(ef.residual()[i], g[i]);
    }
  }
}

TEST(ErrorFeedback, NothingIsLostOverManySteps) {
  // Sum of everything sent + final residual == sum of all inputs, and with a
  // constant input the average of what was sent converges to it.
  for (const char* text : {"topk(0.05) -> int8", "sign", "randomk(0.1) -> int4", "lowrank(rank=1)"}) {
    ErrorFeedback ef(Pipeline::parse(text), 11);
    const size_t n = 400;
    const auto g = gaussian(n, 5);
    std::vector<double> sent_sum(n, 0.0);
    std::vector<uint8_t> payload;
    std::vector<float> sent(n);
    const int steps = 400;
    for (int s = 0; s < steps; ++s) {
      ef.encode(g.data(), n, payload);
      decode(payload.data(), payload.size(), sent.data(), n);
      for (size_t i = 0; i < n; ++i) sent_sum[i] += sent[i];
    }
    double err = 0, norm = 0;
    for (size_t i = 0; i < n; ++i) {
      const double total_in = double(g[i]) * steps;
      EXPECT_NEAR(sent_sum[i] + ef.residual()[i], total_in, 1e-3 * steps) << text << " " << i;
      err += std::pow(sent_sum[i] / steps - g[i], 2);
      norm += double(g[i]) * g[i];
    }
    EXPECT_LT(std::sqrt(err / norm), 0.1) << text << ": the mean of what was sent approaches the input";
  }
}

TEST(ErrorFeedback, AFailedStepLeavesTheResidualUnchanged) {
  ErrorFeedback ef(Pipeline::parse("topk(0.1) -> int8"));
  auto g = gaussian(100, 1);
  std::vector<uint8_t> payload;
  ef.encode(g.data(), g.size(), payload);
  const auto before = ef.residual();
  g[42] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(ef.encode(g.data(), g.size(), payload), InvalidArgument);
  EXPECT_EQ(ef.residual(), before);
}

TEST(ErrorFeedback, SizeIsFixedByTheFirstStep) {
  ErrorFeedback ef(Pipeline::parse("int8"));
  const auto g = gaussian(10, 1);
  std::vector<uint8_t> payload;
  ef.encode(g.data(), 10, payload);
  EXPECT_THROW(ef.encode(g.data(), 9, payload), InvalidArgument);
  EXPECT_THROW(ef.setResidual(std::vector<float>(3)), InvalidArgument);
  std::vector<float> bad(10, 0.0f);
  bad[2] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(ef.setResidual(bad), InvalidArgument);
  ef.setResidual(std::vector<float>(10, 1.0f));
  EXPECT_EQ(ef.residual()[9], 1.0f);
}

}  // namespace
}  // namespace strait::core
