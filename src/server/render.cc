#include "server/render.h"

#include "algo/saturating.h"

#include <algorithm>
#include <charconv>

#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

namespace sluice::server {
namespace http = boost::beast::http;

int64_t RetryAfterSeconds(DurationUs retry_after) {
  if (retry_after == kNever) return -1;
  return std::max<int64_t>(algo::SatAdd(retry_after, kSecond - 1) / kSecond, 1);
}

namespace {

// Sets a header Beast has no enum for: inserted by its name when absent (the usual case, a
// response being built), which skips the lookup among the names Beast knows that set()
// does; replaced when present.
void Put(HttpResponse& res, std::string_view name, std::string_view value) {
  if (res.find(name) == res.end()) {
    res.insert(http::field::unknown, name, value);
  } else {
    res.set(name, value);
  }
}

// The digits of v, at p (room for 20).
char* Digits(char* p, int64_t v) { return std::to_chars(p, p + 20, v).ptr; }

std::string_view Text(const char* begin, const char* end) {
  return {begin, static_cast<size_t>(end - begin)};
}

}  // namespace

// Formats into buffers on the stack: these headers are on every answer.
void SetRateLimitHeaders(HttpResponse& res, const Verdict& v, const RenderOptions& o) {
  if (!v.limit) return;  // a rule without limits has nothing to say
  const Decision& d = v.decision;
  int64_t reset_s = algo::SatAdd(algo::SatAdd(v.now, d.reset_after), kSecond - 1) / kSecond;
  char buf[20];
  Put(res, "X-RateLimit-Limit", Text(buf, Digits(buf, d.limit)));
  Put(res, "X-RateLimit-Remaining", Text(buf, Digits(buf, d.remaining)));
  Put(res, "X-RateLimit-Reset", Text(buf, Digits(buf, reset_s)));
  if (o.ietf_headers) {
    // The policy's own quota: `limit` per period, whatever the algorithm lets spend at once
    // (a bucket's burst is no rate). A window of whole seconds is rounded up, so the rate
    // stated is never above the real one.
    const Policy& policy = v.limit->policy;
    int64_t window_s = std::max<int64_t>((policy.period + kSecond - 1) / kSecond, 1);
    int64_t reset_after_s = algo::SatAdd(d.reset_after, kSecond - 1) / kSecond;
    char line[96];
    char* p = Digits(line, policy.limit);
    p = std::copy_n(";w=", 3, p);
    Put(res, "RateLimit-Policy", Text(line, Digits(p, window_s)));
    p = std::copy_n("limit=", 6, line);
    p = Digits(p, d.limit);
    p = std::copy_n(", remaining=", 12, p);
    p = Digits(p, d.remaining);
    p = std::copy_n(", reset=", 8, p);
    Put(res, "RateLimit", Text(line, Digits(p, reset_after_s)));
  }
}

void RenderRejection(HttpResponse& res, const Verdict& v, const RenderOptions& o) {
  res.result(http::status::too_many_requests);
  SetRateLimitHeaders(res, v, o);
  res.set(http::field::content_type, "application/json");
  int64_t retry = RetryAfterSeconds(v.decision.retry_after);
  boost::json::object body;
  body["error"] = "rate_limit_exceeded";
  if (retry < 0) {
    body["message"] = "Too many requests. This request exceeds the limit and cannot succeed.";
    body["retry_after"] = nullptr;
  } else {
    res.set(http::field::retry_after, std::to_string(retry));
    body["message"] = "Too many requests. Retry after " + std::to_string(retry) + " seconds.";
    body["retry_after"] = retry;
  }
  res.body() = boost::json::serialize(body);
}

std::string VerdictJson(const Verdict& v) {
  const Decision& d = v.decision;
  boost::json::object o;
  o["allowed"] = v.allowed;
  o["rule"] = v.rule ? v.rule->name : "";
  if (v.limit) {
    o["limit_name"] = v.limit->name;
    o["policy"] = v.limit->policy.ToString();
    o["limit"] = d.limit;
    o["remaining"] = d.remaining;
    o["reset"] = algo::SatAdd(algo::SatAdd(v.now, d.reset_after), kSecond - 1) / kSecond;
    o["reset_after_ms"] = algo::SatAdd(d.reset_after, kMillisecond - 1) / kMillisecond;
    int64_t retry = RetryAfterSeconds(d.retry_after);
    if (v.would_reject) {
      o["retry_after"] = retry < 0 ? boost::json::value(nullptr) : boost::json::value(retry);
    } else {
      o["retry_after"] = 0;
    }
    o["delay_ms"] = (d.delay + kMillisecond - 1) / kMillisecond;
  }
  o["shadow"] = v.allowed && v.would_reject;
  if (v.degraded != Degraded::kNo) {
    // Decided without the shared store (unreachable): which fail mode answered.
    constexpr const char* kModes[] = {"", "open", "closed", "local"};
    o["degraded"] = kModes[static_cast<size_t>(v.degraded)];
  }
  return boost::json::serialize(o);
}

}  // namespace sluice::server
