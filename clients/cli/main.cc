// ropekv: the command-line client of ropekvd.
//
//   ropekv [--addr HOST:PORT] health | stats | models
//   ropekv [--addr HOST:PORT] put-random    --model NAME --tokens N [--seed S] [--tenant T]
//   ropekv [--addr HOST:PORT] lookup-random --model NAME --tokens N [--seed S] [--tenant T]
//   ropekv [--addr HOST:PORT] get-random    --model NAME --tokens N [--seed S] [--tenant T]
//                                           [--streams S]
//   ropekv [--addr HOST:PORT] evict --model NAME
//   ropekv [--addr HOST:PORT] bench [--blocks N] [--lookups N] [--redis HOST:PORT]
//
// `--model demo` registers the built-in demo model (4 layers, 2 KV heads, head_dim 64, bf16,
// 16-token blocks) when it is absent; any other unknown name is an error.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "clients/cli/bench.h"
#include "clients/cli/random_kv.h"
#include "clients/cpp/client.h"

namespace ropekv::cli {
namespace {

constexpr char kUsage[] =
    "usage: ropekv [--addr HOST:PORT] COMMAND [flags]\n"
    "commands:\n"
    "  health                      is the daemon serving?\n"
    "  stats                       per tier: usage, hits, misses, evictions, promotions,\n"
    "                              demotions, bytes moved, corrupt blocks\n"
    "  models                      registered models\n"
    "  put-random    --model NAME --tokens N [--seed S] [--tenant T]\n"
    "                              store random KV for N random tokens (seeded)\n"
    "  lookup-random --model NAME --tokens N [--seed S] [--tenant T]\n"
    "                              print how many of the same tokens are cached\n"
    "  get-random    --model NAME --tokens N [--seed S] [--tenant T] [--streams S]\n"
    "                              fetch them (over S connections at once) and check the\n"
    "                              bytes against the seed\n"
    "  evict --model NAME          evict every unpinned block of a model\n"
    "  bench [--blocks N] [--lookups N] [--redis HOST:PORT]\n"
    "                              put/get throughput of 2 MiB blocks, lookup latency\n"
    "--model demo registers the built-in demo model if it is absent.\n";

int Fail(const absl::Status& s) {
  std::cerr << "ropekv: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
  return 1;
}

v1::ModelSpec DemoSpec() {
  v1::ModelSpec spec;
  spec.set_layers(4);
  spec.set_kv_heads(2);
  spec.set_head_dim(64);
  spec.set_dtype(v1::DTYPE_BF16);
  spec.set_block_tokens(16);
  spec.mutable_rope()->set_theta(10000);
  return spec;
}

// The spec of `name`, registering the demo model on first use.
absl::StatusOr<v1::ModelSpec> ResolveModel(client::Client& c, const std::string& name) {
  auto models = c.ListModels();
  if (!models.ok()) return models.status();
  for (const v1::ModelInfo& m : *models) {
    if (m.model_id() == name) return m.spec();
    for (const std::string& n : m.names()) {
      if (n == name) return m.spec();
    }
  }
  if (name == "demo") {
    auto reg = c.RegisterModel(DemoSpec(), "demo");
    if (!reg.ok()) return reg.status();
    return DemoSpec();
  }
  return absl::NotFoundError(
      absl::StrCat("unknown model \"", name, "\" (only \"demo\" is registered on demand)"));
}

struct Flags {
  std::map<std::string, std::string> values;

