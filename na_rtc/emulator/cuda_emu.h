// cuda_emu.h: the CUDA execution model on the CPU, for na_rtc's emulator.
//
// The emulator compiles the unchanged kernels of cuda_src/ with the system C++
// compiler. A generated translation unit does
//
//     #include "cuda_emu.h"
//     #include "<kernel source>.cu"
//     ... one extern "C" launch trampoline per name expression ...
//
// and is built with g++ -std=c++20 -O2 -fPIC -shared -pthread
// -ffp-contract=off -fno-fast-math (na_rtc/emulator/build.py has the full
// list). This header defines NA_RTC_EMULATOR (never __CUDA_ARCH__), so
// kernels choose emulator code with `#ifdef NA_RTC_EMULATOR` or
// `#ifndef __CUDA_ARCH__`.
//
// ---------------------------------------------------------------------------
// Spellings kernels must use (everything else is plain CUDA C++):
//
//   Dynamic shared memory
//       unsigned char* na_dynamic_shared();
//     returns the block's dynamic shared memory (the launch's shared_bytes,
//     16-byte aligned). On the GPU, define it in a cuda_src header as
//       __device__ __forceinline__ unsigned char* na_dynamic_shared() {
//           extern __shared__ __align__(16) unsigned char na_smem_[];
//           return na_smem_; }
//     under #ifndef NA_RTC_EMULATOR. `extern __shared__` itself does not
//     compile here. The buffer is filled with 0xFF bytes (float NaN, int -1)
//     at the start of every block, and its end abuts a guard page: an access
//     past shared_bytes (rounded up to 16) is reported, not a crash.
//
//   cp.async (sm_80): copies are deferred until the matching wait, so a
//   missing or too weak wait shows up as stale data, and an ldmatrix of rows
//   that any thread's pending cp.async writes is reported (a missing wait or
//   barrier: on the GPU the copy may land before or after the read):
//       void na_cp_async_16(void* smem_dst, const void* gmem_src);  // also _8, _4
//       void na_cp_async_zfill_16(void* smem_dst, const void* gmem_src, int src_bytes);
//       void na_cp_async_commit();                  // cp.async.commit_group
//       template <int N> void na_cp_async_wait_group();  // cp.async.wait_group N
//       void na_cp_async_wait_all();                // cp.async.wait_all
//     Addresses must be aligned to the copy size (as in PTX); zfill copies
//     src_bytes (0..16) and zero-fills the rest (src is not read when 0).
//
//   wgmma (sm_90a, cuda_src/na_wgmma.cuh's spellings): each warp's 16 rows of
//   a warpgroup product, computed at the wgmma.wait_group that covers it, B
//   (and, in the SS form, a K-major A) through no-swizzle descriptors into
//   the dynamic shared memory (na_shared_address gives offsets there):
//       void na_wgmma_fence(); void na_wgmma_commit(); template <int N> void na_wgmma_wait();
//       template <int N, bool TRANS_B, bool BF16>
//       void na_wgmma_m64k16(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc, int accumulate);
//       template <int N, bool TRANS_B, bool BF16>
//       void na_wgmma_m64k16_ss(float (&d)[N / 2], unsigned long long a_desc, unsigned long long desc,
//                               int accumulate);
//       void na_fence_proxy_async();  // clears this thread's landed-but-unfenced copies
//     Reported: an issue without a fence since the last wait, B rows with a
//     pending cp.async or a landed one its thread has not fenced, B outside
//     the dynamic shared memory, a thread exiting with issues not waited for.
//
//   fp16 / bf16 conversions (bit-exact, round to nearest even, subnormals
//   kept, overflow to inf; NaN gives the canonical NaN 0x7FFF like cvt.rn):
//       unsigned short na_emu_f32_to_f16_rn(float);
//       float          na_emu_f16_to_f32(unsigned short);
//       unsigned short na_emu_f32_to_bf16_rn(float);
//       float          na_emu_bf16_to_f32(unsigned short);
//
//   ex2.approx.ftz.f32 (PTX ISA, "Floating Point Instructions: ex2"): the C
//   library's exp2f (within 1 ulp of the correctly rounded 2^x; the GPU's is
//   within 2), with subnormal inputs and results flushed to zero as .ftz does:
//       float na_emu_ex2_approx_ftz(float);
//
//   Emulator-only helper (guard with #ifdef NA_RTC_EMULATOR):
//       int na_emu_os_thread_index();  // which worker thread runs this block
//
// ---------------------------------------------------------------------------
// Execution model
//
// * Blocks run in parallel on a pool of worker threads (one launch at a time
//   per library; the Python side serializes launches process-wide). The
//   count is set per launch by Python (NA_RTC_EMULATOR_THREADS).
// * All threads of a block run as fibers on ONE worker thread, each with its
//   own 64 KiB stack (NA_EMU_STACK_BYTES; a guard page below it turns an
//   overflow into an error). Fibers switch with a few instructions of
//   assembly on x86-64 and AArch64 (ucontext elsewhere, ~10x slower). A fiber
//   runs until it finishes or blocks in __syncthreads / a warp collective;
//   there is no preemption, so a spin-wait on another thread of the same
//   block never ends, and one on another block only ends if that block runs
//   on another worker at the same time (as on a GPU: not guaranteed).
// * Each pass of a block's scheduler runs its ready threads in index order,
//   or, in a reversed launch (NA_RTC_EMULATOR_SCHEDULE=reverse from Python,
//   na_emu_set_schedule here), highest index first. This model has no race
//   detector, but a shared-memory write and a read of another thread with no
//   barrier between them run in opposite orders under the two schedules, so a
//   kernel that passes its tests under both has no such race between threads
//   that reach it in one pass (the 0xFF fill makes early reads visible).
// * `__shared__` expands to `thread_local`: a worker runs one block at a time
//   and all its fibers share that worker's copy, which is exactly per-block
//   shared memory. Static shared memory is not cleared between blocks (its
//   content is whatever the previous block on that worker left).
// * __syncthreads() is a barrier of all threads of the block. A barrier that
//   cannot complete (a thread exited or waits elsewhere) or two threads
//   waiting at different __syncthreads calls is an error ("barrier divergence
//   in <kernel> block (x,y,z): N of M threads reached __syncthreads ..."),
//   reported to Python as EmulatorError: never a hang.
// * Warp collectives (__shfl*_sync, __ballot/__any/__all_sync, __syncwarp,
//   __reduce_*_sync, __match_*_sync) follow the CUDA definitions with full and
//   partial masks: only the lanes in the mask are waited for, and of those
//   only the ones that have not exited (CUDA: "all non-exited threads named
//   in mask must execute the same intrinsic with the same mask"; lanes past
//   the end of a partial last warp count as exited). A live lane of the mask
//   that calls a different collective or mask, or waits at __syncthreads, is
//   a divergence error; the calling lane must be in its mask. Reading from a
//   lane that did not take part (outside the mask, or exited: undefined in
//   CUDA) returns all-ones bits (NaN for floats, -1 for ints), so a kernel
//   that uses such a value fails its tests. Votes and reductions count the
//   lanes that took part. __activemask() returns the lanes that have not
//   exited (this model has no notion of divergent-but-live lanes).
// * Faults in kernel code (invalid addresses, guard pages of checked-mode
//   buffers, dynamic shared memory overflow, stack overflow, integer division
//   by zero) are caught with a signal handler that is installed only while a
//   launch runs, and reported as an error naming the kernel, block and thread.
// * Math functions are the C library's (exact versions even for the fast
//   intrinsics: __expf is expf), no FMA contraction, IEEE denormals; results
//   can differ from the GPU's in the last bits (compare within one backend).
// * Kernels may not include system headers (NVRTC has none); this header
//   brings <math.h>, <stdint.h>, <stdio.h> (printf) and <string.h> names in.
//
// Limits: no preemption (see above); __activemask() as described; static
// __shared__ arrays are not poisoned between blocks; no race detection on
// shared memory (the reversed schedule above exposes races as wrong results); mma.sync m16n8k16 (f16/bf16 -> f32), ldmatrix m8n8 and
// wgmma m64nNk16 with A from registers or K-major from shared memory and
// unswizzled operands only (see "tensor cores" and "wgmma" below); plain
// shared-memory stores are not tracked for the async-proxy fence (only
// cp.async copies are).
// ---------------------------------------------------------------------------
#pragma once

#ifndef NA_RTC_EMULATOR
#define NA_RTC_EMULATOR 1
#endif

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <limits>
#include <type_traits>
#include <utility>

// fibers switch with a few instructions of assembly on x86-64 and AArch64,
// elsewhere (or with -DNA_EMU_USE_UCONTEXT) with ucontext (correct, ~10x slower)
#if defined(NA_EMU_USE_UCONTEXT) || !(defined(__x86_64__) || defined(__aarch64__))
#include <ucontext.h>
#define NA_EMU_UCONTEXT 1
#endif

// ============================================================ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))

#define NA_EMU_EXPORT extern "C" __attribute__((visibility("default")))
#define NA_EMU_NOINLINE __attribute__((noinline))

// ============================================================ vector types

#define NA_EMU_VEC(T, N, A1, A2, A4)                                                          \
    struct __attribute__((aligned(A1))) N##1 { T x; };                                        \
    struct __attribute__((aligned(A2))) N##2 { T x, y; };                                     \
    struct N##3 { T x, y, z; };                                                               \
    struct __attribute__((aligned(A4))) N##4 { T x, y, z, w; };                               \
    static inline N##1 make_##N##1(T x) { return N##1{x}; }                                   \
    static inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }                           \
    static inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }                   \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }

NA_EMU_VEC(signed char, char, 1, 2, 4)
NA_EMU_VEC(unsigned char, uchar, 1, 2, 4)
NA_EMU_VEC(short, short, 2, 4, 8)
NA_EMU_VEC(unsigned short, ushort, 2, 4, 8)
NA_EMU_VEC(int, int, 4, 8, 16)
NA_EMU_VEC(unsigned int, uint, 4, 8, 16)
NA_EMU_VEC(long, long, 8, 16, 16)
NA_EMU_VEC(unsigned long, ulong, 8, 16, 16)
NA_EMU_VEC(long long, longlong, 8, 16, 16)
NA_EMU_VEC(unsigned long long, ulonglong, 8, 16, 16)
NA_EMU_VEC(float, float, 4, 8, 16)
NA_EMU_VEC(double, double, 8, 16, 16)
#undef NA_EMU_VEC

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

