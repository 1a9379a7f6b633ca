#include "server/json_keys.h"

#include <string>

#include <gtest/gtest.h>

namespace sluice::server {
namespace {

TEST(JsonKeys, FindsAKeyGivenTwiceAtAnyDepth) {
  EXPECT_EQ(FirstDuplicateKey(R"({"path":"/a","path":"/b"})"), "path");
  EXPECT_EQ(FirstDuplicateKey(R"({"headers":{"X-A":"1","X-A":"2"}})"), "X-A");
  EXPECT_EQ(FirstDuplicateKey(R"({"checks":[{"a":1},{"b":1,"b":2}]})"), "b");
  // Keys are compared decoded: an escape is the same key.
  EXPECT_EQ(FirstDuplicateKey(R"({"user_id":"a","user_\u0069d":"b"})"), "user_id");
}

TEST(JsonKeys, DistinctKeysAndNonJsonFindNothing) {
  EXPECT_EQ(FirstDuplicateKey(R"({"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}]})"), std::nullopt);
  EXPECT_EQ(FirstDuplicateKey(R"({"X-A":"1","x-a":"2"})"), std::nullopt);  // JSON keys are exact
  EXPECT_EQ(FirstDuplicateKey("{bad"), std::nullopt);
  EXPECT_EQ(FirstDuplicateKey(""), std::nullopt);
  std::string many = "{";
  for (int i = 0; i < 100000; ++i) many += "\"k" + std::to_string(i) + "\":0,";
  EXPECT_EQ(FirstDuplicateKey(many + "\"k7\":1}"), "k7");
}

}  // namespace
}  // namespace sluice::server
