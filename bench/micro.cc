// Micro benchmarks of the decision path: ns per decision for each algorithm on one hot key
// and on 1M and 10M distinct keys, with one and two threads, and the resident memory per
// key at 10M keys (bytes_per_key: RSS growth while the keys were added, divided by keys).
//
// Time advances one microsecond per decision in each thread, so windows roll and buckets
// refill as they would at a million decisions per second. Keys are "user:<n>", formatted
// per decision as a server would receive them; distinct-key runs visit the keys in a
// stride order so each access lands on a cold cache line, as real traffic does at 10M keys.
#include <benchmark/benchmark.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string_view>
#include <vector>

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

void Populate(Populated& p) {
  MemoryStore::Options o;
  o.max_keys_per_limit = p.keys + p.keys / 2;
  p.store = std::make_unique<MemoryStore>(o);
  p.limit = p.store->AddLimit("bench", BenchPolicy(p.algorithm));
  char buf[32];
  for (uint64_t i = 0; i < p.keys; ++i) p.limit->Check(KeyOf(buf, i), kT0);
}

// Resident memory per key, measured in a fresh process (this binary, re-run with
// --bytes-per-key) so that no earlier benchmark's heap blurs the reading.
double MeasureBytesPerKey(Algorithm a, size_t keys) {
  char cmd[256];
  std::snprintf(cmd, sizeof cmd, "/proc/%d/exe --bytes-per-key %d %zu", getpid(),
                static_cast<int>(a), keys);
  double v = 0;
  if (FILE* f = popen(cmd, "r")) {
    if (std::fscanf(f, "%lf", &v) != 1) v = 0;
    pclose(f);
  }
  return v;
}

Populated& PopulatedStore(Algorithm a, size_t keys) {
  if (g_populated && g_populated->algorithm == a && g_populated->keys == keys) return *g_populated;
  g_populated.reset();
  auto p = std::make_unique<Populated>();
  p->algorithm = a;
  p->keys = keys;
  Populate(*p);
  if (keys >= 10'000'000) p->bytes_per_key = MeasureBytesPerKey(a, keys);
  g_populated = std::move(p);
  return *g_populated;
}

// The latency of one dependent random access to DRAM on this machine (512 MiB, huge pages
// where the kernel gives them): the floor under a decision on a key that is not in cache.
void BM_DramLatencyReference(benchmark::State& state) {
  constexpr size_t kBytes = size_t{512} << 20, kLine = 64, kLines = kBytes / kLine;
  static uint64_t* mem = nullptr;
  if (!mem) {
    void* p = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(p, kBytes, MADV_HUGEPAGE);
    mem = static_cast<uint64_t*>(p);
    std::vector<uint32_t> order(kLines);
    std::iota(order.begin(), order.end(), 0u);
    std::shuffle(order.begin(), order.end(), std::mt19937(1));
    for (size_t i = 0; i < kLines; ++i) {
      mem[order[i] * (kLine / 8)] = order[(i + 1) % kLines] * (kLine / 8);
    }
  }
  uint64_t at = 0;
  for (auto _ : state) {
    at = mem[at];
    benchmark::DoNotOptimize(at);
  }
  state.SetLabel("one cache-missing load");
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
  if (state.thread_index() == 0 && bytes_per_key > 0) {
    state.counters["bytes_per_key"] = bytes_per_key;
  }
}

// How long a server's loop is held by the periodic sweep of 1M keys that are all back to
// fresh: the whole store at once (arg 0, MemoryStore::Sweep) against one step of a pass
// spread one shard per step (arg 1, MemoryStore::SweepStep, as `sluice serve` runs it). The
// iteration time is the hold: the whole sweep's, or the median step's; `longest_ms` is the
// longest step of the pass (a preemption of this shared VM lands in it).
void BM_SweepPause(benchmark::State& state) {
  const bool stepped = state.range(0) == 1;
  double longest = 0;
  for (auto _ : state) {
    Populated p{Algorithm::kFixedWindow, 1'000'000, nullptr, nullptr, 0};
    Populate(p);
    const TimeUs later = kT0 + 10 * sluice::kSecond;
    std::vector<double> holds;
    size_t dropped = 0;
    bool done = !stepped;
    do {
      auto t0 = std::chrono::steady_clock::now();
      dropped += stepped ? p.store->SweepStep(later, &done) : p.store->Sweep(later);
      holds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    } while (!done);
    if (dropped != p.keys) state.SkipWithError("the sweep did not drop every key");
    std::sort(holds.begin(), holds.end());
    longest = std::max(longest, holds.back());
    state.SetIterationTime(holds[holds.size() / 2]);
  }
  state.counters["longest_ms"] = longest * 1e3;
}

void Register() {
  benchmark::RegisterBenchmark("dram_latency_reference", BM_DramLatencyReference)->UseRealTime();
  benchmark::RegisterBenchmark("sweep_pause_1M/whole_store", BM_SweepPause)
      ->Arg(0)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(5);
  benchmark::RegisterBenchmark("sweep_pause_1M/one_step", BM_SweepPause)
      ->Arg(1)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(5);
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
  if (argc == 4 && std::string_view(argv[1]) == "--bytes-per-key") {
    Populated p;
    p.algorithm = static_cast<Algorithm>(std::atoi(argv[2]));
    p.keys = static_cast<size_t>(std::atoll(argv[3]));
    size_t before = ResidentBytes();
    Populate(p);
    std::printf("%.2f\n",
                static_cast<double>(ResidentBytes() - before) / static_cast<double>(p.keys));
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  Register();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
