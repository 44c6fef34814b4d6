// Straightforward (non-tiled) neighborhood attention kernels, 1D and 2D.
//
// The general fallback every faster kernel is tested and measured against:
// one thread per output element, plain loops over window slots, no shared
// memory except the deterministic block reduction of the bias gradient.
// 1D problems run as 2D with a second axis of length 1 and kernel 1.
//
// Every tensor is addressed through int64 element strides, so heads-first,
// heads-last and other strided views run without copies. Layouts (indices):
//   q, k, v, out, grads : [b, x, y, h, d]      (5 strides)
//   attn (weights)      : [b, x, y, h, t]      (5 strides; t = tx * ky + ty)
//   rpb                 : [h, rx, ry]          (3 strides; accumulator type)
//   lse                 : [b, x, y, h]         (4 strides; accumulator type)
//
// Template parameters are element types only; sizes, windows and strides are
// runtime arguments, so a new shape never recompiles.
#include "na_types.cuh"
#include "na_window.cuh"
#include "na_args.cuh"

#define NA_AXES                                   \
    const na_axis ax = {X, kx, sx, dx, cx};       \
    const na_axis ay = {Y, ky, sy, dy, cy};

__device__ __forceinline__ long long na_thread_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

// a flat thread index over [b, x, y, h, last] (row-major) as its coordinates
struct na_coords {
    long long b, x, y, h, last;
};
__device__ __forceinline__ na_coords na_unravel(long long n, long long X, long long Y, long long H, long long L) {
    na_coords c;
    c.last = n % L; n /= L;
    c.h = n % H; n /= H;
    c.y = n % Y; n /= Y;
    c.x = n % X;
    c.b = n / X;
    return c;
}

// logits: attn[b,i,h,t] = scale * q[b,i,h] . k[b,key(i,t),h] + rpb[h, rel(i,t)]
// slots outside a (causal) window get `fill` (-inf for logits, 0 for gradients)
template <class T, class TA>
__global__ void na_qk_fwd(const T* __restrict__ q, NA_TENSOR(q), const T* __restrict__ k, NA_TENSOR(k),
                          const typename na_acc<T>::type* __restrict__ rpb, NA_BIAS(rpb), TA* __restrict__ attn, NA_TENSOR(a), double scale, double fill,
                          NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_AXES
    const long long slots = kx * ky;
    const long long n = na_thread_index();
    if (n >= B * X * Y * H * slots) return;
    const na_coords c = na_unravel(n, X, Y, H, slots);
    const long long b = c.b, x = c.x, y = c.y, h = c.h, t = c.last;
    const long long tx = t / ky, ty = t % ky;
    long long x0, x1, y0, y1;
    na_window(ax, x, x0, x1);
    na_window(ay, y, y0, y1);
    const long long out = NA_AT5(a, b, x, y, h, t);
    if (x0 + tx >= x1 || y0 + ty >= y1) {
        na_store<TA, A>(attn, out, (A)fill);
        return;
    }
    const long long jx = (x0 + tx) * dx + x % dx, jy = (y0 + ty) * dy + y % dy;
    A dot = 0;
    for (long long d = 0; d < D; ++d)
        dot += na_load(q, NA_AT5(q, b, x, y, h, d)) * na_load(k, NA_AT5(k, b, jx, jy, h, d));
    A logit = dot * (A)scale;
    if (rpb) logit += rpb[h * rpb_h + (x0 + tx - x / dx + kx - 1) * rpb_x + (y0 + ty - y / dy + ky - 1) * rpb_y];
    na_store<TA, A>(attn, out, logit);
}

// weighted sum over the window: out[b,i,h,d] = scale * sum_t attn[b,i,h,t] * v[b,key(i,t),h,d]
// (slots outside the window are skipped, whatever attn holds there)
template <class TA, class T>
__global__ void na_av_fwd(const TA* __restrict__ attn, NA_TENSOR(a), const T* __restrict__ v, NA_TENSOR(v),
                          T* __restrict__ out, NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_AXES
    const long long n = na_thread_index();
    if (n >= B * X * Y * H * D) return;
    const na_coords c = na_unravel(n, X, Y, H, D);
    const long long b = c.b, x = c.x, y = c.y, h = c.h, d = c.last;
    long long x0, x1, y0, y1;
    na_window(ax, x, x0, x1);
    na_window(ay, y, y0, y1);
    A sum = 0;
    for (long long wx = x0; wx < x1; ++wx) {
        const long long jx = wx * dx + x % dx;
        for (long long wy = y0; wy < y1; ++wy) {
            const long long jy = wy * dy + y % dy;
            const long long t = (wx - x0) * ky + (wy - y0);
            sum += (A)na_load(attn, NA_AT5(a, b, x, y, h, t)) * na_load(v, NA_AT5(v, b, jx, jy, h, d));
        }
    }
    na_store<T, A>(out, NA_AT5(o, b, x, y, h, d), sum * (A)scale);
}

