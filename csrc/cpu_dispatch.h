// CPU kernels only: the hot loops are also compiled for AVX2 and the clone is picked at load time (GCC's
// function multiversioning). target_clones("avx2") names an x86 target: elsewhere (aarch64, e.g. Grace or
// Graviton hosts) and with clang the loops are compiled once, for the baseline of the build.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PF_HOT __attribute__((target_clones("avx2", "default")))
#else
#define PF_HOT
#endif
