// HugePageAllocator: a std-style allocator that backs large arrays (>= 2 MiB) with
// transparent huge pages.
//
// At millions of keys every decision lands on a random slot of a table of hundreds of MiB;
// with 4 KiB pages that is a TLB miss and a page-table walk on top of the cache miss. 2 MiB
// pages cut the page table a key walks through by 512x. The memory is mapped directly
// (aligned to 2 MiB) and marked MADV_HUGEPAGE, which works when the system's THP setting
// is "madvise" as well as "always"; where huge pages are unavailable it is plain memory.
// Small arrays go through operator new as usual.
//
// Thread-safety: stateless; safe from any thread.
#ifndef SLUICE_STORE_HUGE_PAGE_ALLOCATOR_H_
#define SLUICE_STORE_HUGE_PAGE_ALLOCATOR_H_

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>

namespace sluice::internal {

void* MapHugeArray(size_t bytes);
void UnmapHugeArray(void* p, size_t bytes);

template <class T>
class HugePageAllocator {
 public:
  using value_type = T;
  static constexpr size_t kHugePage = size_t{2} << 20;

  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}  // NOLINT: allocators convert implicitly

  T* allocate(size_t n) {
    size_t bytes = n * sizeof(T);
    if (bytes < kHugePage)
      return static_cast<T*>(
          ::operator new (bytes, std::align_val_t{alignof(T) > 16 ? alignof(T) : 16}));
    return static_cast<T*>(MapHugeArray(bytes));
  }
  void deallocate(T* p, size_t n) {
    size_t bytes = n * sizeof(T);
    if (bytes < kHugePage) {
      ::operator delete (p, std::align_val_t{alignof(T) > 16 ? alignof(T) : 16});
    } else {
      UnmapHugeArray(p, bytes);
    }
  }

  template <class U>
  friend bool operator==(const HugePageAllocator&, const HugePageAllocator<U>&) {
    return true;
  }
};

}  // namespace sluice::internal

#endif  // SLUICE_STORE_HUGE_PAGE_ALLOCATOR_H_
