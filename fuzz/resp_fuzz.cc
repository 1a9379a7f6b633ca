// Fuzzes what Sluice reads from Redis: RESP replies (store/redis/resp.h) as a connection
// parses them, one after another from one buffer into a reused Reply, and the decision
// script's reply (ParseScriptReply), both as raw bytes and inside a RESP bulk string.
// Checked: a parsed reply consumed a non-empty prefix and parses the same from exactly that
// prefix and into a fresh Reply; any shorter prefix is incomplete (so a connection waits
// for more instead of failing); commands written by AppendCommand parse back to their
// arguments; CLUSTER SLOTS ranges and MOVED/ASK redirects read from a reply are well formed.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz/fuzz_fail.h"
#include "sluice/decision.h"
#include "store/redis/address.h"
#include "store/redis/cluster_topology.h"
#include "store/redis/resp.h"
#include "store/redis/script.h"

namespace {

namespace redis = sluice::redis;
using sluice::fuzz::Fail;

void CheckScriptReply(std::string_view bytes) {
  // As many records as the bytes hold: the right count whenever the length is a reply's.
  const size_t n = bytes.size() >= 8 ? (bytes.size() - 8) / redis::kScriptReplyRecordSize : 0;
  std::vector<sluice::Decision> out(n);
  sluice::TimeUs now = -7;
  bool ok = redis::ParseScriptReply(bytes, out, &now);
  if (ok && bytes.size() != 8 + redis::kScriptReplyRecordSize * n) {
    Fail("a script reply of the wrong length was read");
  }
  if (!ok && now != -7) Fail("a refused script reply changed *now");
  std::vector<sluice::Decision> one_more(n + 1);
  if (redis::ParseScriptReply(bytes, one_more, &now)) Fail("a reply read for the wrong count");
}

// What Cluster says about where slots live: only well-formed ranges and redirects are
// taken, every address one SplitAddress reads with a real port.
void CheckTopology(const redis::Reply& r) {
  auto good_address = [](const std::string& a) {
    std::string host;
    uint16_t port = 0;
    return redis::SplitAddress(a, &host, &port) && port != 0;
  };
  for (const redis::SlotRange& range : redis::ParseClusterSlots(r, "10.0.0.1:7000")) {
    if (range.first > range.last || range.last >= redis::kClusterSlots) Fail("a bad slot range");
    if (!good_address(range.address)) Fail("a slot range with a bad address");
  }
  if (auto to = redis::ParseRedirect(r, "10.0.0.1:7000")) {
    if (to->slot >= redis::kClusterSlots || !good_address(to->address)) Fail("a bad redirect");
    if (to->moved != r.ErrorIs("MOVED")) Fail("a redirect of the wrong kind");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view buf(reinterpret_cast<const char*>(data), size);
  static redis::Reply reused;  // a connection's Reply, reused across parses

  std::string_view rest = buf;
  for (int i = 0; i < 64 && !rest.empty(); ++i) {
    size_t consumed = 0;
    redis::ParseStatus st = redis::ParseReply(rest, reused, &consumed);
    if (st != redis::ParseStatus::kOk) {
      if (consumed != 0) Fail("a failed parse consumed bytes");
      break;
    }
    if (consumed == 0 || consumed > rest.size()) Fail("a parse consumed nothing or too much");
    std::string_view whole = rest.substr(0, consumed);
    redis::Reply fresh;
    size_t again = 0;
    if (redis::ParseReply(whole, fresh, &again) != redis::ParseStatus::kOk || again != consumed) {
      Fail("a reply does not parse from exactly its own bytes");
    }
    if (fresh.ToString() != reused.ToString()) Fail("a reused Reply parses differently");
    // Lines longer than the parser's guard (64 KiB without CR) are refused before their end.
    if (consumed < 64 * 1024) {
      for (size_t cut : {size_t{0}, consumed / 2, consumed - 1}) {
        redis::Reply partial;
        size_t n = 0;
        if (redis::ParseReply(whole.substr(0, cut), partial, &n) !=
            redis::ParseStatus::kIncomplete) {
          Fail("a truncated reply is not incomplete");
        }
      }
    }
    CheckTopology(reused);
    if (reused.type == redis::Reply::Type::kString) {
      std::vector<sluice::Decision> out(reused.str.size() >= 8 ? (reused.str.size() - 8) / 41 : 0);
      sluice::TimeUs now = 0;
      (void)redis::ParseScriptReply(reused, out, &now);
    }
    rest.remove_prefix(consumed);
  }

  CheckScriptReply(buf);

  // AppendCommand's output reads back as the same arguments.
  std::vector<std::string_view> args;
  for (std::string_view s = buf; args.size() < 16;) {
    size_t cut = s.find('\0');
    args.push_back(s.substr(0, cut));
    if (cut == std::string_view::npos) break;
    s.remove_prefix(cut + 1);
  }
  std::string command;
  redis::AppendCommand(command, args);
  redis::Reply back;
  size_t consumed = 0;
  if (redis::ParseReply(command, back, &consumed) != redis::ParseStatus::kOk ||
      consumed != command.size() || back.type != redis::Reply::Type::kArray ||
      back.elements.size() != args.size()) {
    Fail("a command does not parse back");
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (back.elements[i].type != redis::Reply::Type::kString || back.elements[i].str != args[i]) {
      Fail("a command's argument does not parse back");
    }
  }
  return 0;
}
