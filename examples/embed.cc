// Limiting in-process with the embeddable library: no server, no network.
// Built and run by the test suite (ctest -R example_embed), so this example stays true.
#include <cstdio>

#include "sluice/memory_store.h"

int main() {
  sluice::MemoryStore store;  // thread-safe; share one per process

  // 5 logins per minute per IP, and a token bucket for the API: bursts of 20, 10/s.
  sluice::Limit* login =
      store.AddLimit("login", sluice::Policy::SlidingWindowCounter(5, sluice::kMinute));
  sluice::Limit* api = store.AddLimit(
      "api", sluice::Policy::TokenBucket(/*capacity=*/20, /*refill=*/10, sluice::kSecond));

  sluice::TimeUs now = sluice::SystemClock::Instance().Now();
  int admitted = 0;
  for (int i = 0; i < 7; ++i) {
    sluice::Decision d = login->Check("ip:203.0.113.7", now);
    if (d.allowed) {
      ++admitted;
    } else {
      std::printf("429: retry after %.1f s\n", static_cast<double>(d.retry_after) / 1e6);
    }
  }

  // Several limits of one request, all-or-nothing: a request the login limit rejects
  // spends nothing from the API bucket.
  sluice::LimitCheck checks[] = {{api, "user:42", 1}, {login, "ip:203.0.113.7", 1}};
  sluice::Decision out[2];
  size_t deciding = store.CheckAll(checks, now, out);
  std::printf("admitted %d of 7 logins; combined check %s by '%s'; api remaining %lld\n", admitted,
              out[deciding].allowed ? "allowed" : "rejected",
              checks[deciding].limit->name().c_str(),
              static_cast<long long>(api->Check("user:42", now, /*cost=*/0).remaining));
  return admitted == 5 && !out[deciding].allowed && deciding == 1 ? 0 : 1;
}