constexpr int warpSize = 32;

// ============================================================ runtime state

// 16-bit conversions (defined with the other fp16/bf16 helpers below), used by mma
static inline float na_emu_f16_to_f32(unsigned short h);
static inline float na_emu_bf16_to_f32(unsigned short b);

namespace na_emu {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr unsigned kMaxWorkers = 512;
constexpr size_t kMaxSharedBytes = 232448;  // 227 KiB: the largest opt-in dynamic shared memory (sm_90)
#ifndef NA_EMU_STACK_BYTES
#define NA_EMU_STACK_BYTES (64 * 1024)
#endif
constexpr size_t kStackBytes = NA_EMU_STACK_BYTES;
constexpr size_t kAltStackBytes = 64 * 1024;
constexpr int kMaxGuards = 256;
constexpr unsigned long long kPoison = ~0ull;  // value read from a lane outside the mask

enum FiberState : unsigned char { F_READY, F_RUNNING, F_BARRIER, F_WARP, F_DONE };

enum BarrierKind : int { B_SYNC, B_COUNT, B_AND, B_OR };

enum WarpKind : int {
    W_SYNCWARP,
    W_SHFL_IDX,
    W_SHFL_UP,
    W_SHFL_DOWN,
    W_SHFL_XOR,
    W_BALLOT,
    W_ANY,
    W_ALL,
    W_REDUCE_ADD,
    W_REDUCE_MIN_S,
    W_REDUCE_MAX_S,
    W_REDUCE_MIN_U,
    W_REDUCE_MAX_U,
    W_REDUCE_AND,
    W_REDUCE_OR,
    W_REDUCE_XOR,
    W_MATCH_ANY,
    W_MATCH_ALL,
    W_MMA,       // mma.sync.m16n8k16 (tag: element type), lanes exchange operand addresses
    W_LDMATRIX,  // ldmatrix.m8n8 (tag: matrix count, + 8 for .trans)
    W_WGMMA,        // wgmma.mma_async m64nNk16, this warp's 16 rows (tag: N | .trans-b << 9 | bf16 << 10 | SS << 11)
    W_WGMMA_FENCE,  // wgmma.fence
    W_WGMMA_COMMIT, // wgmma.commit_group
    W_WGMMA_WAIT,   // wgmma.wait_group (tag: N)
};

static const char* warp_kind_name(int kind) {
    switch (kind) {
        case W_SYNCWARP: return "__syncwarp";
        case W_SHFL_IDX: return "__shfl_sync";
        case W_SHFL_UP: return "__shfl_up_sync";
        case W_SHFL_DOWN: return "__shfl_down_sync";
        case W_SHFL_XOR: return "__shfl_xor_sync";
        case W_BALLOT: return "__ballot_sync";
        case W_ANY: return "__any_sync";
        case W_ALL: return "__all_sync";
        case W_REDUCE_ADD: return "__reduce_add_sync";
        case W_REDUCE_MIN_S: case W_REDUCE_MIN_U: return "__reduce_min_sync";
        case W_REDUCE_MAX_S: case W_REDUCE_MAX_U: return "__reduce_max_sync";
        case W_REDUCE_AND: return "__reduce_and_sync";
        case W_REDUCE_OR: return "__reduce_or_sync";
        case W_REDUCE_XOR: return "__reduce_xor_sync";
        case W_MATCH_ANY: return "__match_any_sync";
        case W_MATCH_ALL: return "__match_all_sync";
        case W_MMA: return "mma.sync.m16n8k16";
        case W_LDMATRIX: return "ldmatrix.m8n8";
        case W_WGMMA: return "wgmma.mma_async";
        case W_WGMMA_FENCE: return "wgmma.fence";
        case W_WGMMA_COMMIT: return "wgmma.commit_group";
        case W_WGMMA_WAIT: return "wgmma.wait_group";
    }
    return "warp collective";
}

struct CpAsync {
    void* dst;
    const void* src;
    unsigned bytes, src_bytes;
    unsigned line;  // where it was issued, for the race report of pending_copy_at
    const char* file;
};

struct Fiber {
#ifdef NA_EMU_UCONTEXT
    ucontext_t uc;
#else
    void* sp;
#endif
    unsigned char state;
    unsigned linear;
    uint3 tid;
    // where it waits (for divergence messages)
    unsigned wait_line;
    const char* wait_file;
    int wait_kind;
    unsigned wait_mask;
    int result;  // __syncthreads_count/and/or
    // cp.async: issued copies in order; group_end[k] = entries in groups 0..k;
    // [cp_lo, cp_hi) bounds the destinations of the cp_n pending ones
    CpAsync* cp;
    unsigned cp_n, cp_cap;
    uintptr_t cp_lo, cp_hi;
    unsigned* group_end;
    unsigned group_n, group_cap;
    // [uf_lo, uf_hi) bounds the shared memory its landed cp.async copies wrote since its last
    // fence.proxy.async: wgmma (the async proxy) may not read there yet
    uintptr_t uf_lo, uf_hi;
    char* stack_lo;  // guard page
    char* stack_hi;
};

struct WarpOp {
    unsigned mask, arrived;
    int kind, tag;
    unsigned line;
    const char* file;
};

// one issued wgmma.mma_async of a warp, computed at the wait_group that covers it
struct WgmmaOp {
    unsigned long long desc, a_desc;  // B's descriptor; A's (the SS form: A from shared memory too)
    unsigned n, trans, bf16, accumulate, ss, rank;  // rank: the warp's place in its warpgroup (its rows of A)
    unsigned line;
    const char* file;
    const unsigned* a[32];  // each lane's A registers (the RS form) and D registers (its kernel's arrays)
    float* d[32];
    unsigned a_issued[32][4];  // the A registers' values at the issue (RS): they must hold until the wait
};

enum { kWgmmaMaxGroups = 64 };

struct Warp {
    unsigned nops;
    unsigned exited;  // lanes that exited (or do not exist)
    WarpOp ops[32];
    unsigned long long val[32];
    unsigned long long result[32];
    unsigned char src[32];
    // wgmma: issued operations in order, wg_group_end[k] = operations in groups 0..k (committed),
    // wg_fenced: a wgmma.fence since the last wait_group (or the start)
    WgmmaOp* wg;
    unsigned wg_n, wg_cap, wg_groups;
    unsigned wg_group_end[kWgmmaMaxGroups];
    unsigned char wg_fenced;
};

struct Launch {
    const char* name;
    unsigned grid[3], block[3];
    size_t smem;
    unsigned nthreads;
    void (*thread_fn)(void*);
    void* arg;
    unsigned long long nblocks;
    unsigned long long next;  // atomic: next block to run
    int stop;                 // atomic
    pthread_mutex_t err_mu;
    int has_error;
    unsigned long long err_block;
    char error[2048];
    int reverse;  // the schedule: threads of a block run highest index first (na_emu_set_schedule)
};

struct Worker {
    pthread_t thread;
    unsigned index;
#ifdef NA_EMU_UCONTEXT
    ucontext_t sched_uc;
#else
    void* sched_sp;
#endif
    Fiber* fibers;
    unsigned fiber_cap;
    char* stacks;
    size_t stacks_len;
    unsigned char* dsmem_region;  // [buffer ... | guard page]
    size_t dsmem_region_len;      // without the guard page
    unsigned char* dsmem;         // this launch's buffer (end abuts the guard)
    size_t dsmem_bytes;
    char* altstack;
    Warp* warps;
    Launch* L;
    unsigned n, cur, done;
    uint3 block;
    // barrier
    unsigned bar_arrived, bar_line;
    const char* bar_file;
    int bar_kind, bar_count;
    // faults (written by the signal handler)
    volatile sig_atomic_t in_fiber;
    volatile sig_atomic_t faulted;
    int fault_sig, fault_code, fault_write;
    void* fault_addr;
    // the block's error
    int failed;
    char error[1536];
};

struct Guard {
    uintptr_t start, end;
    int label;
};

static thread_local Worker* tl_worker;
static thread_local uint3 tl_threadIdx;
static thread_local uint3 tl_blockIdx;
static thread_local dim3 tl_blockDim;
static thread_local dim3 tl_gridDim;

static size_t page_size() {
    static size_t page = (size_t)sysconf(_SC_PAGESIZE);
    return page;
}

static const char* base_name(const char* path) {
    if (!path) return "?";
    const char* slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

// ------------------------------------------------------------ context switch

#ifndef NA_EMU_UCONTEXT
// na_emu_ctx_switch(save, load): push the callee-saved registers and the
// floating-point control state on the current stack, store the stack pointer
// in *save, switch to the stack `load` and pop the same from there. A new
// fiber's stack holds such a frame that "returns" into na_emu_ctx_start,
// which calls fiber_main(worker) (function and argument in callee-saved
// registers of the frame).
extern "C" __attribute__((visibility("hidden"))) void na_emu_ctx_switch(void** save, void* load);
extern "C" __attribute__((visibility("hidden"))) void na_emu_ctx_start();
#if defined(__x86_64__)
__asm__(R"(
    .pushsection .text
    .p2align 4
    .globl na_emu_ctx_switch
    .hidden na_emu_ctx_switch
    .type na_emu_ctx_switch,@function
na_emu_ctx_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size na_emu_ctx_switch, .-na_emu_ctx_switch

    .p2align 4
    .globl na_emu_ctx_start
    .hidden na_emu_ctx_start
    .type na_emu_ctx_start,@function
na_emu_ctx_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size na_emu_ctx_start, .-na_emu_ctx_start
    .popsection
)");
#else  // __aarch64__: x19-x30, d8-d15 and fpcr in a 176-byte frame
__asm__(R"(
    .pushsection .text
    .p2align 4
    .globl na_emu_ctx_switch
    .hidden na_emu_ctx_switch
    .type na_emu_ctx_switch,%function
na_emu_ctx_switch:
    .cfi_startproc
    sub sp, sp, #176
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mrs x9, fpcr
    str x9, [sp, #160]
    mov x9, sp
    str x9, [x0]
    mov sp, x1
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    ldr x9, [sp, #160]
    msr fpcr, x9
    add sp, sp, #176
    ret
    .cfi_endproc
    .size na_emu_ctx_switch, .-na_emu_ctx_switch

    .p2align 4
    .globl na_emu_ctx_start
    .hidden na_emu_ctx_start
    .type na_emu_ctx_start,%function
na_emu_ctx_start:
    .cfi_startproc
    .cfi_undefined x30
    mov x0, x19
    blr x20
    brk #0
    .cfi_endproc
    .size na_emu_ctx_start, .-na_emu_ctx_start
    .popsection
)");
#endif
#endif

static void fiber_main(Worker* w);

#ifdef NA_EMU_UCONTEXT
static void fiber_main_uc() { fiber_main(tl_worker); }
#endif

static inline void fiber_prepare(Worker* w, Fiber* f) {
#ifdef NA_EMU_UCONTEXT
    (void)w;
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack_lo + page_size();
    f->uc.uc_stack.ss_size = kStackBytes;
    f->uc.uc_link = nullptr;
    makecontext(&f->uc, (void (*)())fiber_main_uc, 0);
#elif defined(__aarch64__)
    uintptr_t top = ((uintptr_t)f->stack_hi) & ~(uintptr_t)15;
    uint64_t* s = (uint64_t*)(top - 176);
    memset(s, 0, 176);
    s[0] = (uint64_t)(uintptr_t)w;            // x19: argument
    s[1] = (uint64_t)(uintptr_t)&fiber_main;  // x20: function
    s[11] = (uint64_t)(uintptr_t)&na_emu_ctx_start;  // x30 (x29 = 0 ends backtraces); fpcr = 0
    f->sp = s;
#else
    uintptr_t top = ((uintptr_t)f->stack_hi) & ~(uintptr_t)15;
    uint64_t* s = (uint64_t*)(top - 80);
    s[0] = 0x1F80ull | (0x037Full << 32);  // mxcsr (round to nearest, no FTZ/DAZ), x87 control word
    s[1] = 0;                              // r15
    s[2] = 0;                              // r14
    s[3] = (uint64_t)(uintptr_t)&fiber_main;  // r13: function
    s[4] = (uint64_t)(uintptr_t)w;            // r12: argument
    s[5] = 0;                              // rbx
    s[6] = 0;                              // rbp
    s[7] = (uint64_t)(uintptr_t)&na_emu_ctx_start;
    f->sp = s;
#endif
}

// from the scheduler into fiber f; returns when a fiber switches back
static inline void switch_from_scheduler(Worker* w, Fiber* f) {
#ifdef NA_EMU_UCONTEXT
    swapcontext(&w->sched_uc, &f->uc);
#else
    na_emu_ctx_switch(&w->sched_sp, f->sp);
#endif
}

static inline void switch_fiber(Fiber* from, Fiber* to) {
#ifdef NA_EMU_UCONTEXT
    swapcontext(&from->uc, &to->uc);
#else
    na_emu_ctx_switch(&from->sp, to->sp);
#endif
}

static inline void switch_to_scheduler(Worker* w, Fiber* from) {
#ifdef NA_EMU_UCONTEXT
    swapcontext(&from->uc, &w->sched_uc);
#else
    na_emu_ctx_switch(&from->sp, w->sched_sp);
#endif
}

// leave the current fiber for good (errors, faults): its stack is abandoned
[[noreturn]] static void abandon_to_scheduler(Worker* w) {
#ifdef NA_EMU_UCONTEXT
    setcontext(&w->sched_uc);
#else
    void* dead;
    na_emu_ctx_switch(&dead, w->sched_sp);
#endif
    __builtin_unreachable();
}

// ------------------------------------------------------------ scheduling

static inline void enter_fiber_state(Worker* w, unsigned j) {
    Fiber* f = &w->fibers[j];
    w->cur = j;
    tl_threadIdx = f->tid;
    f->state = F_RUNNING;
}

// The current fiber is blocked (or done): run the next ready fiber of the
// block after it, or go back to the scheduler, which starts a new pass.
// The schedule's order: position p of a pass runs thread p, or thread n - 1 - p
// in a reversed launch (the same map turns a thread back into its position).
// Running both orders flips which side of an unsynchronized shared-memory
// write and read goes first, so a race that one order hides fails the other.
static inline unsigned schedule_order(const Worker* w, unsigned p) { return w->L->reverse ? w->n - 1 - p : p; }

static NA_EMU_NOINLINE void block_yield(Worker* w) {
    Fiber* me = &w->fibers[w->cur];
    for (unsigned p = schedule_order(w, w->cur) + 1; p < w->n; ++p) {
        const unsigned j = schedule_order(w, p);
        if (w->fibers[j].state == F_READY) {
            enter_fiber_state(w, j);
            switch_fiber(me, &w->fibers[j]);
            return;
        }
    }
    switch_to_scheduler(w, me);
}

static int thread_str(char* out, size_t len, const uint3& t) {
    return snprintf(out, len, "(%u,%u,%u)", t.x, t.y, t.z);
}

[[noreturn]] static void fail_current(Worker* w) {
    w->failed = 1;
    w->in_fiber = 0;
    abandon_to_scheduler(w);
}

[[noreturn]] __attribute__((format(printf, 2, 3))) static void failf(Worker* w, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->error, sizeof w->error, fmt, ap);
    va_end(ap);
    fail_current(w);
}

static void warp_lane_exited(Worker* w, unsigned linear);

static void fiber_main(Worker* w) {
    w->L->thread_fn(w->L->arg);
    Fiber* me = &w->fibers[w->cur];
    if (w->warps[me->linear >> 5].wg_n) {
        char t[48];
        thread_str(t, sizeof t, me->tid);
        const WgmmaOp& g = w->warps[me->linear >> 5].wg[0];
        failf(w, "thread %s of %s block (%u,%u,%u) exits with a wgmma.mma_async (%s:%u) not waited for "
                 "(wgmma.commit_group, then wgmma.wait_group)", t, w->L->name, w->block.x, w->block.y,
              w->block.z, base_name(g.file), g.line);
    }
    me->state = F_DONE;
    me->cp_n = 0;
    me->group_n = 0;
    w->done++;
    warp_lane_exited(w, me->linear);
    block_yield(w);
    __builtin_trap();  // a finished fiber is never resumed
}

// ------------------------------------------------------------ __syncthreads

static NA_EMU_NOINLINE int barrier(int kind, int pred, unsigned line, const char* file) {
    Worker* w = tl_worker;
    Fiber* me = &w->fibers[w->cur];
    if (w->bar_arrived == 0) {
        w->bar_line = line;
        w->bar_file = file;
        w->bar_kind = kind;
        w->bar_count = 0;
    } else if (w->bar_line != line || w->bar_kind != kind ||
               (w->bar_file != file && strcmp(w->bar_file, file) != 0)) {
        char t[48];
        thread_str(t, sizeof t, me->tid);
        failf(w,
              "barrier divergence in %s block (%u,%u,%u): %u of %u threads reached __syncthreads at %s:%u, "
              "but thread %s reached a different __syncthreads at %s:%u",
              w->L->name, w->block.x, w->block.y, w->block.z, w->bar_arrived, w->n, base_name(w->bar_file),
              w->bar_line, t, base_name(file), line);
    }
    w->bar_arrived++;
    if (pred) w->bar_count++;
    if (w->bar_arrived == w->n) {
        int result = w->bar_count;
        if (kind == B_AND) result = w->bar_count == (int)w->n;
        if (kind == B_OR) result = w->bar_count != 0;
        for (unsigned j = 0; j < w->n; ++j) {
            Fiber* f = &w->fibers[j];
            if (f->state == F_BARRIER) {
                f->state = F_READY;
                f->result = result;
            }
        }
        w->bar_arrived = 0;
        __asm__ __volatile__("" ::: "memory");
        return result;
    }
    me->state = F_BARRIER;
    me->wait_line = line;
    me->wait_file = file;
    __asm__ __volatile__("" ::: "memory");
    block_yield(w);
    __asm__ __volatile__("" ::: "memory");
    return me->result;
}

// ------------------------------------------------------------ warp collectives

static inline unsigned lanes_of_warp(const Worker* w, unsigned warp) {
    unsigned first = warp * 32;
    unsigned count = w->n - first;
    return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// an op is complete when every lane of its mask arrived or has exited
// (CUDA: "all non-exited threads named in mask must execute the same
// intrinsic"; lanes past the end of a partial warp count as exited)
static inline bool op_complete(const Warp* ws, const WarpOp* op) {
    return ((op->arrived | ws->exited) & op->mask) == op->mask;
}


// ------------------------------------------------------------ tensor cores (mma.sync, ldmatrix)
//
// Every lane deposits the address of its operands (a lane-local struct on its
// fiber stack, alive while it waits); the lane that completes the collective
// computes the whole warp's result with the PTX ISA fragment layouts and
// writes each lane's part back through its address.

enum MmaType : int { MMA_F16 = 0, MMA_BF16 = 1 };

struct MmaLane {  // one lane's mma.m16n8k16 operands: a 4 x b32, b 2 x b32, c and d 4 x f32
    const unsigned* a;
    const unsigned* b;
    const float* c;
    float* d;
};

struct LdmatrixLane {  // one lane's ldmatrix row address and destination registers
    const unsigned char* row;
    unsigned* out;
};

static inline float mma_element(unsigned bits, int type) {
    return type == MMA_F16 ? na_emu_f16_to_f32((unsigned short)bits) : na_emu_bf16_to_f32((unsigned short)bits);
}

static void require_full_warp(Worker* w, const WarpOp* op, const Warp* ws) {
    if (op->mask != 0xffffffffu || (op->arrived | 0u) != 0xffffffffu || ws->exited) {
        failf(w, "%s in %s block (%u,%u,%u): all 32 lanes must take part (mask 0x%08x, arrived 0x%08x, exited 0x%08x) "
                 "(%s:%u)", warp_kind_name(op->kind), w->L->name, w->block.x, w->block.y, w->block.z, op->mask,
              op->arrived, ws->exited, base_name(op->file), op->line);
    }
}

// D = A (16x16, row) * B (16x8, col) + C (16x8), f32 accumulation. Fragments
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"): g = lane / 4, t = lane % 4;
// A reg r holds row g + 8 (r % 2), cols 2t + 8 (r / 2) + {0, 1} (low half
// first); B reg r holds rows (k) 2t + 8 r + {0, 1} of col (n) g; C/D element
// i is row g + 8 (i / 2), col 2t + i % 2.
static void mma_complete(Worker* w, Warp* ws, const WarpOp* op) {
    require_full_warp(w, op, ws);
    float A[16][16], B[16][8], C[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const MmaLane* m = (const MmaLane*)ws->val[l];
        const unsigned g = l >> 2, t = l & 3u;
        for (unsigned r = 0; r < 4; ++r)
            for (unsigned h = 0; h < 2; ++h) A[g + 8 * (r & 1u)][2 * t + 8 * (r >> 1) + h] = mma_element(m->a[r] >> (16 * h) & 0xffffu, op->tag);
        for (unsigned r = 0; r < 2; ++r)
            for (unsigned h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = mma_element(m->b[r] >> (16 * h) & 0xffffu, op->tag);
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1u)] = m->c[i];
    }
    float D[16][8];
    for (unsigned r = 0; r < 16; ++r)
        for (unsigned c = 0; c < 8; ++c) {
            // products of 16-bit values are exact in double; the sum is rounded once (the hardware's order
            // and internal precision are unspecified: kernels are compared within tolerances, not bits)
            double acc = C[r][c];
            for (unsigned k = 0; k < 16; ++k) acc += (double)A[r][k] * (double)B[k][c];
            D[r][c] = (float)acc;
        }
    for (unsigned l = 0; l < 32; ++l) {  // C may alias D: everything was read above
        const MmaLane* m = (const MmaLane*)ws->val[l];
        const unsigned g = l >> 2, t = l & 3u;
        for (unsigned i = 0; i < 4; ++i) m->d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1u)];
    }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16: lanes 8j..8j+7 give
// the row addresses (16 bytes each, 16-byte aligned) of matrix j; lane l
// receives in register j the elements (l / 4, 2 (l % 4) + {0, 1}) of matrix j,
// or with .trans the elements (2 (l % 4) + {0, 1}, l / 4).
// A read of shared memory [p, p + bytes) while a cp.async of some thread of the
// block into it is still pending: on the GPU the copy may land before or after
// the read (a missing cp.async wait, or a missing __syncthreads between one
// thread's copy and another's read, e.g. a stage reloaded before every warp is
// done with it). The emulator performs copies only at the wait, so without
// this check such a race would read the old contents and go unnoticed. Checked
// by ldmatrix, which reads the staged rows of the tensor-core kernels.
static void pending_copy_at(Worker* w, const unsigned char* p, unsigned bytes, const char* what, unsigned lane,
                            unsigned line, const char* file) {
    const uintptr_t lo = (uintptr_t)p, hi = lo + bytes;
    for (unsigned j = 0; j < w->n; ++j) {
        const Fiber* f = &w->fibers[j];
        if (!f->cp_n || hi <= f->cp_lo || lo >= f->cp_hi) continue;
        for (unsigned i = 0; i < f->cp_n; ++i) {
            const CpAsync& c = f->cp[i];
            const uintptr_t d = (uintptr_t)c.dst;
            if (hi <= d || lo >= d + c.bytes) continue;
            char t[48];
            thread_str(t, sizeof t, f->tid);
            failf(w, "%s in %s block (%u,%u,%u): lane %u reads shared memory at %p that a cp.async of thread %s "
                  "(%s:%u) has not landed in yet: a missing cp.async wait, or no __syncthreads between that "
                  "thread's wait and this read (%s:%u)", what, w->L->name, w->block.x, w->block.y, w->block.z, lane,
                  (const void*)p, t, base_name(c.file), c.line, base_name(file), line);
        }
    }
}

static void ldmatrix_complete(Worker* w, Warp* ws, const WarpOp* op) {
    require_full_warp(w, op, ws);
    const unsigned count = (unsigned)op->tag & 7u;
    const bool trans = (op->tag & 8) != 0;
    for (unsigned l = 0; l < 8 * count; ++l) {
        const LdmatrixLane* m = (const LdmatrixLane*)ws->val[l];
        if ((uintptr_t)m->row & 15u) {
            failf(w, "ldmatrix in %s block (%u,%u,%u): lane %u's row address %p is not 16-byte aligned (%s:%u)",
                  w->L->name, w->block.x, w->block.y, w->block.z, l, (const void*)m->row, base_name(op->file), op->line);
        }
        pending_copy_at(w, m->row, 16, "ldmatrix", l, op->line, op->file);
    }
    unsigned out[32][4];
    for (unsigned j = 0; j < count; ++j)
        for (unsigned l = 0; l < 32; ++l) {
            unsigned short e[2];
            for (unsigned h = 0; h < 2; ++h) {
                const unsigned row = trans ? 2 * (l & 3u) + h : l >> 2, col = trans ? l >> 2 : 2 * (l & 3u) + h;
                const LdmatrixLane* src = (const LdmatrixLane*)ws->val[8 * j + row];
                memcpy(&e[h], src->row + 2 * col, 2);
            }
            out[l][j] = (unsigned)e[0] | ((unsigned)e[1] << 16);
        }
    for (unsigned l = 0; l < 32; ++l) {
        const LdmatrixLane* m = (const LdmatrixLane*)ws->val[l];
        for (unsigned j = 0; j < count; ++j) m->out[j] = out[l][j];
    }
}

// ------------------------------------------------------------ wgmma (sm_90a)
//
// wgmma.mma_async of a warpgroup: each warp's 16 rows of D depend only on its
// own A registers and the shared B, so the emulator handles every warp on its
// own. An issue records the operands (each lane's A and D register arrays
// and the descriptor); the wait_group that covers it computes D, reading A,
// D and B then: touching them in between (undefined on the GPU) gives wrong
// results here. Checked: a fence before the first issue after a wait (and at
// the start), B inside the dynamic shared memory with no swizzle, no pending
// cp.async and no landed one without a fence.proxy.async in its rows, every
// issue waited for before the thread exits, a block of whole warpgroups.

struct WgmmaLane {  // one lane's operands
    const unsigned* a;  // null in the SS form, which reads A through a_desc
    float* d;
    unsigned long long desc, a_desc;
    unsigned accumulate;
};

static void wgmma_issue(Worker* w, Warp* ws, const WarpOp* op) {
    require_full_warp(w, op, ws);
    if (w->n % 128u) {
        failf(w, "wgmma.mma_async in %s block (%u,%u,%u): the block has %u threads, not whole warpgroups of 128 "
                 "(%s:%u)", w->L->name, w->block.x, w->block.y, w->block.z, w->n, base_name(op->file), op->line);
    }
    if (!ws->wg_fenced) {
        failf(w, "wgmma.mma_async in %s block (%u,%u,%u) without a wgmma.fence since the start or the last "
                 "wgmma.wait_group: the registers it reads may still be written (%s:%u)", w->L->name, w->block.x,
              w->block.y, w->block.z, base_name(op->file), op->line);
    }
    const WgmmaLane* first = (const WgmmaLane*)ws->val[0];
    for (unsigned l = 1; l < 32; ++l) {
        const WgmmaLane* m = (const WgmmaLane*)ws->val[l];
        if (m->desc != first->desc || m->a_desc != first->a_desc || m->accumulate != first->accumulate) {
            failf(w, "wgmma.mma_async in %s block (%u,%u,%u): lane %u's descriptors or scale-d (0x%016llx, "
                     "0x%016llx, %u) differ from lane 0's (0x%016llx, 0x%016llx, %u) (%s:%u)", w->L->name,
                  w->block.x, w->block.y, w->block.z, l, m->desc, m->a_desc, m->accumulate, first->desc,
                  first->a_desc, first->accumulate, base_name(op->file), op->line);
        }
    }
    if (ws->wg_n == ws->wg_cap) {
        const unsigned cap = ws->wg_cap ? 2 * ws->wg_cap : 16;
        WgmmaOp* grown = (WgmmaOp*)realloc(ws->wg, cap * sizeof(WgmmaOp));
        if (!grown) failf(w, "out of memory for wgmma bookkeeping");
        ws->wg = grown;
        ws->wg_cap = cap;
    }
    WgmmaOp* g = &ws->wg[ws->wg_n++];
    g->desc = first->desc;
    g->a_desc = first->a_desc;
    g->n = (unsigned)op->tag & 511u;
    g->trans = ((unsigned)op->tag >> 9) & 1u;
    g->bf16 = ((unsigned)op->tag >> 10) & 1u;
    g->ss = ((unsigned)op->tag >> 11) & 1u;
    g->rank = (unsigned)(ws - w->warps) % 4u;
    g->accumulate = first->accumulate;
    g->line = op->line;
    g->file = op->file;
    for (unsigned l = 0; l < 32; ++l) {
        const WgmmaLane* m = (const WgmmaLane*)ws->val[l];
        g->a[l] = m->a;
        g->d[l] = m->d;
        if (!g->ss) memcpy(g->a_issued[l], m->a, sizeof g->a_issued[l]);
    }
}

// the 16-byte row of shared memory at `p` that a wgmma reads: no pending copy, no unfenced landed one
static void wgmma_check_row(Worker* w, const unsigned char* p, const WgmmaOp* g) {
    pending_copy_at(w, p, 16, "wgmma.mma_async", 0, g->line, g->file);
    const uintptr_t lo = (uintptr_t)p, hi = lo + 16;
    for (unsigned j = 0; j < w->n; ++j) {
        const Fiber* f = &w->fibers[j];
        if (hi <= f->uf_lo || lo >= f->uf_hi) continue;
        char t[48];
        thread_str(t, sizeof t, f->tid);
        failf(w, "wgmma.mma_async in %s block (%u,%u,%u) reads shared memory at %p that a cp.async of thread %s "
                 "wrote with no fence.proxy.async in that thread since (na_fence_proxy_async before the barrier) "
                 "(%s:%u)", w->L->name, w->block.x, w->block.y, w->block.z, (const void*)p, t, base_name(g->file),
              g->line);
    }
}

// One element of a no-swizzle operand in shared memory, as a float: (k, n) of B, or (k, m) of A (A's
// rows m play B's columns n), through descriptor `desc` read K-major or MN-major (see
// cuda_src/na_wgmma.cuh for the core-matrix addressing); checks the bounds and, once per 16-byte row,
// the copies that wrote it.
static float wgmma_element(Worker* w, const WgmmaOp* g, unsigned long long desc, bool mn_major, unsigned k,
                           unsigned n, const char* operand) {
    const unsigned start = (unsigned)(desc & 0x3fffu) << 4, lbo = (unsigned)(desc >> 16 & 0x3fffu) << 4,
                   sbo = (unsigned)(desc >> 32 & 0x3fffu) << 4;
    const unsigned base_offset = (unsigned)(desc >> 49 & 7u), swizzle = (unsigned)(desc >> 62);
    if (base_offset || swizzle) {
        failf(w, "wgmma.mma_async in %s: %s descriptor 0x%016llx asks for swizzle mode %u / base offset %u; the "
                 "emulator models the no-swizzle layout only (%s:%u)", w->L->name, operand, desc, swizzle,
              base_offset, base_name(g->file), g->line);
    }
    const unsigned off = mn_major ? start + n / 8 * sbo + k / 8 * lbo + k % 8 * 16 + n % 8 * 2
                                  : start + n / 8 * sbo + k / 8 * lbo + n % 8 * 16 + k % 8 * 2;
    if ((size_t)off + 2 > w->L->smem) {
        failf(w, "wgmma.mma_async in %s block (%u,%u,%u): %s element (k %u, %s %u) at shared offset %u is "
                 "outside the block's %zu bytes of dynamic shared memory (descriptor 0x%016llx) (%s:%u)",
              w->L->name, w->block.x, w->block.y, w->block.z, operand, k, operand[0] == 'A' ? "m" : "n", n, off,
              w->L->smem, desc, base_name(g->file), g->line);
    }
    if ((mn_major ? n : k) % 8 == 0) wgmma_check_row(w, w->dsmem + (off & ~15u), g);
    unsigned short bits;
    memcpy(&bits, w->dsmem + off, 2);
    return mma_element(bits, g->bf16 ? MMA_BF16 : MMA_F16);
}

// D (16 x N per warp) = A (16 x 16) B (16 x N) + (accumulate ? D : 0); B from its descriptor, A from
// the lanes' registers (RS) or, K-major, from its descriptor at the warp's rows 16 rank .. (SS)
static void wgmma_compute(Worker* w, const WgmmaOp* g) {
    static thread_local float B[16][256];
    for (unsigned k = 0; k < 16; ++k)
        for (unsigned n = 0; n < g->n; ++n) B[k][n] = wgmma_element(w, g, g->desc, g->trans, k, n, "B");
    float A[16][16];
    if (g->ss) {
        for (unsigned r = 0; r < 16; ++r)
            for (unsigned k = 0; k < 16; ++k) A[r][k] = wgmma_element(w, g, g->a_desc, false, k, 16 * g->rank + r, "A");
    } else {
        for (unsigned l = 0; l < 32; ++l) {
            // the PTX ISA: A's registers may not be written until the wait; an array that left scope before
            // it (its frame reused) shows here too
            if (memcmp(g->a[l], g->a_issued[l], sizeof g->a_issued[l]) != 0) {
                failf(w, "the A registers of a wgmma.mma_async (%s:%u) in %s block (%u,%u,%u) changed before the "
                         "wgmma.wait_group that covers it (lane %u): keep them untouched, and in scope, until the "
                         "wait", base_name(g->file), g->line, w->L->name, w->block.x, w->block.y, w->block.z, l);
            }
            const unsigned gr = l >> 2, t = l & 3u;
            for (unsigned r = 0; r < 4; ++r)
                for (unsigned h = 0; h < 2; ++h)
                    A[gr + 8 * (r & 1u)][2 * t + 8 * (r >> 1) + h] =
                        mma_element(g->a_issued[l][r] >> (16 * h) & 0xffffu, g->bf16 ? MMA_BF16 : MMA_F16);
        }
    }
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned gr = l >> 2, t = l & 3u;
        for (unsigned i = 0; i < g->n / 2; ++i) {
            const unsigned r = gr + 8 * ((i >> 1) & 1u), c = 8 * (i >> 2) + 2 * t + (i & 1u);
            double acc = g->accumulate ? g->d[l][i] : 0.0;  // exact products, one rounding (as mma_complete)
            for (unsigned k = 0; k < 16; ++k) acc += (double)A[r][k] * (double)B[k][c];
            g->d[l][i] = (float)acc;
        }
    }
}

// wgmma.wait_group N: compute every operation of the committed groups but the newest N
static void wgmma_wait(Worker* w, Warp* ws, const WarpOp* op) {
    require_full_warp(w, op, ws);
    const unsigned pending = (unsigned)op->tag;
    ws->wg_fenced = 0;
    if (ws->wg_groups <= pending) return;
    const unsigned groups = ws->wg_groups - pending, ops = ws->wg_group_end[groups - 1];
    for (unsigned i = 0; i < ops; ++i) wgmma_compute(w, &ws->wg[i]);
    memmove(ws->wg, ws->wg + ops, (ws->wg_n - ops) * sizeof(WgmmaOp));
    ws->wg_n -= ops;
    for (unsigned k = groups; k < ws->wg_groups; ++k) ws->wg_group_end[k - groups] = ws->wg_group_end[k] - ops;
    ws->wg_groups -= groups;
}

static void wgmma_commit(Worker* w, Warp* ws, const WarpOp* op) {
    require_full_warp(w, op, ws);
    if (ws->wg_groups == kWgmmaMaxGroups) {
        failf(w, "wgmma.commit_group in %s: more than %d groups pending (%s:%u)", w->L->name, (int)kWgmmaMaxGroups,
              base_name(op->file), op->line);
    }
    ws->wg_group_end[ws->wg_groups++] = ws->wg_n;
}

// tensor-core instructions executed since the last na_emu_op_counts reset, one per warp: [0] mma.sync,
// [1] wgmma.mma_async (four per warpgroup instruction). Tests compare them with the work a kernel should do
// (the chunks and tiles it skips), which no timing on a CPU could show.
static unsigned long long g_op_counts[2];

// compute the results of a complete op for the lanes that arrived, wake them
// (except `self`, which returns its result directly) and remove the op
static void complete_op(Worker* w, unsigned warp, WarpOp* op, unsigned self) {
    Warp* ws = &w->warps[warp];
    const unsigned in = op->arrived;  // exited lanes give no value: reading one is undefined (poison)
    const int kind = op->kind;
    unsigned long long r = 0;
    switch (kind) {
        case W_SHFL_IDX:
        case W_SHFL_UP:
        case W_SHFL_DOWN:
        case W_SHFL_XOR:
            for (unsigned l = 0; l < 32; ++l) {
                if (!(in >> l & 1u)) continue;
                const unsigned j = ws->src[l];
                ws->result[l] = (in >> j & 1u) ? ws->val[j] : kPoison;
            }
            break;
        case W_BALLOT:
        case W_ANY:
        case W_ALL: {
            unsigned ballot = 0;
            for (unsigned l = 0; l < 32; ++l)
                if ((in >> l & 1u) && ws->val[l]) ballot |= 1u << l;
            r = kind == W_BALLOT ? ballot : kind == W_ANY ? (ballot != 0) : (ballot == in);
            break;
        }
        case W_REDUCE_ADD:
        case W_REDUCE_AND:
        case W_REDUCE_OR:
        case W_REDUCE_XOR:
        case W_REDUCE_MIN_S:
        case W_REDUCE_MAX_S:
        case W_REDUCE_MIN_U:
        case W_REDUCE_MAX_U: {
            bool first = true;
            unsigned acc = 0;
            for (unsigned l = 0; l < 32; ++l) {
                if (!(in >> l & 1u)) continue;
                const unsigned v = (unsigned)ws->val[l];
                if (first) {
                    acc = v;
                    first = false;
                    continue;
                }
                switch (kind) {
                    case W_REDUCE_ADD: acc += v; break;
                    case W_REDUCE_AND: acc &= v; break;
                    case W_REDUCE_OR: acc |= v; break;
                    case W_REDUCE_XOR: acc ^= v; break;
                    case W_REDUCE_MIN_S: acc = (int)v < (int)acc ? v : acc; break;
                    case W_REDUCE_MAX_S: acc = (int)v > (int)acc ? v : acc; break;
                    case W_REDUCE_MIN_U: acc = v < acc ? v : acc; break;
                    case W_REDUCE_MAX_U: acc = v > acc ? v : acc; break;
                }
            }
            r = acc;
            break;
        }
        case W_MATCH_ANY:
            for (unsigned l = 0; l < 32; ++l) {
                if (!(in >> l & 1u)) continue;
                unsigned same = 0;
                for (unsigned j = 0; j < 32; ++j)
                    if ((in >> j & 1u) && ws->val[j] == ws->val[l]) same |= 1u << j;
                ws->result[l] = same;
            }
            break;
        case W_MATCH_ALL: {
            bool all = true;
            const unsigned first = (unsigned)__builtin_ctz(in);
            for (unsigned l = 0; l < 32; ++l)
                if ((in >> l & 1u) && ws->val[l] != ws->val[first]) all = false;
            r = all ? op->mask : 0;
            break;
        }
        case W_MMA:
            mma_complete(w, ws, op);
            __atomic_fetch_add(&g_op_counts[0], 1ull, __ATOMIC_RELAXED);
            break;
        case W_LDMATRIX:
            ldmatrix_complete(w, ws, op);
            break;
        case W_WGMMA:
            wgmma_issue(w, ws, op);
            __atomic_fetch_add(&g_op_counts[1], 1ull, __ATOMIC_RELAXED);
            break;
        case W_WGMMA_FENCE:
            require_full_warp(w, op, ws);
            ws->wg_fenced = 1;
            break;
        case W_WGMMA_COMMIT:
            wgmma_commit(w, ws, op);
            break;
        case W_WGMMA_WAIT:
            wgmma_wait(w, ws, op);
            break;
        default:
            break;
    }
    const bool per_lane = kind == W_SHFL_IDX || kind == W_SHFL_UP || kind == W_SHFL_DOWN || kind == W_SHFL_XOR ||
                          kind == W_MATCH_ANY;
    for (unsigned l = 0; l < 32; ++l) {
        if (!(in >> l & 1u)) continue;
        if (!per_lane) ws->result[l] = r;
        if (l != self) w->fibers[warp * 32 + l].state = F_READY;
    }
    *op = ws->ops[--ws->nops];  // order does not matter
}

// a lane exited: ops that only waited for it complete now
static void warp_lane_exited(Worker* w, unsigned linear) {
    const unsigned warp = linear >> 5;
    Warp* ws = &w->warps[warp];
    ws->exited |= 1u << (linear & 31u);
    for (unsigned k = ws->nops; k-- > 0;) {
        if (op_complete(ws, &ws->ops[k])) complete_op(w, warp, &ws->ops[k], 32);
    }
}

static NA_EMU_NOINLINE unsigned long long warp_collective(int kind, int tag, unsigned mask, unsigned long long value,
                                                          unsigned src, unsigned line, const char* file) {
    Worker* w = tl_worker;
    Fiber* me = &w->fibers[w->cur];
    const unsigned lane = me->linear & 31u, warp = me->linear >> 5;
    const unsigned bit = 1u << lane;
    char t[48];
    if (!(mask & bit)) {
        thread_str(t, sizeof t, me->tid);
        failf(w, "%s in %s block (%u,%u,%u): thread %s (lane %u) called it with mask 0x%08x, which does not include its own lane (%s:%u)",
              warp_kind_name(kind), w->L->name, w->block.x, w->block.y, w->block.z, t, lane, mask, base_name(file), line);
    }
    Warp* ws = &w->warps[warp];
    WarpOp* op = nullptr;
    for (unsigned k = 0; k < ws->nops; ++k) {
        if (ws->ops[k].mask & bit) {
            op = &ws->ops[k];
            break;
        }
    }
    if (op) {
        if (op->mask != mask || op->kind != kind || op->tag != tag) {
            thread_str(t, sizeof t, me->tid);
            failf(w,
                  "warp divergence in %s block (%u,%u,%u) warp %u: thread %s (lane %u) called %s with mask 0x%08x at %s:%u "
                  "while lanes 0x%08x wait in %s with mask 0x%08x at %s:%u",
                  w->L->name, w->block.x, w->block.y, w->block.z, warp, t, lane, warp_kind_name(kind), mask,
                  base_name(file), line, op->arrived, warp_kind_name(op->kind), op->mask, base_name(op->file), op->line);
        }
    } else {
        op = &ws->ops[ws->nops++];
        op->mask = mask;
        op->arrived = 0;
        op->kind = kind;
        op->tag = tag;
        op->line = line;
        op->file = file;
    }
    op->arrived |= bit;
    ws->val[lane] = value;
    ws->src[lane] = (unsigned char)src;
    __asm__ __volatile__("" ::: "memory");
    if (op_complete(ws, op)) {
        complete_op(w, warp, op, lane);
        return ws->result[lane];
    }
    me->state = F_WARP;
    me->wait_line = line;
    me->wait_file = file;
    me->wait_kind = kind;
    me->wait_mask = mask;
    block_yield(w);
    __asm__ __volatile__("" ::: "memory");
    return ws->result[lane];
}

// PTX shfl.sync source lane: c = ((32 - width) << 8) | (up ? 0 : 31)
static inline unsigned shfl_source(int kind, unsigned lane, unsigned b, int width) {
    const unsigned seg = (unsigned)(32 - width) & 31u;
    const unsigned bval = b & 31u;
    const unsigned min_lane = lane & seg;
    const unsigned max_lane = kind == W_SHFL_UP ? min_lane : (min_lane | (31u & ~seg));
    int j = 0;
    bool ok = false;
    switch (kind) {
        case W_SHFL_UP: j = (int)lane - (int)bval; ok = j >= (int)max_lane; break;
        case W_SHFL_DOWN: j = (int)(lane + bval); ok = j <= (int)max_lane; break;
        case W_SHFL_XOR: j = (int)(lane ^ bval); ok = j <= (int)max_lane; break;
        default: j = (int)(min_lane | (bval & ~seg)); ok = j <= (int)max_lane; break;
    }
    return ok ? (unsigned)j : lane;
}

template <class T>
static inline unsigned long long to_bits64(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move values of at most 8 bytes");
    unsigned long long u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}

template <class T>
static inline T from_bits64(unsigned long long u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

template <class T>
static inline T shfl(int kind, unsigned mask, T var, unsigned b, int width, unsigned line, const char* file) {
    Worker* w = tl_worker;
    if (width < 1 || width > 32 || (width & (width - 1))) {
        failf(w, "%s in %s: width %d is not a power of two in [1, 32] (%s:%u)", warp_kind_name(kind), w->L->name, width,
              base_name(file), line);
    }
    const unsigned lane = w->fibers[w->cur].linear & 31u;
    unsigned src = shfl_source(kind, lane, b, width);
    return from_bits64<T>(warp_collective(kind, (int)sizeof(T) * 64 + width, mask, to_bits64(var), src, line, file));
}

// ------------------------------------------------------------ cp.async

static void cp_async_issue(void* dst, const void* src, unsigned bytes, unsigned src_bytes, unsigned line,
                           const char* file) {
    Worker* w = tl_worker;
    Fiber* f = &w->fibers[w->cur];
    if (((uintptr_t)dst | (src_bytes ? (uintptr_t)src : 0)) & (bytes - 1)) {
        char t[48];
        thread_str(t, sizeof t, f->tid);
        failf(w, "misaligned cp.async of %u bytes in %s block (%u,%u,%u) thread %s: dst %p, src %p (%s:%u)", bytes,
              w->L->name, w->block.x, w->block.y, w->block.z, t, dst, src, base_name(file), line);
    }
    if (src_bytes > bytes) {
        failf(w, "cp.async in %s: src_bytes %u exceeds the copy size %u (%s:%u)", w->L->name, src_bytes, bytes,
              base_name(file), line);
    }
    if (f->cp_n == f->cp_cap) {
        unsigned cap = f->cp_cap ? f->cp_cap * 2 : 16;
        CpAsync* grown = (CpAsync*)realloc(f->cp, cap * sizeof(CpAsync));
        if (!grown) failf(w, "out of memory for cp.async bookkeeping");
        f->cp = grown;
        f->cp_cap = cap;
    }
    const uintptr_t lo = (uintptr_t)dst, hi = lo + bytes;
    if (!f->cp_n) f->cp_lo = lo, f->cp_hi = hi;
    f->cp_lo = lo < f->cp_lo ? lo : f->cp_lo;
    f->cp_hi = hi > f->cp_hi ? hi : f->cp_hi;
    f->cp[f->cp_n++] = CpAsync{dst, src, bytes, src_bytes, line, file};
}

static void cp_async_commit() {
    Worker* w = tl_worker;
    Fiber* f = &w->fibers[w->cur];
    if (f->group_n == f->group_cap) {
        unsigned cap = f->group_cap ? f->group_cap * 2 : 8;
        unsigned* grown = (unsigned*)realloc(f->group_end, cap * sizeof(unsigned));
        if (!grown) failf(w, "out of memory for cp.async bookkeeping");
        f->group_end = grown;
        f->group_cap = cap;
    }
    f->group_end[f->group_n++] = f->cp_n;
}

// perform the copies of all committed groups but the newest `pending`
static void cp_async_wait(unsigned pending) {
    Worker* w = tl_worker;
    Fiber* f = &w->fibers[w->cur];
    if (f->group_n <= pending) return;
    const unsigned groups = f->group_n - pending;
    const unsigned entries = f->group_end[groups - 1];
    for (unsigned i = 0; i < entries; ++i) {
        const CpAsync& c = f->cp[i];
        if (c.src_bytes) memcpy(c.dst, c.src, c.src_bytes);
        if (c.src_bytes < c.bytes) memset((char*)c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
        const uintptr_t d = (uintptr_t)c.dst;  // landed: unfenced for wgmma until this thread's proxy fence
        if (f->uf_lo >= f->uf_hi) f->uf_lo = d, f->uf_hi = d + c.bytes;
        f->uf_lo = d < f->uf_lo ? d : f->uf_lo;
        f->uf_hi = d + c.bytes > f->uf_hi ? d + c.bytes : f->uf_hi;
    }
    memmove(f->cp, f->cp + entries, (f->cp_n - entries) * sizeof(CpAsync));
    f->cp_n -= entries;
    f->cp_lo = UINTPTR_MAX;
    f->cp_hi = 0;
    for (unsigned i = 0; i < f->cp_n; ++i) {  // the bounds of what is still pending
        const uintptr_t d = (uintptr_t)f->cp[i].dst;
        f->cp_lo = d < f->cp_lo ? d : f->cp_lo;
        f->cp_hi = d + f->cp[i].bytes > f->cp_hi ? d + f->cp[i].bytes : f->cp_hi;
    }
    for (unsigned k = groups; k < f->group_n; ++k) f->group_end[k - groups] = f->group_end[k] - entries;
    f->group_n -= groups;
    __asm__ __volatile__("" ::: "memory");
}

[[noreturn]] static void trap(const char* what, unsigned line, const char* file) {
    Worker* w = tl_worker;
    char t[48];
    thread_str(t, sizeof t, w->fibers[w->cur].tid);
    failf(w, "%s in %s block (%u,%u,%u) thread %s (%s:%u)", what, w->L->name, w->block.x, w->block.y, w->block.z, t,
          base_name(file), line);
}

}  // namespace na_emu

// ============================================================ built-in variables

#define threadIdx (static_cast<const uint3&>(::na_emu::tl_threadIdx))
#define blockIdx (static_cast<const uint3&>(::na_emu::tl_blockIdx))
#define blockDim (static_cast<const dim3&>(::na_emu::tl_blockDim))
#define gridDim (static_cast<const dim3&>(::na_emu::tl_gridDim))

// ============================================================ synchronization

static inline void __syncthreads(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::barrier(::na_emu::B_SYNC, 0, line, file);
}
static inline int __syncthreads_count(int pred, unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::barrier(::na_emu::B_COUNT, pred != 0, line, file);
}
static inline int __syncthreads_and(int pred, unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::barrier(::na_emu::B_AND, pred != 0, line, file);
}
static inline int __syncthreads_or(int pred, unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::barrier(::na_emu::B_OR, pred != 0, line, file);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu, unsigned line = __builtin_LINE(),
                              const char* file = __builtin_FILE()) {
    ::na_emu::warp_collective(::na_emu::W_SYNCWARP, 0, mask, 0, 0, line, file);
}
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

[[noreturn]] static inline void __trap(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::trap("__trap() called", line, file);
}
[[noreturn]] static inline void __brkpt(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::trap("__brkpt() called", line, file);
}

// assert() in kernels: an emulator error instead of abort()
#ifdef assert
#undef assert
#endif
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : ::na_emu::trap("assertion failed: " #e, __LINE__, __FILE__))
#endif

// ============================================================ warp collectives

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                            unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::shfl(::na_emu::W_SHFL_IDX, mask, var, (unsigned)src_lane, width, line, file);
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                               unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::shfl(::na_emu::W_SHFL_UP, mask, var, delta, width, line, file);
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                                 unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::shfl(::na_emu::W_SHFL_DOWN, mask, var, delta, width, line, file);
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                                unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    return ::na_emu::shfl(::na_emu::W_SHFL_XOR, mask, var, (unsigned)lane_mask, width, line, file);
}

static inline unsigned __ballot_sync(unsigned mask, int pred, unsigned line = __builtin_LINE(),
                                     const char* file = __builtin_FILE()) {
    return (unsigned)::na_emu::warp_collective(::na_emu::W_BALLOT, 0, mask, pred != 0, 0, line, file);
}
static inline int __any_sync(unsigned mask, int pred, unsigned line = __builtin_LINE(),
                             const char* file = __builtin_FILE()) {
    return (int)::na_emu::warp_collective(::na_emu::W_ANY, 0, mask, pred != 0, 0, line, file);
}
static inline int __all_sync(unsigned mask, int pred, unsigned line = __builtin_LINE(),
                             const char* file = __builtin_FILE()) {
    return (int)::na_emu::warp_collective(::na_emu::W_ALL, 0, mask, pred != 0, 0, line, file);
}
static inline unsigned __activemask() {
    ::na_emu::Worker* w = ::na_emu::tl_worker;
    return ~w->warps[w->fibers[w->cur].linear >> 5].exited;
}

#define NA_EMU_REDUCE(name, T, kind)                                                                        \
    static inline T name(unsigned mask, T value, unsigned line = __builtin_LINE(),                          \
                         const char* file = __builtin_FILE()) {                                             \
        return (T)(unsigned)::na_emu::warp_collective(::na_emu::kind, 0, mask, (unsigned)value, 0, line, file); \
    }
NA_EMU_REDUCE(__reduce_add_sync, unsigned, W_REDUCE_ADD)
NA_EMU_REDUCE(__reduce_add_sync, int, W_REDUCE_ADD)
NA_EMU_REDUCE(__reduce_min_sync, unsigned, W_REDUCE_MIN_U)
NA_EMU_REDUCE(__reduce_min_sync, int, W_REDUCE_MIN_S)
NA_EMU_REDUCE(__reduce_max_sync, unsigned, W_REDUCE_MAX_U)
NA_EMU_REDUCE(__reduce_max_sync, int, W_REDUCE_MAX_S)
NA_EMU_REDUCE(__reduce_and_sync, unsigned, W_REDUCE_AND)
NA_EMU_REDUCE(__reduce_or_sync, unsigned, W_REDUCE_OR)
NA_EMU_REDUCE(__reduce_xor_sync, unsigned, W_REDUCE_XOR)
#undef NA_EMU_REDUCE

template <class T>
static inline unsigned __match_any_sync(unsigned mask, T value, unsigned line = __builtin_LINE(),
                                        const char* file = __builtin_FILE()) {
    return (unsigned)::na_emu::warp_collective(::na_emu::W_MATCH_ANY, (int)sizeof(T), mask,
                                               ::na_emu::to_bits64(value), 0, line, file);
}
template <class T>
static inline unsigned __match_all_sync(unsigned mask, T value, int* pred, unsigned line = __builtin_LINE(),
                                        const char* file = __builtin_FILE()) {
    unsigned r = (unsigned)::na_emu::warp_collective(::na_emu::W_MATCH_ALL, (int)sizeof(T), mask,
                                                     ::na_emu::to_bits64(value), 0, line, file);
    *pred = r != 0;
    return r;
}

// ============================================================ atomics (relaxed, like CUDA's)

#define NA_EMU_ATOMIC_INT(T)                                                                                          \
    static inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }                      \
    static inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }                      \
    static inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }                      \
    static inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }                        \
    static inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }                      \
    static inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }                    \
    static inline T atomicCAS(T* p, T cmp, T v) {                                                                    \
        __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);                          \
        return cmp;                                                                                                  \
    }                                                                                                                \
    static inline T atomicMax(T* p, T v) {                                                                           \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                                \
        while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {     \
        }                                                                                                            \
        return old;                                                                                                  \
    }                                                                                                                \
    static inline T atomicMin(T* p, T v) {                                                                           \
        T old = __atomic_load_n(p, __ATOMIC_RELAXED);                                                                \
        while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {     \
        }                                                                                                            \
        return old;                                                                                                  \
    }
