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

// Names come from config files (an envoy descriptor's value may hold any character): the
// exposition stays parseable.
TEST(MetricsTest, LabelValuesAreEscaped) {
  EXPECT_EQ(PromLabel(R"(plain.key_value)"), "plain.key_value");
  EXPECT_EQ(PromLabel("a\"b\\c\nd"), R"(a\"b\\c\nd)");
  Metrics metrics;
  metrics.Count(metrics.SlotFor("envoy:d.k_say \"hi\""), Metrics::Outcome::kAllowed);
  std::string text = metrics.Render([](std::string&) {});
  EXPECT_NE(text.find(R"(sluice_decisions_total{rule="envoy:d.k_say \"hi\"",outcome="allowed"} 1)"),
            std::string::npos)
      << text;
}

// A raw CR, NUL or ESC has no escape in the text format: written %XX, so one line stays one.
TEST(MetricsTest, ControlCharactersInLabelValuesAreWrittenAsEscapes) {
  EXPECT_EQ(PromLabel(std::string("a\rb\0c\x1b[31m\x7f", 11)), "a%0Db%00c%1B[31m%7F");
}

// Names built from requests' values (detailed_metric) take at most kMaxRequestNames slots:
// a client sending new values cannot leave a rule loaded later without its own series.
TEST(MetricsTest, RequestValuesCannotTakeTheSlotsOfConfiguredNames) {
  Metrics metrics;
  for (size_t i = 0; i < 2 * Metrics::kMaxRules; ++i) {
    size_t slot = metrics.SlotForRequestValue("envoy:d.dm_v" + std::to_string(i));
    EXPECT_EQ(slot == Metrics::kMaxRules - 1, i >= Metrics::kMaxRequestNames) << i;
  }
  EXPECT_EQ(metrics.SlotForRequestValue("envoy:d.dm_v7"), 7u);  // a known value keeps its slot
  size_t later = metrics.SlotFor("envoy:d.newkey");
  EXPECT_EQ(later, Metrics::kMaxRequestNames);
  metrics.Count(later, Metrics::Outcome::kLimited);
  std::string text = metrics.Render([](std::string&) {});
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"envoy:d.newkey\",outcome=\"limited\"} 1\n"),
            std::string::npos);
}

// Past kMaxRules names (envoy descriptors with detailed_metric can name many), the rest
// share one slot, shown as "(other)": their decisions are counted, not dropped.
TEST(MetricsTest, NamesPastTheBoundAreCountedAsOther) {
  Metrics metrics;
  size_t last = 0;
  testing::internal::CaptureStderr();
  for (size_t i = 0; i < Metrics::kMaxRules + 100; ++i) {
    last = metrics.SlotFor("name" + std::to_string(i));
    metrics.Count(last, Metrics::Outcome::kAllowed);
  }
  std::string log = testing::internal::GetCapturedStderr();
  EXPECT_EQ(last, Metrics::kMaxRules - 1);
  // Said once, with the first name that did not get a slot of its own.
  EXPECT_NE(log.find("WARN metrics: 1023 rule names have been counted since start (reloads keep "
                     "every name they met, so that counters stay monotonic); 'name1023' and "
                     "later new names are counted as \"(other)\" until a restart"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("WARN", log.find("WARN") + 1), std::string::npos) << log;
  EXPECT_EQ(metrics.SlotFor("name0"), 0u);
  std::string text = metrics.Render([](std::string&) {});
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"name1022\",outcome=\"allowed\"} 1\n"),
            std::string::npos);
  EXPECT_EQ(text.find("rule=\"name1023\""), std::string::npos);
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"(other)\",outcome=\"allowed\"} 101\n"),
            std::string::npos);
}

// Past kMaxRequestNames request-built names, with room left for configured ones, the rest
// are counted as "(other)" and shown: no decision goes missing from the sum.
TEST(MetricsTest, RequestValuesPastTheirBoundAreShownAsOther) {
  Metrics metrics;
  testing::internal::CaptureStderr();
  const size_t n = Metrics::kMaxRequestNames + 44;
  for (size_t i = 0; i < n; ++i) {
    metrics.Count(metrics.SlotForRequestValue("envoy:d.dm_v" + std::to_string(i)),
                  Metrics::Outcome::kAllowed);
  }
  std::string log = testing::internal::GetCapturedStderr();
  std::string text = metrics.Render([](std::string&) {});
  EXPECT_NE(text.find("sluice_decisions_total{rule=\"(other)\",outcome=\"allowed\"} 44\n"),
            std::string::npos)
      << text;
  EXPECT_NE(log.find("WARN metrics: 256 names built from request values (detailed_metric) have "
                     "been counted since start; 'envoy:d.dm_v256' and later new ones are counted "
                     "as \"(other)\" until a restart"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("dm_v257"), std::string::npos) << log;  // said once
}

// '%' is escaped too, so that the %XX escapes cannot make two values one series.
TEST(MetricsTest, APercentSignIsEscapedSoThatEscapesStayOneToOne) {
  EXPECT_EQ(PromLabel("x\ry"), "x%0Dy");
  EXPECT_EQ(PromLabel("x%0Dy"), "x%250Dy");
  EXPECT_EQ(PromLabel("100%"), "100%25");
}

}  // namespace
}  // namespace sluice::server
