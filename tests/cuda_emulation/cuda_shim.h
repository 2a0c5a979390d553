// Minimal CUDA-on-CPU shim: lets the self-contained kernels in kernels/*.cu compile with g++.
//
// Only what the kernels use is provided, and on purpose nothing more (no shared memory, no
// __syncthreads, no warp intrinsics): a kernel that starts using them fails to compile here
// and the shim must be extended deliberately, with semantics that stay faithful.
//
//   __global__/__device__/__host__  -> nothing; __forceinline__ -> inline
//   threadIdx/blockIdx/blockDim/gridDim -> thread_local globals, set by the driver
//                                          (emu_driver.cpp) before each emulated thread runs
//   atomicAdd, atomicCAS, atomicMin -> plain read-modify-write returning the old value (the
//                                      emulated threads run one at a time)
//
// This header includes nothing, and the translation unit holding the kernels is compiled
// with -nostdinc -nostdinc++: like NVRTC, the kernels can use no host library.

#ifndef GPUMESH_CUDA_SHIM_H
#define GPUMESH_CUDA_SHIM_H

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

template <typename T>
inline T atomicAdd(T* address, T val) {
    T old = *address;
    *address = old + val;
    return old;
}

template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
    T old = *address;
    if (old == compare) *address = val;
    return old;
}

template <typename T>
inline T atomicMin(T* address, T val) {
    T old = *address;
    if (val < old) *address = val;
    return old;
}

// ---------------------------------------------------------------------------------------
// Launch plumbing: a kernel is called with CUDA's launch ABI, an array of pointers to the
// argument values (cuLaunchKernel's kernelParams), and reports its parameter types so that
// the Python launcher can check every argument (array dtype, scalar width) before a launch.

template <typename T>
struct emu_type;  // no definition: a parameter type not listed below does not compile

#define EMU_TYPE(T, S)                                            \
    template <>                                                   \
    struct emu_type<T> {                                          \
        static const char* name() { return S; }                   \
    };                                                            \
    template <>                                                   \
    struct emu_type<T*> {                                         \
        static const char* name() { return S "*"; }               \
    };                                                            \
    template <>                                                   \
    struct emu_type<const T*> {                                   \
        static const char* name() { return "const " S "*"; }      \
    };

EMU_TYPE(signed char, "i8")
EMU_TYPE(unsigned char, "u8")
EMU_TYPE(short, "i16")
EMU_TYPE(unsigned short, "u16")
EMU_TYPE(int, "i32")
EMU_TYPE(unsigned int, "u32")
EMU_TYPE(long long, "i64")
EMU_TYPE(unsigned long long, "u64")
EMU_TYPE(float, "f32")
EMU_TYPE(double, "f64")

template <unsigned long... I>
struct emu_seq {};
template <unsigned long N, unsigned long... I>
struct emu_make_seq : emu_make_seq<N - 1, N - 1, I...> {};
template <unsigned long... I>
struct emu_make_seq<0, I...> {
    typedef emu_seq<I...> type;
};

template <typename... A, unsigned long... I>
inline void emu_call(void (*kernel)(A...), void** args, emu_seq<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}

template <typename... A>
inline void emu_invoke(void (*kernel)(A...), void** args) {
    emu_call(kernel, args, typename emu_make_seq<sizeof...(A)>::type());
}

template <typename... A>
inline int emu_signature(void (*)(A...), const char** out, int cap) {
    const char* names[] = {emu_type<A>::name()..., nullptr};
    int n = 0;
    for (; names[n] != nullptr; ++n) {
        if (n < cap) out[n] = names[n];
    }
    return n;
}

// EMU_KERNEL(name): extern "C" emu_thunk_<name>(void** args) runs one thread's body,
// emu_sig_<name>(out, cap) lists the parameter types.
#define EMU_KERNEL(NAME)                                                    \
    extern "C" void emu_thunk_##NAME(void** args) { emu_invoke(NAME, args); } \
    extern "C" int emu_sig_##NAME(const char** out, int cap) {              \
        return emu_signature(NAME, out, cap);                               \
    }

#endif  // GPUMESH_CUDA_SHIM_H
