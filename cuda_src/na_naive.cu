// Straightforward (non-tiled) neighborhood attention kernels, 1D, 2D and 3D.
//
// The general fallback every faster kernel is tested and measured against:
// one thread per output element, plain loops over window slots, no shared
// memory except the deterministic block reduction of the bias gradient.
// 1D problems run as 2D with a second axis of length 1 and kernel 1; RANK 3
// reads the z axis, and below it z is the constant trivial axis (az), so the
// 1D/2D instantiations compile to the code they had before z existed.
//
// Every tensor is addressed through int64 element strides, so heads-first,
// heads-last and other strided views run without copies. Layouts (indices):
//   q, k, v, out, grads : [b, x, y, z, h, d]   (6 strides)
//   attn (weights)      : [b, x, y, z, h, t]   (6 strides; t = (tx * ky + ty) * kz + tz)
//   rpb                 : [h, rx, ry, rz]      (4 strides; accumulator type)
//   lse                 : [b, x, y, z, h]      (5 strides; accumulator type)
//
// Template parameters are element types and the rank only; sizes, windows and
// strides are runtime arguments, so a new shape never recompiles.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_args.cuh"

__device__ __forceinline__ long long na_thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// a flat thread index over [b, x, y, z, h, last] (row-major) as its coordinates
// (Z is az.length: a constant 1 below rank 3, so z = 0 folds away)
struct na_coords {
    long long b, x, y, z, h, last;
};
__device__ __forceinline__ na_coords na_unravel(long long n, long long X, long long Y, long long Z, long long H,
                                                long long L) {
    na_coords c;
    c.last = n % L; n /= L;
    c.h = n % H; n /= H;
    c.z = n % Z; n /= Z;
    c.y = n % Y; n /= Y;
    c.x = n % X;
    c.b = n / X;
    return c;
}

// A query's window on every axis, [lo, hi) in group coordinates. Below rank
// 3 the z window is [0, 1) without a call the compiler would have to fold.
struct na_box {
    long long lo[3], hi[3];
};
template <int RANK>
__device__ __forceinline__ na_box na_window_box(const na_axis& ax, const na_axis& ay, const na_axis& az, long long x,
                                                long long y, long long z) {
    na_box w;
    na_window(ax, x, w.lo[0], w.hi[0]);
    na_window(ay, y, w.lo[1], w.hi[1]);
    if (RANK == 3) na_window(az, z, w.lo[2], w.hi[2]);
    else w.lo[2] = 0, w.hi[2] = 1;
    return w;
}

// the slot of window position (wx, wy, wz) (group coordinates) in a box:
// t = (tx * ky + ty) * kz + tz
__device__ __forceinline__ long long na_slot(const na_box& w, long long ky, long long kz, long long wx, long long wy,
                                             long long wz) {
    return ((wx - w.lo[0]) * ky + (wy - w.lo[1])) * kz + (wz - w.lo[2]);
}

// logits: attn[b,i,h,t] = scale * q[b,i,h] . k[b,key(i,t),h] + rpb[h, rel(i,t)]
// slots outside a (causal) window get `fill` (-inf for logits, 0 for gradients)
template <class T, class TA, int RANK = 2>
__global__ void na_qk_fwd(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                          const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb), TA* __restrict__ attn, NA_TENSOR(a), double scale, double fill,
                          NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_PROBLEM_AXES(RANK)
    const long long slots = kx * ky * az.kernel;
    const long long n = na_thread_index();
    if (n >= B * X * Y * az.length * H * slots) return;
    const na_coords c = na_unravel(n, X, Y, az.length, H, slots);
    const long long b = c.b, x = c.x, y = c.y, z = c.z, h = c.h, t = c.last;
    const long long tz = t % az.kernel, tx = t / az.kernel / ky, ty = t / az.kernel % ky;
    const na_box w = na_window_box<RANK>(ax, ay, az, x, y, z);
    const long long out = NA_AT6(a, b, x, y, z, h, t);
    if (w.lo[0] + tx >= w.hi[0] || w.lo[1] + ty >= w.hi[1] || w.lo[2] + tz >= w.hi[2]) {
        na_store<TA, A>(attn, out, (A)fill);
        return;
    }
    const long long jx = (w.lo[0] + tx) * dx + x % dx, jy = (w.lo[1] + ty) * dy + y % dy;
    const long long jz = (w.lo[2] + tz) * az.dilation + z % az.dilation;
    A dot = 0;
    for (long long d = 0; d < D; ++d)
        dot += na_load(q, NA_AT6(q, b, x, y, z, h, d)) * na_load(k, NA_AT6(k, b, jx, jy, jz, NA_KV_HEAD(h), d));
    A logit = dot * (A)scale;
    if (rpb)
        logit += rpb[h * rpb_h + (w.lo[0] + tx - x / dx + kx - 1) * rpb_x + (w.lo[1] + ty - y / dy + ky - 1) * rpb_y
                     + (w.lo[2] + tz - z / az.dilation + az.kernel - 1) * rpb_z];
    na_store<TA, A>(attn, out, logit);
}

