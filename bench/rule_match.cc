// Micro benchmark of matching a request to its rule (RuleSet::Match), ns per request, for
// configs of 8 to 10,000 endpoint rules ("/api/rN/*", GET, like a config generated from a
// route table), the request hitting the middle rule. Below 16 rules each rule is tried in
// turn; from 16 on, through the index of the patterns' literal text.
#include <benchmark/benchmark.h>

#include <string>

#include "rules/rule_set.h"

namespace {

using sluice::rules::Config;
using sluice::rules::Rule;
using sluice::rules::RuleSet;

RuleSet Rules(int n) {
  Config c;
  for (int i = 0; i < n; ++i) {
    Rule r;
    r.name = "r" + std::to_string(i);
    r.path = "/api/r" + std::to_string(i) + "/*";
    r.methods = {"GET"};
    c.endpoints.push_back(std::move(r));
  }
  return RuleSet(std::move(c));
}

void BM_Match(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  RuleSet rules = Rules(n);
  const std::string path = "/api/r" + std::to_string(n / 2) + "/items/42";
  for (auto _ : state) {
    benchmark::DoNotOptimize(&rules.Match("GET", path));
  }
}
BENCHMARK(BM_Match)->Arg(8)->Arg(15)->Arg(16)->Arg(100)->Arg(1000)->Arg(10000);

}  // namespace

BENCHMARK_MAIN();
