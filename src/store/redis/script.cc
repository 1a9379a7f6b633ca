#include "store/redis/script.h"

#include <algorithm>
#include <bit>

#include "algo/gcra.h"
#include "algo/saturating.h"
#include "algo/token_bucket.h"
#include "store/redis/resp.h"

namespace sluice::redis {

const std::string_view kScript =
#include "store/redis/sluice_lua.inc"
    ;

namespace {

// SHA-1 (FIPS 180-4): only to name the script for EVALSHA without asking Redis.
class Sha1 {
 public:
  void Update(std::string_view data) {
    for (char c : data) {
      block_[fill_++] = static_cast<uint8_t>(c);
      if (fill_ == 64) Compress();
    }
    bytes_ += data.size();
  }

  std::string HexDigest() {
    uint64_t bits = bytes_ * 8;
    block_[fill_++] = 0x80;
    if (fill_ > 56) {
      while (fill_ < 64) block_[fill_++] = 0;
      Compress();
    }
    while (fill_ < 56) block_[fill_++] = 0;
    for (int i = 7; i >= 0; --i) block_[fill_++] = static_cast<uint8_t>(bits >> (8 * i));
    Compress();
    static constexpr char kHex[] = "0123456789abcdef";
    std::string out;
    for (uint32_t word : h_) {
      for (int i = 7; i >= 0; --i) out += kHex[(word >> (4 * i)) & 0xf];
    }
    return out;
  }

 private:
  void Compress() {
    uint32_t w[80];
    for (int i = 0; i < 16; ++i) {
      w[i] = uint32_t{block_[4 * i]} << 24 | uint32_t{block_[4 * i + 1]} << 16 |
             uint32_t{block_[4 * i + 2]} << 8 | uint32_t{block_[4 * i + 3]};
    }
    for (int i = 16; i < 80; ++i) w[i] = std::rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4];
    for (int i = 0; i < 80; ++i) {
      uint32_t f, k;
      if (i < 20) {
        f = (b & c) | (~b & d);
        k = 0x5a827999;
      } else if (i < 40) {
        f = b ^ c ^ d;
        k = 0x6ed9eba1;
      } else if (i < 60) {
        f = (b & c) | (b & d) | (c & d);
        k = 0x8f1bbcdc;
      } else {
        f = b ^ c ^ d;
        k = 0xca62c1d6;
      }
      uint32_t t = std::rotl(a, 5) + f + e + k + w[i];
      e = d;
      d = c;
      c = std::rotl(b, 30);
      b = a;
      a = t;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    fill_ = 0;
  }

  uint32_t h_[5] = {0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476, 0xc3d2e1f0};
  uint8_t block_[64] = {};
  size_t fill_ = 0;
  uint64_t bytes_ = 0;
};

constexpr int64_t kTwo53 = int64_t{1} << 53;

// Fills `out` from the reply's values, value(i) being the i-th (the count is checked).
template <class Value>
bool Fill(Value value, std::span<Decision> out, TimeUs* now) {
  auto duration = [](int64_t v) { return v == -1 ? kNever : v; };
  for (size_t i = 0; i < out.size(); ++i) {
    size_t at = kScriptReplyPerLimit * i;
    int64_t allowed = value(at);
    if (allowed != 0 && allowed != 1) return false;
    Decision& d = out[i];
    d.allowed = allowed == 1;
    d.limit = value(at + 1);
    d.remaining = value(at + 2);
    d.reset_after = duration(value(at + 3));
    d.retry_after = duration(value(at + 4));
    d.delay = value(at + 5);
  }
  *now = value(kScriptReplyPerLimit * out.size());
  return true;
}

}  // namespace

std::string Sha1Hex(std::string_view data) {
  Sha1 sha;
  sha.Update(data);
  return sha.HexDigest();
}

const std::string& ScriptSha1() {
  static const std::string sha = Sha1Hex(kScript);
  return sha;
}

bool ScriptExact(const Policy& p) {
  // Counts stay below 2^52 (so a clamped cost is above any capacity), products below 2^53,
  // and durations added to a time below 2^52 (times are below 2^52 until 2112).
  constexpr int64_t kTwo52 = kTwo53 / 2;
  switch (p.algorithm) {
    case Algorithm::kFixedWindow:
    case Algorithm::kSlidingWindowLog:
      return p.limit < kTwo52;  // no products: counts and times only
    case Algorithm::kSlidingWindowCounter:
      return algo::Mul(p.limit, p.period) < kTwo53;  // prev * (W - e), limit * W
    case Algorithm::kTokenBucket: {
      int64_t capacity = p.EffectiveBurst();
      if (capacity >= kTwo52) return false;
      if (p.limit == 0) return true;  // never refills: no products
      // cycle * cycle_tokens <= refill * period; the time to fill an empty bucket.
      return algo::Mul(p.limit, p.period) < kTwo53 &&
             algo::CeilDiv(algo::Mul(capacity, p.period), algo::i128{p.limit}) + p.period < kTwo52;
    }
    case Algorithm::kGcra:
    case Algorithm::kLeakyQueue:
      return algo::Gcra::Compile(p).tolerance < kTwo52;  // TAT <= now + burst * T
  }
  return false;
}

CompiledLimit::CompiledLimit(const Policy& p) {
  int64_t numbers[4] = {static_cast<int64_t>(p.algorithm), p.limit, p.period, 0};
  switch (p.algorithm) {
    case Algorithm::kFixedWindow:
    case Algorithm::kSlidingWindowLog:
    case Algorithm::kSlidingWindowCounter:
      break;
    case Algorithm::kTokenBucket: {
      algo::TokenBucket::Params tb = algo::TokenBucket::Compile(p);
      numbers[1] = tb.capacity;
      numbers[2] = tb.cycle;
      numbers[3] = tb.cycle_tokens;
      break;
    }
    case Algorithm::kGcra:
    case Algorithm::kLeakyQueue: {
      algo::Gcra::Params g = algo::Gcra::Compile(p);
      numbers[1] = g.burst;
      numbers[2] = g.interval;
      numbers[3] = algo::Clamp(g.tolerance);
      break;
    }
  }
  char buf[4 * 20];
  char* end = buf;
  for (size_t i = 0; i < 4; ++i) {
    start_[i] = static_cast<uint8_t>(end - buf);
    end += FormatScriptNumber(end, numbers[i]).size();
  }
  start_[4] = static_cast<uint8_t>(end - buf);
  text_.assign(buf, end);
}

bool ParseScriptReply(std::span<const int64_t> values, std::span<Decision> out, TimeUs* now) {
  if (values.size() != kScriptReplyPerLimit * out.size() + 1) return false;
  return Fill([&](size_t i) { return values[i]; }, out, now);
}

bool ParseScriptReply(const Reply& reply, std::span<Decision> out, TimeUs* now) {
  if (reply.type != Reply::Type::kArray ||
      reply.elements.size() != kScriptReplyPerLimit * out.size() + 1) {
    return false;
  }
  for (const Reply& e : reply.elements) {
    if (e.type != Reply::Type::kInteger) return false;
  }
  return Fill([&](size_t i) { return reply.elements[i].integer; }, out, now);
}

}  // namespace sluice::redis