NA_EMU_ATOMIC_INT(int)
NA_EMU_ATOMIC_INT(unsigned int)
NA_EMU_ATOMIC_INT(unsigned long long)
NA_EMU_ATOMIC_INT(long long)
#undef NA_EMU_ATOMIC_INT

namespace na_emu {
template <class F, class U>
static inline F atomic_float_add(F* p, F v) {
    U* u = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        F now;
        memcpy(&now, &old, sizeof(F));
        F sum = now + v;
        U desired;
        memcpy(&desired, &sum, sizeof(F));
        if (__atomic_compare_exchange_n(u, &old, desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return now;
    }
}
}  // namespace na_emu
static inline float atomicAdd(float* p, float v) { return ::na_emu::atomic_float_add<float, unsigned>(p, v); }
static inline double atomicAdd(double* p, double v) {
    return ::na_emu::atomic_float_add<double, unsigned long long>(p, v);
}
static inline float atomicExch(float* p, float v) {
    unsigned u;
    memcpy(&u, &v, 4);
    u = __atomic_exchange_n(reinterpret_cast<unsigned*>(p), u, __ATOMIC_RELAXED);
    float r;
    memcpy(&r, &u, 4);
    return r;
}
static inline unsigned atomicInc(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, old >= limit ? 0u : old + 1u, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
    }
    return old;
}
static inline unsigned atomicDec(unsigned* p, unsigned limit) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(p, &old, (old == 0u || old > limit) ? limit : old - 1u, true,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

// ============================================================ loads / stores with cache hints

template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static inline T __ldca(const T* p) { return *p; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldlu(const T* p) { return *p; }
template <class T> static inline T __ldcv(const T* p) { return *p; }
template <class T> static inline void __stcg(T* p, T v) { *p = v; }
template <class T> static inline void __stcs(T* p, T v) { *p = v; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
template <class T> static inline void __stwt(T* p, T v) { *p = v; }

// ============================================================ math and bit built-ins

namespace na_emu {
template <class To, class From>
static inline To bit_cast(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
    To r;
    memcpy(&r, &v, sizeof(To));
    return r;
}
}  // namespace na_emu

static inline int __float_as_int(float x) { return ::na_emu::bit_cast<int>(x); }
static inline unsigned __float_as_uint(float x) { return ::na_emu::bit_cast<unsigned>(x); }
static inline float __int_as_float(int x) { return ::na_emu::bit_cast<float>(x); }
static inline float __uint_as_float(unsigned x) { return ::na_emu::bit_cast<float>(x); }
static inline long long __double_as_longlong(double x) { return ::na_emu::bit_cast<long long>(x); }
static inline double __longlong_as_double(long long x) { return ::na_emu::bit_cast<double>(x); }
static inline int __double2hiint(double x) { return (int)(::na_emu::bit_cast<unsigned long long>(x) >> 32); }
static inline int __double2loint(double x) { return (int)(unsigned)::na_emu::bit_cast<unsigned long long>(x); }
static inline double __hiloint2double(int hi, int lo) {
    return ::na_emu::bit_cast<double>(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo);
}

// ex2.approx.ftz.f32: a subnormal input counts as zero (2^0 = 1, which exp2f gives anyway) and a subnormal
// result becomes +0 (results are positive), so softmax weights below 2^-126 vanish as they do on the GPU
static inline float na_emu_ex2_approx_ftz(float x) {
    const float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.0f : y;  // FLT_MIN; NaN compares false and stays NaN
}

static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
// glibc declares these names itself: macros to the exact functions
#define __expf(x) expf(x)
#define __exp10f(x) exp10f(x)
#define __logf(x) logf(x)
#define __log2f(x) log2f(x)
#define __log10f(x) log10f(x)
#define __sinf(x) sinf(x)
#define __cosf(x) cosf(x)
#define __tanf(x) tanf(x)
#define __powf(x, y) powf(x, y)
static inline float __fdividef(float x, float y) { return x / y; }
static inline float fdividef(float x, float y) { return x / y; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __drcp_rn(double x) { return 1.0 / x; }
static inline double __dsqrt_rn(double x) { return sqrt(x); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }

namespace na_emu {
// cvt.rni/rzi/rmi/rpi.s32.f32: NaN -> 0, saturating
template <class I>
static inline I float_to_int(double r) {
    if (r != r) return 0;
    constexpr double lo = (double)std::numeric_limits<I>::min(), hi = (double)std::numeric_limits<I>::max();
    if (r <= lo) return std::numeric_limits<I>::min();
    if (r >= hi) return std::numeric_limits<I>::max();
    return (I)r;
}
}  // namespace na_emu
static inline int __float2int_rn(float x) { return ::na_emu::float_to_int<int>(nearbyint((double)x)); }
static inline int __float2int_rz(float x) { return ::na_emu::float_to_int<int>(trunc((double)x)); }
static inline int __float2int_rd(float x) { return ::na_emu::float_to_int<int>(floor((double)x)); }
static inline int __float2int_ru(float x) { return ::na_emu::float_to_int<int>(ceil((double)x)); }
static inline unsigned __float2uint_rn(float x) { return ::na_emu::float_to_int<unsigned>(nearbyint((double)x)); }
static inline unsigned __float2uint_rz(float x) { return ::na_emu::float_to_int<unsigned>(trunc((double)x)); }
static inline long long __float2ll_rn(float x) { return ::na_emu::float_to_int<long long>(nearbyint((double)x)); }
static inline long long __float2ll_rz(float x) { return ::na_emu::float_to_int<long long>(trunc((double)x)); }
static inline int __double2int_rn(double x) { return ::na_emu::float_to_int<int>(nearbyint(x)); }
static inline int __double2int_rz(double x) { return ::na_emu::float_to_int<int>(trunc(x)); }
static inline long long __double2ll_rn(double x) { return ::na_emu::float_to_int<long long>(nearbyint(x)); }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline double __int2double_rn(int x) { return (double)x; }
static inline double __ll2double_rn(long long x) { return (double)x; }
static inline float __double2float_rn(double x) { return (float)x; }

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline unsigned long long __brevll(unsigned long long x) {
    return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
static inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
    return r;
}
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)((v << (shift & 31u)) >> 32);
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(v >> (shift & 31u));
}
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
static inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }

static inline long long clock64() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}
static inline void __nanosleep(unsigned) {}

