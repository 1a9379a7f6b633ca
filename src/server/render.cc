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

// Writes into a buffer with room for all the rate limit header lines (under 400 bytes:
// five names, five numbers of at most 20 digits and the IETF words).
class LineWriter {
 public:
  explicit LineWriter(char* p) : p_(p) {}
  LineWriter& Text(std::string_view t) {
    p_ = std::copy(t.begin(), t.end(), p_);
    return *this;
  }
  LineWriter& Number(int64_t v) {
    p_ = std::to_chars(p_, p_ + 20, v).ptr;
    return *this;
  }
  char* end() const { return p_; }

 private:
  char* p_;
};

}  // namespace

// Rendered straight into the response's header block: these headers are on every answer.
void SetRateLimitHeaders(HttpResponse& res, const Verdict& v, const RenderOptions& o) {
  if (!v.limit) return;  // a rule without limits has nothing to say
  // The names, in the order written; an upstream's fields of these names give way to them
  // when its answer is merged (Upstream, RenderedHas).
  static constexpr std::string_view kNames[] = {"X-RateLimit-Limit", "X-RateLimit-Remaining",
                                                "X-RateLimit-Reset", "RateLimit-Policy",
                                                "RateLimit"};
  const Decision& d = v.decision;
  int64_t reset_s = algo::SatAdd(algo::SatAdd(v.now, d.reset_after), kSecond - 1) / kSecond;
  char buf[512];
  LineWriter w(buf);
  w.Text(kNames[0]).Text(": ").Number(d.limit).Text("\r\n");
  w.Text(kNames[1]).Text(": ").Number(d.remaining).Text("\r\n");
  w.Text(kNames[2]).Text(": ").Number(reset_s).Text("\r\n");
  if (o.ietf_headers) {
    // The policy's own quota: `limit` per period, whatever the algorithm lets spend at once
    // (a bucket's burst is no rate). A window of whole seconds is rounded up, so the rate
    // stated is never above the real one.
    const Policy& policy = v.limit->policy;
    int64_t window_s = std::max<int64_t>((policy.period + kSecond - 1) / kSecond, 1);
    int64_t reset_after_s = algo::SatAdd(d.reset_after, kSecond - 1) / kSecond;
    w.Text(kNames[3]).Text(": ").Number(policy.limit).Text(";w=").Number(window_s);
    w.Text("\r\n").Text(kNames[4]).Text(": limit=").Number(d.limit);
    w.Text(", remaining=").Number(d.remaining).Text(", reset=").Number(reset_after_s);
    w.Text("\r\n");
  }
  res.rendered_fields.assign(buf, w.end());
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
    o["delay_ms"] = (v.delay() + kMillisecond - 1) / kMillisecond;
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
