// The runtime of cuda_emu.h: fibers, collectives and their checks, launches.
//
// A CUDA thread is a fiber on its own stack, entered once with makecontext/setcontext and
// switched with _setjmp/_longjmp (swapcontext would make a signal-mask syscall per switch).
// A fiber runs until it reaches a collective, then the scheduler runs the next ready one. No
// ready fiber while some are unfinished is a deadlock. The schedules:
//   - "forward" starts the threads in thread order; a collective that completes puts its
//     participants at the front of the ready queue in the opposite order, so the threads a
//     barrier releases run ahead of the ones that have not reached it yet (a barrier that
//     releases too early shows as wrong data), and the last of them first (thread 0 of a team,
//     which writes what the others read after the next barrier, runs last: a missing barrier
//     shows too). "reverse" mirrors both orders. Either runs one team of a block far ahead of
//     the others.
//   - "round-robin" and "random" interleave the warps, of all teams: each step picks a warp and
//     runs its ready lanes, each up to its next collective. "round-robin" takes the warps in
//     turn and the lanes in order; "random" takes a random warp among those with a ready lane
//     and its lanes in a random order, from a generator seeded per block (the seed of
//     set_schedule and the block index). Warps of different teams then reach a barrier in
//     between each other, as on a GPU, and a warp that does more work (warp 0's solve) falls
//     behind the others of its team.
// Checks, each a launch error naming the threads and lines involved:
//   - bar.sync / __syncthreads: count a positive multiple of 32 and <= the block (PTX), every
//     arrival of one phase with the same count, whole warps only (.aligned: every live lane of
//     a warp arrives at the same barrier phase), __syncthreads from one call site, and every
//     phase of a barrier id completed by the same warps as its first phase in the block (an id
//     that several groups of warps use, one team's barrier shared with another's, completes
//     on a GPU with whichever warps arrive first);
//   - __syncwarp and the shuffles: the caller in its mask, the mask within the warp, every
//     lane of the mask at the same call (kind, mask, width, source line) before any proceeds,
//     a shuffle's source lane inside the mask;
//   - launch limits: block size, grid size, dynamic shared memory without an opt-in (48 KB).
// Dynamic shared memory is filled with 0xff bytes (NaN in every float format; set_shared_memory_fill
// picks another byte) at block start;
// under AddressSanitizer the part beyond the launch's request is poisoned.
#undef _FORTIFY_SOURCE  // __longjmp_chk rejects a jump to another stack
#include "cuda_emu.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif

// The kernels' dynamic shared memory (`extern __shared__ ... smem_raw[]` in their namespace):
// one per OS thread, that is per block.
namespace purified_ops {
namespace cuda {
thread_local __attribute__((aligned(64))) unsigned char smem_raw[cuda_emu::kMaxDynamicSmem];
}
}  // namespace purified_ops