// min / max with CUDA's overload set
#define NA_EMU_MINMAX(R, A, B)                                              \
    static inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; }    \
    static inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
NA_EMU_MINMAX(int, int, int)
NA_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
NA_EMU_MINMAX(unsigned int, int, unsigned int)
NA_EMU_MINMAX(unsigned int, unsigned int, int)
NA_EMU_MINMAX(long, long, long)
NA_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
NA_EMU_MINMAX(unsigned long, long, unsigned long)
NA_EMU_MINMAX(unsigned long, unsigned long, long)
NA_EMU_MINMAX(long long, long long, long long)
NA_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
NA_EMU_MINMAX(unsigned long long, long long, unsigned long long)
NA_EMU_MINMAX(unsigned long long, unsigned long long, long long)
#undef NA_EMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline double min(float a, double b) { return fmin(a, b); }
static inline double max(float a, double b) { return fmax(a, b); }
static inline double min(double a, float b) { return fmin(a, b); }
static inline double max(double a, float b) { return fmax(a, b); }
static inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long llmin(long long a, long long b) { return a < b ? a : b; }
static inline long long llmax(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ============================================================ fp16 / bf16 conversions

// float -> IEEE binary16, round to nearest even (cvt.rn.f16.f32)
static inline unsigned short na_emu_f32_to_f16_rn(float f) {
    const unsigned x = __float_as_uint(f);
    const unsigned sign = (x >> 16) & 0x8000u;
    const unsigned ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                          // NaN: canonical
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 (and inf): inf
    if (ax >= 0x38800000u) {                                        // normal: >= 2^-14
        unsigned r = ax - 0x38000000u;                              // rebias 127 -> 15
        r += 0x0fffu + ((r >> 13) & 1u);
        return (unsigned short)(sign | (r >> 13));
    }
    if (ax <= 0x33000000u) return (unsigned short)sign;  // <= 2^-25: rounds (ties to even) to zero
    const unsigned e = ax >> 23;                          // 102 .. 112
    const unsigned m = (ax & 0x7fffffu) | 0x800000u;
    const unsigned shift = 126u - e;                      // value in units of 2^-24 is m >> shift
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}

// IEEE binary16 -> float, exact (NaN -> canonical NaN, like cvt.f32.f16)
static inline float na_emu_f16_to_f32(unsigned short h) {
    const unsigned sign = ((unsigned)h & 0x8000u) << 16;
    const unsigned e = ((unsigned)h >> 10) & 0x1fu, m = (unsigned)h & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(m ? 0x7fffffffu : (sign | 0x7f800000u));
    if (e != 0) return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    if (m == 0) return __uint_as_float(sign);
    // subnormal: m * 2^-24, exact in float
    const float v = (float)m * 5.9604644775390625e-08f;
    return sign ? -v : v;
}

// float -> bfloat16, round to nearest even (cvt.rn.bf16.f32)
static inline unsigned short na_emu_f32_to_bf16_rn(float f) {
    unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN: canonical
    x += 0x7fffu + ((x >> 16) & 1u);
    return (unsigned short)(x >> 16);
}

// bfloat16 -> float, exact (NaN -> canonical NaN)
static inline float na_emu_bf16_to_f32(unsigned short b) {
    const unsigned x = (unsigned)b << 16;
    if ((x & 0x7fffffffu) > 0x7f800000u) return __uint_as_float(0x7fffffffu);
    return __uint_as_float(x);
}

// ============================================================ shared memory and cp.async

static inline unsigned char* na_dynamic_shared() { return ::na_emu::tl_worker->dsmem; }

static inline int na_emu_os_thread_index() { return (int)::na_emu::tl_worker->index; }

static inline void na_cp_async_16(void* dst, const void* src, unsigned line = __builtin_LINE(),
                                  const char* file = __builtin_FILE()) {
    ::na_emu::cp_async_issue(dst, src, 16, 16, line, file);
}
static inline void na_cp_async_8(void* dst, const void* src, unsigned line = __builtin_LINE(),
                                 const char* file = __builtin_FILE()) {
    ::na_emu::cp_async_issue(dst, src, 8, 8, line, file);
}
static inline void na_cp_async_4(void* dst, const void* src, unsigned line = __builtin_LINE(),
                                 const char* file = __builtin_FILE()) {
    ::na_emu::cp_async_issue(dst, src, 4, 4, line, file);
}
static inline void na_cp_async_zfill_16(void* dst, const void* src, int src_bytes, unsigned line = __builtin_LINE(),
                                        const char* file = __builtin_FILE()) {
    ::na_emu::cp_async_issue(dst, src, 16, src_bytes < 0 ? 0u : (unsigned)src_bytes, line, file);
}
static inline void na_cp_async_commit() { ::na_emu::cp_async_commit(); }
template <int N>
static inline void na_cp_async_wait_group() {
    static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
    ::na_emu::cp_async_wait((unsigned)N);
}
static inline void na_cp_async_wait_all() {
    ::na_emu::cp_async_commit();
    ::na_emu::cp_async_wait(0);
}

// ============================================================ tensor cores
//
// The spellings of cuda_src/na_mma.cuh (inline PTX there): warp collectives
// of all 32 lanes with the PTX ISA fragment layouts (see mma_complete and
// ldmatrix_complete above).

static inline void na_mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                       const float (&c)[4], unsigned line = __builtin_LINE(),
                                       const char* file = __builtin_FILE()) {
    ::na_emu::MmaLane lane{a, b, c, d};
    ::na_emu::warp_collective(::na_emu::W_MMA, ::na_emu::MMA_F16, 0xffffffffu, (unsigned long long)(uintptr_t)&lane, 0,
                              line, file);
}
static inline void na_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                        const float (&c)[4], unsigned line = __builtin_LINE(),
                                        const char* file = __builtin_FILE()) {
    ::na_emu::MmaLane lane{a, b, c, d};
    ::na_emu::warp_collective(::na_emu::W_MMA, ::na_emu::MMA_BF16, 0xffffffffu, (unsigned long long)(uintptr_t)&lane,
                              0, line, file);
}
template <int N, bool TRANS>
static inline void na_ldmatrix(unsigned (&r)[N], const void* row, unsigned line = __builtin_LINE(),
                               const char* file = __builtin_FILE()) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    ::na_emu::LdmatrixLane lane{(const unsigned char*)row, r};
    ::na_emu::warp_collective(::na_emu::W_LDMATRIX, N + (TRANS ? 8 : 0), 0xffffffffu,
                              (unsigned long long)(uintptr_t)&lane, 0, line, file);
}

