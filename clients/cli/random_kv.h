// Deterministic random prompts and KV for the CLI's put-random / lookup-random / bench: the same
// seed gives the same tokens and bytes in every process, so a second process can check what a
// first one stored.
#ifndef ROPEKV_CLIENTS_CLI_RANDOM_KV_H_
#define ROPEKV_CLIENTS_CLI_RANDOM_KV_H_

#include <cstdint>
#include <vector>

#include "ropekv/v1/kvcache.pb.h"

namespace ropekv::cli {

// n token ids in [0, 32000).
std::vector<int32_t> RandomTokens(uint64_t seed, size_t n);

// `blocks` blocks of KV for a model: values uniform in [-1, 1) rounded to the model's dtype.
std::vector<uint8_t> RandomKv(const v1::ModelSpec& spec, uint64_t seed, uint32_t blocks);

}  // namespace ropekv::cli

#endif  // ROPEKV_CLIENTS_CLI_RANDOM_KV_H_