namespace cuda_emu {
namespace {

#if CUDA_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

std::atomic<Schedule> g_schedule{Schedule::kForward};
std::atomic<uint64_t> g_seed{0};
std::atomic<unsigned> g_max_grid_stride_blocks{0};
std::atomic<unsigned char> g_smem_fill{0xff};
thread_local std::string t_last_error;

enum class State { kReady, kBlocked, kDone };

struct Fiber {
  jmp_buf ctx;
  ucontext_t start;
  char* stack = nullptr;
  uint3 tid{};
  int linear = 0, warp = 0, lane = 0;
  State state = State::kReady;
  bool started = false;
  const char* waits = "";  // what it is blocked in, for a deadlock report
  int wait_line = 0, wait_id = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;
  uint64_t collectives = 0;  // barriers, __syncwarp and shuffles passed (memory_traffic.cpp)
};

struct Barrier {
  bool active = false;
  int count = 0, line = 0, first = 0;
  std::vector<int> arrived;
  uint32_t members = 0;  // the warps that completed its first phase in the block (bit w: warp w)
};

// splitmix64: a small, fast generator with a well-mixed output from any seed.
struct Random {
  uint64_t state;
  uint64_t next() {
    uint64_t v = (state += 0x9e3779b97f4a7c15ull);
    v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
    v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
    return v ^ (v >> 31);
  }
  int below(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
};

struct WarpCollective {
  bool active = false;
  int kind = 0;  // 0 syncwarp, 1 index shuffle, 2 xor shuffle
  unsigned mask = 0, arrived = 0;
  int width = 32, line = 0, first = 0;
  uint64_t in[32] = {};
  int arg[32] = {};
};

struct Block {
  uint3 idx{};
  dim3 dim, grid;
  int threads = 0, warps = 0;
  std::vector<Fiber> fibers;
  Barrier bars[16];
  std::vector<WarpCollective> warp_state;
  Schedule schedule = Schedule::kForward;
  std::deque<int> ready;           // thread-order schedules: the fibers in the order they run
  std::vector<int> ready_in_warp;  // how many fibers of each warp are ready (the warp schedules pick by it)
  Random random{0};
  jmp_buf sched;
  void* sched_fake = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  const std::function<void()>* body = nullptr;
  std::string error;
};

thread_local Block* t_block = nullptr;
thread_local Fiber* t_fiber = nullptr;

void start_switch(void** fake, const void* bottom, size_t size) {
#if CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

void finish_switch(void* fake, const void** bottom, size_t* size) {
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom, size);
#else
  (void)fake, (void)bottom, (void)size;
#endif
}

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield() {
  Block* b = t_block;
  Fiber* f = t_fiber;
  if (_setjmp(f->ctx) == 0) {
    start_switch(f->state == State::kDone ? nullptr : &f->fake_stack, b->main_bottom, b->main_size);
    _longjmp(b->sched, 1);
  }
  finish_switch(f->fake_stack, &b->main_bottom, &b->main_size);
}

[[noreturn]] void fail(const std::string& msg) {
  Block* b = t_block;
  Fiber* f = t_fiber;
  std::ostringstream os;
  os << "block (" << b->idx.x << "," << b->idx.y << "," << b->idx.z << "), thread " << f->linear << " (warp "
     << f->warp << ", lane " << f->lane << "): " << msg;
  b->error = os.str();
  f->state = State::kDone;  // abandoned: the launch stops here
  yield();
  __builtin_unreachable();
}

void fiber_entry() {
  Block* b = t_block;
  finish_switch(nullptr, &b->main_bottom, &b->main_size);
  (*b->body)();
  t_fiber->state = State::kDone;
  yield();
  __builtin_unreachable();
}

bool warp_granular(Schedule s) { return s == Schedule::kRoundRobin || s == Schedule::kRandom; }

// Participants of a completed collective become ready; in the thread-order schedules they run
// next, against the schedule's thread order.
void release(std::vector<int> who) {
  Block* b = t_block;
  for (int t : who) {
    b->fibers[t].state = State::kReady;
    ++b->ready_in_warp[t / 32];
  }
  if (warp_granular(b->schedule)) return;
  std::sort(who.begin(), who.end());
  if (b->schedule == Schedule::kForward) std::reverse(who.begin(), who.end());
  for (auto it = who.rbegin(); it != who.rend(); ++it) b->ready.push_front(*it);
}

int warp_lanes(const Block* b, int warp) { return std::min(32, b->threads - 32 * warp); }

std::string warp_list(uint32_t warps) {
  std::string s;
  for (int w = 0; w < 32; ++w)
    if (warps >> w & 1u) s += (s.empty() ? "{" : ",") + std::to_string(w);
  return s + "}";
}

const char* kind_name(int kind) { return kind == 0 ? "__syncwarp" : kind == 1 ? "__shfl_sync" : "__shfl_xor_sync"; }

void resume(Block* b, Fiber* f) {
  t_fiber = f;
  if (_setjmp(b->sched) == 0) {
    start_switch(&b->sched_fake, f->stack, kStackBytes);
    if (!f->started) {
      f->started = true;
      setcontext(&f->start);
    }
    _longjmp(f->ctx, 1);
  }
  finish_switch(b->sched_fake, nullptr, nullptr);
  t_fiber = nullptr;
}

std::string deadlock_report(const Block* b) {
  std::ostringstream os;
  os << "deadlock in block (" << b->idx.x << "," << b->idx.y << "," << b->idx.z << "): ";
  int shown = 0, blocked = 0;
  for (const Fiber& f : b->fibers) {
    if (f.state != State::kBlocked) continue;
    if (shown < 8) {
      os << (shown ? "; " : "") << "thread " << f.linear << " waits in " << f.waits << " (line " << f.wait_line;
      if (std::string(f.waits) == "bar.sync") os << ", barrier " << f.wait_id;
      os << ")";
      ++shown;
    }
    ++blocked;
  }
  int done = 0;
  for (const Fiber& f : b->fibers) done += f.state == State::kDone;
  os << "; " << blocked << " threads blocked, " << done << " exited";
  return os.str();
}

void run(Block* b, int t) {
  --b->ready_in_warp[t / 32];
  resume(b, &b->fibers[t]);
}

// The thread-order schedules: the ready queue, front first.
void run_threads(Block* b) {
  while (b->error.empty() && !b->ready.empty()) {
    const int t = b->ready.front();
    b->ready.pop_front();
    run(b, t);
  }
}

// The warp schedules: a warp with ready lanes, then each of those lanes up to its next
// collective.
void run_warps(Block* b) {
  std::vector<int> candidates, lanes;
  int turn = 0;  // round robin: the warp whose turn is next
  while (b->error.empty()) {
    candidates.clear();
    for (int i = 0; i < b->warps; ++i) {
      const int w = (turn + i) % b->warps;
      if (b->ready_in_warp[w] > 0) candidates.push_back(w);
    }
    if (candidates.empty()) return;
    const bool random = b->schedule == Schedule::kRandom;
    const int w = random ? candidates[b->random.below(static_cast<int>(candidates.size()))] : candidates[0];
    turn = w + 1;
    lanes.clear();
    for (int t = 32 * w; t < 32 * w + warp_lanes(b, w); ++t)
      if (b->fibers[t].state == State::kReady) lanes.push_back(t);
    if (random)
      for (int i = static_cast<int>(lanes.size()) - 1; i > 0; --i) std::swap(lanes[i], lanes[b->random.below(i + 1)]);
    for (int t : lanes) {
      if (!b->error.empty()) return;
      run(b, t);
    }
  }
}

void run_block(Block* b, char* stacks, size_t smem) {
  t_block = b;
  unsigned char* shared = purified_ops::cuda::smem_raw;
  std::memset(shared, g_smem_fill.load(), smem);
#if CUDA_EMU_ASAN
  ASAN_POISON_MEMORY_REGION(shared + smem, kMaxDynamicSmem - smem);
#endif
  b->fibers.assign(b->threads, Fiber{});
  b->warps = (b->threads + 31) / 32;
  b->warp_state.assign(b->warps, WarpCollective{});
  b->ready_in_warp.assign(b->warps, 0);
  for (int t = 0; t < b->threads; ++t) {
    Fiber& f = b->fibers[t];
    f.linear = t;
    f.tid = {static_cast<unsigned>(t % b->dim.x), static_cast<unsigned>(t / b->dim.x % b->dim.y),
             static_cast<unsigned>(t / (b->dim.x * b->dim.y))};
    f.warp = t / 32;
    f.lane = t % 32;
    f.stack = stacks + t * kStackBytes;
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack;
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_entry, 0);
    ++b->ready_in_warp[f.warp];
    if (!warp_granular(b->schedule)) b->ready.push_back(b->schedule == Schedule::kReverse ? b->threads - 1 - t : t);
  }
  if (warp_granular(b->schedule))
    run_warps(b);
  else
    run_threads(b);
  if (b->error.empty() &&
      std::any_of(b->fibers.begin(), b->fibers.end(), [](const Fiber& f) { return f.state != State::kDone; }))
    b->error = deadlock_report(b);
#if CUDA_EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(shared, kMaxDynamicSmem);
  ASAN_UNPOISON_MEMORY_REGION(stacks, static_cast<size_t>(b->threads) * kStackBytes);
#endif
  t_block = nullptr;
}

// Every thread of the block computes the same thing: enforce it where CUDA requires it.
Fiber* current(const char* what) {
  if (t_fiber == nullptr || t_block == nullptr) {
    std::fprintf(stderr, "cuda_emu: %s outside an emulated kernel\n", what);
    std::abort();
  }
  return t_fiber;
}

}  // namespace

const uint3& thread_idx() { return current("threadIdx")->tid; }
const uint3& block_idx() { return (current("blockIdx"), t_block->idx); }
const dim3& block_dim() { return (current("blockDim"), t_block->dim); }
const dim3& grid_dim() { return (current("gridDim"), t_block->grid); }

FiberPlace fiber_place() {
  const Fiber* f = current("a global memory access");
  return {f->linear, f->warp, f->collectives};
}

void bar_sync(int id, int count, int line) {
  Fiber* f = current("bar.sync");
  Block* b = t_block;
  ++f->collectives;
  if (id < 0 || id > 15) fail("bar.sync: barrier id " + std::to_string(id) + " outside 0..15");
  if (count > 0 && (count % 32 != 0 || count > b->threads))
    fail("bar.sync " + std::to_string(id) + ": count " + std::to_string(count) +
         " is not a multiple of 32 within the block's " + std::to_string(b->threads) + " threads");
  const int want = count > 0 ? count : b->threads;
  Barrier& bar = b->bars[id];
  if (!bar.active) {
    bar.active = true;
    bar.count = want;
    bar.line = line;
    bar.first = f->linear;
    bar.arrived.clear();
  } else if (bar.count != want) {
    fail("bar.sync " + std::to_string(id) + " with count " + std::to_string(want) + ", but thread " +
         std::to_string(bar.first) + " arrived at this phase with count " + std::to_string(bar.count));
  } else if (count <= 0 && bar.line != line) {
    fail("__syncthreads at line " + std::to_string(line) + ", but thread " + std::to_string(bar.first) +
         " waits at the one at line " + std::to_string(bar.line) + " (divergent __syncthreads)");
  }
  bar.arrived.push_back(f->linear);
  f->state = State::kBlocked;
  f->waits = "bar.sync";
  f->wait_line = line;
  f->wait_id = id;
  if (static_cast<int>(bar.arrived.size()) == bar.count) {
    std::vector<int> per_warp(b->warps, 0);
    for (int t : bar.arrived) ++per_warp[t / 32];
    uint32_t members = 0;
    for (int w = 0; w < b->warps; ++w) {
      if (per_warp[w] != 0 && per_warp[w] != warp_lanes(b, w))
        fail("bar.sync " + std::to_string(id) + " (count " + std::to_string(bar.count) + ") completed with " +
             std::to_string(per_warp[w]) + " of warp " + std::to_string(w) + "'s " +
             std::to_string(warp_lanes(b, w)) + " lanes (a partial warp)");
      if (per_warp[w] != 0) members |= 1u << w;
    }
    if (bar.members == 0) {
      bar.members = members;
    } else if (members != bar.members) {
      fail("bar.sync " + std::to_string(id) + " (count " + std::to_string(bar.count) + ") completed by warps " +
           warp_list(members) + ", but its first phase in this block by warps " + warp_list(bar.members) +
           " (a barrier id that several groups of warps use)");
    }
    bar.active = false;
    release(bar.arrived);
  }
  yield();
}

namespace {

uint64_t warp_collective(int kind, unsigned mask, uint64_t bits, int arg, int width, int line) {
  Fiber* f = current(kind_name(kind));
  Block* b = t_block;
  ++f->collectives;
  const int lanes = warp_lanes(b, f->warp);
  const unsigned valid = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
  if (!(mask >> f->lane & 1u)) fail(std::string(kind_name(kind)) + ": the calling lane is not in its mask");
  if (mask & ~valid) fail(std::string(kind_name(kind)) + ": mask names lanes that do not exist");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(std::string(kind_name(kind)) + ": width " + std::to_string(width) + " is not a power of two <= 32");
  WarpCollective& c = b->warp_state[f->warp];
  if (!c.active) {
    c.active = true;
    c.kind = kind;
    c.mask = mask;
    c.width = width;
    c.line = line;
    c.first = f->lane;
    c.arrived = 0;
  } else if (c.kind != kind || c.mask != mask || c.width != width || c.line != line) {
    std::ostringstream os;
    os << kind_name(kind) << " (mask " << std::hex << mask << std::dec << ", line " << line << ") while lane "
       << c.first << " waits in " << kind_name(c.kind) << " (mask " << std::hex << c.mask << std::dec << ", line "
       << c.line << "): lanes of one mask at different calls";
    fail(os.str());
  }
  c.in[f->lane] = bits;
  c.arg[f->lane] = arg;
  c.arrived |= 1u << f->lane;
  f->state = State::kBlocked;
  f->waits = kind_name(kind);
  f->wait_line = line;
  if (c.arrived == c.mask) {
    std::vector<int> who;
    for (int l = 0; l < 32; ++l) {
      if (!(c.mask >> l & 1u)) continue;
      uint64_t out = c.in[l];
      if (kind != 0) {
        const int base = l & ~(c.width - 1);
        int src = kind == 1 ? base + (c.arg[l] & (c.width - 1)) : l ^ c.arg[l];
        if (kind == 2 && (src < base || src >= base + c.width)) src = l;  // outside the segment: own value
        if (!(c.mask >> src & 1u))
          fail(std::string(kind_name(kind)) + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               ", which is outside the mask");
        out = c.in[src];
      }
      b->fibers[f->warp * 32 + l].result = out;
      who.push_back(f->warp * 32 + l);
    }
    c.active = false;
    release(who);
  }
  yield();
  return f->result;
}

}  // namespace

void syncwarp(unsigned mask, int line) { warp_collective(0, mask, 0, 0, 32, line); }

uint64_t shuffle_bits(unsigned mask, uint64_t bits, Shuffle kind, int arg, int width, int line) {
  return warp_collective(kind == Shuffle::kIndex ? 1 : 2, mask, bits, arg, width, line);
}

cudaError_t launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, bool grid_stride,
                   const std::function<void()>& body) {
  std::ostringstream os;
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    os << "block (" << block.x << "," << block.y << "," << block.z << ") outside CUDA's limits (1..1024 threads)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    os << "grid (" << grid.x << "," << grid.y << "," << grid.z << ") outside CUDA's limits";
  else if (dynamic_smem > kMaxDynamicSmem)
    os << "dynamic shared memory " << dynamic_smem << " bytes > " << kMaxDynamicSmem << " without an opt-in";
  if (!os.str().empty()) {
    t_last_error = "launch: " + os.str();
    return cudaErrorInvalidValue;
  }
  const unsigned cap = g_max_grid_stride_blocks.load();
  if (grid_stride && cap > 0 && grid.x > cap) grid.x = cap;
  const size_t stack_bytes = threads * kStackBytes;
  void* mem = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    t_last_error = "launch: no memory for the fiber stacks";
    return cudaErrorMemoryAllocation;
  }
  char* stacks = static_cast<char*>(mem);
  const long page = sysconf(_SC_PAGESIZE);
  for (uint64_t t = 0; t < threads; ++t) mprotect(stacks + t * kStackBytes, page, PROT_NONE);  // overflow guard
  std::string error;
  traffic_launch_begin(name, grid, block, dynamic_smem);
  const Schedule schedule = g_schedule.load();
  const uint64_t seed = g_seed.load();
  for (unsigned bz = 0; bz < grid.z && error.empty(); ++bz)
    for (unsigned by = 0; by < grid.y && error.empty(); ++by)
      for (unsigned bx = 0; bx < grid.x && error.empty(); ++bx) {
        Block blk;
        blk.idx = {bx, by, bz};
        blk.dim = block;
        blk.grid = grid;
        blk.threads = static_cast<int>(threads);
        blk.schedule = schedule;
        blk.random.state = seed ^ (((static_cast<uint64_t>(bz) * grid.y + by) * grid.x + bx) * 0xd1b54a32d192ed03ull);
        blk.body = &body;
        // A fresh OS thread per block: fresh thread_local (__shared__) storage.
        std::thread worker(run_block, &blk, stacks, dynamic_smem);
        worker.join();
        error = blk.error;
        traffic_block_end();
      }
  traffic_launch_end();
  munmap(mem, stack_bytes);
  if (!error.empty()) {
    t_last_error = error;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

const char* last_error() { return t_last_error.c_str(); }
void set_schedule(Schedule schedule, uint64_t seed) {
  g_schedule = schedule;
  g_seed = seed;
}
void set_max_grid_stride_blocks(unsigned blocks) { g_max_grid_stride_blocks = blocks; }
void set_shared_memory_fill(unsigned char byte) { g_smem_fill = byte; }

}  // namespace cuda_emu
