// The grid loop of the CUDA emulation: runs one kernel thunk once per (block, thread) of a
// 1-D launch, each time with blockIdx/threadIdx/blockDim/gridDim set to that thread's values.
//
// seed == 0 runs threads in launch order (block 0 thread 0, block 0 thread 1, ...); any other
// seed runs them in a pseudo-random permutation, so a kernel whose result depends on the
// order in which threads run (a race on real hardware) gives a different result here.

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cuda_shim.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

typedef void (*emu_thunk)(void**);

extern "C" int emu_launch(emu_thunk thunk, unsigned int grid, unsigned int block,
                          unsigned long long seed, void** args) {
    if (grid == 0 || block == 0 || block > 1024) return 1;  // CUDA rejects these launches
    const std::uint64_t n = std::uint64_t(grid) * block;
    std::vector<std::uint64_t> order(n);
    for (std::uint64_t t = 0; t < n; ++t) order[t] = t;
    if (seed != 0) {
        std::mt19937_64 rng(seed);
        std::shuffle(order.begin(), order.end(), rng);
    }
    gridDim = dim3{grid, 1, 1};
    blockDim = dim3{block, 1, 1};
    for (std::uint64_t t : order) {
        blockIdx = uint3{static_cast<unsigned int>(t / block), 0, 0};
        threadIdx = uint3{static_cast<unsigned int>(t % block), 0, 0};
        thunk(args);
    }
    blockIdx = uint3{0, 0, 0};
    threadIdx = uint3{0, 0, 0};
    return 0;
}
