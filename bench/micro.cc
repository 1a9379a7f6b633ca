// Micro benchmarks of the decision path: ns per decision for each algorithm on one hot key
// and on 1M and 10M distinct keys, with one and two threads, and the resident memory per
// key at 10M keys (bytes_per_key: RSS growth while the keys were added, divided by keys).
//
// Time advances one microsecond per decision in each thread, so windows roll and buckets
// refill as they would at a million decisions per second. Keys are "user:<n>", formatted
// per decision as a server would receive them; distinct-key runs visit the keys in a
// stride order so each access lands on a cold cache line, as real traffic does at 10M keys.
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string_view>

#include "sluice/memory_store.h"

namespace {

using sluice::Algorithm;
using sluice::Limit;
using sluice::MemoryStore;
using sluice::Policy;
using sluice::TimeUs;

constexpr TimeUs kT0 = 1699012800 * sluice::kSecond;

size_t ResidentBytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return static_cast<size_t>(resident) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
}

// "user:<n>" into buf; returns the view.
std::string_view KeyOf(char (&buf)[32], uint64_t n) {
  std::memcpy(buf, "user:", 5);
  auto [end, ec] = std::to_chars(buf + 5, buf + sizeof buf, n);
  return {buf, static_cast<size_t>(end - buf)};
}

Policy BenchPolicy(Algorithm a) { return Policy{a, 1000, sluice::kSecond, 0}; }

// One populated store at a time (10M keys of every algorithm at once would not fit in
// memory comfortably), rebuilt when a benchmark asks for another (algorithm, keys).
struct Populated {
  Algorithm algorithm;
  size_t keys;
  std::unique_ptr<MemoryStore> store;
  Limit* limit = nullptr;
  double bytes_per_key = 0;
};
std::unique_ptr<Populated> g_populated;

Populated& PopulatedStore(Algorithm a, size_t keys) {
  if (g_populated && g_populated->algorithm == a && g_populated->keys == keys) return *g_populated;
  g_populated.reset();
  malloc_trim(0);
  size_t before = ResidentBytes();
  auto p = std::make_unique<Populated>();
  p->algorithm = a;
  p->keys = keys;
  MemoryStore::Options o;
  o.max_keys_per_limit = keys + keys / 2;
  p->store = std::make_unique<MemoryStore>(o);
  p->limit = p->store->AddLimit("bench", BenchPolicy(a));
  char buf[32];
  for (uint64_t i = 0; i < keys; ++i) p->limit->Check(KeyOf(buf, i), kT0);
  p->bytes_per_key = static_cast<double>(ResidentBytes() - before) / static_cast<double>(keys);
  g_populated = std::move(p);
  return *g_populated;
}

void BM_HotKey(benchmark::State& state) {
  auto a = static_cast<Algorithm>(state.range(0));
  static std::unique_ptr<MemoryStore> store;
  static Limit* limit;
  if (state.thread_index() == 0) {
    g_populated.reset();
    store = std::make_unique<MemoryStore>();
    limit = store->AddLimit("bench", BenchPolicy(a));
  }
  char buf[32];
  std::string_view key = KeyOf(buf, 42);
  TimeUs now = kT0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(limit->Check(key, ++now));
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(std::string(sluice::AlgorithmName(a)));
}

void BM_DistinctKeys(benchmark::State& state) {
  auto a = static_cast<Algorithm>(state.range(0));
  auto keys = static_cast<uint64_t>(state.range(1));
  static Limit* limit;
  static double bytes_per_key;
  if (state.thread_index() == 0) {
    Populated& p = PopulatedStore(a, keys);
    limit = p.limit;
    bytes_per_key = p.bytes_per_key;
  }
  // A stride coprime with 10^6 and 10^7 visits every key once per cycle, in scattered order.
  constexpr uint64_t kStride = 7368787;
  uint64_t idx = (static_cast<uint64_t>(state.thread_index()) * keys / 2) % keys;
  char buf[32];
  TimeUs now = kT0;
  for (auto _ : state) {
    idx += kStride;
    while (idx >= keys) idx -= keys;
    benchmark::DoNotOptimize(limit->Check(KeyOf(buf, idx), ++now));
  }
  state.SetItemsProcessed(state.iterations());
  state.SetLabel(std::string(sluice::AlgorithmName(a)));
  if (state.thread_index() == 0) state.counters["bytes_per_key"] = bytes_per_key;
}

void Register() {
  for (Algorithm a : sluice::kAllAlgorithms) {
    auto name = std::string(sluice::AlgorithmName(a));
    for (int threads : {1, 2}) {
      benchmark::RegisterBenchmark(("hot_key/" + name).c_str(), BM_HotKey)
          ->Arg(static_cast<int>(a))
          ->Threads(threads)
          ->UseRealTime();
    }
    for (int64_t keys : {1'000'000, 10'000'000}) {
      for (int threads : {1, 2}) {
        benchmark::RegisterBenchmark(
            ("keys_" + std::to_string(keys / 1'000'000) + "M/" + name).c_str(), BM_DistinctKeys)
            ->Args({static_cast<int>(a), keys})
            ->Threads(threads)
            ->UseRealTime();
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Tables above 64 KiB come straight from mmap and go back to the kernel when freed, so
  // the resident-memory reading of one store is not blurred by the heap of the last one.
  mallopt(M_MMAP_THRESHOLD, 64 * 1024);
  benchmark::Initialize(&argc, argv);
  Register();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
