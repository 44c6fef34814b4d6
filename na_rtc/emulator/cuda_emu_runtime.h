// cuda_emu_runtime.h: worker pool, block scheduler, fault handling and the
// launch entry points of the na_rtc CPU emulator. Included once, at the end
// of cuda_emu.h; see there for the execution model.
//
// C ABI of a generated library (all extern "C"):
//   int         na_emu_abi_version(void);
//   int         na_emu_launch_<i>(const unsigned grid[3], const unsigned block[3], size_t shared_bytes,
//                                 void** args, char* error, size_t error_len);
//                 0: done; 1: the kernel failed (message in error); 2: invalid launch;
//                 3: interrupted (SIGINT); 4: the emulator could not run it (threads, memory)
//   const char* na_emu_signature_<i>(void);  // one letter per kernel parameter:
//                 p pointer, i int, I unsigned, q int64, Q uint64, f float, d double, ? other
//   void        na_emu_set_threads(int count);  // worker threads for later launches (0: all cores)
//   size_t      na_emu_page_size(void);
//   void*       na_emu_guard_alloc(size_t nbytes);  // checked mode: see below
//   void        na_emu_guard_free(void* start, size_t nbytes);
//   int         na_emu_set_guards(int n, void* const* starts, const size_t* sizes, const int* labels);
//   void        na_emu_op_counts(unsigned long long out[2], int reset);  // mma.sync, wgmma.mma_async warp
//                 instructions executed (cuda_emu.h's g_op_counts); reset != 0 zeroes them after reading
//
// Checked mode (driven from Python): na_emu_guard_alloc returns `start` with
// [start, start + nbytes) readable and writable, the page after
// start + nbytes (which is page aligned) and the page before the page of
// `start` inaccessible, and the bytes between those (below start) filled with
// 0xA5 so that writes there can be found after the launch. Registered guards
// turn a fault next to a buffer into "out-of-bounds read of argument <label>
// at byte offset <k>".
#pragma once