// weighted sum over the window: out[b,i,h,d] = scale * sum_t attn[b,i,h,t] * v[b,key(i,t),h,d]
// (slots outside the window are skipped, whatever attn holds there)
template <class TA, class T, int RANK = 2>
__global__ void na_av_fwd(const TA* __restrict__ attn, NA_TENSOR(a), const T* __restrict__ v, NA_TENSOR(v),
                          T* __restrict__ out, NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_PROBLEM_AXES(RANK)
    const long long n = na_thread_index();
    if (n >= B * X * Y * az.length * H * D) return;
    const na_coords c = na_unravel(n, X, Y, az.length, H, D);
    const long long b = c.b, x = c.x, y = c.y, z = c.z, h = c.h, d = c.last;
    const na_box w = na_window_box<RANK>(ax, ay, az, x, y, z);
    A sum = 0;
    for (long long wx = w.lo[0]; wx < w.hi[0]; ++wx) {
        const long long jx = wx * dx + x % dx;
        for (long long wy = w.lo[1]; wy < w.hi[1]; ++wy) {
            const long long jy = wy * dy + y % dy;
            const auto add = [&](long long t, long long jz) {
                sum += (A)na_load(attn, NA_AT6(a, b, x, y, z, h, t)) * na_load(v, NA_AT6(v, b, jx, jy, jz, NA_KV_HEAD(h), d));
            };
            // below rank 3 the z window is one slot: no loop, so the 1D/2D code is unchanged
            if (RANK < 3) add(na_slot(w, ky, 1, wx, wy, 0), 0);
            else
                for (long long wz = w.lo[2]; wz < w.hi[2]; ++wz)
                    add(na_slot(w, ky, az.kernel, wx, wy, wz), wz * az.dilation + z % az.dilation);
        }
    }
    na_store<T, A>(out, NA_AT6(o, b, x, y, z, h, d), sum * (A)scale);
}

// through the inverse neighborhood: out[b,j,h,d] = scale * sum over query
// heads hq reading key/value head h (grouped-query attention: HPK of them,
// in order) and queries i whose window holds key j of
// w[b,i,hq,slot(i,j)] * src[b,i,hq,d] (dK from dAttn and Q, dV from Attn and
// dOut; out has NA_KV_HEADS heads): deterministic, no atomics
template <class TA, class T, int RANK = 2>
__global__ void na_inv_fwd(const TA* __restrict__ w, NA_TENSOR(w), const T* __restrict__ src, NA_TENSOR(s),
                           T* __restrict__ out, NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_PROBLEM_AXES(RANK)
    const long long n = na_thread_index();
    if (n >= B * X * Y * az.length * (NA_KV_HEADS) * D) return;
    const na_coords c = na_unravel(n, X, Y, az.length, NA_KV_HEADS, D);
    const long long b = c.b, jx = c.x, jy = c.y, jz = c.z, h = c.h, d = c.last;
    long long qx0, qx1, qy0, qy1, qz0 = 0, qz1 = 1;
    na_inverse_range(ax, jx, qx0, qx1);
    na_inverse_range(ay, jy, qy0, qy1);
    if (RANK == 3) na_inverse_range(az, jz, qz0, qz1);
    // each query's window per axis is found in that axis' loop, so the inner loops only add offsets
    A sum = 0;
    for (long long hq = h * HPK; hq < (h + 1) * HPK; ++hq) {
        for (long long gx = qx0; gx < qx1; ++gx) {
            const long long x = gx * dx + jx % dx;
            long long x0, x1;
            na_window(ax, x, x0, x1);
            for (long long gy = qy0; gy < qy1; ++gy) {
                const long long y = gy * dy + jy % dy;
                long long y0, y1, z0 = 0, z1;
                na_window(ay, y, y0, y1);
                for (long long gz = qz0; gz < qz1; ++gz) {
                    const long long z = gz * az.dilation + jz % az.dilation;
                    if (RANK == 3) na_window(az, z, z0, z1);
                    const long long t = ((jx / dx - x0) * ky + (jy / dy - y0)) * az.kernel + (jz / az.dilation - z0);
                    sum += (A)na_load(w, NA_AT6(w, b, x, y, z, hq, t)) * na_load(src, NA_AT6(s, b, x, y, z, hq, d));
                }
            }
        }
    }
    na_store<T, A>(out, NA_AT6(o, b, jx, jy, jz, h, d), sum * (A)scale);
}

