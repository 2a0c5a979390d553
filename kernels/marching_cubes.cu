// Multi-label marching cubes over one block: the CUDA twin of gpumesh/marching.py::_march.
//
// Conventions (identical to the CPU kernel; see gpumesh/marching.py and gpumesh/mctable.py):
//   * labels: (nx, ny, nz) C-contiguous, axes x, y, z; element (a, b, c) at (a * ny + b) * nz + c.
//   * Cube (i, j, k) spans array indices i..i+1, j..j+1, k..k+1; there are (nx-1)(ny-1)(nz-1)
//     cubes, numbered c = (i * cy + j) * cz + k (row-major, the CPU's loop order).
//   * Corner m of a cube sits at offset (m & 1, (m >> 1) & 1, (m >> 2) & 1).
//   * For m = 0..7, every distinct non-zero label v[m] not seen at a corner q < m gets
//     case = OR of (1 << q) over corners q with v[q] == label, and emits tri_counts[case]
//     triangles in table order, each with three vertices named by their lattice edge:
//     edge_id = ((bx * ny + by) * nz + bz) * 3 + edge_axis[e], (bx, by, bz) = (i, j, k) + edge_base[e].
//   * piece = ((i / piece_size) * py + (j / piece_size)) * pz + (k / piece_size).
//   * A block may be meshed in x-slabs (to bound device memory): the labels passed are then
//     the x-planes x0 .. x0 + nx - 1 of the block's labels, and mc_emit writes the block's
//     piece and edge ids (cube i of the slab is cube x0 + i of the block; ny, nz are the
//     block's), so the slabs' outputs, one after the other, are the block's.  x0 = 0: a whole
//     block.
//
// Two passes, so that the output order equals the CPU's emission order:
//   mc_count_*: counts[c] = number of triangles cube c emits (all its labels together);
//   (host)     : inclusive scan of counts (cupy.cumsum, int64);
//   mc_emit_*  : cube c writes its triangles at rows [scan[c] - counts[c], scan[c]).
// Every cube is handled by exactly one thread (grid-stride loop); no atomics, no shared memory,
// so the result does not depend on the order in which threads run.
//
// The source is self-contained (no #include) so that NVRTC (CuPy) compiles it as it is, and
// tests/cuda_emulation compiles it with g++ on the CPU.

typedef long long mc_i64;

// Case table and edge geometry, from gpumesh.mctable (uploaded once by gpumesh/gpu.py).
struct McTables {
    const int* tri_counts;          // (256,) int32
    const signed char* tri_table;   // (256, max_tris, 3) int8, C-contiguous
    const int* edge_base;           // (12, 3) int32
    const int* edge_axis;           // (12,) int32
};

template <typename T>
__device__ __forceinline__ void mc_load_cube(const T* __restrict__ labels, mc_i64 ny, mc_i64 nz,
                                             mc_i64 i, mc_i64 j, mc_i64 k, T v[8]) {
    const mc_i64 sx = ny * nz;  // stride of x
    const mc_i64 sy = nz;       // stride of y
    const mc_i64 p = i * sx + j * sy + k;
    v[0] = labels[p];
    v[1] = labels[p + sx];
    v[2] = labels[p + sy];
    v[3] = labels[p + sx + sy];
    v[4] = labels[p + 1];
    v[5] = labels[p + sx + 1];
    v[6] = labels[p + sy + 1];
    v[7] = labels[p + sx + sy + 1];
}

// The case of label v[m] if m is the first corner holding it and it is non-zero, else -1.
template <typename T>
__device__ __forceinline__ int mc_label_case(const T v[8], int m) {
    const T lab = v[m];
    if (lab == 0) return -1;
    for (int q = 0; q < m; ++q) {
        if (v[q] == lab) return -1;
    }
    int c = 0;
    for (int q = 0; q < 8; ++q) {
        if (v[q] == lab) c |= 1 << q;
    }
    return c;
}

template <typename T>
__device__ __forceinline__ bool mc_uniform(const T v[8]) {
    for (int m = 1; m < 8; ++m) {
        if (v[m] != v[0]) return false;
    }
    return true;
}

template <typename T>
__device__ void mc_count(const T* __restrict__ labels, int* __restrict__ counts,
                         mc_i64 nx, mc_i64 ny, mc_i64 nz, const int* __restrict__ tri_counts) {
    const mc_i64 cx = nx - 1, cy = ny - 1, cz = nz - 1;
    const mc_i64 ncubes = cx * cy * cz;
    const mc_i64 stride = (mc_i64)gridDim.x * blockDim.x;
    for (mc_i64 c = (mc_i64)blockIdx.x * blockDim.x + threadIdx.x; c < ncubes; c += stride) {
        const mc_i64 k = c % cz;
        const mc_i64 j = (c / cz) % cy;
        const mc_i64 i = c / (cz * cy);
        T v[8];
        mc_load_cube(labels, ny, nz, i, j, k, v);
        int n = 0;
        if (!mc_uniform(v)) {
            for (int m = 0; m < 8; ++m) {
                const int cs = mc_label_case(v, m);
                if (cs >= 0) n += tri_counts[cs];
            }
        }
        counts[c] = n;
    }
}

