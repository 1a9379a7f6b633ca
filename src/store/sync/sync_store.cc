#include "store/sync/sync_store.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "algo/fixed_window.h"
#include "algo/sliding_window_counter.h"

namespace sluice::sync {
namespace {

using algo::kMinI64;

constexpr int kTagBits = 24;
constexpr uint64_t kTagMask = (uint64_t{1} << kTagBits) - 1;
constexpr int64_t kMaxCount = (int64_t{1} << 39) - 1;
constexpr size_t kMaxProbe = 64;
// A node's hits reach Redis within one interval of being decided, so three rounds after a
// decision here the fetched total holds every hit other nodes decided before it.
constexpr int kRefreshRounds = 3;

template <class T>
std::atomic_ref<T> A(T& v) {
  return std::atomic_ref<T>(v);
}

int64_t ClampCount(int64_t c) { return std::clamp(c, -kMaxCount, kMaxCount); }
uint64_t Pack(int64_t window, int64_t count) {
  return (static_cast<uint64_t>(ClampCount(count)) << kTagBits) |
         (static_cast<uint64_t>(window) & kTagMask);
}
int64_t CountOf(uint64_t word) { return static_cast<int64_t>(word) >> kTagBits; }
bool InWindow(uint64_t word, int64_t window) {
  return (word & kTagMask) == (static_cast<uint64_t>(window) & kTagMask);
}
// The full window of a word's tag, among the windows near `now_window`; kMinI64 if none.
int64_t WindowOf(uint64_t word, int64_t now_window) {
  for (int64_t w = now_window + 1; w >= now_window - 2; --w) {
    if (InWindow(word, w)) return w;
  }
  return kMinI64;
}
// Whether a word holds a window after `window`: its tag at most kMaxAhead windows ahead
// (no sync reply is that late; a word left from 2^24 - kMaxAhead windows before is
// long forgotten), and not an empty word (0: no decision in any window, or a slot
// cleared), whose tag 0 may read as any distance ahead.
bool AfterWindow(uint64_t word, int64_t window) {
  constexpr uint64_t kMaxAhead = uint64_t{1} << 20;
  const uint64_t ahead = ((word & kTagMask) - static_cast<uint64_t>(window)) & kTagMask;
  return word != 0 && ahead != 0 && ahead <= kMaxAhead;
}
// The count a word holds for `window` (0 when it holds another window's).
int64_t CountIn(uint64_t word, int64_t window) {
  return InWindow(word, window) ? CountOf(word) : 0;
}
size_t Parity(int64_t window) { return static_cast<size_t>(window & 1); }

int64_t WindowIndex(TimeUs now, DurationUs period) {
  int64_t q = now / period;
  return now % period < 0 ? q - 1 : q;
}

size_t RoundUpPow2(size_t n) {
  size_t p = 1024;
  while (p < n && p < (size_t{1} << 58)) p <<= 1;
  return p;
}

// The decision of `p` for a window count `curr` (and the previous window's `prev`).
Decision Evaluate(const Policy& p, int64_t window, int64_t curr, int64_t prev, TimeUs now,
                  int64_t cost) {
  curr = std::max<int64_t>(curr, 0);
  prev = std::max<int64_t>(prev, 0);
  if (p.algorithm == Algorithm::kFixedWindow) {
    algo::FixedWindow::State s{window * p.period, curr};
    return algo::FixedWindow::Step(s, algo::FixedWindow::Compile(p), now, cost, false);
  }
  algo::SlidingWindowCounter::State s{static_cast<uint32_t>(window), curr, prev};
  return algo::SlidingWindowCounter::Step(s, algo::SlidingWindowCounter::Compile(p), now, cost,
                                          false);
}

}  // namespace

struct SyncStore::Record {
  Record* next = nullptr;
  std::shared_ptr<SyncLimit> limit;  // held: the rules that decided may be gone by Collect
  size_t slot = 0;
  uint64_t fingerprint = 0;  // the key's: the slot may have gone to another key since
  std::string key;
};

// One window of one key as the syncer knows it.
struct Win {
  int64_t window = kMinI64;
  int64_t global = 0;  // Redis' total at the last sync (in `used`)
  int64_t sent = 0;    // this node's hits Redis confirmed (in `global`)
  int64_t unsent = 0;  // taken from pending, not yet confirmed by Redis (in `used`)
};

struct SyncStore::Known {
  std::shared_ptr<SyncLimit> limit;
  size_t slot;
  std::string key;
  // Rounds that still fetch the key's totals: a decision here asks for kRefreshRounds, so
  // the hits other nodes sent just after this node's fetch still arrive.
  int refresh = 0;
  Win win[2];         // by window parity
  bool held = false;  // counted in held_: it had unsent hits at the last Collect
};

bool Syncable(const Policy& policy) {
  return (policy.algorithm == Algorithm::kFixedWindow ||
          policy.algorithm == Algorithm::kSlidingWindowCounter) &&
         policy.limit <= kMaxLimit;
}

namespace {

// An anonymous mapping is zero and backed page by page as it is written; MAP_NORESERVE
// keeps the kernel from counting the whole of it against the commit limit up front. (The
// allocator's calloc may zero or commit a large block at once: a table is not its business.)
void* MapTable(size_t bytes, std::string* error) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p != MAP_FAILED) return p;
  if (error != nullptr) {
    *error = "a local_sync key table of " + std::to_string(bytes) +
             " bytes cannot be mapped: " + std::strerror(errno) +
             " (each limit's table holds --max-keys keys; lower it)";
  }
  return nullptr;
}