namespace na_emu {

// ============================================================ worker resources

static unsigned round_up_u(unsigned v, unsigned to) { return (v + to - 1) / to * to; }

static bool worker_reserve_fibers(Worker* w, unsigned n, char* err, size_t errlen) {
    if (n <= w->fiber_cap) return true;
    const unsigned cap = round_up_u(n, 64) > kMaxBlockThreads ? kMaxBlockThreads : round_up_u(n, 64);
    const size_t page = page_size();
    const size_t slot = page + ((kStackBytes + page - 1) / page) * page;
    char* region = (char*)mmap(nullptr, slot * cap, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (region == MAP_FAILED) {
        snprintf(err, errlen, "the emulator could not map %zu bytes of fiber stacks", slot * cap);
        return false;
    }
    for (unsigned i = 0; i < cap; ++i) mprotect(region + i * slot, page, PROT_NONE);
    Fiber* fibers = (Fiber*)realloc(w->fibers, cap * sizeof(Fiber));
    if (!fibers) {
        munmap(region, slot * cap);
        snprintf(err, errlen, "out of memory for %u fibers", cap);
        return false;
    }
    memset(fibers + w->fiber_cap, 0, (cap - w->fiber_cap) * sizeof(Fiber));
    if (w->stacks) munmap(w->stacks, w->stacks_len);
    w->stacks = region;
    w->stacks_len = slot * cap;
    w->fibers = fibers;
    w->fiber_cap = cap;
    for (unsigned i = 0; i < cap; ++i) {
        fibers[i].stack_lo = region + i * slot;
        fibers[i].stack_hi = region + (i + 1) * slot;
    }
    return true;
}

static bool worker_reserve_smem(Worker* w, size_t bytes, char* err, size_t errlen) {
    const size_t page = page_size();
    const size_t need = ((bytes + 15) / 16) * 16;
    if (!w->dsmem_region || need > w->dsmem_region_len) {
        const size_t len = ((need + page - 1) / page) * page;
        unsigned char* region = (unsigned char*)mmap(nullptr, len + page, PROT_READ | PROT_WRITE,
                                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (region == MAP_FAILED) {
            snprintf(err, errlen, "the emulator could not map %zu bytes of shared memory", len + page);
            return false;
        }
        mprotect(region + len, page, PROT_NONE);
        if (w->dsmem_region) munmap(w->dsmem_region, w->dsmem_region_len + page);
        w->dsmem_region = region;
        w->dsmem_region_len = len;
    }
    w->dsmem = w->dsmem_region + w->dsmem_region_len - need;  // the end abuts the guard page
    w->dsmem_bytes = bytes;
    return true;
}

// memory of an idle worker (its fibers' stacks and shared memory) back to the system
static void worker_release(Worker* w) {
    for (unsigned i = 0; i < w->fiber_cap; ++i) {
        free(w->fibers[i].cp);
        free(w->fibers[i].group_end);
    }
    free(w->fibers);
    w->fibers = nullptr;
    w->fiber_cap = 0;
    if (w->stacks) munmap(w->stacks, w->stacks_len);
    w->stacks = nullptr;
    w->stacks_len = 0;
    if (w->dsmem_region) munmap(w->dsmem_region, w->dsmem_region_len + page_size());
    w->dsmem_region = nullptr;
    w->dsmem_region_len = 0;
    w->dsmem = nullptr;
}

// ============================================================ errors and faults

static void record_error(Launch* L, unsigned long long block, const char* message) {
    pthread_mutex_lock(&L->err_mu);
    if (!L->has_error || block < L->err_block) {
        L->has_error = 1;
        L->err_block = block;
        snprintf(L->error, sizeof L->error, "%s", message);
    }
    pthread_mutex_unlock(&L->err_mu);
    __atomic_store_n(&L->stop, 1, __ATOMIC_RELAXED);
}

static Guard g_guards[kMaxGuards];
static int g_nguards;

static void describe_fault(Worker* w) {
    const Fiber* f = &w->fibers[w->cur];
    char what[768];
    const uintptr_t a = (uintptr_t)w->fault_addr;
    const size_t page = page_size();
    const char* rw = w->fault_write < 0 ? "access" : w->fault_write ? "write" : "read";
    const char* hint = "";
    if (w->fault_sig == SIGFPE) {
        snprintf(what, sizeof what, "%s",
                 w->fault_code == FPE_INTDIV || w->fault_code == FPE_INTOVF ? "integer division by zero (or overflow)"
                                                                            : "arithmetic exception");
    } else {
        what[0] = 0;
        for (int i = 0; i < g_nguards && !what[0]; ++i) {
            const Guard& g = g_guards[i];
            const uintptr_t front = (g.start & ~(uintptr_t)(page - 1)) - page;
            if (a >= front && a < g.start) {
                snprintf(what, sizeof what,
                         "out-of-bounds %s of argument %d at byte offset -%zu (before the start of its %zu-byte buffer)",
                         rw, g.label, (size_t)(g.start - a), (size_t)(g.end - g.start));
            } else if (a >= g.end && a < g.end + page) {
                snprintf(what, sizeof what,
                         "out-of-bounds %s of argument %d at byte offset %zu (%zu bytes past the end of its %zu-byte buffer)",
                         rw, g.label, (size_t)(a - g.start), (size_t)(a - g.end), (size_t)(g.end - g.start));
            }
        }
        const uintptr_t smem_guard = (uintptr_t)(w->dsmem_region + w->dsmem_region_len);
        if (!what[0] && a >= smem_guard && a < smem_guard + page) {
            snprintf(what, sizeof what,
                     "out-of-bounds %s of dynamic shared memory at byte offset %zu (the launch has %zu bytes)", rw,
                     (size_t)(a - (uintptr_t)w->dsmem), w->dsmem_bytes);
        }
        if (!what[0] && a >= (uintptr_t)w->stacks && a < (uintptr_t)w->stacks + w->stacks_len) {
            snprintf(what, sizeof what, "stack overflow (each emulated thread has a %zu KiB stack)", kStackBytes / 1024);
        }
        if (!what[0]) {
            snprintf(what, sizeof what, "invalid memory %s at address 0x%llx", rw, (unsigned long long)a);
            hint = g_nguards ? " (not next to any argument buffer)"
                             : "; launch with checked=True (NA_RTC_EMULATOR_CHECKED=1) to find the argument";
        }
    }
    snprintf(w->error, sizeof w->error, "%s in %s block (%u,%u,%u) thread (%u,%u,%u)%s", what, w->L->name, w->block.x,
             w->block.y, w->block.z, f->tid.x, f->tid.y, f->tid.z, hint);
}

static const char* fiber_state_text(const Worker* w, const Fiber* f, char* buf, size_t len) {
    switch (f->state) {
        case F_DONE: return "exited";
        case F_BARRIER:
            snprintf(buf, len, "waits at __syncthreads (%s:%u)", base_name(f->wait_file), f->wait_line);
            return buf;
        case F_WARP:
            snprintf(buf, len, "waits in %s with mask 0x%08x (%s:%u)", warp_kind_name(f->wait_kind), f->wait_mask,
                     base_name(f->wait_file), f->wait_line);
            return buf;
        default: (void)w; return "is runnable";
    }
}

static void describe_deadlock(Worker* w) {
    unsigned at_barrier = 0, at_warp = 0, exited = 0;
    const Fiber *first_barrier = nullptr, *first_warp = nullptr, *first_exited = nullptr;
    for (unsigned j = 0; j < w->n; ++j) {
        const Fiber* f = &w->fibers[j];
        if (f->state == F_BARRIER) {
            at_barrier++;
            if (!first_barrier) first_barrier = f;
        } else if (f->state == F_WARP) {
            at_warp++;
            if (!first_warp) first_warp = f;
        } else if (f->state == F_DONE) {
            exited++;
            if (!first_exited) first_exited = f;
        }
    }
    char* out = w->error;
    const size_t len = sizeof w->error;
    int k = 0;
    auto add = [&](const char* fmt, auto... a) {
        if (k >= 0 && (size_t)k < len) k += snprintf(out + k, len - k, fmt, a...);
    };
    if (at_barrier) {
        add("barrier divergence in %s block (%u,%u,%u): %u of %u threads reached __syncthreads (%s:%u)", w->L->name,
            w->block.x, w->block.y, w->block.z, at_barrier, w->n, base_name(first_barrier->wait_file),
            first_barrier->wait_line);
        if (exited) {
            add("; %u exited without reaching it (first: thread (%u,%u,%u))", exited, first_exited->tid.x,
                first_exited->tid.y, first_exited->tid.z);
        }
        if (at_warp) {
            add("; %u wait in warp collectives (first: thread (%u,%u,%u) in %s with mask 0x%08x at %s:%u)", at_warp,
                first_warp->tid.x, first_warp->tid.y, first_warp->tid.z, warp_kind_name(first_warp->wait_kind),
                first_warp->wait_mask, base_name(first_warp->wait_file), first_warp->wait_line);
        }
        return;
    }
    if (at_warp) {
        const Fiber* f = first_warp;
        const unsigned lane = f->linear & 31u, warp = f->linear >> 5;
        const Warp* ws = &w->warps[warp];
        unsigned missing = 0;
        for (unsigned o = 0; o < ws->nops; ++o)
            if (ws->ops[o].mask >> lane & 1u) missing = ws->ops[o].mask & ~ws->ops[o].arrived & ~ws->exited;
        add("warp divergence in %s block (%u,%u,%u) warp %u: thread (%u,%u,%u) (lane %u) waits in %s with mask 0x%08x "
            "(%s:%u) for lanes 0x%08x that never arrive",
            w->L->name, w->block.x, w->block.y, w->block.z, warp, f->tid.x, f->tid.y, f->tid.z, lane,
            warp_kind_name(f->wait_kind), f->wait_mask, base_name(f->wait_file), f->wait_line, missing);
        if (missing) {
            const unsigned l = (unsigned)__builtin_ctz(missing);
            char buf[256];
            add(" (lane %u %s)", l, fiber_state_text(w, &w->fibers[warp * 32 + l], buf, sizeof buf));
        }
        return;
    }
    add("internal emulator error in %s block (%u,%u,%u): no runnable thread", w->L->name, w->block.x, w->block.y,
        w->block.z);
}

// ============================================================ running blocks

static volatile sig_atomic_t g_cancel;

static bool run_block(Worker* w, Launch* L, unsigned long long b) {
    const unsigned long long gx = L->grid[0], gy = L->grid[1];
    w->block = uint3{(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / (gx * gy))};
    tl_blockIdx = w->block;
    const unsigned n = L->nthreads;
    w->n = n;
    w->done = 0;
    w->bar_arrived = 0;
    w->failed = 0;
    w->faulted = 0;
    for (unsigned k = 0; k < (n + 31) / 32; ++k) {
        w->warps[k].nops = 0;
        w->warps[k].exited = ~lanes_of_warp(w, k);
        w->warps[k].wg_n = w->warps[k].wg_groups = 0;
        w->warps[k].wg_fenced = 0;
    }
    if (L->smem) memset(w->dsmem, 0xff, L->smem);
    for (unsigned j = 0; j < n; ++j) {
        Fiber* f = &w->fibers[j];
        f->state = F_READY;
        f->cp_n = 0;
        f->group_n = 0;
        f->uf_lo = UINTPTR_MAX;
        f->uf_hi = 0;
        fiber_prepare(w, f);
    }
    for (;;) {
        bool ran = false;
        for (unsigned p = 0; p < n; ++p) {
            const unsigned j = schedule_order(w, p);
            if (w->fibers[j].state != F_READY) continue;
            ran = true;
            enter_fiber_state(w, j);
            w->in_fiber = 1;
            switch_from_scheduler(w, &w->fibers[j]);
            w->in_fiber = 0;
            if (w->faulted) {
                describe_fault(w);
                return false;
            }
            if (w->failed) return false;
        }
        if (w->done == n) return true;
        if (!ran) {
            describe_deadlock(w);
            return false;
        }
        if (g_cancel) {
            snprintf(w->error, sizeof w->error, "interrupted");
            return false;
        }
    }
}

static void run_job(Worker* w, Launch* L) {
    char err[512];
    if (!w->warps) w->warps = (Warp*)calloc(kMaxBlockThreads / 32, sizeof(Warp));
    if (!w->warps || !worker_reserve_fibers(w, L->nthreads, err, sizeof err) ||
        !worker_reserve_smem(w, L->smem, err, sizeof err)) {
        if (!w->warps) snprintf(err, sizeof err, "out of memory for warp state");
        record_error(L, 0, err);
        return;
    }
    w->L = L;
    const unsigned bx = L->block[0], by = L->block[1];
    for (unsigned j = 0; j < L->nthreads; ++j) {
        Fiber* f = &w->fibers[j];
        f->linear = j;
        f->tid = uint3{j % bx, (j / bx) % by, j / (bx * by)};
    }
    tl_blockDim = dim3(L->block[0], L->block[1], L->block[2]);
    tl_gridDim = dim3(L->grid[0], L->grid[1], L->grid[2]);
    while (!__atomic_load_n(&L->stop, __ATOMIC_RELAXED) && !g_cancel) {
        const unsigned long long b = __atomic_fetch_add(&L->next, 1ull, __ATOMIC_RELAXED);
        if (b >= L->nblocks) break;
        if (!run_block(w, L, b)) {
            record_error(L, b, w->error);
            break;
        }
    }
    w->L = nullptr;
}

// ============================================================ the worker pool

struct Pool {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    Worker* workers[kMaxWorkers];
    unsigned nworkers;  // read by the signal handler
    Launch* job;
    unsigned long long seq;
    unsigned participants, finished;
    pid_t pid;
};

struct WorkerStart {
    Pool* pool;
    Worker* worker;
    unsigned long long seen;
};

constexpr int kIdleReleaseSeconds = 2;

static Pool* g_pool;
static pthread_mutex_t g_launch_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_threads;
static int g_reverse_schedule;  // na_emu_set_schedule

static void* worker_main(void* arg) {
    WorkerStart start = *(WorkerStart*)arg;
    free(arg);
    Pool* p = start.pool;
    Worker* w = start.worker;
    tl_worker = w;
    // asynchronous signals go to other threads; faults are handled here
    sigset_t mask;
    sigfillset(&mask);
    sigdelset(&mask, SIGSEGV);
    sigdelset(&mask, SIGBUS);
    sigdelset(&mask, SIGFPE);
    sigdelset(&mask, SIGILL);
    pthread_sigmask(SIG_BLOCK, &mask, nullptr);
    stack_t ss;
    ss.ss_sp = w->altstack;
    ss.ss_size = kAltStackBytes;
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);
    unsigned long long seen = start.seen;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        bool holding = w->fiber_cap > 0 || w->dsmem_region;
        while (p->seq == seen) {
            if (!holding) {
                pthread_cond_wait(&p->work, &p->mu);
                continue;
            }
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += kIdleReleaseSeconds;
            if (pthread_cond_timedwait(&p->work, &p->mu, &until) == ETIMEDOUT && p->seq == seen) {
                worker_release(w);  // idle: give the stacks' memory back (every loaded family has a pool)
                holding = false;
            }
        }
        seen = p->seq;
        if (w->index >= p->participants) continue;
        Launch* L = p->job;
        pthread_mutex_unlock(&p->mu);
        run_job(w, L);
        pthread_mutex_lock(&p->mu);
        if (++p->finished == p->participants) pthread_cond_broadcast(&p->done);
    }
    return nullptr;
}

static Pool* get_pool() {
    if (!g_pool || g_pool->pid != getpid()) {  // first use, or a forked child: the old workers are gone
        Pool* p = (Pool*)calloc(1, sizeof(Pool));
        if (!p) return nullptr;
        pthread_mutex_init(&p->mu, nullptr);
        pthread_cond_init(&p->work, nullptr);
        pthread_cond_init(&p->done, nullptr);
        p->pid = getpid();
        __atomic_store_n(&g_pool, p, __ATOMIC_RELEASE);  // the old pool is leaked on purpose
    }
    return g_pool;
}

// with p->mu held
static bool ensure_workers(Pool* p, unsigned count, char* err, size_t errlen) {
    while (p->nworkers < count) {
        Worker* w = (Worker*)calloc(1, sizeof(Worker));
        WorkerStart* start = (WorkerStart*)malloc(sizeof(WorkerStart));
        char* alt = (char*)malloc(kAltStackBytes);
        if (!w || !start || !alt) {
            free(w);
            free(start);
            free(alt);
            snprintf(err, errlen, "out of memory for emulator worker threads");
            return false;
        }
        w->index = p->nworkers;
        w->altstack = alt;
        *start = WorkerStart{p, w, p->seq};
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t thread;
        const int rc = pthread_create(&thread, &attr, worker_main, start);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            free(w);
            free(start);
            free(alt);
            snprintf(err, errlen, "could not start emulator worker thread %u (error %d)", p->nworkers, rc);
            return p->nworkers > 0;  // run with fewer threads
        }
        w->thread = thread;
        p->workers[p->nworkers] = w;
        __atomic_store_n(&p->nworkers, p->nworkers + 1, __ATOMIC_RELEASE);
    }
    return true;
}