  std::string Get(const std::string& k, const std::string& def = "") const {
    auto it = values.find(k);
    return it == values.end() ? def : it->second;
  }
  absl::StatusOr<uint64_t> Number(const std::string& k, uint64_t def) const {
    auto it = values.find(k);
    if (it == values.end()) return def;
    uint64_t v;
    if (!absl::SimpleAtoi(it->second, &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", k, " needs a non-negative number, got \"", it->second, "\""));
    }
    return v;
  }
};

int RandomCommand(client::Client& c, const std::string& cmd, const Flags& f) {
  const std::string model = f.Get("model");
  if (model.empty()) return Fail(absl::InvalidArgumentError(cmd + " needs --model NAME"));
  auto n_tokens = f.Number("tokens", 0);
  if (!n_tokens.ok()) return Fail(n_tokens.status());
  auto seed = f.Number("seed", 1);
  if (!seed.ok()) return Fail(seed.status());
  auto spec = ResolveModel(c, model);
  if (!spec.ok()) return Fail(spec.status());
  const std::string tenant = f.Get("tenant");
  const std::vector<int32_t> tokens = RandomTokens(*seed, *n_tokens);
  const uint32_t bt = spec->block_tokens();
  const uint32_t blocks = static_cast<uint32_t>(tokens.size() / bt);

  if (cmd == "lookup-random") {
    auto r = c.Lookup(model, tenant, tokens);
    if (!r.ok()) return Fail(r.status());
    std::cout << "matched " << r->matched_tokens() << " of " << tokens.size() << " tokens ("
              << r->blocks_size() << " blocks)\n";
    return 0;
  }
  const std::vector<uint8_t> kv = RandomKv(*spec, *seed, blocks);
  if (cmd == "put-random") {
    if (blocks == 0) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--tokens ", tokens.size(), " is less than one block of ", bt)));
    }
    client::PutArgs args;
    args.model = model;
    args.tenant = tenant;
    args.tokens.assign(tokens.begin(), tokens.begin() + uint64_t{blocks} * bt);
    auto r = c.Put(args, client::KvView{kv, client::KvShape::Of(*spec, blocks)});
    if (!r.ok()) return Fail(r.status());
    std::cout << "stored " << r->blocks_stored() << " blocks, " << r->blocks_existing()
              << " already cached (" << uint64_t{blocks} * bt << " tokens, " << kv.size()
              << " bytes)";
    if (tokens.size() % bt != 0) {
      std::cout << "; the last " << tokens.size() % bt << " tokens fill no block";
    }
    std::cout << "\n";
    return 0;
  }
  // get-random: fetch and compare with the seed's bytes.
  auto streams = f.Number("streams", 1);
  if (!streams.ok()) return Fail(streams.status());
  client::GetArgs args;
  args.model = model;
  args.tenant = tenant;
  args.tokens = tokens;
  args.streams = static_cast<uint32_t>(std::min<uint64_t>(*streams, 64));
  auto r = c.Get(args);
  if (!r.ok()) return Fail(r.status());
  const size_t got = r->data.size();
  const bool same = got <= kv.size() && std::memcmp(r->data.data(), kv.data(), got) == 0;
  std::cout << "got " << r->header.blocks() << " blocks (" << r->header.matched_tokens()
            << " tokens, " << got << " bytes): " << (same ? "bytes match" : "BYTES DIFFER") << "\n";
  return same ? 0 : 1;
}

