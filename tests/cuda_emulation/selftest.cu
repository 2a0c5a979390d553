// Kernels with known bugs, compiled into the emulation library only, to show that the
// emulation catches them (tests/test_gpu.py::test_emulator_*).

typedef long long st_i64;

// Correct: out[i] = 2 * in[i].
extern "C" __global__ void st_double(const st_i64* __restrict__ in, st_i64* __restrict__ out,
                                     st_i64 n) {
    const st_i64 i = (st_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = 2 * in[i];
}

// Off by one: thread n writes one element past the end.
extern "C" __global__ void st_oob(st_i64* __restrict__ out, st_i64 n) {
    const st_i64 i = (st_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = i;
}

// A race: every thread writes the same element; the result is whichever thread ran last.
extern "C" __global__ void st_race(st_i64* __restrict__ out, st_i64 n) {
    const st_i64 i = (st_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[0] = i;
}

// Atomics are order-independent: out[0] ends as the sum of 0..n-1 in any order.
extern "C" __global__ void st_atomic(unsigned long long* __restrict__ out, st_i64 n) {
    const st_i64 i = (st_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) atomicAdd(out, (unsigned long long)i);
}

// Undefined behaviour that does not show in the output: reads past a local array when
// n >= 4 (UBSan reports it).
extern "C" __global__ void st_ub(st_i64* __restrict__ out, st_i64 n) {
    const st_i64 i = (st_i64)blockIdx.x * blockDim.x + threadIdx.x;
    st_i64 a[4] = {1, 2, 3, 4};
    if (i == 0) out[0] = a[n];
}