size_t TableBytes(size_t capacity, size_t slot) {
  // RoundUpPow2 stops at 2^58 keys; the product then fits: a size_t of bytes is checked
  // before any mapping is asked for.
  return capacity > SIZE_MAX / slot ? SIZE_MAX : capacity * slot;
}

}  // namespace

SyncLimit::SyncLimit(std::string id, const Policy& policy, size_t capacity)
    : id_(std::move(id)), policy_(policy), mask_(capacity - 1) {
  slots_ = static_cast<Slot*>(MapTable(TableBytes(capacity, sizeof(Slot)), nullptr));
}

SyncLimit::~SyncLimit() {
  if (slots_ != nullptr) munmap(slots_, (mask_ + 1) * sizeof(Slot));
}

SyncLimit::Slot* SyncLimit::Find(uint64_t fingerprint, bool insert, TimeUs now) {
  size_t start = static_cast<size_t>(fingerprint);
  for (size_t probe = 0; probe < kMaxProbe; ++probe) {
    Slot& s = slots_[(start + probe) & mask_];
    uint64_t f = A(s.fingerprint).load(std::memory_order_acquire);
    if (f == fingerprint) return &s;
    if (f != 0) continue;
    if (!insert) return nullptr;
    // Slots are never emptied, so the first empty slot of the sequence is where every
    // inserter of this fingerprint lands: two racing inserts meet there.
    uint64_t expected = 0;
    if (A(s.fingerprint)
            .compare_exchange_strong(expected, fingerprint, std::memory_order_acq_rel) ||
        expected == fingerprint) {
      return &s;
    }
  }
  if (!insert) return nullptr;
  // The sequence is full: the first slot whose key's state is over. Racing inserters of one
  // key scan in the same order and mostly meet there too; two that do not leave the key in
  // two slots, of which decisions use the first, until the other's state is over.
  const int64_t w = WindowIndex(now, policy_.period);
  for (size_t probe = 0; probe < kMaxProbe; ++probe) {
    Slot& s = slots_[(start + probe) & mask_];
    if (Reclaim(s, fingerprint, w)) return &s;
  }
  return nullptr;
}

bool SyncLimit::Reclaim(Slot& s, uint64_t fingerprint, int64_t w) {
  uint64_t f = A(s.fingerprint).load(std::memory_order_acquire);
  if (f == fingerprint) return true;  // a racing inserter of this key took it
  // Known to the syncer (or about to be): its hits or its fetched totals still matter.
  if (A(s.listed).load(std::memory_order_acquire) != 0) return false;
  for (uint64_t& pending : s.pending) {
    if (CountOf(A(pending).load(std::memory_order_acquire)) != 0) return false;
  }
  uint64_t used[2];
  for (size_t i = 0; i < 2; ++i) {
    used[i] = A(s.used[i]).load(std::memory_order_acquire);
    // A window a decision reads (this one, the one before for the sliding counter): live.
    if (used[i] != 0 && WindowOf(used[i], w) >= w - history()) return false;
  }
  if (!A(s.fingerprint).compare_exchange_strong(f, fingerprint, std::memory_order_acq_rel)) {
    return f == fingerprint;
  }
  // The old key's words: ended windows, read as 0 by the new key, but cleared so that their
  // tags cannot alias a window 2^24 later. A decision of the old key that found the slot
  // just before it changed hands may still land here: it counts against the new key (an
  // over-count, never an under-count), and its record is dropped by Collect.
  for (size_t i = 0; i < 2; ++i) {
    uint64_t expected = used[i];
    A(s.used[i]).compare_exchange_strong(expected, 0, std::memory_order_acq_rel);
  }
  return true;
}

