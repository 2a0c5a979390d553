// Label downsampling by 1 or 2 per axis with the non-zero mode rule: the CUDA twin of
// gpumesh/lod.py::_downsample.
//
// Output voxel (i, j, k) of an (nx, ny, nz) = (ceil(sx/fx), ceil(sy/fy), ceil(sz/fz)) array takes
// the most frequent non-zero label among input voxels (fx*i+dx, fy*j+dy, fz*k+dz), 0 <= dx < fx,
// 0 <= dy < fy, 0 <= dz < fz (fx, fy, fz each 1 or 2), that lie inside the (sx, sy, sz) input
// (partial blocks at odd edges use the voxels they have); ties go to the smaller label; 0 only
// when every such voxel is 0.  Arrays are C-contiguous, axes x, y, z.  One thread per output
// voxel (grid-stride loop), no atomics.
//
// Self-contained (no #include): compiled by NVRTC (CuPy) and, for tests, by g++ through
// tests/cuda_emulation.

typedef long long ds_i64;

template <typename T>
__device__ void ds2(const T* __restrict__ labels, T* __restrict__ out, ds_i64 sx, ds_i64 sy,
                    ds_i64 sz, ds_i64 nx, ds_i64 ny, ds_i64 nz, int fx, int fy, int fz) {
    const ds_i64 nout = nx * ny * nz;
    const ds_i64 stride = (ds_i64)gridDim.x * blockDim.x;
    for (ds_i64 o = (ds_i64)blockIdx.x * blockDim.x + threadIdx.x; o < nout; o += stride) {
        const ds_i64 k = o % nz;
        const ds_i64 j = (o / nz) % ny;
        const ds_i64 i = o / (nz * ny);
        T v[8];
        int n = 0;
        for (int dx = 0; dx < fx; ++dx) {
            const ds_i64 x = fx * i + dx;
            for (int dy = 0; dy < fy; ++dy) {
                const ds_i64 y = fy * j + dy;
                for (int dz = 0; dz < fz; ++dz) {
                    const ds_i64 z = fz * k + dz;
                    if (x < sx && y < sy && z < sz) {
                        const T val = labels[(x * sy + y) * sz + z];
                        if (val != 0) v[n++] = val;
                    }
                }
            }
        }
        T best = 0;
        int best_count = 0;
        for (int a = 0; a < n; ++a) {
            int c = 0;
            for (int b = 0; b < n; ++b) {
                if (v[b] == v[a]) ++c;
            }
            if (c > best_count || (c == best_count && v[a] < best)) {
                best = v[a];
                best_count = c;
            }
        }
        out[o] = best;  // 0 when n == 0
    }
}

#define DS_ENTRY_POINT(SUFFIX, T)                                                               \
    extern "C" __global__ void ds2_##SUFFIX(const T* __restrict__ labels, T* __restrict__ out,  \
                                            ds_i64 sx, ds_i64 sy, ds_i64 sz, ds_i64 nx,         \
                                            ds_i64 ny, ds_i64 nz, int fx, int fy, int fz) {     \
        ds2<T>(labels, out, sx, sy, sz, nx, ny, nz, fx, fy, fz);                                \
    }

DS_ENTRY_POINT(u8, unsigned char)
DS_ENTRY_POINT(u16, unsigned short)
DS_ENTRY_POINT(u32, unsigned int)
DS_ENTRY_POINT(u64, unsigned long long)
