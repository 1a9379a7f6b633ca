// The sluice command: serve, check, version.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "rules/config_loader.h"
#include "rules/describe.h"
#include "sluice/memory_store.h"
#include "sluice/policy.h"
#include "sluice/time.h"

namespace {

std::string FormatDelta(sluice::DurationUs d) {
  if (d == sluice::kNever) return "never";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6fs", static_cast<double>(d) / sluice::kSecond);
  return buf;
}

// Loads the config (or the embedded default); prints the error and returns false if invalid.
bool Load(const std::string& path, sluice::rules::Config* config) {
  if (path.empty()) {
    *config = sluice::rules::DefaultConfig();
    return true;
  }
  sluice::Status st = sluice::rules::LoadConfigFile(path, config);
  if (!st.ok()) std::fprintf(stderr, "%s\n", st.message().c_str());
  return st.ok();
}

int Serve(const std::string& path) {
  sluice::rules::Config config;
  if (!Load(path, &config)) return 2;
  std::printf("sluice %s: store memory, config %s\n", SLUICE_VERSION, config.source.c_str());
  std::printf("%s", sluice::rules::DescribeConfig(config).c_str());
  std::printf("the HTTP front end is not part of this build; exiting\n");
  return 0;
}

int Validate(const std::string& path) {
  sluice::rules::Config config;
  if (!Load(path, &config)) return 1;
  std::printf("%s: ok\n%s", path.c_str(), sluice::rules::DescribeConfig(config).c_str());
  return 0;
}

// Runs `times` requests of `cost` for one key through an in-memory limit and prints each
// decision: a way to see what a policy does before putting it in a config.
int Check(const std::string& algorithm, int64_t limit, const std::string& period, int64_t burst,
          const std::string& key, int64_t cost, int times) {
  auto algo = sluice::ParseAlgorithm(algorithm);
  if (!algo) {
    std::fprintf(stderr, "sluice check: unknown algorithm '%s'\n", algorithm.c_str());
    return 2;
  }
  auto per = sluice::ParseDuration(period);
  if (!per) {
    std::fprintf(stderr, "sluice check: bad period '%s' (examples: 1s, 250ms, 1m, 1h, 1d)\n",
                 period.c_str());
    return 2;
  }
  sluice::Policy policy{*algo, limit, *per, burst};
  if (auto st = policy.Validate(); !st.ok()) {
    std::fprintf(stderr, "sluice check: %s\n", st.message().c_str());
    return 2;
  }
  sluice::MemoryStore store;
  sluice::Limit* l = store.AddLimit("check", policy);
  sluice::TimeUs now = sluice::SystemClock::Instance().Now();
  int rejected = 0;
  for (int i = 0; i < times; ++i) {
    sluice::Decision d = l->Check(key, now, cost);
    rejected += d.allowed ? 0 : 1;
    std::printf("%d %s limit=%lld remaining=%lld reset_after=%s retry_after=%s delay=%s\n", i + 1,
                d.allowed ? "allowed" : "rejected", static_cast<long long>(d.limit),
                static_cast<long long>(d.remaining), FormatDelta(d.reset_after).c_str(),
                FormatDelta(d.retry_after).c_str(), FormatDelta(d.delay).c_str());
  }
  return rejected > 0 ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Sluice: a rate limiting service"};
  app.require_subcommand(0, 1);
  bool version = false;
  app.add_flag("--version", version, "Print the version and exit");

  auto* serve = app.add_subcommand("serve", "Run the rate limiting service");
  std::string config;
  serve->add_option("--config", config, "YAML config file (default: the embedded default)");

  auto* check = app.add_subcommand("check", "Decide requests for one key with one policy");
  std::string algorithm = "sliding_window_counter", period = "1m", key = "cli";
  int64_t limit = 60, burst = 0, cost = 1;
  int times = 1;
  check
      ->add_option("--algorithm", algorithm,
                   "fixed_window, sliding_window_log, "
                   "sliding_window_counter, token_bucket, gcra, leaky_queue")
      ->capture_default_str();
  check->add_option("--limit", limit, "Requests (or tokens) per period")->capture_default_str();
  check->add_option("--period", period, "Window or refill period")->capture_default_str();
  check->add_option("--burst", burst, "Capacity (token bucket), burst (gcra, leaky_queue)");
  check->add_option("--key", key, "Client key")->capture_default_str();
  check->add_option("--cost", cost, "Units per request (0 peeks)")->capture_default_str();
  check->add_option("--times", times, "Requests to send at the same instant")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000000));

  auto* validate = app.add_subcommand("validate", "Check a config file; errors name file:line:col");
  std::string validate_path;
  validate->add_option("config", validate_path, "YAML config file")->required();

  auto* ver = app.add_subcommand("version", "Print the version");

  CLI11_PARSE(app, argc, argv);
  if (version || ver->parsed()) {
    std::printf("sluice %s\n", SLUICE_VERSION);
    return 0;
  }
  if (serve->parsed()) return Serve(config);
  if (validate->parsed()) return Validate(validate_path);
  if (check->parsed()) return Check(algorithm, limit, period, burst, key, cost, times);
  std::printf("%s", app.help().c_str());
  return 0;
}