SyncStore::SyncStore(size_t capacity) : capacity_(RoundUpPow2(capacity)), hasher_(0) {
  // A table too large for the address space (or the overcommit policy) fails here, at the
  // start, with the reason, rather than at the first limit.
  std::string error;
  const size_t bytes = TableBytes(capacity_, sizeof(SyncLimit::Slot));
  if (capacity_ < capacity || bytes == SIZE_MAX) {
    throw std::runtime_error("--max-keys " + std::to_string(capacity) +
                             ": too many keys for a local_sync key table");
  }
  void* p = MapTable(bytes, &error);
  if (p == nullptr) throw std::runtime_error(error);
  munmap(p, bytes);
}

SyncStore::~SyncStore() {
  for (Record* r = records_.exchange(nullptr); r != nullptr;) {
    Record* next = r->next;
    delete r;
    r = next;
  }
}

std::shared_ptr<SyncLimit> SyncStore::AddLimit(const std::string& id, const Policy& policy,
                                               std::string* error) {
  if (!Syncable(policy)) return nullptr;
  std::lock_guard lock(limits_mu_);
  // The ids of limits no one holds any more go (their tables are already unmapped).
  boost::unordered::erase_if(limits_, [](const auto& kv) { return kv.second.expired(); });
  if (auto it = limits_.find(id); it != limits_.end()) {
    if (auto l = it->second.lock()) return l;
  }
  // Not make_shared: the table is unmapped when the last holder goes, not when the last
  // weak reference (this map's) does.
  std::shared_ptr<SyncLimit> l(new SyncLimit(id, policy, capacity_));
  if (!l->mapped()) {
    MapTable(TableBytes(capacity_, sizeof(SyncLimit::Slot)), error);
    return nullptr;
  }
  limits_[id] = l;
  return l;
}

size_t SyncStore::limits() const {
  std::lock_guard lock(limits_mu_);
  size_t n = 0;
  for (const auto& kv : limits_) n += kv.second.expired() ? 0 : 1;
  return n;
}

void SyncStore::Touch(SyncLimit& limit, size_t slot, uint64_t fingerprint, std::string_view key) {
  uint64_t& listed = limit.slots_[slot].listed;
  if ((A(listed).load(std::memory_order_relaxed) & SyncLimit::kOnStack) != 0 ||
      (A(listed).fetch_or(SyncLimit::kOnStack, std::memory_order_acq_rel) & SyncLimit::kOnStack) !=
          0) {
    return;
  }
  auto* r = new Record{nullptr, limit.shared_from_this(), slot, fingerprint, std::string(key)};
  Record* head = records_.load(std::memory_order_relaxed);
  do {
    r->next = head;
  } while (!records_.compare_exchange_weak(head, r, std::memory_order_release,
                                           std::memory_order_relaxed));
}

