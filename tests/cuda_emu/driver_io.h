// Shared by the emulation drivers (driver.cpp: one adapter; driver_multi.cpp: per-row adapters):
// reading the problem file and filling the kernels' RowParams from its header fields.
#pragma once
#include <cstdio>
#include <vector>

#include "reft_cuda.h"

template <typename T> std::vector<T> read(FILE* f, size_t n) {
  std::vector<T> v(n);
  if (n && fread(v.data(), sizeof(T), n, f) != n) throw 1;
  return v;
}

// flags = {has_weight, subtract_proj, has_c, act, seed}; p = dropout probability.
inline reft::RowParams<float> row_params(const std::vector<float>& P, const std::vector<float>& W,
                                         const std::vector<float>& b, const std::vector<float>& c,
                                         const int64_t* flags, int64_t r, int64_t d, double p) {
  reft::RowParams<float> rp;
  rp.P = P.data(), rp.W = flags[0] ? W.data() : nullptr, rp.b = b.data(), rp.c = flags[2] ? c.data() : nullptr;
  rp.r = static_cast<int>(r), rp.d = d, rp.act = static_cast<int>(flags[3]);
  rp.has_weight = flags[0], rp.subtract_proj = flags[1], rp.dropout = p > 0;
  rp.seed = static_cast<uint64_t>(flags[4]), rp.threshold = static_cast<uint32_t>(p * 16777216.0);
  rp.scale = static_cast<float>(1.0 / (1.0 - p));
  return rp;
}
