#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <vector>

namespace purified_ops {
namespace {

constexpr std::size_t kMinCached = std::size_t{1} << 20;  // below this malloc is cheap enough
constexpr std::size_t kAlign = std::size_t{2} << 20;      // one huge page
constexpr std::size_t kDefaultCap = std::size_t{512} << 20;

struct Block {
  void* ptr;
  std::size_t size;
};

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    static auto* cache = new OutputCache();  // never destroyed: tensors may outlive statics
    return *cache;
  }

  c10::DataPtr allocate(std::size_t n) override {
    if (n < kMinCached || cap_.load(std::memory_order_relaxed) == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    const std::size_t size = (n + kAlign - 1) / kAlign * kAlign;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        const auto block = it->second.back();  // the most recently freed block of this size
        it->second.pop_back();
        ptr = block->ptr;
        by_age_.erase(block);
        cached_ -= size;
      }
    }
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kAlign, size);
      if (ptr == nullptr) {
        empty();  // give the cache back and try once more
        ptr = std::aligned_alloc(kAlign, size);
      }
      TORCH_CHECK(ptr != nullptr, "purified_ops: out of CPU memory allocating ", size, " bytes");
      madvise(ptr, size, MADV_HUGEPAGE);  // a hint: fewer faults on first touch where THP is on
    }
    report(ptr, static_cast<int64_t>(size));
    return {ptr, new Block{ptr, size}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::size_t empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::size_t released = 0;
    for (const Block& b : by_age_) {
      std::free(b.ptr);
      released += b.size;
    }
    by_age_.clear();
    free_.clear();
    cached_ = 0;
    return released;
  }

  std::size_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

  void set_cap(std::size_t bytes) { cap_.store(bytes, std::memory_order_relaxed); }

 private:
  OutputCache() = default;

  // Tensors in our blocks count in the profiler's memory view, as torch's own allocations do.
  void report(void* ptr, int64_t delta) {
    if (!c10::memoryProfilingEnabled()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_ += delta;
    c10::reportMemoryUsageToProfiler(ptr, delta, static_cast<std::size_t>(in_use_), in_use_ + cached_,
                                     c10::Device(c10::DeviceType::CPU));
  }

  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    get().report(block->ptr, -static_cast<int64_t>(block->size));
    get().put(block->ptr, block->size);
    delete block;
  }

  // A freed block is kept if it fits under the cap, evicting the blocks freed longest ago: the
  // sizes a loop uses now are the ones it frees last, and a cache full of an earlier phase's
  // sizes (another batch size, an evaluation pass) would otherwise send every new block to
  // fresh pages.
  void put(void* ptr, std::size_t size) {
    std::vector<void*> evicted;
    bool kept = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const std::size_t cap = cap_.load(std::memory_order_relaxed);
      if (size <= cap) {
        while (cached_ + size > cap) {
          const Block oldest = by_age_.front();
          auto& same_size = free_[oldest.size];
          same_size.erase(std::find(same_size.begin(), same_size.end(), by_age_.begin()));
          by_age_.pop_front();
          cached_ -= oldest.size;
          evicted.push_back(oldest.ptr);
        }
        free_[size].push_back(by_age_.insert(by_age_.end(), Block{ptr, size}));
        cached_ += size;
        kept = true;
      }
    }
    for (void* p : evicted) std::free(p);  // outside the lock
    if (!kept) std::free(ptr);
  }

  std::atomic<std::size_t> cap_{kDefaultCap};
  std::mutex mutex_;
  std::list<Block> by_age_;  // the cached blocks, freed longest ago first
  std::map<std::size_t, std::vector<std::list<Block>::iterator>> free_;  // by size, oldest first
  std::size_t cached_ = 0;
  int64_t in_use_ = 0;  // only tracked while the profiler records memory
};

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, std::nullopt);
}

std::size_t empty_cpu_output_cache() { return OutputCache::get().empty(); }

std::size_t cpu_output_cache_bytes() { return OutputCache::get().cached(); }

void set_cpu_output_cache_limit(std::size_t bytes) { OutputCache::get().set_cap(bytes); }

}  // namespace purified_ops
