// editor_loop: the editor loop of a code-completion server over ropekvd's Sessions API.
//
//   ropekvd --listen=127.0.0.1:50051 &
//   editor_loop --address=127.0.0.1:50051 --file=some_source.cc --edits=10
//
// The "file" is tokenized as bytes. The frontend here is a stand-in whose KV depends only on each
// token and its position (like a model's first layer): keys are a per-token vector rotated by
// RoPE at the token's position, values a per-token vector. That lets the example check what it
// gets: after every edit, the KV read from the session must equal re-encoding the edited file
// (keys within 2 bf16 ulp, values bit for bit), while only the new tokens were encoded.
//
// Loop: Open(file, KV) -> [user edits a line] -> Edit(replace line) -> Fill(new tokens' KV)
// -> Read(the whole file's KV, suffix keys re-rotated once) -> next-token prediction.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "clients/cpp/client.h"
#include "clients/cpp/session_client.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rope.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "ropekvd HOST:PORT");
ABSL_FLAG(std::string, file, "", "source file to open (default: a generated one)");
ABSL_FLAG(int, edits, 8, "one-line edits to make");
ABSL_FLAG(uint64_t, seed, 1, "seed of the edits");

namespace {

using ropekv::DType;
using ropekv::client::Range;
using ropekv::client::ReplaceOp;
using ropekv::client::SessionClient;
namespace v1 = ropekv::v1;

constexpr int kLayers = 2, kHeads = 2, kDim = 64, kBlock = 16;

v1::ModelSpec Spec() {
  v1::ModelSpec s;
  s.set_layers(kLayers);
  s.set_kv_heads(kHeads);
  s.set_head_dim(kDim);
  s.set_dtype(v1::DTYPE_BF16);
  s.set_block_tokens(kBlock);
  s.mutable_rope()->set_theta(10000);
  return s;
}

ropekv::RopeSpec Rope() {
  ropekv::RopeSpec r;
  r.head_dim = kDim;
  r.theta = 10000;
  return r;
}

// A deterministic value in [-1, 1) for (token, layer, k|v, head, dim).
float Feature(int32_t token, int layer, int kv, int head, int dim) {
  uint64_t x = (static_cast<uint64_t>(token) << 32) ^ (layer << 24) ^ (kv << 20) ^ (head << 16) ^
               static_cast<uint64_t>(dim);
  x = (x ^ (x >> 33)) * 0xff51afd7ed558ccdull;
  x = (x ^ (x >> 33)) * 0xc4ceb9fe1a85ec53ull;
  return static_cast<float>((x >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

// The stand-in frontend: KV of tokens[a, b) at positions a.. in range layout
// [layer][k|v][head][b - a][dim], bf16, keys rotated once by RoPE (as a frontend caches them).
std::vector<uint8_t> Encode(const std::vector<int32_t>& tokens, int64_t a, int64_t b) {
  const int64_t n = b - a;
  std::vector<uint8_t> out(static_cast<size_t>(kLayers) * 2 * kHeads * n * kDim * 2);
  std::vector<uint16_t> rows(static_cast<size_t>(n) * kHeads * kDim);  // [n][head][dim]
  std::vector<int64_t> positions(n);
  for (int64_t i = 0; i < n; ++i) positions[i] = a + i;
  for (int l = 0; l < kLayers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t i = 0; i < n; ++i) {
        for (int h = 0; h < kHeads; ++h) {
          for (int d = 0; d < kDim; ++d) {
            rows[(i * kHeads + h) * kDim + d] =
                ropekv::FloatToBFloat16(Feature(tokens[a + i], l, kv, h, d));
          }
        }
      }
      if (kv == 0 && n > 0) {
        ropekv::ApplyRopeCpu(Rope(), ropekv::kBaseTable, DType::kBF16, n, kHeads, rows.data(),
                             positions.data())
            .IgnoreError();
      }
      uint16_t* dst = reinterpret_cast<uint16_t*>(out.data());
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t i = 0; i < n; ++i) {
          std::copy_n(&rows[(i * kHeads + h) * kDim], kDim,
                      &dst[(((static_cast<size_t>(l) * 2 + kv) * kHeads + h) * n + i) * kDim]);
        }
      }
    }
  }
  return out;
}

// Range layout -> block layout (what Open takes), the last block padded with zeros.
std::vector<uint8_t> ToBlocks(const std::vector<uint8_t>& kv, int64_t n) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const size_t row = kDim * 2;
  const int rows = kLayers * 2 * kHeads;
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * rows * kBlock * row, 0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < kBlock && b * kBlock + t < n; ++t) {
        std::copy_n(&kv[(static_cast<size_t>(r) * n + b * kBlock + t) * row], row,
                    &out[((static_cast<size_t>(b) * rows + r) * kBlock + t) * row]);
      }
    }
  }
  return out;
}

// Worst key error (bf16 ulps of the pair's larger element) and whether values are identical.
std::pair<double, bool> Compare(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                                int64_t n) {
  double worst = 0;
  bool values_equal = true;
  for (int l = 0; l < kLayers; ++l) {
    for (int h = 0; h < kHeads; ++h) {
      for (int64_t t = 0; t < n; ++t) {
        const size_t k_row = (((static_cast<size_t>(l) * 2) * kHeads + h) * n + t) * kDim;
        const size_t v_row = (((static_cast<size_t>(l) * 2 + 1) * kHeads + h) * n + t) * kDim;
        for (int d = 0; d < kDim / 2; ++d) {
          const double g1 = ropekv::LoadAsFloat(got.data(), k_row + d, DType::kBF16);
          const double g2 = ropekv::LoadAsFloat(got.data(), k_row + d + kDim / 2, DType::kBF16);
          const double w1 = ropekv::LoadAsFloat(want.data(), k_row + d, DType::kBF16);
          const double w2 = ropekv::LoadAsFloat(want.data(), k_row + d + kDim / 2, DType::kBF16);
          const double ulp = ropekv::UlpOf(
              DType::kBF16, std::max({std::fabs(g1), std::fabs(g2), std::fabs(w1), std::fabs(w2)}));
          worst = std::max(worst, std::max(std::fabs(g1 - w1), std::fabs(g2 - w2)) / ulp);
        }
        values_equal =
            values_equal && std::equal(&got[v_row * 2], &got[(v_row + kDim) * 2], &want[v_row * 2]);
      }
    }
  }
  return {worst, values_equal};
}

