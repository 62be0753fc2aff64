// Speed of the reference frontend (clients/llama) on the CPU: prefill of N bytes of real Python
// code with the trained code-byte-9m model, and decode (one token per call over the prefilled
// cache), per thread count and cache dtype. Prints a table and one JSON line.
//
//   llama_prefill_bench [--model DIR] [--bytes N] [--reps R] [--decode D]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "clients/llama/cpu_ops.h"
#include "clients/llama/llama_model.h"

namespace {

using ropekv::DType;
using ropekv::llama::KvCache;
using ropekv::llama::LlamaModel;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

std::string Text(size_t n) {
  // Real code where the machine has it (Debian's Python); otherwise this file's own pattern.
  for (const char* path :
       {"/usr/lib/python3.11/textwrap.py", "/usr/lib/python3/dist-packages/six.py"}) {
    std::ifstream in(path, std::ios::binary);
    if (!in) continue;
    std::stringstream ss;
    ss << in.rdbuf();
    std::string s = ss.str();
    while (s.size() < n) s += s;
    return s.substr(0, n);
  }
  std::string s;
  for (int i = 0; s.size() < n; ++i) {
    s += absl::StrCat("def f", i, "(x):\n    return x * ", i, " + 1\n\n");
  }
  return s.substr(0, n);
}

double GemmGflops(int threads) {
  const int64_t n = 1000, in = 384, out = 1024;
  std::vector<float> x(n * in, 0.5f), w(in * out, 0.25f), y(n * out);
  std::vector<double> t;
  for (int r = 0; r < 7; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    ropekv::llama::MatmulF32(x.data(), w.data(), n, in, out, y.data(), threads);
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 2.0 * n * in * out / Median(t) / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = std::string(ROPEKV_SOURCE_DIR) + "/tests/data/models/code-byte-9m";
  int64_t bytes = 1000;
  int reps = 5, decode = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--model")) dir = argv[i + 1];
    if (!std::strcmp(argv[i], "--bytes")) bytes = std::atoll(argv[i + 1]);
    if (!std::strcmp(argv[i], "--reps")) reps = std::atoi(argv[i + 1]);
    if (!std::strcmp(argv[i], "--decode")) decode = std::atoi(argv[i + 1]);
  }
  const std::string text = Text(static_cast<size_t>(bytes));
  std::vector<int32_t> tokens(text.begin(), text.end());
  for (int32_t& t : tokens) t &= 0xff;
  std::vector<int64_t> positions(tokens.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(i);

  const int hw = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<int> thread_counts = {1};
  if (hw > 1) thread_counts.push_back(hw);

  std::printf("reference frontend (clients/llama), model %s, %lld bytes, %d reps, %d hw threads\n",
              dir.c_str(), static_cast<long long>(bytes), reps, hw);
  std::printf("%-8s %-6s %14s %14s %16s %14s\n", "threads", "cache", "prefill_ms", "prefill_tok/s",
              "decode_ms/token", "gemm_GFLOP/s");
  std::string json =
      "{\"bench\":\"llama_prefill\",\"bytes\":" + std::to_string(bytes) + ",\"rows\":[";
  bool first_row = true;
  for (int threads : thread_counts) {
    LlamaModel::Options o;
    o.threads = threads;
    auto model = LlamaModel::Load(dir, o);
    if (!model.ok()) {
      std::fprintf(stderr, "load failed: %s\n", std::string(model.status().message()).c_str());
      return 1;
    }
    const double gflops = GemmGflops(threads);
    for (DType dt : {DType::kF32, DType::kBF16}) {
      std::vector<double> prefill, dec;
      for (int r = 0; r < reps; ++r) {
        auto cache = (*model)->NewCache(dt);
        auto t0 = std::chrono::steady_clock::now();
        auto logits = (*model)->Prefill(tokens, positions, cache->get());
        prefill.push_back(
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        if (!logits.ok()) {
          std::fprintf(stderr, "prefill failed: %s\n",
                       std::string(logits.status().message()).c_str());
          return 1;
        }
        if (r == 0) {
          // Decode: greedy, one token per call over the prefilled cache.
          const int64_t V = (*model)->config().vocab_size;
          int32_t next = static_cast<int32_t>(std::max_element(logits->end() - V, logits->end()) -
                                              (logits->end() - V));
          for (int s = 0; s < decode; ++s) {
            const int64_t pos = bytes + s;
            auto t1 = std::chrono::steady_clock::now();
            auto l = (*model)->Prefill({&next, 1}, {&pos, 1}, cache->get());
            dec.push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count());
            if (!l.ok()) return 1;
            next = static_cast<int32_t>(std::max_element(l->begin(), l->end()) - l->begin());
          }
        }
      }
      const double p = Median(prefill), d = dec.empty() ? 0 : Median(dec);
      std::printf("%-8d %-6s %14.1f %14.0f %16.2f %14.1f\n", threads,
                  std::string(ropekv::DTypeName(dt)).c_str(), p * 1e3, bytes / p, d * 1e3, gflops);
      json += absl::StrCat(first_row ? "" : ",", "{\"threads\":", threads, ",\"cache\":\"",
                           ropekv::DTypeName(dt), "\",\"prefill_ms\":", p * 1e3,
                           ",\"prefill_tokens_per_s\":", bytes / p,
                           ",\"decode_ms_per_token\":", d * 1e3, ",\"gemm_gflops\":", gflops, "}");
      first_row = false;
    }
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}
