// PendingHandshakes without sockets: which accepted-but-silent connections
// the gateway drops.

#include <gtest/gtest.h>

#include "transport/impl/handshakes.h"

namespace strait::transport {
namespace {

TEST(PendingHandshakes, DropsTheOldestSilentConnectionsBeyondTheLimit) {
  PendingHandshakes p(3);
  for (int fd = 10; fd < 15; ++fd) p.accepted(fd);
  EXPECT_EQ(p.overLimit(), (std::vector<int>{10, 11}));
  EXPECT_EQ(p.size(), 3u);
  EXPECT_TRUE(p.overLimit().empty());
}

TEST(PendingHandshakes, AConnectionThatSpokeOrClosedIsNotHeld) {
  PendingHandshakes p(2);
  p.accepted(5);
  p.accepted(6);
  p.finished(5);  // spoke: its handshake is done
  p.accepted(7);
  EXPECT_TRUE(p.overLimit().empty());
  p.accepted(8);
  EXPECT_EQ(p.overLimit(), std::vector<int>{6});
  p.finished(7);
  p.finished(8);
  EXPECT_TRUE(p.empty());
  p.finished(99);  // unknown: nothing happens
  EXPECT_TRUE(p.empty());
}

TEST(PendingHandshakes, AReusedDescriptorIsANewConnection) {
  PendingHandshakes p(2);
  p.accepted(5);
  p.accepted(6);
  p.accepted(5);  // 5 closed (its event not seen) and was reused: now the newest
  p.accepted(7);
  EXPECT_EQ(p.overLimit(), std::vector<int>{6});
}

}  // namespace
}  // namespace strait::transport
