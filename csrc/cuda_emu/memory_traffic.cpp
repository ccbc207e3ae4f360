// What the emulated launches would move through a GPU's memory system, counted from every lane's
// global access (cuda_emu.h's record_global_access, called by device_hooks.cuh's global_load and
// global_store). Per warp instruction (the lanes of a warp at one call site's one dynamic
// execution): the 32-byte sectors its lanes touch, against the ideal, its distinct bytes / 32
// rounded up. Per launch: the distinct bytes read and written (the DRAM traffic if L2 caught
// every reuse), as merged address ranges, and the load bursts of each warp (the bytes its lanes
// load between two collectives or stores: what it can have in flight before it uses them).
// Blocks run one after another (cuda_emu.cpp), so the state below needs no lock.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cuda_emu.h"

namespace cuda_emu {
namespace {

constexpr uint64_t kSector = 32;

struct Range {
  uint64_t begin, end;
};

struct SiteStats {
  uint64_t instructions = 0, sectors = 0, ideal = 0, bytes = 0;
};

// (file, line, store): one call site's loads or stores.
using SiteKey = std::tuple<std::string, int, bool>;

struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  std::map<SiteKey, SiteStats> sites;
  std::vector<Range> reads, writes;
  uint64_t burst_max = 0;
  double burst_sum = 0, burst_sq = 0;  // over the warps' load bursts: sum of bytes, of bytes^2
  uint64_t bursts = 0;
};

struct Access {
  uint64_t addr;
  uint32_t size;
};

// A warp instruction: (warp, file, line, store, collectives passed, execution of the site since).
using InstrKey = std::tuple<int, const char*, int, bool, uint64_t, uint64_t>;

struct LaneSite {
  uint64_t collectives = ~uint64_t{0};
  uint64_t count = 0;
};

struct LaneBurst {
  uint64_t collectives = ~uint64_t{0};
  uint64_t index = 0;
  bool loading = false;
};

struct BlockTrace {
  std::vector<std::map<std::pair<const char*, int>, LaneSite>> lane_sites;  // by thread
  std::vector<LaneBurst> lane_bursts;                                       // by thread
  std::map<InstrKey, std::vector<Access>> instructions;
  std::map<std::pair<int, uint64_t>, uint64_t> burst_bytes;  // (warp, burst) -> bytes loaded
};

std::atomic<bool> g_enabled{false};
std::vector<LaunchRecord> g_launches;
BlockTrace g_block;
bool g_in_launch = false;

// Sorted, merged ranges.
std::vector<Range> merged(std::vector<Range> r) {
  std::sort(r.begin(), r.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  std::vector<Range> out;
  for (const Range& x : r) {
    if (!out.empty() && x.begin <= out.back().end)
      out.back().end = std::max(out.back().end, x.end);
    else
      out.push_back(x);
  }
  return out;
}

uint64_t total_bytes(const std::vector<Range>& r) {
  uint64_t n = 0;
  for (const Range& x : r) n += x.end - x.begin;
  return n;
}

}  // namespace

void record_global_access(const void* p, size_t bytes, bool store, bool active, const char* file, int line) {
  if (!g_enabled.load(std::memory_order_relaxed) || !g_in_launch) return;
  const FiberPlace f = fiber_place();
  BlockTrace& b = g_block;
  if (b.lane_sites.size() <= static_cast<size_t>(f.linear)) {
    b.lane_sites.resize(f.linear + 1);
    b.lane_bursts.resize(f.linear + 1);
  }
  LaneSite& s = b.lane_sites[f.linear][{file, line}];
  if (s.collectives != f.collectives) {
    s.collectives = f.collectives;
    s.count = 0;
  }
  const uint64_t count = s.count++;
  LaneBurst& burst = b.lane_bursts[f.linear];
  if (store) {
    burst.loading = false;
  } else {
    if (!burst.loading || burst.collectives != f.collectives) ++burst.index;
    burst.loading = true;
    burst.collectives = f.collectives;
    if (active) b.burst_bytes[{f.warp, burst.index}] += bytes;
  }
  if (!active) return;
  const uint64_t addr = reinterpret_cast<uintptr_t>(p);
  b.instructions[InstrKey{f.warp, file, line, store, f.collectives, count}].push_back(
      {addr, static_cast<uint32_t>(bytes)});
  LaunchRecord& launch = g_launches.back();
  (store ? launch.writes : launch.reads).push_back({addr, addr + bytes});
}

void traffic_launch_begin(const char* name, dim3 grid, dim3 block, size_t dynamic_smem) {
  if (!g_enabled.load()) return;
  g_in_launch = true;
  g_block = BlockTrace();
  LaunchRecord r;
  r.name = name;
  r.grid = grid;
  r.block = block;
  r.smem = dynamic_smem;
  g_launches.push_back(std::move(r));
}

void traffic_block_end() {
  if (!g_in_launch) return;
  LaunchRecord& launch = g_launches.back();
  for (auto& [key, lanes] : g_block.instructions) {
    std::vector<Range> bytes;
    std::vector<uint64_t> sectors;
    for (const Access& a : lanes) {
      bytes.push_back({a.addr, a.addr + a.size});
      for (uint64_t s = a.addr / kSector; s <= (a.addr + a.size - 1) / kSector; ++s) sectors.push_back(s);
    }
    std::sort(sectors.begin(), sectors.end());
    const uint64_t requested = std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    const uint64_t distinct = total_bytes(merged(std::move(bytes)));
    SiteStats& site = launch.sites[SiteKey{std::get<1>(key), std::get<2>(key), std::get<3>(key)}];
    site.instructions += 1;
    site.sectors += requested;
    site.ideal += (distinct + kSector - 1) / kSector;
    site.bytes += distinct;
  }
  for (const auto& [key, n] : g_block.burst_bytes) {
    if (n == 0) continue;
    launch.burst_max = std::max(launch.burst_max, n);
    launch.burst_sum += static_cast<double>(n);
    launch.burst_sq += static_cast<double>(n) * static_cast<double>(n);
    launch.bursts += 1;
  }
  g_block = BlockTrace();
}

void traffic_launch_end() {
  if (!g_in_launch) return;
  LaunchRecord& launch = g_launches.back();
  launch.reads = merged(std::move(launch.reads));
  launch.writes = merged(std::move(launch.writes));
  g_in_launch = false;
}

}  // namespace cuda_emu

