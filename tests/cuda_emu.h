// Runs csrc's kernels on the CPU, for tests/test_csrc.py on machines without a GPU: compiled as
// plain C++ with this header forced in first, a launch runs each block as blockDim std::threads
// that meet at __syncthreads and at every warp shuffle (csrc's kernels call both at points every
// thread of a block reaches), on a small grid so the grid-stride loops go round.  "Device"
// pointers are host pointers; the few runtime calls are answered below.  It checks the kernels' indexing, vector and scalar paths,
// reductions and partial-sum slots, not their speed or memory model.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __shared__
#define __shared__ static  // one instance per kernel: blocks run one at a time
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace fa_emu {

struct Block {
  unsigned threads = 0;
  std::mutex m;
  std::condition_variable cv;
  unsigned waiting = 0, generation = 0;
  std::vector<double> lanes;

  void sync() {
    std::unique_lock<std::mutex> lock(m);
    const unsigned gen = generation;
    if (++waiting == threads) {
      waiting = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return gen != generation; });
    }
  }
};

inline Block& block() {
  static Block b;
  return b;
}

constexpr unsigned GRID = 3;  // blocks, whatever the launcher asked: exercises grid-stride

}  // namespace fa_emu

// The runtime calls csrc makes, answered here (built with `-cudart none`): one device of two
// multiprocessors, no errors.  They are renamed, not defined under CUDA's names: a process that
// already loaded a CUDA runtime (torch's CUDA wheels ship one) would bind those names to it.
namespace fa_emu {
inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t device_attribute(int* value, cudaDeviceAttr, int) {
  *value = 2;
  return cudaSuccess;
}
inline cudaError_t last_error() { return cudaSuccess; }
inline const char* error_string(cudaError_t) { return "emulated"; }
}  // namespace fa_emu
#define cudaGetDevice fa_emu::get_device
#define cudaDeviceGetAttribute fa_emu::device_attribute
#define cudaGetLastError fa_emu::last_error
#define cudaGetErrorString fa_emu::error_string

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 gridDim;
inline dim3 blockDim;

inline void __syncthreads() { fa_emu::block().sync(); }

// IEEE division, which the device asks for by name (its `/` may be approximate): the host's `/`.
inline float __fdiv_rn(float a, float b) { return a / b; }

// The store intrinsic csrc uses to keep a vector store whole: a plain store on the host.
template <class T>
inline void __stwb(T* p, T v) { *p = v; }

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset) {
  fa_emu::Block& b = fa_emu::block();
  const unsigned tid = threadIdx.x;
  b.lanes[tid] = double(v);
  b.sync();
  const T r = T(b.lanes[tid ^ unsigned(offset)]);
  b.sync();
  return r;
}

#define FA_LAUNCH(kernel, grid, nthreads_, stream, ...)                      \
  do {                                                                     \
    (void)(stream);                                                        \
    fa_emu::Block& b_ = fa_emu::block();                                   \
    b_.threads = (nthreads_);                                              \
    b_.lanes.assign((nthreads_), 0.0);                                     \
    gridDim = dim3((grid) < fa_emu::GRID ? (grid) : fa_emu::GRID);         \
    blockDim = dim3((nthreads_));                                          \
    for (unsigned bx = 0; bx < gridDim.x; ++bx) {                          \
      std::vector<std::thread> ts;                                         \
      for (unsigned tx = 0; tx < unsigned(nthreads_); ++tx) {              \
        ts.emplace_back([&, bx, tx] {                                      \
          blockIdx = make_uint3(bx, 0, 0);                                 \
          threadIdx = make_uint3(tx, 0, 0);                                \
          kernel(__VA_ARGS__);                                             \
        });                                                                \
      }                                                                    \
      for (auto& t : ts) t.join();                                         \
    }                                                                      \
  } while (0)
