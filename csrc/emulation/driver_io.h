// What the emulation drivers (csrc/emulation/*_driver.cpp) share: the binary file exchange with
// tests/test_cuda_emulation.py (a header struct, then float32 tensors, contiguous, one after the
// other), conversions between that float32 and the kernels' element types, and the dispatch over
// the dtype code the tests send (0 fp32, 1 fp16, 2 bf16).

#pragma once

#include "cuda_host.h"

#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace vapt_emu {
namespace io {

inline std::vector<float> read_floats(FILE* f, size_t n) {
  std::vector<float> v(n);
  if (std::fread(v.data(), sizeof(float), n, f) != n) fail("driver: input file too short");
  return v;
}

template <typename Header>
Header read_header(FILE* f) {
  Header h;
  if (std::fread(&h, sizeof(h), 1, f) != 1) fail("driver: no header");
  return h;
}

inline void write_floats(FILE* f, const std::vector<float>& v) { std::fwrite(v.data(), sizeof(float), v.size(), f); }

inline void write_ints(FILE* f, const std::vector<int32_t>& v) { std::fwrite(v.data(), sizeof(int32_t), v.size(), f); }

// Each value rounded to T (to nearest even, as the device's conversions).
template <typename T>
std::vector<T> to(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(v[i]);
  return out;
}

template <typename T>
std::vector<float> as_floats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i]);
  return out;
}

// An output buffer of n elements, all NaN: an element a kernel forgets to write fails the test.
template <typename T>
std::vector<T> nan_filled(size_t n) {
  return std::vector<T>(n, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
}

// f(T{}) with T the element type of dtype code `code`.
template <typename F>
void with_dtype(int32_t code, F&& f) {
  switch (code) {
    case 0:
      f(float{});
      break;
    case 1:
      f(c10::Half{});
      break;
    case 2:
      f(c10::BFloat16{});
      break;
    default:
      fail("driver: unknown dtype code");
  }
}

// The files of `driver MODE IN OUT`, closed when it goes out of scope.
struct Exchange {
  FILE* in = nullptr;
  FILE* out = nullptr;
  Exchange(const char* in_path, const char* out_path)
      : in(std::fopen(in_path, "rb")), out(std::fopen(out_path, "wb")) {
    if (in == nullptr || out == nullptr) fail("driver: cannot open the files");
  }
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() {
    std::fclose(in);
    std::fclose(out);
  }
};

// main() of a driver in mode `mode`, `driver MODE IN OUT`: reads the Header from IN and calls
// run(T{}, header, in, out) with T the element type of header.dtype. Returns the exit status (2 with
// `usage` on stderr for other arguments).
template <typename Header, typename Run>
int driver_main(int argc, char** argv, const char* mode, const char* usage, Run&& run) {
  if (argc != 4 || std::string(argv[1]) != mode) {
    std::fprintf(stderr, "usage: %s %s\n", argv[0], usage);
    return 2;
  }
  Exchange files(argv[2], argv[3]);
  const auto hd = read_header<Header>(files.in);
  with_dtype(hd.dtype, [&](auto zero) { run(zero, hd, files.in, files.out); });
  return 0;
}

}  // namespace io
}  // namespace vapt_emu