SyncStore::Result SyncStore::CheckAll(std::span<const SyncCheck> checks, TimeUs now,
                                      std::span<Decision> out, size_t* deciding) {
  struct Item {
    SyncLimit::Slot* slot;
    int64_t window;
    uint64_t fingerprint;
    uint64_t seen;  // the used word the decision read
    int64_t total;  // cost of every check on this slot (first occurrence only)
    size_t first;   // index of the first check on the same slot
  };
  thread_local std::vector<Item> items;
  const size_t n = checks.size();
  items.resize(n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t fp = hasher_(checks[i].key);
    if (fp == 0) fp = 1;
    items[i].fingerprint = fp;
    items[i].slot = checks[i].limit->Find(fp, /*insert=*/true, now);
    if (items[i].slot == nullptr) {
      full_.fetch_add(1, std::memory_order_relaxed);
      last_full_.store(now, std::memory_order_relaxed);
      return Result::kFull;
    }
    items[i].first = i;
    for (size_t j = 0; j < i; ++j) {
      if (items[j].slot == items[i].slot) {
        items[i].first = j;
        break;
      }
    }
  }
  for (;;) {
    bool all = true;
    for (size_t i = 0; i < n; ++i) {
      Item& it = items[i];
      const Policy& p = checks[i].limit->policy();
      it.window = WindowIndex(now, p.period);
      it.total = 0;
      int64_t before = 0;  // spent by earlier checks of this request on the same slot
      if (it.first == i) {
        it.seen = A(it.slot->used[Parity(it.window)]).load(std::memory_order_acquire);
      } else {
        it.seen = items[it.first].seen;
        before = items[it.first].total;
      }
      int64_t curr = CountIn(it.seen, it.window) + before;
      int64_t prev = 0;
      if (checks[i].limit->history() != 0) {
        prev = CountIn(A(it.slot->used[Parity(it.window - 1)]).load(std::memory_order_acquire),
                       it.window - 1);
      }
      out[i] = Evaluate(p, it.window, curr, prev, now, checks[i].cost);
      if (out[i].allowed) items[it.first].total += checks[i].cost;
      all = all && out[i].allowed;
    }
    if (!all) break;
    // Commit every slot's spending; a word that moved since it was read means another
    // decision came first: undo what this one committed and decide again.
    size_t committed = 0;
    for (; committed < n; ++committed) {
      Item& it = items[committed];
      if (it.first != committed || it.total == 0) continue;
      uint64_t want = Pack(it.window, CountIn(it.seen, it.window) + it.total);
      uint64_t expected = it.seen;
      if (!A(it.slot->used[Parity(it.window)])
               .compare_exchange_strong(expected, want, std::memory_order_acq_rel)) {
        break;
      }
    }
    if (committed == n) {
      for (size_t i = 0; i < n; ++i) {
        Item& it = items[i];
        if (it.first != i || it.total == 0) continue;
        uint64_t& pending = it.slot->pending[Parity(it.window)];
        uint64_t w = A(pending).load(std::memory_order_relaxed);
        while (!A(pending).compare_exchange_weak(
            w, Pack(it.window, CountIn(w, it.window) + it.total), std::memory_order_acq_rel)) {
        }
        // Hits of a window two back that no round took (the syncer fell behind, or its
        // interval is longer than the window) are replaced here: counted as dropped, as
        // Collect counts those it finds too old to send.
        if (!InWindow(w, it.window) && CountOf(w) > 0) {
          dropped_.fetch_add(static_cast<uint64_t>(CountOf(w)), std::memory_order_relaxed);
        }
      }
      break;
    }
    for (size_t i = 0; i < committed; ++i) {
      Item& it = items[i];
      if (it.first != i || it.total == 0) continue;
      uint64_t& used = it.slot->used[Parity(it.window)];
      uint64_t w = A(used).load(std::memory_order_relaxed);
      while (InWindow(w, it.window) &&
             !A(used).compare_exchange_weak(w, Pack(it.window, CountOf(w) - it.total),
                                            std::memory_order_acq_rel)) {
      }
    }
  }
  for (size_t i = 0; i < n; ++i) {
    if (items[i].first == i)
      Touch(*checks[i].limit, checks[i].limit->IndexOf(items[i].slot), items[i].fingerprint,
            checks[i].key);
  }
  *deciding = DecidingIndex(out.first(n));
  return Result::kDecided;
}

