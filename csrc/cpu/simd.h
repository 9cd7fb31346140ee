// Compiler helpers shared by the CPU kernels (AdamW, clipping, attention).
//
// Each kernel file compiles its hot loops several times through target
// attributes (AVX-512, AVX2+FMA+F16C, generic) and picks one at run time with
// cpu::simd_variant() (cpu/adamw.h); these macros are the one definition of
// those targets, so every kernel agrees on what "avx512" / "avx2" may use.
#pragma once

#if defined(__GNUC__)
#define TT_INLINE inline __attribute__((always_inline))
#else
#define TT_INLINE inline
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define TT_X86 1
#define TT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define TT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