namespace purified_ops {
namespace cuda {

namespace py = pybind11;

py::list ranges_to_list(const std::vector<::cuda_emu::Range>& r) {
  py::list out;
  for (const auto& x : r) out.append(py::make_tuple(x.begin, x.end));
  return out;
}

void bind_memory_traffic(py::module_& m) {
  m.def(
      "set_memory_trace",
      [](bool enabled) {
        ::cuda_emu::g_launches.clear();
        ::cuda_emu::g_enabled = enabled;
      },
      py::arg("enabled"),
      "Starts (clearing what was recorded) or stops recording the launches' global memory accesses.");
  m.def(
      "memory_traffic",
      [] {
        py::list out;
        for (const auto& r : ::cuda_emu::g_launches) {
          py::dict d;
          d["name"] = r.name;
          d["grid"] = py::make_tuple(r.grid.x, r.grid.y, r.grid.z);
          d["block"] = py::make_tuple(r.block.x, r.block.y, r.block.z);
          d["dynamic_smem"] = r.smem;
          py::list sites;
          for (const auto& [key, s] : r.sites) {
            py::dict sd;
            sd["file"] = std::get<0>(key);
            sd["line"] = std::get<1>(key);
            sd["store"] = std::get<2>(key);
            sd["instructions"] = s.instructions;
            sd["sectors"] = s.sectors;
            sd["ideal_sectors"] = s.ideal;
            sd["bytes"] = s.bytes;
            sites.append(sd);
          }
          d["sites"] = sites;
          d["read_ranges"] = ranges_to_list(r.reads);
          d["write_ranges"] = ranges_to_list(r.writes);
          d["distinct_bytes_read"] = ::cuda_emu::total_bytes(r.reads);
          d["distinct_bytes_written"] = ::cuda_emu::total_bytes(r.writes);
          d["load_bursts"] = r.bursts;
          d["load_burst_max"] = r.burst_max;
          d["load_burst_mean"] = r.bursts > 0 ? r.burst_sum / static_cast<double>(r.bursts) : 0.0;
          // The bytes of the burst an average loaded byte belongs to.
          d["load_burst_weighted_mean"] = r.burst_sum > 0 ? r.burst_sq / r.burst_sum : 0.0;
          out.append(d);
        }
        return out;
      },
      "The launches recorded since set_memory_trace(True), each a dict: name, grid, block, dynamic_smem; "
      "per call site (file, line, store) its warp instructions, sectors requested, ideal sectors "
      "(distinct bytes / 32, rounded up per instruction) and distinct bytes; the merged address "
      "ranges read and written and their bytes; the warps' load bursts (bytes loaded between two "
      "collectives or stores): count, largest, mean and byte-weighted mean.");
}

}  // namespace cuda
}  // namespace purified_ops