// bias gradient: drpb[h,rx,ry,rz] = sum over b and queries i whose window
// holds the key at relative offset (rx, ry, rz) of dattn[b,i,h,slot]; one
// block per bias entry, a fixed-order tree reduction (deterministic, no atomics)
#define NA_RPB_THREADS 256
template <class TA, int RANK = 2>
__global__ void na_rpb_bwd(const TA* __restrict__ dattn, NA_TENSOR(a), typename na_acc<TA>::type* __restrict__ drpb,
                           NA_BIAS(rpb), NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    __shared__ A partial[NA_RPB_THREADS];
    NA_PROBLEM_AXES(RANK)
    const long long rw = 2 * ky - 1, rd = 2 * az.kernel - 1;
    long long entry = blockIdx.x;  // over H * (2kx-1) * (2ky-1) * (2kz-1)
    const long long rz = entry % rd;
    entry /= rd;
    const long long ry = entry % rw, rx = (entry / rw) % (2 * kx - 1), h = entry / (rw * (2 * kx - 1));
    const long long Zl = az.length;
    A sum = 0;
    for (long long n = threadIdx.x; n < B * X * Y * Zl; n += blockDim.x) {
        const long long z = n % Zl, y = n / Zl % Y, x = (n / Zl / Y) % X, b = n / (Zl * X * Y);
        const na_box w = na_window_box<RANK>(ax, ay, az, x, y, z);
        // the key's group coordinates
        const long long wx = x / dx + rx - (kx - 1), wy = y / dy + ry - (ky - 1);
        const long long wz = z / az.dilation + rz - (az.kernel - 1);
        if (wx >= w.lo[0] && wx < w.hi[0] && wy >= w.lo[1] && wy < w.hi[1] && wz >= w.lo[2] && wz < w.hi[2])
            sum += (A)na_load(dattn, NA_AT6(a, b, x, y, z, h, na_slot(w, ky, az.kernel, wx, wy, wz)));
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = NA_RPB_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) drpb[h * rpb_h + rx * rpb_x + ry * rpb_y + rz * rpb_z] = partial[0];
}

// softmax over the slots of each (b, i, h) row, in place; writes the
// natural-log sum of exp (lse may be null). Rows: [b, x, y, z, h].
template <class TA, int RANK = 2>
__global__ void na_softmax_fwd(TA* __restrict__ attn, NA_TENSOR(a), typename na_acc<TA>::type* __restrict__ lse,
                               NA_ROWS(l), NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    NA_PROBLEM_AXES(RANK)
    const long long slots = kx * ky * az.kernel;
    const long long n = na_thread_index();
    if (n >= B * X * Y * az.length * H) return;
    const na_coords c = na_unravel(n, X, Y, az.length, H, 1);
    const long long b = c.b, x = c.x, y = c.y, z = c.z, h = c.h;
    A peak = na_load(attn, NA_AT6(a, b, x, y, z, h, 0));  // slot 0 is always inside the window
    for (long long t = 1; t < slots; ++t) {
        const A v = na_load(attn, NA_AT6(a, b, x, y, z, h, t));
        peak = v > peak ? v : peak;
        if (v != v) peak = v;  // NaN poisons the row
    }
    A total = 0;
    for (long long t = 0; t < slots; ++t) total += na_exp(na_load(attn, NA_AT6(a, b, x, y, z, h, t)) - peak);
    for (long long t = 0; t < slots; ++t) {
        const long long at = NA_AT6(a, b, x, y, z, h, t);
        na_store<TA, A>(attn, at, na_exp(na_load(attn, at) - peak) / total);
    }
    if (lse) lse[NA_ATR(l, b, x, y, z, h)] = peak + na_log(total);
}

// softmax backward, in place on the probability gradient:
// grad[t] <- p[t] * (grad[t] - sum_s p[s] * grad[s])
template <class TA, int RANK = 2>
__global__ void na_softmax_bwd(const TA* __restrict__ probs, NA_TENSOR(p), TA* __restrict__ grad, NA_TENSOR(g),
                               NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    NA_PROBLEM_AXES(RANK)
    const long long slots = kx * ky * az.kernel;
    const long long n = na_thread_index();
    if (n >= B * X * Y * az.length * H) return;
    const na_coords c = na_unravel(n, X, Y, az.length, H, 1);
    const long long b = c.b, x = c.x, y = c.y, z = c.z, h = c.h;
    A delta = 0;
    for (long long t = 0; t < slots; ++t)
        delta += na_load(probs, NA_AT6(p, b, x, y, z, h, t)) * na_load(grad, NA_AT6(g, b, x, y, z, h, t));
    for (long long t = 0; t < slots; ++t) {
        const long long at = NA_AT6(g, b, x, y, z, h, t);
        const A p = na_load(probs, NA_AT6(p, b, x, y, z, h, t));
        na_store<TA, A>(grad, at, p == 0 ? (A)0 : p * (na_load(grad, at) - delta));
    }
}