// The spellings of cuda_src/na_wgmma.cuh (sm_90a inline PTX there): warp
// collectives of all 32 lanes, computed at the wait (see wgmma_compute).
// Shared addresses are offsets in the block's dynamic shared memory, the only
// place the emulator lets a descriptor point to.
static inline unsigned na_shared_address(const void* p, unsigned line = __builtin_LINE(),
                                         const char* file = __builtin_FILE()) {
    ::na_emu::Worker* w = ::na_emu::tl_worker;
    const uintptr_t at = (uintptr_t)p, base = (uintptr_t)w->dsmem;
    if (at < base || at >= base + w->L->smem) {
        ::na_emu::trap("a shared address outside the block's dynamic shared memory (the emulator maps only that "
                       "one to shared addresses)", line, file);
    }
    return (unsigned)(at - base);
}
static inline void na_wgmma_fence(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::warp_collective(::na_emu::W_WGMMA_FENCE, 0, 0xffffffffu, 0, 0, line, file);
}
static inline void na_wgmma_commit(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::warp_collective(::na_emu::W_WGMMA_COMMIT, 0, 0xffffffffu, 0, 0, line, file);
}
template <int N>
static inline void na_wgmma_wait(unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    ::na_emu::warp_collective(::na_emu::W_WGMMA_WAIT, N, 0xffffffffu, 0, 0, line, file);
}
static inline void na_fence_proxy_async() {
    ::na_emu::Fiber* f = &::na_emu::tl_worker->fibers[::na_emu::tl_worker->cur];
    f->uf_lo = UINTPTR_MAX;
    f->uf_hi = 0;
}
template <int K>
static inline void na_wgmma_hold(float (&)[K]) {}
template <int K>
static inline void na_wgmma_hold(unsigned (&)[K]) {}
template <int N, bool TRANS_B, bool BF16>
static inline void na_wgmma_m64k16(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long desc, int accumulate,
                                   unsigned line = __builtin_LINE(), const char* file = __builtin_FILE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N is a multiple of 8 up to 256");
    ::na_emu::WgmmaLane lane{a, d, desc, 0, accumulate != 0};
    ::na_emu::warp_collective(::na_emu::W_WGMMA, N | (TRANS_B ? 1 << 9 : 0) | (BF16 ? 1 << 10 : 0), 0xffffffffu,
                              (unsigned long long)(uintptr_t)&lane, 0, line, file);
}
template <int N, bool TRANS_B, bool BF16>
static inline void na_wgmma_m64k16_ss(float (&d)[N / 2], unsigned long long a_desc, unsigned long long desc,
                                      int accumulate, unsigned line = __builtin_LINE(),
                                      const char* file = __builtin_FILE()) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N is a multiple of 8 up to 256");
    ::na_emu::WgmmaLane lane{nullptr, d, desc, a_desc, accumulate != 0};
    ::na_emu::warp_collective(::na_emu::W_WGMMA, N | (TRANS_B ? 1 << 9 : 0) | (BF16 ? 1 << 10 : 0) | 1 << 11,
                              0xffffffffu, (unsigned long long)(uintptr_t)&lane, 0, line, file);
}

// ============================================================ launching

#include "cuda_emu_runtime.h"