// ============================================================ signals

static struct sigaction g_old_segv, g_old_bus, g_old_fpe, g_old_int;
static bool g_int_installed;

static struct sigaction* old_action(int sig) {
    return sig == SIGSEGV ? &g_old_segv : sig == SIGBUS ? &g_old_bus : &g_old_fpe;
}

// 1 write, 0 read, -1 unknown
static int fault_is_write(void* context) {
#if defined(__x86_64__) && defined(REG_ERR)
    return (((ucontext_t*)context)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#elif defined(__aarch64__)
    // the kernel's esr_context record in mcontext's reserved area: WnR bit of a data abort
    const unsigned char* p = (const unsigned char*)((ucontext_t*)context)->uc_mcontext.__reserved;
    for (int guard = 0; guard < 64; ++guard) {
        unsigned magic, size;
        memcpy(&magic, p, 4);
        memcpy(&size, p + 4, 4);
        if (magic == 0 || size < 8) break;
        if (magic == 0x45535201u) {  // ESR_MAGIC
            unsigned long long esr;
            memcpy(&esr, p + 8, 8);
            const unsigned ec = (unsigned)(esr >> 26) & 0x3fu;
            return (ec == 0x24u || ec == 0x25u) ? (int)((esr >> 6) & 1u) : -1;
        }
        p += size;
    }
    return -1;
#else
    (void)context;
    return -1;
#endif
}

static void fault_handler(int sig, siginfo_t* info, void* context) {
    Worker* w = nullptr;
    Pool* p = __atomic_load_n(&g_pool, __ATOMIC_ACQUIRE);
    if (p) {
        const pthread_t self = pthread_self();
        const unsigned count = __atomic_load_n(&p->nworkers, __ATOMIC_ACQUIRE);
        for (unsigned i = 0; i < count; ++i) {
            if (pthread_equal(p->workers[i]->thread, self)) {
                w = p->workers[i];
                break;
            }
        }
    }
    if (!w || !w->in_fiber) {
        // not kernel code: let the previous handler (or the default action) see the fault again
        sigaction(sig, old_action(sig), nullptr);
        if (info->si_code <= 0) raise(sig);
        return;
    }
    w->fault_sig = sig;
    w->fault_code = info->si_code;
    w->fault_addr = info->si_addr;
    w->fault_write = fault_is_write(context);
    w->faulted = 1;
    w->in_fiber = 0;
    abandon_to_scheduler(w);
}

static void interrupt_handler(int) { g_cancel = 1; }

static void install_handlers() {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
    sigaction(SIGFPE, &sa, &g_old_fpe);
    struct sigaction current;
    sigaction(SIGINT, nullptr, &current);
    g_int_installed = false;
    if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler == SIG_IGN) return;
    struct sigaction si;
    memset(&si, 0, sizeof si);
    si.sa_handler = interrupt_handler;
    sigemptyset(&si.sa_mask);
    sigaction(SIGINT, &si, &g_old_int);
    g_int_installed = true;
}

