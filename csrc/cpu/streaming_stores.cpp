#include "streaming_stores.h"

#include <atomic>

namespace purified_ops {
namespace {

std::atomic<StreamingStores> mode{StreamingStores::kBySize};

}  // namespace

void set_streaming_stores(StreamingStores m) { mode.store(m, std::memory_order_relaxed); }

StreamingStores streaming_stores() { return mode.load(std::memory_order_relaxed); }

}  // namespace purified_ops
