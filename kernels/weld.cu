// Vertex welding by first appearance, with a hash table instead of a sort: the kernels of
// GPUBackend.weld_device(weld="hash") in gpumesh/gpu.py, which give the pieces of
// gpumesh/marching.py::weld exactly.
//
// Input: the triangles already in group order (a stable sort by group key, done by the host),
// so their 3T corners are numbered c = 3 * triangle + corner in the order in which the CPU weld
// meets them; corner c has the key  group[c / 3] * nedge + edge[c]  (< 2**62, checked by the
// host), one key per vertex of one group.
//
//   weld_insert: every corner puts its key into an open-addressing table (linear probing,
//                atomicCAS on the key) and atomicMin's its corner number into the slot's
//                `first`.  The minimum is the key's first appearance, whatever order the threads
//                run in (the slot a key ends up in may differ, its minimum does not).
//   weld_lookup: (a later launch, so every insert is done) every corner finds its key and writes
//                its vertex's first corner, cfirst[c].
//
// Both probe at most the whole table (mask + 1 slots), so they end whatever the table holds. A
// key that finds no room is left out, and its corners' lookups (which stop at an empty slot or
// after the whole table) write -1: the host sizes the table at twice the corners or more, and
// checks that every cfirst[c] lies in [0, c] (else it welds on the CPU), so a table too small
// or a broken insert fails the check instead of hanging the kernel.
//
// The host then flags the corners with cfirst[c] == c (each vertex's first appearance) and
// scans the flags: that numbers the vertices by first appearance, group by group, which is the
// CPU weld's numbering.  Self-contained (no #include): compiled by NVRTC (CuPy) and, for the
// tests, by g++ through tests/cuda_emulation.

typedef long long wd_i64;
typedef unsigned long long wd_u64;

#define WD_EMPTY 0xFFFFFFFFFFFFFFFFull

// Home slot of a key (MurmurHash3's 64-bit finalizer, then the table's mask).
__device__ __forceinline__ wd_u64 wd_slot(wd_u64 key, wd_u64 mask) {
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ull;
    key ^= key >> 33;
    return key & mask;
}

extern "C" __global__ void weld_insert(const wd_i64* __restrict__ group, const wd_i64* __restrict__ edge,
                                       wd_i64 ncorners, wd_i64 nedge, wd_u64* __restrict__ keys,
                                       wd_i64* __restrict__ first, wd_u64 mask) {
    const wd_i64 stride = (wd_i64)gridDim.x * blockDim.x;
    for (wd_i64 c = (wd_i64)blockIdx.x * blockDim.x + threadIdx.x; c < ncorners; c += stride) {
        const wd_u64 key = (wd_u64)(group[c / 3] * nedge + edge[c]);
        wd_u64 h = wd_slot(key, mask);
        for (wd_u64 probe = 0; probe <= mask; ++probe) {
            const wd_u64 prev = atomicCAS(&keys[h], WD_EMPTY, key);
            if (prev == WD_EMPTY || prev == key) {
                atomicMin(&first[h], c);
                break;
            }
            h = (h + 1) & mask;
        }
    }
}

extern "C" __global__ void weld_lookup(const wd_i64* __restrict__ group, const wd_i64* __restrict__ edge,
                                       wd_i64 ncorners, wd_i64 nedge, const wd_u64* __restrict__ keys,
                                       const wd_i64* __restrict__ first, wd_u64 mask,
                                       wd_i64* __restrict__ cfirst) {
    const wd_i64 stride = (wd_i64)gridDim.x * blockDim.x;
    for (wd_i64 c = (wd_i64)blockIdx.x * blockDim.x + threadIdx.x; c < ncorners; c += stride) {
        const wd_u64 key = (wd_u64)(group[c / 3] * nedge + edge[c]);
        wd_u64 h = wd_slot(key, mask);
        wd_i64 found = -1;
        for (wd_u64 probe = 0; probe <= mask; ++probe) {
            const wd_u64 k = keys[h];
            if (k == key) {
                found = first[h];
                break;
            }
            if (k == WD_EMPTY) break;
            h = (h + 1) & mask;
        }
        cfirst[c] = found;
    }
}