static void restore_handlers() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaction(SIGFPE, &g_old_fpe, nullptr);
    if (g_int_installed) sigaction(SIGINT, &g_old_int, nullptr);
}

// ============================================================ launch

static unsigned default_threads() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int count = CPU_COUNT(&set);
        if (count > 0) return (unsigned)count;
    }
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (unsigned)online : 1u;
}

static int run_launch(const char* name, const unsigned* grid, const unsigned* block, size_t smem,
                      void (*thread_fn)(void*), void* arg, char* err, size_t errlen) {
    if (errlen) err[0] = 0;
    for (int d = 0; d < 3; ++d) {
        if (grid[d] == 0 || block[d] == 0) {
            snprintf(err, errlen, "invalid launch of %s: grid (%u,%u,%u), block (%u,%u,%u) has a zero dimension", name,
                     grid[0], grid[1], grid[2], block[0], block[1], block[2]);
            return 2;
        }
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads > kMaxBlockThreads) {
        snprintf(err, errlen, "invalid launch of %s: block (%u,%u,%u) has %llu threads, more than %u", name, block[0],
                 block[1], block[2], threads, kMaxBlockThreads);
        return 2;
    }
    if (smem > kMaxSharedBytes) {
        snprintf(err, errlen, "invalid launch of %s: %zu bytes of dynamic shared memory, more than any GPU has (%zu)",
                 name, smem, kMaxSharedBytes);
        return 2;
    }
    Launch L;
    memset(&L, 0, sizeof L);
    L.name = name;
    memcpy(L.grid, grid, sizeof L.grid);
    memcpy(L.block, block, sizeof L.block);
    L.smem = smem;
    L.nthreads = (unsigned)threads;
    L.thread_fn = thread_fn;
    L.arg = arg;
    L.nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    L.reverse = g_reverse_schedule;
    pthread_mutex_init(&L.err_mu, nullptr);

    static pid_t lock_pid = getpid();
    if (lock_pid != getpid()) {  // forked child: start from a fresh lock
        pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
        g_launch_mu = fresh;
        lock_pid = getpid();
    }
    pthread_mutex_lock(&g_launch_mu);
    int rc = 0;
    Pool* p = get_pool();
    if (!p) {
        snprintf(err, errlen, "out of memory for the emulator's worker pool");
        pthread_mutex_unlock(&g_launch_mu);
        return 4;
    }
    unsigned want = g_threads > 0 ? (unsigned)g_threads : default_threads();
    if (want > kMaxWorkers) want = kMaxWorkers;
    if (want > L.nblocks) want = (unsigned)L.nblocks;
    pthread_mutex_lock(&p->mu);
    char start_err[256] = "";
    if (!ensure_workers(p, want, start_err, sizeof start_err)) {
        pthread_mutex_unlock(&p->mu);
        pthread_mutex_unlock(&g_launch_mu);
        snprintf(err, errlen, "%s", start_err);
        return 4;
    }
    if (want > p->nworkers) want = p->nworkers;
    g_cancel = 0;
    install_handlers();
    p->job = &L;
    p->participants = want;
    p->finished = 0;
    p->seq++;
    pthread_cond_broadcast(&p->work);
    while (p->finished < p->participants) pthread_cond_wait(&p->done, &p->mu);
    p->job = nullptr;
    p->participants = 0;
    pthread_mutex_unlock(&p->mu);
    restore_handlers();
    if (g_cancel) {
        snprintf(err, errlen, "launch of %s interrupted", name);
        rc = 3;
        if (g_int_installed) raise(SIGINT);  // the previous (Python's) handler sees the interrupt now
    } else if (L.has_error) {
        snprintf(err, errlen, "%s", L.error);
        rc = 1;
    }
    pthread_mutex_unlock(&g_launch_mu);
    pthread_mutex_destroy(&L.err_mu);
    return rc;
}

