// How a verdict is told to HTTP clients: rate limit headers, the 429 response, and the
// JSON of the decision API. One place, so the gateway, the check API and the admin
// listener say the same thing in the same words.
#ifndef SLUICE_SERVER_RENDER_H_
#define SLUICE_SERVER_RENDER_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "server/http_server.h"
#include "server/service.h"

namespace sluice::server {

struct RenderOptions {
  bool ietf_headers =
      true;  // RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers)
};

// Whole seconds a client should wait: the duration rounded up, at least 1; -1 for kNever.
int64_t RetryAfterSeconds(DurationUs retry_after);

// X-RateLimit-Limit, -Remaining, -Reset (Unix time of reset), and the IETF pair,
// RateLimit-Policy and RateLimit, written into res.rendered_fields (replacing any set before).
void SetRateLimitHeaders(HttpResponse& res, const Verdict& v, const RenderOptions& o);
// 429 with Retry-After, the headers above and the seed's JSON body.
void RenderRejection(HttpResponse& res, const Verdict& v, const RenderOptions& o);
// The decision API's JSON object for one verdict.
std::string VerdictJson(const Verdict& v);

}  // namespace sluice::server

#endif  // SLUICE_SERVER_RENDER_H_
