// CRC-32 (IEEE 802.3 / zlib: reflected polynomial 0xEDB88320, init and final XOR 0xFFFFFFFF).
#pragma once

#include <cstddef>
#include <cstdint>

namespace apr {

// Continue a CRC: crc32_update(crc32_update(0, a), b) == crc32 of a followed by b, the same
// convention as zlib.crc32(data, value). Uses carry-less multiplication (PCLMULQDQ) folding when
// the CPU has it, slice-by-8 tables otherwise.
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t len) noexcept;

// Which implementation crc32_update picks on this CPU ("pclmul" or "slice8"), for benchmarks.
const char* crc32_impl() noexcept;

// The portable path on its own (tests compare both against zlib).
uint32_t crc32_slice8(uint32_t crc, const uint8_t* data, size_t len) noexcept;

}  // namespace apr