std::string DefaultFile() {
  std::ostringstream s;
  for (int i = 0; i < 60; ++i) {
    s << "int f" << i << "(int x) { return x * " << i << " + " << (i * 7) % 13 << "; }\n";
  }
  return s.str();
}

double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int Run() {
  std::string text = DefaultFile();
  if (const std::string path = absl::GetFlag(FLAGS_file); !path.empty()) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      std::cerr << "editor_loop: cannot read " << path << "\n";
      return 1;
    }
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::vector<int32_t> tokens(text.begin(), text.end());  // byte tokens

  ropekv::client::Client::Options o;
  o.address = absl::GetFlag(FLAGS_address);
  auto kv_client = ropekv::client::Client::Connect(o);
  auto sessions = SessionClient::Connect(o);
  if (!kv_client.ok() || !sessions.ok()) {
    std::cerr << "editor_loop: " << kv_client.status() << " " << sessions.status() << "\n";
    return 1;
  }
  auto reg = (*kv_client)->RegisterModel(Spec(), "editor-demo");
  if (!reg.ok()) {
    std::cerr << "editor_loop: RegisterModel: " << reg.status() << "\n";
    return 1;
  }

  // 1. Open: the file was prefilled once; its KV goes to the session.
  const int64_t n0 = static_cast<int64_t>(tokens.size());
  ropekv::client::OpenArgs open;
  open.model = "editor-demo";
  open.tokens = tokens;
  auto opened = (*sessions)->Open(open, ToBlocks(Encode(tokens, 0, n0), n0));
  if (!opened.ok()) {
    std::cerr << "editor_loop: Open: " << opened.status() << "\n";
    return 1;
  }
  const std::string id = opened->session_id();
  std::cout << "opened session " << id << ": " << n0 << " tokens\n";
  std::cout << "edit  line  length  new  encoded  edit_ms  fill_ms  read_ms  key_ulp  values\n";

  std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
  int failures = 0;
  for (int e = 0; e < absl::GetFlag(FLAGS_edits); ++e) {
    // 2. The user rewrites one line: a Replace of the line's tokens.
    std::vector<int64_t> starts = {0};
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == '\n') starts.push_back(static_cast<int64_t>(i) + 1);
    }
    const size_t line = rng() % starts.size();
    const int64_t a = starts[line];
    const int64_t b = line + 1 < starts.size() ? starts[line + 1] - 1 : tokens.size();
    const std::string new_line = absl::StrCat("  auto v", e, " = compute(", rng() % 1000, ");");
    std::vector<int32_t> new_tokens(new_line.begin(), new_line.end());

    const auto t0 = std::chrono::steady_clock::now();
    auto edit = (*sessions)->Edit(id, {ReplaceOp(a, b, new_tokens)});
    const auto t1 = std::chrono::steady_clock::now();
    if (!edit.ok()) {
      std::cerr << "editor_loop: Edit: " << edit.status() << "\n";
      return 1;
    }
    tokens.erase(tokens.begin() + a, tokens.begin() + b);
    tokens.insert(tokens.begin() + a, new_tokens.begin(), new_tokens.end());

    // 3. The frontend encodes only the ranges the session names, and fills them.
    int64_t encoded = 0;
    for (const v1::TokenRange& r : edit->fill()) {
      auto f = (*sessions)->Fill(id, r, Encode(tokens, r.start(), r.end()));
      if (!f.ok()) {
        std::cerr << "editor_loop: Fill: " << f.status() << "\n";
        return 1;
      }
      encoded += r.end() - r.start();
    }
    const auto t2 = std::chrono::steady_clock::now();

    // 4. The whole file's KV, suffix keys at their new positions, ready for the next token.
    auto read = (*sessions)->Read(id);
    const auto t3 = std::chrono::steady_clock::now();
    if (!read.ok()) {
      std::cerr << "editor_loop: Read: " << read.status() << "\n";
      return 1;
    }
    const int64_t n = static_cast<int64_t>(tokens.size());
    const auto [ulp, values_equal] = Compare(read->data, Encode(tokens, 0, n), n);
    failures += (ulp > 2.0 || !values_equal) ? 1 : 0;
    std::printf("%4d  %4zu  %6lld  %3zu  %7lld  %7.2f  %7.2f  %7.2f  %7.1f  %s\n", e, line,
                static_cast<long long>(n), new_tokens.size(), static_cast<long long>(encoded),
                Ms(t0, t1), Ms(t1, t2), Ms(t2, t3), ulp, values_equal ? "exact" : "DIFFER");
  }
  if (auto s = (*sessions)->Close(id); !s.ok()) std::cerr << "editor_loop: Close: " << s << "\n";
  std::cout << (failures == 0 ? "every read matched a full re-encode\n"
                              : "some reads did NOT match a re-encode\n");
  return failures == 0 ? 0 : 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("editor_loop: PIE edits of an open file over ropekvd's Sessions");
  absl::ParseCommandLine(argc, argv);
  return Run();
}