// through the inverse neighborhood: out[b,j,h,d] = scale * sum over queries i
// whose window holds key j of w[b,i,h,slot(i,j)] * src[b,i,h,d]
// (dK from dAttn and Q, dV from Attn and dOut): deterministic, no atomics
template <class TA, class T>
__global__ void na_inv_fwd(const TA* __restrict__ w, NA_TENSOR(w), const T* __restrict__ src, NA_TENSOR(s),
                           T* __restrict__ out, NA_TENSOR(o), double scale, NA_PROBLEM) {
    typedef typename na_acc<T>::type A;
    NA_AXES
    const long long n = na_thread_index();
    if (n >= B * X * Y * H * D) return;
    const na_coords c = na_unravel(n, X, Y, H, D);
    const long long b = c.b, jx = c.x, jy = c.y, h = c.h, d = c.last;
    long long qx0, qx1, qy0, qy1, x0, x1, y0, y1;
    na_inverse_range(ax, jx, qx0, qx1);
    na_inverse_range(ay, jy, qy0, qy1);
    A sum = 0;
    for (long long gx = qx0; gx < qx1; ++gx) {
        const long long x = gx * dx + jx % dx;
        na_window(ax, x, x0, x1);
        for (long long gy = qy0; gy < qy1; ++gy) {
            const long long y = gy * dy + jy % dy;
            na_window(ay, y, y0, y1);
            const long long t = (jx / dx - x0) * ky + (jy / dy - y0);
            sum += (A)na_load(w, NA_AT5(w, b, x, y, h, t)) * na_load(src, NA_AT5(s, b, x, y, h, d));
        }
    }
    na_store<T, A>(out, NA_AT5(o, b, jx, jy, h, d), sum * (A)scale);
}

// bias gradient: drpb[h,rx,ry] = sum over b and queries i whose window holds
// the key at relative offset (rx, ry) of dattn[b,i,h,slot]; one block per
// bias entry, a fixed-order tree reduction (deterministic, no atomics)
#define NA_RPB_THREADS 256
template <class TA>
__global__ void na_rpb_bwd(const TA* __restrict__ dattn, NA_TENSOR(a), typename na_acc<TA>::type* __restrict__ drpb,
                           NA_BIAS(rpb), NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    __shared__ A partial[NA_RPB_THREADS];
    NA_AXES
    const long long rw = 2 * ky - 1;
    const long long entry = blockIdx.x;  // over H * (2kx-1) * (2ky-1)
    const long long ry = entry % rw, rx = (entry / rw) % (2 * kx - 1), h = entry / (rw * (2 * kx - 1));
    A sum = 0;
    for (long long n = threadIdx.x; n < B * X * Y; n += blockDim.x) {
        const long long y = n % Y, x = (n / Y) % X, b = n / (X * Y);
        long long x0, x1, y0, y1;
        na_window(ax, x, x0, x1);
        na_window(ay, y, y0, y1);
        const long long wx = x / dx + rx - (kx - 1), wy = y / dy + ry - (ky - 1);  // key group coordinates
        if (wx >= x0 && wx < x1 && wy >= y0 && wy < y1)
            sum += (A)na_load(dattn, NA_AT5(a, b, x, y, h, (wx - x0) * ky + (wy - y0)));
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = NA_RPB_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) drpb[h * rpb_h + rx * rpb_x + ry * rpb_y] = partial[0];
}

// softmax over the slots of each (b, i, h) row, in place; writes the
// natural-log sum of exp (lse may be null). Rows: [b, x, y, h].
template <class TA>
__global__ void na_softmax_fwd(TA* __restrict__ attn, NA_TENSOR(a), typename na_acc<TA>::type* __restrict__ lse,
                               NA_ROWS(l), NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    const long long slots = kx * ky;
    const long long n = na_thread_index();
    if (n >= B * X * Y * H) return;
    const na_coords c = na_unravel(n, X, Y, H, 1);
    const long long b = c.b, x = c.x, y = c.y, h = c.h;
    A peak = na_load(attn, NA_AT5(a, b, x, y, h, 0));  // slot 0 is always inside the window
    for (long long t = 1; t < slots; ++t) {
        const A v = na_load(attn, NA_AT5(a, b, x, y, h, t));
        peak = v > peak ? v : peak;
        if (v != v) peak = v;  // NaN poisons the row
    }
    A total = 0;
    for (long long t = 0; t < slots; ++t) total += na_exp(na_load(attn, NA_AT5(a, b, x, y, h, t)) - peak);
    for (long long t = 0; t < slots; ++t) {
        const long long at = NA_AT5(a, b, x, y, h, t);
        na_store<TA, A>(attn, at, na_exp(na_load(attn, at) - peak) / total);
    }
    if (lse) lse[b * l_b + x * l_x + y * l_y + h * l_h] = peak + na_log(total);
}

// softmax backward, in place on the probability gradient:
// grad[t] <- p[t] * (grad[t] - sum_s p[s] * grad[s])
template <class TA>
__global__ void na_softmax_bwd(const TA* __restrict__ probs, NA_TENSOR(p), TA* __restrict__ grad, NA_TENSOR(g),
                               NA_PROBLEM) {
    typedef typename na_acc<TA>::type A;
    const long long slots = kx * ky;
    const long long n = na_thread_index();
    if (n >= B * X * Y * H) return;
    const na_coords c = na_unravel(n, X, Y, H, 1);
    const long long b = c.b, x = c.x, y = c.y, h = c.h;
    A delta = 0;
    for (long long t = 0; t < slots; ++t)
        delta += na_load(probs, NA_AT5(p, b, x, y, h, t)) * na_load(grad, NA_AT5(g, b, x, y, h, t));
    for (long long t = 0; t < slots; ++t) {
        const long long at = NA_AT5(g, b, x, y, h, t);
        const A p = na_load(probs, NA_AT5(p, b, x, y, h, t));
        na_store<TA, A>(grad, at, p == 0 ? (A)0 : p * (na_load(grad, at) - delta));
    }
}
