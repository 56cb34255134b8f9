// CRC-32: slice-by-8 tables everywhere, PCLMULQDQ folding on x86-64 CPUs that have it.
//
// The folding path follows Intel's white paper "Fast CRC Computation for Generic Polynomials Using
// PCLMULQDQ Instruction" (Gopal et al., 2009): four 128-bit accumulators fold 64 bytes per step,
// then fold to one lane, then a Barrett reduction gives the 32-bit remainder. The constants are the
// paper's bit-reflected values for the IEEE polynomial (x^(4*128+32) mod P etc.).
#include "crc32.hpp"

#include <array>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define APR_HAVE_PCLMUL 1
#include <immintrin.h>
#endif

namespace apr {
namespace {

using Tables = std::array<std::array<uint32_t, 256>, 8>;

constexpr Tables make_tables() {
  Tables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
    t[0][i] = c;
  }
  for (uint32_t i = 0; i < 256; ++i)
    for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  return t;
}

constexpr Tables kTables = make_tables();

// Works on the raw register (already inverted): the caller does the pre/post XOR.
uint32_t slice8_raw(uint32_t c, const uint8_t* p, size_t n) noexcept {
  while (n && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = kTables[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    --n;
  }
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);  // little-endian host (checked by the build)
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;
    c = kTables[7][lo & 0xFF] ^ kTables[6][(lo >> 8) & 0xFF] ^ kTables[5][(lo >> 16) & 0xFF] ^
        kTables[4][lo >> 24] ^ kTables[3][hi & 0xFF] ^ kTables[2][(hi >> 8) & 0xFF] ^
        kTables[1][(hi >> 16) & 0xFF] ^ kTables[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = kTables[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c;
}

#ifdef APR_HAVE_PCLMUL
#define APR_PCLMUL __attribute__((target("pclmul,sse4.1")))

APR_PCLMUL inline __m128i load16(const uint8_t* q) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
}

// x * k (both 64-bit halves, carry-less) folded onto the next 16 bytes.
APR_PCLMUL inline __m128i fold(__m128i x, __m128i k, __m128i next) {
  __m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
  __m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
  return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

// Folds n bytes (n >= 64, n % 16 == 0) into the raw register c.
APR_PCLMUL uint32_t pclmul_raw(uint32_t c, const uint8_t* p, size_t n) noexcept {
  const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);  // fold by 512 bits
  const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);  // fold by 128 bits
  const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124LL);                // 64 -> 32 bits
  const __m128i poly = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL);   // Barrett mu, P
  auto load = load16;

  __m128i x1 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(c)));
  __m128i x2 = load(p + 16), x3 = load(p + 32), x4 = load(p + 48);
  p += 64;
  n -= 64;
  while (n >= 64) {
    x1 = fold(x1, k1k2, load(p));
    x2 = fold(x2, k1k2, load(p + 16));
    x3 = fold(x3, k1k2, load(p + 32));
    x4 = fold(x4, k1k2, load(p + 48));
    p += 64;
    n -= 64;
  }
  x1 = fold(x1, k3k4, x2);
  x1 = fold(x1, k3k4, x3);
  x1 = fold(x1, k3k4, x4);
  while (n >= 16) {
    x1 = fold(x1, k3k4, load(p));
    p += 16;
    n -= 16;
  }
  // 128 -> 64 bits.
  const __m128i mask32 = _mm_setr_epi32(~0, 0, ~0, 0);
  __m128i x2b = _mm_clmulepi64_si128(x1, k3k4, 0x10);
  x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), x2b);
  // 64 -> 32 bits.
  x2b = _mm_srli_si128(x1, 4);
  x1 = _mm_and_si128(x1, mask32);
  x1 = _mm_clmulepi64_si128(x1, k5k0, 0x00);
  x1 = _mm_xor_si128(x1, x2b);
  // Barrett reduction to the 32-bit remainder.
  x2b = _mm_and_si128(x1, mask32);
  x2b = _mm_clmulepi64_si128(x2b, poly, 0x10);
  x2b = _mm_and_si128(x2b, mask32);
  x2b = _mm_clmulepi64_si128(x2b, poly, 0x00);
  x1 = _mm_xor_si128(x1, x2b);
  return static_cast<uint32_t>(_mm_extract_epi32(x1, 1));
}

bool cpu_has_pclmul() noexcept {
  static const bool has = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
  return has;
}
#endif

}  // namespace

uint32_t crc32_slice8(uint32_t crc, const uint8_t* data, size_t len) noexcept {
  return ~slice8_raw(~crc, data, len);
}

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) noexcept {
  uint32_t c = ~crc;
#ifdef APR_HAVE_PCLMUL
  if (len >= 64 && cpu_has_pclmul()) {
    size_t chunk = len & ~static_cast<size_t>(15);
    c = pclmul_raw(c, data, chunk);
    data += chunk;
    len -= chunk;
  }
#endif
  return ~slice8_raw(c, data, len);
}

const char* crc32_impl() noexcept {
#ifdef APR_HAVE_PCLMUL
  if (cpu_has_pclmul()) return "pclmul";
#endif
  return "slice8";
}

}  // namespace apr
