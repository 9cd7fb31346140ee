// CPU attention, forward and backward: softmax(q k^T * scale + masks) v with
// packed variable-length sequences or a dense (B, H, L, D) batch with a key
// padding mask, causal masking (bottom-right aligned) and Philox dropout that
// is bit-identical to turbotune's Triton kernels and PyTorch reference.
//
// Host C++ only: no torch, no Python. Tensors arrive as raw pointers plus
// element strides; the math is fp32 whatever the storage dtype.
#pragma once

#include <cstdint>

#include "cpu/adamw.h"  // DType (the storage dtype codes shared by the CPU kernels)

namespace turbotune {
namespace cpu {

// A strided tensor: element (b, h, row, d) lives at
//   ptr + b * sb + h * sh + row * sr + d * sd   (strides in elements).
// For a dense (B, H, L, D) tensor these are its four strides. For a packed
// varlen tensor (total, H, D), sb = 0 and `row` is the global row
// (cu_seqlens[b] + i). For the log-sum-exp, d is unused (sd = 0).
struct AttnView {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, sr = 0, sd = 0;
};

struct AttnProblem {
  DType dtype = kFloat32;  // q, k, v, out, dout, dq, dk, dv; lse is always fp32
  int64_t batch = 0, heads = 0, head_dim = 0;
  // Dense: every sequence has seqlen_q queries and seqlen_k keys.
  int64_t seqlen_q = 0, seqlen_k = 0;
  // Varlen (when cu_q is set): cu_q / cu_k hold batch + 1 non-decreasing entries, sequence b is
  // rows cu[b] .. cu[b + 1] of tensors with total_q / total_k rows.
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  // Dense only, optional: key (b, j) is attended when key_mask[b * mask_sb + j * mask_sk] != 0.
  const uint8_t* key_mask = nullptr;
  int64_t mask_sb = 0, mask_sk = 0;
  bool causal = false;  // key j visible to query i when j <= i + (Lk - Lq)
  double scale = 1.0;   // softmax scale
  // Dropout: probability p in [0, 1) and the kept test (word >> 8) >= threshold,
  // threshold = round(p * 2^24). Philox key (seed low, seed high), counter
  // (n / 4, b * heads + h, offset, 0) for position n = i * Lk + j.
  double dropout_p = 0.0;
  uint32_t dropout_threshold = 0;
  uint64_t seed = 0;
  uint32_t offset = 0;
  int num_threads = 1;
  // SIMD variant to use: "auto" (best this CPU has, capped by TURBOTUNE_CPU_SIMD), or
  // "generic" / "avx2" / "avx512" (capped to what the CPU has). Tests use it to reach every variant.
  const char* simd = "auto";
};

// out (like q) and lse (fp32, one value per query row: the natural log-sum-exp
// of the scaled, masked scores; -inf for a row with no key, whose output is 0).
// Throws std::invalid_argument for inconsistent sizes, cu_seqlens out of range
// or an unsupported dtype, before touching any memory.
void attention_forward(const AttnProblem& p, const AttnView& q, const AttnView& k, const AttnView& v,
                       const AttnView& out, const AttnView& lse);

// dq, dk, dv (like q, k, v) from dout, the forward's out and lse, regenerating
// the dropout mask. Every element of dq, dk and dv is written (zeros where no
// gradient flows, e.g. masked keys).
void attention_backward(const AttnProblem& p, const AttnView& dout, const AttnView& q, const AttnView& k,
                        const AttnView& v, const AttnView& out, const AttnView& lse, const AttnView& dq,
                        const AttnView& dk, const AttnView& dv);

// The keep mask (uint8 0/1) of heads bh0 .. bh0 + n_heads - 1 for an Lq x Lk
// score matrix, written to mask[(bh - bh0) * Lq * Lk + i * Lk + j] (debugging
// and tests: the same generator the attention kernels use).
void attention_dropout_mask(uint8_t* mask, int64_t bh0, int64_t n_heads, int64_t seqlen_q, int64_t seqlen_k,
                            uint32_t threshold, uint64_t seed, uint32_t offset, const char* simd);

// The SIMD variant attention would use for `simd` ("auto", "generic", "avx2", "avx512").
const char* attention_simd_variant(const char* simd);

}  // namespace cpu
}  // namespace turbotune
