// Fuzzes Envoy's rate limit call as it arrives over gRPC: the input is a serialized
// envoy.service.ratelimit.v3.RateLimitRequest, parsed into the generated message and decided
// by Rls::Decide (descriptor matching against a fixed envoyproxy/ratelimit config, replaces,
// limits a descriptor brings itself, hits_addend, the decision on the in-memory store and
// the response headers), as the gRPC service calls it. Checked: the call is answered at once
// (the memory store needs no loop), an invalid one with a reason, a valid one with one
// status per descriptor and an overall code that agrees with them.
#include <cstddef>
#include <cstdint>
#include <string>

#include <boost/asio/io_context.hpp>

#include "fuzz/fuzz_fixture.h"

namespace {

using sluice::fuzz::Fail;
namespace rlspb = ::envoy::service::ratelimit::v3;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static sluice::fuzz::Fixture& fixture = *new sluice::fuzz::Fixture();
  static boost::asio::io_context& io = *new boost::asio::io_context();  // a worker's loop
  rlspb::RateLimitRequest req;
  if (!req.ParseFromArray(data, static_cast<int>(size))) return 0;
  rlspb::RateLimitResponse resp;
  bool answered = false;
  fixture.rls.Decide(req, &resp, io,
                     [&](sluice::server::RlsFailure failure, const std::string& message) {
                       answered = true;
                       if (failure == sluice::server::RlsFailure::kUnavailable) {
                         Fail("the memory store is never unavailable: " + message);
                       }
                       if (failure != sluice::server::RlsFailure::kNone && message.empty()) {
                         Fail("a refusal without a reason");
                       }
                     });
  if (!answered) Fail("a call with the memory store was not answered at once");
  if (resp.statuses_size() == 0) return 0;  // refused (no domain, no descriptors)
  if (resp.statuses_size() != req.descriptors_size()) {
    Fail("statuses do not match descriptors one to one");
  }
  bool over = false;
  for (const auto& s : resp.statuses()) over |= s.code() == rlspb::RateLimitResponse::OVER_LIMIT;
  if (over != (resp.overall_code() == rlspb::RateLimitResponse::OVER_LIMIT) ||
      resp.overall_code() == rlspb::RateLimitResponse::UNKNOWN) {
    Fail("the overall code disagrees with the descriptors'");
  }
  std::string wire;
  if (!resp.SerializeToString(&wire)) Fail("the response does not serialize");
  return 0;
}
