#include "store/huge_page_allocator.h"

namespace sluice::internal {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = 4096;

// Whole small pages only: the 2 MiB-aligned part of the array gets huge pages, the tail
// small ones, so no memory is spent rounding up to a huge page.
size_t RoundUp(size_t bytes) { return (bytes + kPage - 1) & ~(kPage - 1); }

}  // namespace

void* MapHugeArray(size_t bytes) {
  size_t len = RoundUp(bytes);
  // Over-map by one huge page so the start can be aligned to 2 MiB, then give the slack back.
  void* raw =
      mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  auto start = reinterpret_cast<uintptr_t>(raw);
  uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  uintptr_t end = start + len + kHugePage;
  if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - (aligned + len));
  void* p = reinterpret_cast<void*>(aligned);
  madvise(p, len, MADV_HUGEPAGE);
  return p;
}

void UnmapHugeArray(void* p, size_t bytes) { munmap(p, RoundUp(bytes)); }

}  // namespace sluice::internal
