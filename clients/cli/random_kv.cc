#include "clients/cli/random_kv.h"

#include <cstring>
#include <random>

#include "clients/cpp/client.h"
#include "kernels/common/dtype.h"

namespace ropekv::cli {

std::vector<int32_t> RandomTokens(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ull + 1);
  std::uniform_int_distribution<int32_t> dist(0, 31999);
  std::vector<int32_t> tokens(n);
  for (auto& t : tokens) t = dist(rng);
  return tokens;
}

std::vector<uint8_t> RandomKv(const v1::ModelSpec& spec, uint64_t seed, uint32_t blocks) {
  const client::KvShape shape = client::KvShape::Of(spec, blocks);
  std::vector<uint8_t> bytes(shape.Bytes());
  const size_t elem = spec.dtype() == v1::DTYPE_F32 ? 4 : 2;
  const size_t n = bytes.size() / elem;
  uint64_t x = seed * 0xd1b54a32d192ed03ull + 0x632be59bd9b4e019ull;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    const float f = static_cast<float>(static_cast<int32_t>(x >> 32)) * (1.0f / 2147483648.0f);
    if (elem == 4) {
      std::memcpy(bytes.data() + 4 * i, &f, 4);
    } else {
      const uint16_t h = spec.dtype() == v1::DTYPE_BF16 ? FloatToBFloat16(f) : FloatToHalf(f);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}

}  // namespace ropekv::cli
