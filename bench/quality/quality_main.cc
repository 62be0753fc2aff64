// quality: the end-to-end quality suite (issue 9) with the trained code-byte-9m model — PIE vs
// full re-encode / naive / stale, budgeted repair, prompt modules, APE and top-k — printed as
// Markdown tables and one JSON line. See docs/quality.md.
//
//   quality --samples=200 --threads=2
//   quality --experiments=pie --pie_samples=400 --max_seconds=600
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/quality/suite.h"

ABSL_FLAG(std::string, model_dir, ROPEKV_SOURCE_DIR "/tests/data/models/code-byte-9m",
          "model directory (config.json + safetensors)");
ABSL_FLAG(std::string, corpus, "/usr/lib/python3.11", "root of the Python files");
ABSL_FLAG(std::string, experiments, "pie,topk,modules,ape", "experiments to run, in this order");
ABSL_FLAG(int, samples, 32, "samples of every experiment (unless its own flag says otherwise)");
ABSL_FLAG(int, pie_samples, -1, "PIE windows (-1: --samples)");
ABSL_FLAG(int, topk_samples, -1, "top-k samples (-1: --samples)");
ABSL_FLAG(int, module_samples, -1, "module prompts (-1: --samples)");
ABSL_FLAG(int, ape_samples, -1, "APE samples (-1: --samples)");
ABSL_FLAG(int, threads, 0, "samples in flight (0: hardware threads)");
ABSL_FLAG(uint64_t, seed, 1, "picks files, windows and edits");
ABSL_FLAG(double, max_seconds, 0, "per experiment: stop starting samples after this (0: none)");
ABSL_FLAG(std::string, dtype, "f32", "KV cache element type: f32, bf16 or f16");
ABSL_FLAG(std::string, repair, "0,8,32,128", "repair budgets (tokens after each edit)");
ABSL_FLAG(std::string, budgets, "32,64,128,256", "top-k budgets");
ABSL_FLAG(int64_t, sink, 4, "top-k sink tokens");
ABSL_FLAG(int64_t, local, 16, "top-k local window");
ABSL_FLAG(int, ape_k, 3, "APE: definitions encoded in parallel");
ABSL_FLAG(std::string, ape_t, "1,0.9,0.8,0.6", "APE temperatures T");
ABSL_FLAG(std::string, ape_s, "1,0.9,0.8", "APE scales S");
ABSL_FLAG(std::string, json_out, "", "also write the JSON line to this file");

namespace {

template <typename T>
std::optional<std::vector<T>> ParseList(const std::string& s) {
  std::vector<T> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    T v;
    bool ok;
    if constexpr (std::is_same_v<T, float>) {
      ok = absl::SimpleAtof(part, &v);
    } else {
      ok = absl::SimpleAtoi(part, &v);
    }
    if (!ok) return std::nullopt;
    out.push_back(v);
  }
  return out;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "quality: %s\n", what.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("End-to-end quality suite of ropekv with code-byte-9m");
  absl::ParseCommandLine(argc, argv);
  using ropekv::quality::SuiteOptions;
  SuiteOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model_dir);
  o.corpus_root = absl::GetFlag(FLAGS_corpus);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.threads = absl::GetFlag(FLAGS_threads);
  if (o.threads == 0)
    o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  o.max_seconds = absl::GetFlag(FLAGS_max_seconds);
  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  if (dtype == "f32") {
    o.dtype = ropekv::DType::kF32;
  } else if (dtype == "bf16") {
    o.dtype = ropekv::DType::kBF16;
  } else if (dtype == "f16") {
    o.dtype = ropekv::DType::kF16;
  } else {
    return Fail("--dtype must be f32, bf16 or f16, got " + dtype);
  }
  auto repair = ParseList<int64_t>(absl::GetFlag(FLAGS_repair));
  auto budgets = ParseList<int64_t>(absl::GetFlag(FLAGS_budgets));
  auto ts = ParseList<float>(absl::GetFlag(FLAGS_ape_t));
  auto ss = ParseList<float>(absl::GetFlag(FLAGS_ape_s));
  if (!repair || !budgets || !ts || !ss) {
    return Fail("--repair, --budgets, --ape_t and --ape_s are comma-separated numbers");
  }
  o.repair = *repair;
  o.topk_budgets = *budgets;
  o.topk_sink = absl::GetFlag(FLAGS_sink);
  o.topk_local = absl::GetFlag(FLAGS_local);
  o.ape_k = absl::GetFlag(FLAGS_ape_k);
  o.ape_temperatures = *ts;
  o.ape_scales = *ss;

  auto suite = ropekv::quality::Suite::Create(o);
  if (!suite.ok()) return Fail(suite.status().ToString());
  std::printf("quality: model %s, %zu Python files under %s, seed %llu, %d threads, %s KV\n\n",
              o.model_dir.c_str(), (*suite)->corpus_files(), o.corpus_root.c_str(),
              static_cast<unsigned long long>(o.seed), o.threads, dtype.c_str());
  std::fflush(stdout);

  const int samples = absl::GetFlag(FLAGS_samples);
  auto count = [&](int own) { return own >= 0 ? own : samples; };
  std::optional<ropekv::quality::PieResults> pie;
  std::optional<ropekv::quality::TopkResults> topk;
  std::optional<ropekv::quality::ModuleResults> modules;
  std::optional<ropekv::quality::ApeResults> ape;
  for (absl::string_view e :
       absl::StrSplit(absl::GetFlag(FLAGS_experiments), ',', absl::SkipEmpty())) {
    std::string table;
    if (e == "pie") {
      auto r = (*suite)->RunPie(count(absl::GetFlag(FLAGS_pie_samples)));
      if (!r.ok()) return Fail(r.status().ToString());
      pie = *r;
      table = ropekv::quality::FormatPie(*pie);
    } else if (e == "topk") {
      auto r = (*suite)->RunTopk(count(absl::GetFlag(FLAGS_topk_samples)));
      if (!r.ok()) return Fail(r.status().ToString());
      topk = *r;
      table = ropekv::quality::FormatTopk(*topk);
    } else if (e == "modules") {
      auto r = (*suite)->RunModules(count(absl::GetFlag(FLAGS_module_samples)));
      if (!r.ok()) return Fail(r.status().ToString());
      modules = *r;
      table = ropekv::quality::FormatModules(*modules);
    } else if (e == "ape") {
      auto r = (*suite)->RunApe(count(absl::GetFlag(FLAGS_ape_samples)));
      if (!r.ok()) return Fail(r.status().ToString());
      ape = *r;
      table = ropekv::quality::FormatApe(*ape);
    } else {
      return Fail("unknown experiment '" + std::string(e) + "' (pie, topk, modules, ape)");
    }
    std::printf("%s\n", table.c_str());
    std::fflush(stdout);
  }
  const std::string json =
      ropekv::quality::ToJson(o, pie ? &*pie : nullptr, topk ? &*topk : nullptr,
                              modules ? &*modules : nullptr, ape ? &*ape : nullptr);
  std::printf("%s\n", json.c_str());
  const std::string json_out = absl::GetFlag(FLAGS_json_out);
  if (!json_out.empty()) {
    std::ofstream out(json_out, std::ios::trunc);
    out << json << "\n";
    if (!out.good()) return Fail("cannot write " + json_out);
  }
  return 0;
}
