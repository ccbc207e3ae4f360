// Whether the CPU kernels write their outputs with non-temporal stores: by their size unless
// PURIFIED_OPS_STREAMING_STORES forces never (0) or always (1); purified_ops/_settings.py parses
// it and purified_ops/_extension.py sets it here when it loads the module, before any kernel runs.
#pragma once

namespace purified_ops {

enum class StreamingStores : int { kBySize, kNever, kAlways };

void set_streaming_stores(StreamingStores mode);
StreamingStores streaming_stores();

}  // namespace purified_ops