// ------------------------------------------------------------ trampolines

template <class T>
constexpr char signature_char() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) return 'p';
    else if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, double>) return 'd';
    else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool> && sizeof(U) == 8)
        return std::is_signed_v<U> ? 'q' : 'Q';
    else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool> && sizeof(U) == 4)
        return std::is_signed_v<U> ? 'i' : 'I';
    else return '?';
}

template <class... A>
static const char* signature(void (*)(A...)) {
    static const char text[] = {signature_char<A>()..., '\0'};
    return text;
}

template <class... A>
struct Call {
    void (*kernel)(A...);
    void** args;
};

template <class... A, size_t... I>
static void invoke(void* p, std::index_sequence<I...>) {
    Call<A...>* c = static_cast<Call<A...>*>(p);
    c->kernel(*static_cast<std::remove_cv_t<A>*>(c->args[I])...);
}

template <class... A>
static void thread_entry(void* p) {
    invoke<A...>(p, std::index_sequence_for<A...>{});
}

template <class... A>
static int launch(const char* name, void (*kernel)(A...), const unsigned* grid, const unsigned* block, size_t smem,
                  void** args, char* err, size_t errlen) {
    Call<A...> call{kernel, args};
    return run_launch(name, grid, block, smem, &thread_entry<A...>, &call, err, errlen);
}

}  // namespace na_emu

