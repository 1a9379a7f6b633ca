// Metrics: each thread's counters belong to one Metrics.
#include "server/metrics.h"

#include <gtest/gtest.h>

#include <optional>
#include <string>

namespace sluice::server {
namespace {

// A Metrics made where a destroyed one lived (same address, same thread) must count in
// blocks of its own, not in the freed blocks the thread had for the old one.
TEST(MetricsTest, ANewMetricsAtAnOldOnesAddressCountsInItsOwnBlocks) {
  std::optional<Metrics> metrics;
  metrics.emplace();
  metrics->Count(metrics->SlotFor("old"), Metrics::Outcome::kAllowed);
  const Metrics* first = &*metrics;
  metrics.reset();
  metrics.emplace();
  ASSERT_EQ(&*metrics, first);
  size_t slot = metrics->SlotFor("new");
  metrics->Count(slot, Metrics::Outcome::kLimited);
  metrics->Count(slot, Metrics::Outcome::kLimited);
  std::string text = metrics->Render([](std::string&) {});
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"new\",outcome=\"limited\"} 2\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"new\",outcome=\"allowed\"} 0\n"),
            std::string::npos)
      << text;
}

}  // namespace
}  // namespace sluice::server
