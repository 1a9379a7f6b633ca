// Service: each thread's cached view of the active rules belongs to one Service.
#include "server/service.h"

#include <gtest/gtest.h>

#include <optional>
#include <string_view>

#include "rules/config_loader.h"

namespace sluice::server {
namespace {

class NoAttributes final : public rules::RequestAttributes {
 public:
  std::optional<std::string_view> Header(std::string_view) const override { return std::nullopt; }
  std::optional<std::string_view> Query(std::string_view) const override { return std::nullopt; }
};

rules::Config PerMinute(int limit) {
  rules::Config c;
  std::string yaml =
      "rate_limits:\n  default:\n    requests_per_minute: " + std::to_string(limit) + "\n";
  Status st = rules::LoadConfigText(yaml, "test.yaml", &c);
  EXPECT_TRUE(st.ok()) << st.message();
  return c;
}

// A Service made where a destroyed one lived (same address, same thread) must decide by its
// own rules and counters, not by what the thread cached for the old one.
TEST(ServiceTest, ANewServiceAtAnOldOnesAddressUsesItsOwnRules) {
  NoAttributes attrs;
  rules::Request req;
  req.method = "GET";
  req.path = "/x";
  req.client_ip = "203.0.113.7";
  req.attributes = &attrs;
  std::optional<Service> service;
  service.emplace(PerMinute(5), MemoryStore::Options{});
  EXPECT_EQ(service->Decide(service->Active(), req).decision.limit, 5);
  const Service* first = &*service;
  service.reset();
  service.emplace(PerMinute(7), MemoryStore::Options{});
  ASSERT_EQ(&*service, first);
  Verdict v = service->Decide(service->Active(), req);
  EXPECT_EQ(v.decision.limit, 7);
  EXPECT_EQ(v.decision.remaining, 6);
}

}  // namespace
}  // namespace sluice::server