int Run(int argc, char** argv) {
  std::string addr = "127.0.0.1:50051";
  std::string cmd;
  Flags flags;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help" || a == "help") {
      std::cout << kUsage;
      return 0;
    }
    if (a.rfind("--", 0) == 0) {
      std::string key = a.substr(2), value;
      if (auto eq = key.find('='); eq != std::string::npos) {
        value = key.substr(eq + 1);
        key = key.substr(0, eq);
      } else if (i + 1 < argc) {
        value = argv[++i];
      } else {
        std::cerr << "ropekv: --" << key << " needs a value\n" << kUsage;
        return 2;
      }
      if (key == "addr") {
        addr = value;
      } else {
        flags.values[key] = value;
      }
    } else if (cmd.empty()) {
      cmd = a;
    } else {
      std::cerr << "ropekv: unexpected argument \"" << a << "\"\n" << kUsage;
      return 2;
    }
  }
  if (cmd.empty()) {
    std::cerr << kUsage;
    return 2;
  }
  client::Client::Options options;
  options.address = addr;
  auto c = client::Client::Connect(options);
  if (!c.ok()) return Fail(c.status());
  client::Client& cl = **c;

  if (cmd == "health") {
    if (auto s = cl.Health(); !s.ok()) return Fail(s);
    std::cout << "SERVING\n";
    return 0;
  }
  if (cmd == "stats") {
    auto s = cl.Stats();
    if (!s.ok()) return Fail(s.status());
    std::printf("%-6s %14s %14s %8s %7s %10s %10s %10s %10s %10s %14s %8s\n", "tier", "used",
                "capacity", "blocks", "pinned", "hits", "misses", "evictions", "promoted",
                "demoted", "bytes moved", "corrupt");
    for (const v1::TierStats& t : s->tiers()) {
      std::string tier = v1::Tier_Name(t.tier()).substr(5);
      std::printf(
          "%-6s %14llu %14llu %8llu %7llu %10llu %10llu %10llu %10llu %10llu %14llu %8llu\n",
          tier.c_str(), (unsigned long long)t.bytes_used(), (unsigned long long)t.capacity_bytes(),
          (unsigned long long)t.blocks(), (unsigned long long)t.pinned_blocks(),
          (unsigned long long)t.hits(), (unsigned long long)t.misses(),
          (unsigned long long)t.evictions(), (unsigned long long)t.promotions(),
          (unsigned long long)t.demotions(), (unsigned long long)t.bytes_moved(),
          (unsigned long long)t.corrupt_blocks());
    }
    std::printf(
        "models %u, lookups %llu (hit tokens %llu, miss tokens %llu), puts %llu, gets %llu,"
        " bytes in %llu, bytes out %llu, block hashes from the prompt memo %llu\n",
        s->models(), (unsigned long long)s->lookups(), (unsigned long long)s->lookup_hit_tokens(),
        (unsigned long long)s->lookup_miss_tokens(), (unsigned long long)s->puts(),
        (unsigned long long)s->gets(), (unsigned long long)s->bytes_in(),
        (unsigned long long)s->bytes_out(), (unsigned long long)s->prompt_blocks_reused());
    return 0;
  }
  if (cmd == "models") {
    auto models = cl.ListModels();
    if (!models.ok()) return Fail(models.status());
    std::printf("%-16s %-12s %6s %8s %8s %5s %6s %10s %8s\n", "id", "names", "layers", "kv_heads",
                "head_dim", "dtype", "block", "block_B", "blocks");
    for (const v1::ModelInfo& m : *models) {
      std::string names;
      for (const std::string& n : m.names()) names += (names.empty() ? "" : ",") + n;
      const v1::ModelSpec& s = m.spec();
      std::printf("%-16s %-12s %6u %8u %8u %5s %6u %10llu %8llu\n", m.model_id().c_str(),
                  names.empty() ? "-" : names.c_str(), s.layers(), s.kv_heads(), s.head_dim(),
                  v1::DType_Name(s.dtype()).substr(6).c_str(), s.block_tokens(),
                  (unsigned long long)m.block_bytes(), (unsigned long long)m.blocks());
    }
    return 0;
  }
  if (cmd == "put-random" || cmd == "lookup-random" || cmd == "get-random") {
    return RandomCommand(cl, cmd, flags);
  }
  if (cmd == "evict") {
    const std::string model = flags.Get("model");
    if (model.empty()) return Fail(absl::InvalidArgumentError("evict needs --model NAME"));
    auto n = cl.Evict(model, flags.Get("tenant"), {});
    if (!n.ok()) return Fail(n.status());
    std::cout << "evicted " << *n << " blocks\n";
    return 0;
  }
  if (cmd == "bench") {
    BenchOptions o;
    auto blocks = flags.Number("blocks", o.blocks);
    auto lookups = flags.Number("lookups", o.lookups);
    if (!blocks.ok()) return Fail(blocks.status());
    if (!lookups.ok()) return Fail(lookups.status());
    o.blocks = static_cast<uint32_t>(*blocks);
    o.lookups = static_cast<uint32_t>(*lookups);
    o.redis = flags.Get("redis");
    if (auto s = RunBench(cl, o); !s.ok()) return Fail(s);
    return 0;
  }
  std::cerr << "ropekv: unknown command \"" << cmd << "\"\n" << kUsage;
  return 2;
}

}  // namespace
}  // namespace ropekv::cli

int main(int argc, char** argv) { return ropekv::cli::Run(argc, argv); }