void SyncStore::Collect(TimeUs now, std::vector<SyncItem>* out) {
  out->clear();
  for (Record* r = records_.exchange(nullptr, std::memory_order_acquire); r != nullptr;) {
    SyncLimit::Slot& slot = r->limit->slots_[r->slot];
    if (A(slot.fingerprint).load(std::memory_order_acquire) == r->fingerprint) {
      auto& k = known_[{r->limit.get(), r->slot}];
      if (!k) k = std::make_unique<Known>(Known{r->limit, r->slot, std::move(r->key), 0, {}});
      k->refresh = kRefreshRounds;
      // Later decisions list the key again for the next round; the slot stays the key's
      // until the syncer forgets it.
      A(slot.listed).store(SyncLimit::kKnown, std::memory_order_release);
    } else {
      // A decision of a key whose slot a new key took over as it decided: the new key's
      // next decision lists the slot under the new key's text.
      A(slot.listed).fetch_and(~SyncLimit::kOnStack, std::memory_order_acq_rel);
    }
    Record* next = r->next;
    delete r;
    r = next;
  }
  size_t held = 0;
  thread_local std::vector<std::pair<const SyncLimit*, size_t>> forget;
  forget.clear();
  for (auto it = known_.begin(); it != known_.end();) {
    Known& k = *it->second;
    SyncLimit::Slot& slot = k.limit->slots_[k.slot];
    const int64_t w = WindowIndex(now, k.limit->policy().period);
    const int64_t oldest = w - k.limit->history() - 1;  // unsent hits of older windows are moot
    for (Win& win : k.win) {
      if (win.window != kMinI64 && win.window < oldest) {
        if (win.unsent > 0) dropped_.fetch_add(static_cast<uint64_t>(win.unsent));
        win = Win{};
      }
    }
    for (uint64_t& pending : slot.pending) {
      uint64_t word = A(pending).load(std::memory_order_acquire);
      int64_t pw = kMinI64;
      bool taken = false;
      while (CountOf(word) != 0) {
        pw = WindowOf(word, w);
        if (pw > w) break;  // a deciding thread whose clock is a hair ahead: next round
        if (A(pending).compare_exchange_weak(word, 0, std::memory_order_acq_rel)) {
          taken = true;
          break;
        }
      }
      if (!taken) continue;
      if (pw < oldest) {
        if (CountOf(word) > 0) dropped_.fetch_add(static_cast<uint64_t>(CountOf(word)));
        continue;
      }
      Win& win = k.win[Parity(pw)];
      if (win.window != pw) win = Win{pw, 0, 0, 0};
      win.unsent += CountOf(word);
    }
    bool unsent = false;
    for (const Win& win : k.win) unsent = unsent || win.unsent != 0;
    if (k.refresh == 0 && !unsent) {
      // Idle: forget the key once its words hold no window a decision still reads, so a
      // later decision starts from zero instead of an aliased count.
      bool stale = true;
      for (uint64_t& used : slot.used) {
        uint64_t word = A(used).load(std::memory_order_acquire);
        if (word == 0) continue;
        int64_t uw = WindowOf(word, w);
        if (uw >= oldest + 1 || !A(used).compare_exchange_strong(word, 0)) stale = false;
      }
      if (stale) forget.push_back(it->first);
      ++it;
      continue;
    }
    held += unsent ? 1 : 0;
    k.held = unsent;
    for (int64_t sw = w - k.limit->history(); sw <= w; ++sw) {
      Win& win = k.win[Parity(sw)];
      if (win.window != sw) {
        if (win.unsent != 0) continue;  // an older window's hits still to send: not this one
        win = Win{sw, 0, 0, 0};
      }
      out->push_back({k.limit.get(), k.slot, &k.key, sw, win.sent + win.unsent, win.unsent});
    }
    // Unsent hits of the window before (fixed window): still sent, for the totals' sake.
    if (k.limit->history() == 0) {
      Win& win = k.win[Parity(w - 1)];
      if (win.window == w - 1 && win.unsent != 0) {
        out->push_back({k.limit.get(), k.slot, &k.key, w - 1, win.sent + win.unsent, win.unsent});
      }
    }
    if (k.refresh > 0) --k.refresh;
    ++it;
  }
  // A forgotten key's limit may be the last hold on a table a reload dropped: it goes here.
  for (const auto& [limit, slot] : forget) {
    A(limit->slots_[slot].listed).fetch_and(~SyncLimit::kKnown, std::memory_order_acq_rel);
    known_.erase({limit, slot});
  }
  held_.store(held, std::memory_order_relaxed);
}

void SyncStore::Apply(const SyncItem& item, int64_t total) {
  auto found = known_.find({item.limit, item.slot});
  if (found == known_.end()) return;
  Win& win = found->second->win[Parity(item.window)];
  if (win.window != item.window) return;
  // Redis' total never falls within a window (every field only grows) unless Redis lost
  // fields: restarted empty, flushed, failed over to a replica behind it, or a peer
  // region's total could not be read. The hits other nodes admitted are no less spent for
  // that, so the view keeps what it knew, with this node's new hits on top; this node's own
  // field is whole again in Redis with this call (it sends its cumulative count).
  total = std::max(ClampCount(total), win.global + item.unsent);
  const int64_t diff = total - (win.global + item.unsent);
  win.global = total;
  win.sent += item.unsent;
  win.unsent -= item.unsent;
  // Its hits confirmed: the key waits no more (held() is 0 after a round that succeeded,
  // not the count of keys decided in the interval before it).
  Known& k = *found->second;
  if (k.held && k.win[0].unsent == 0 && k.win[1].unsent == 0) {
    k.held = false;
    held_.fetch_sub(1, std::memory_order_relaxed);
  }
  uint64_t& used = item.limit->slots_[item.slot].used[Parity(item.window)];
  uint64_t word = A(used).load(std::memory_order_acquire);
  for (;;) {
    uint64_t want;
    if (InWindow(word, item.window)) {
      want = Pack(item.window, CountOf(word) + diff);
    } else if (AfterWindow(word, item.window)) {
      // The slot moved on to a later window of this parity (a reply late by two windows
      // or more must not put an old total in the current window's place).
      return;
    } else {
      want = Pack(item.window, total);  // no decision here in this window yet
    }
    if (A(used).compare_exchange_weak(word, want, std::memory_order_acq_rel)) return;
  }
}

}  // namespace sluice::sync
