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

// The little-endian double at p (PutScriptNumber's inverse).
double GetScriptNumber(const char* p) {
  uint64_t bits = 0;
  for (int i = 7; i >= 0; --i) bits = bits << 8 | static_cast<uint8_t>(p[i]);
  return std::bit_cast<double>(bits);
}

// The integer in the double at p, or false when it holds none (a fraction, NaN, or a value
// past int64).
bool GetScriptInteger(const char* p, int64_t* v) {
  double d = GetScriptNumber(p);
  // -2^63 <= d < 2^63; NaN fails both.
  if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0)) return false;
  *v = static_cast<int64_t>(d);
  return static_cast<double>(*v) == d;
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
  int64_t numbers[3] = {p.limit, p.period, 0};
  switch (p.algorithm) {
    case Algorithm::kFixedWindow:
    case Algorithm::kSlidingWindowLog:
    case Algorithm::kSlidingWindowCounter:
      break;
    case Algorithm::kTokenBucket: {
      algo::TokenBucket::Params tb = algo::TokenBucket::Compile(p);
      numbers[0] = tb.capacity;
      numbers[1] = tb.cycle;
      numbers[2] = tb.cycle_tokens;
      break;
    }
    case Algorithm::kGcra:
    case Algorithm::kLeakyQueue: {
      algo::Gcra::Params g = algo::Gcra::Compile(p);
      numbers[0] = g.burst;
      numbers[1] = g.interval;
      numbers[2] = algo::Clamp(g.tolerance);
      break;
    }
  }
  record_[0] = static_cast<char>(p.algorithm);
  for (size_t i = 0; i < 3; ++i) PutScriptNumber(&record_[1 + 8 * i], numbers[i]);
}

int64_t CompiledLimit::number(size_t i) const {
  if (i == 0) return static_cast<uint8_t>(record_[0]);
  return static_cast<int64_t>(GetScriptNumber(&record_[1 + 8 * (i - 1)]));
}

bool ParseScriptReply(std::string_view bytes, std::span<Decision> out, TimeUs* now) {
  if (bytes.size() != 8 + kScriptReplyRecordSize * out.size()) return false;
  auto duration = [](int64_t v) { return v == -1 ? kNever : v; };
  int64_t t = 0;
  if (!GetScriptInteger(bytes.data(), &t)) return false;
  const char* p = bytes.data() + 8;
  for (Decision& d : out) {
    uint8_t allowed = static_cast<uint8_t>(p[0]);
    int64_t v[5];
    if (allowed > 1) return false;
    for (size_t i = 0; i < 5; ++i) {
      if (!GetScriptInteger(p + 1 + 8 * i, &v[i])) return false;
    }
    d.allowed = allowed == 1;
    d.limit = v[0];
    d.remaining = v[1];
    d.reset_after = duration(v[2]);
    d.retry_after = duration(v[3]);
    d.delay = v[4];
    p += kScriptReplyRecordSize;
  }
  *now = t;
  return true;
}

bool ParseScriptReply(const Reply& reply, std::span<Decision> out, TimeUs* now) {
  if (reply.type != Reply::Type::kString) return false;
  return ParseScriptReply(std::string_view(reply.str), out, now);
}

}  // namespace sluice::redis