// ============================================================ C API

NA_EMU_EXPORT int na_emu_abi_version(void) { return 1; }

NA_EMU_EXPORT void na_emu_set_threads(int count) { ::na_emu::g_threads = count > 0 ? count : 0; }

NA_EMU_EXPORT void na_emu_set_schedule(int reverse) { ::na_emu::g_reverse_schedule = reverse != 0; }

NA_EMU_EXPORT size_t na_emu_page_size(void) { return ::na_emu::page_size(); }

NA_EMU_EXPORT void na_emu_op_counts(unsigned long long* out, int reset) {
    for (int i = 0; i < 2; ++i)
        out[i] = reset ? __atomic_exchange_n(&::na_emu::g_op_counts[i], 0ull, __ATOMIC_RELAXED)
                       : __atomic_load_n(&::na_emu::g_op_counts[i], __ATOMIC_RELAXED);
}

NA_EMU_EXPORT void* na_emu_guard_alloc(size_t nbytes) {
    const size_t page = ::na_emu::page_size();
    const size_t pages = (nbytes + page - 1) / page;
    const size_t total = (pages + 2) * page;
    char* base = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    char* end = base + (pages + 1) * page;
    if (mprotect(base, page, PROT_NONE) != 0 || mprotect(end, page, PROT_NONE) != 0) {
        munmap(base, total);
        return nullptr;
    }
    char* start = end - nbytes;
    memset(base + page, 0xA5, (size_t)(start - (base + page)));
    return start;
}

NA_EMU_EXPORT void na_emu_guard_free(void* start, size_t nbytes) {
    if (!start) return;
    const size_t page = ::na_emu::page_size();
    const size_t pages = (nbytes + page - 1) / page;
    char* end = (char*)start + nbytes;
    munmap(end - (pages + 1) * page, (pages + 2) * page);
}

NA_EMU_EXPORT int na_emu_set_guards(int n, void* const* starts, const size_t* sizes, const int* labels) {
    if (n < 0 || n > ::na_emu::kMaxGuards) return -1;
    for (int i = 0; i < n; ++i) {
        ::na_emu::g_guards[i].start = (uintptr_t)starts[i];
        ::na_emu::g_guards[i].end = (uintptr_t)starts[i] + sizes[i];
        ::na_emu::g_guards[i].label = labels[i];
    }
    ::na_emu::g_nguards = n;
    return 0;
}