template <typename T>
__device__ void mc_emit(const T* __restrict__ labels, const int* __restrict__ counts,
                        const mc_i64* __restrict__ scan, mc_i64 nx, mc_i64 ny, mc_i64 nz,
                        mc_i64 x0, mc_i64 piece_size, McTables tab, mc_i64 max_tris,
                        T* __restrict__ out_label, mc_i64* __restrict__ out_piece,
                        mc_i64* __restrict__ out_edges) {
    const mc_i64 cx = nx - 1, cy = ny - 1, cz = nz - 1;
    const mc_i64 py = (cy + piece_size - 1) / piece_size;
    const mc_i64 pz = (cz + piece_size - 1) / piece_size;
    const mc_i64 ncubes = cx * cy * cz;
    const mc_i64 stride = (mc_i64)gridDim.x * blockDim.x;
    for (mc_i64 c = (mc_i64)blockIdx.x * blockDim.x + threadIdx.x; c < ncubes; c += stride) {
        if (counts[c] == 0) continue;
        const mc_i64 k = c % cz;
        const mc_i64 j = (c / cz) % cy;
        const mc_i64 i = c / (cz * cy);
        T v[8];
        mc_load_cube(labels, ny, nz, i, j, k, v);
        const mc_i64 gi = x0 + i;  // the cube's x in the block
        const mc_i64 piece = ((gi / piece_size) * py + (j / piece_size)) * pz + (k / piece_size);
        mc_i64 n = scan[c] - counts[c];  // exclusive prefix: first output row of this cube
        for (int m = 0; m < 8; ++m) {
            const int cs = mc_label_case(v, m);
            if (cs < 0) continue;
            const int nt = tab.tri_counts[cs];
            for (int t = 0; t < nt; ++t) {
                out_label[n] = v[m];
                out_piece[n] = piece;
                for (int s = 0; s < 3; ++s) {
                    const int e = tab.tri_table[((mc_i64)cs * max_tris + t) * 3 + s];
                    const mc_i64 bx = gi + tab.edge_base[e * 3 + 0];
                    const mc_i64 by = j + tab.edge_base[e * 3 + 1];
                    const mc_i64 bz = k + tab.edge_base[e * 3 + 2];
                    out_edges[n * 3 + s] = ((bx * ny + by) * nz + bz) * 3 + tab.edge_axis[e];
                }
                ++n;
            }
        }
    }
}

// extern "C" entry points, one pair per label dtype (names used by gpumesh/gpu.py).
#define MC_ENTRY_POINTS(SUFFIX, T)                                                              \
    extern "C" __global__ void mc_count_##SUFFIX(                                               \
        const T* __restrict__ labels, int* __restrict__ counts, mc_i64 nx, mc_i64 ny,           \
        mc_i64 nz, const int* __restrict__ tri_counts) {                                        \
        mc_count<T>(labels, counts, nx, ny, nz, tri_counts);                                    \
    }                                                                                           \
    extern "C" __global__ void mc_emit_##SUFFIX(                                                \
        const T* __restrict__ labels, const int* __restrict__ counts,                           \
        const mc_i64* __restrict__ scan, mc_i64 nx, mc_i64 ny, mc_i64 nz, mc_i64 x0,            \
        mc_i64 piece_size,                                                                      \
        const int* __restrict__ tri_counts, const signed char* __restrict__ tri_table,          \
        mc_i64 max_tris, const int* __restrict__ edge_base, const int* __restrict__ edge_axis,  \
        T* __restrict__ out_label, mc_i64* __restrict__ out_piece,                              \
        mc_i64* __restrict__ out_edges) {                                                       \
        McTables tab;                                                                           \
        tab.tri_counts = tri_counts;                                                            \
        tab.tri_table = tri_table;                                                              \
        tab.edge_base = edge_base;                                                              \
        tab.edge_axis = edge_axis;                                                              \
        mc_emit<T>(labels, counts, scan, nx, ny, nz, x0, piece_size, tab, max_tris, out_label,  \
                   out_piece, out_edges);                                                       \
    }

MC_ENTRY_POINTS(u8, unsigned char)
MC_ENTRY_POINTS(u16, unsigned short)
MC_ENTRY_POINTS(u32, unsigned int)
MC_ENTRY_POINTS(u64, unsigned long long)
