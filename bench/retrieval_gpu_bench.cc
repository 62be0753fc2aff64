// Benchmark: one Select through RetrievalStore (cache/retrieval.h) on the CPU path (device -1,
// SelectCpu) and on the GPU path (device 0: keys / page metadata packed into device memory, then
// SelectCuda), over the same in-process cache: a Llama-3-8B-shaped model (8 KV heads, head_dim 128,
// bf16, 16-token blocks, llama3 rope; --layers of it stored), 32 query heads, k 256, 4 sink and 64
// local tokens, over a cached prefix (blocked keys read in place) and an editor session of the same
// tokens (its keys read in place where they sit at their own positions, SessionReader re-rotating
// the others; a GPU session's downloaded). Wall clock around RetrievalStore::Select (resolving the
// source, metadata lookups, copies and the kernel all included): median and min of --reps after
// one warm-up. Rows bound_after_edit / bound_after_append: a BOUND Select after each of --reps
// editor steps (one token inserted at the session's middle and filled, untimed: the moved pages'
// metadata is re-derived) or decode steps (one token appended and filled). The GPU's selection is
// compared with the CPU's (rows equal). Prints a table and one JSON line. --pinned_host: the
// cache's host tier in pinned memory, as the daemon has it beside a GPU tier (the GPU path then
// reads a prefix's keys in place instead of copying them). --gpu_tier: Puts also land in a GPU
// tier on device 0 (write tier gpu), whose blocks the GPU path reads where they are. --cpu_only:
// the CPU path alone (a machine without a GPU).
// --session_device gpu: the session in GPU memory (EXACT on the GPU path then reads its keys
// there). --batch N: N prefixes of --tokens tokens each (a decode batch; the first is
// the prefix above), each its own queries, selected one Select after another against one
// RetrievalStore::Prepare each and one Run (one GPU pass), per mode; rows `batch_<mode>` (the
// cpu columns hold the one-after-another times, the gpu columns the batch's; on the GPU path, or
// with --cpu_only on the CPU path), and below each the batch's Prepare time.
//
//   retrieval_gpu_bench [--tokens 32768] [--reps 7] [--k 256] [--query_dtype f32|bf16]
//                       [--source prefix,session] [--pinned_host] [--gpu_tier] [--cpu_only]
//                       [--session_device cpu|gpu] [--batch N]
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "cache/gpu_tier.h"
#include "cache/kv_cache.h"
#include "cache/pinned_allocator.h"
#include "cache/retrieval.h"
#include "cache/session.h"
#include "kernels/common/dtype.h"

ABSL_FLAG(int32_t, tokens, 32768, "tokens of the prefix / session (a multiple of 16)");
ABSL_FLAG(int32_t, layers, 1, "layers stored (Select reads one)");
ABSL_FLAG(int32_t, query_heads, 32, "query heads (8 KV heads)");
ABSL_FLAG(int32_t, k, 256, "tokens to select besides sink and local ones");
ABSL_FLAG(int32_t, reps, 7, "timed Selects per row (after one warm-up)");
ABSL_FLAG(std::string, query_dtype, "f32", "dtype of the queries: f32 or bf16");
ABSL_FLAG(std::string, source, "prefix,session", "sources to time: prefix, session");
ABSL_FLAG(bool, pinned_host, false, "host tier in pinned memory (cudaHostAlloc)");
ABSL_FLAG(bool, gpu_tier, false, "Puts also land in a GPU tier on device 0 (write tier gpu)");
ABSL_FLAG(bool, cpu_only, false, "time the CPU path alone (no GPU needed)");
ABSL_FLAG(std::string, session_device, "cpu", "where the session's KV lives: cpu or gpu");
ABSL_FLAG(int32_t, batch, 0,
          "prefixes of a decode batch: Selects one by one vs one Prepare each "
          "and one Run");
ABSL_FLAG(bool, verify_metadata, true,
          "check prefix blocks' page metadata against their blocks' serials (the daemon's "
          "--retrieval_verify_metadata)");

namespace ropekv {
namespace {

struct Row {
  std::string source, mode;
  double cpu_ms = 0, cpu_min = 0, gpu_ms = 0, gpu_min = 0;
  bool same = false;
  uint64_t gpu_selects = 0;
};

// The median and the minimum of timed repetitions, into *med and *min.
void Summarise(std::vector<double> v, double* med, double* min) {
  std::sort(v.begin(), v.end());
  *med = v[v.size() / 2];
  *min = v.front();
}

// A timed row of the table (the GPU columns empty with --cpu_only).
void PrintRow(const Row& row, bool cpu_only) {
  std::printf("%-8s %-18s %12.2f %12.2f %12.2f %12.2f %7.1fx%s\n", row.source.c_str(),
              row.mode.c_str(), row.cpu_ms, row.cpu_min, row.gpu_ms, row.gpu_min,
              cpu_only ? 0.0 : row.cpu_ms / row.gpu_ms, row.same ? "" : "  (selections differ)");
  std::fflush(stdout);
}

const char* ModeName(topk::Mode mode) {
  return mode == topk::Mode::kExact   ? "exact"
         : mode == topk::Mode::kBound ? "bound"
                                      : "bound_then_exact";
}

// Puts `kv` as the prompt `tokens` of the bench's model. False when the cache refuses it.
bool PutPrompt(KvCache& cache, const std::vector<int32_t>& tokens, const std::string& kv) {
  PutOptions p;
  p.model = "llama-3-8b";
  p.tokens = tokens;
  auto w = cache.BeginPut(std::move(p));
  return w.ok() && (*w)->Write(kv).ok() && (*w)->Finish().ok();
}

int Main() {
  const int64_t n = absl::GetFlag(FLAGS_tokens);
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  ModelSpec spec;
  spec.layers = absl::GetFlag(FLAGS_layers);
  spec.kv_heads = 8;
  spec.head_dim = 128;
  spec.dtype = DType::kBF16;
  spec.block_tokens = 16;
  spec.rope.type = RopeType::kLlama3;
  spec.rope.head_dim = 128;
  spec.rope.theta = 500000;
  spec.rope.factor = 8;
  spec.rope.original_max_position_embeddings = 8192;
  const uint64_t kv_bytes = BlockBytes(spec) * static_cast<uint64_t>(n / spec.block_tokens);
  const int batch = absl::GetFlag(FLAGS_batch);

  KvCache::Options co;
  co.background_maintenance = false;
  co.host_capacity_bytes = (2 + std::max(batch - 1, 0)) * kv_bytes + (64ull << 20);
  if (absl::GetFlag(FLAGS_pinned_host)) {
    auto pinned = NewPinnedAllocator(co.host_capacity_bytes);
    if (!pinned.ok()) {
      return std::fprintf(stderr, "pinned: %s\n", pinned.status().ToString().c_str()), 1;
    }
    co.host_allocator = *std::move(pinned);
  }
  if (absl::GetFlag(FLAGS_gpu_tier)) {
    GpuTier::Options g;
    g.chunk_bytes = SlotAllocator::SlotSize(BlockBytes(spec));  // a block a chunk
    g.capacity_bytes =
        g.chunk_bytes * static_cast<uint64_t>(n / spec.block_tokens) * std::max(batch, 1);
    auto tier = GpuTier::Create(g);
    if (!tier.ok())
      return std::fprintf(stderr, "gpu tier: %s\n", tier.status().ToString().c_str()), 1;
    co.gpu = *std::move(tier);
    co.policy.write_tier = WriteTier::kGpu;
  }
  auto cache = KvCache::Create(std::move(co));
  if (!cache.ok()) return std::fprintf(stderr, "cache: %s\n", cache.status().ToString().c_str()), 1;
  if (auto reg = (*cache)->RegisterModel(spec, "llama-3-8b"); !reg.ok()) {
    return std::fprintf(stderr, "model: %s\n", reg.status().ToString().c_str()), 1;
  }
  SessionStore::Options so;
  auto session_device = ParseSessionDevice(absl::GetFlag(FLAGS_session_device));
  if (!session_device.ok()) {
    return std::fprintf(stderr, "%s\n", session_device.status().ToString().c_str()), 1;
  }
  so.device = *session_device;
  so.capacity_bytes = 2 * kv_bytes + (64ull << 20);
  auto sessions = SessionStore::Create(cache->get(), so);
  if (!sessions.ok()) return 1;
  RetrievalStore::Options ro;
  ro.verify_metadata = absl::GetFlag(FLAGS_verify_metadata);
  auto cpu = RetrievalStore::Create(cache->get(), sessions->get(), ro);
  ro.device = 0;
  auto gpu = RetrievalStore::Create(cache->get(), sessions->get(), ro);
  if (!cpu.ok()) return 1;
  const bool cpu_only = absl::GetFlag(FLAGS_cpu_only);
  if (!gpu.ok() && !cpu_only) {
    std::fprintf(stderr, "no GPU path: %s\n", gpu.status().ToString().c_str());
    return 1;
  }

  std::mt19937_64 rng(1);
  std::vector<int32_t> tokens(n);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % 128000);
  std::string kv(kv_bytes, '\0');
  {
    std::normal_distribution<float> normal(0.f, 1.f);
    for (uint64_t i = 0; i < kv_bytes / 2; ++i)
      StoreFromFloat(kv.data(), i, spec.dtype, normal(rng));
  }
  const absl::Time t0 = absl::Now();
  if (!PutPrompt(**cache, tokens, kv)) return std::fprintf(stderr, "put failed\n"), 1;
  std::fprintf(stderr, "put %lld tokens (%.0f MiB) in %.2f s\n", static_cast<long long>(n),
               kv_bytes / 1048576.0, absl::ToDoubleSeconds(absl::Now() - t0));
  OpenSessionArgs open;
  open.model = "llama-3-8b";
  open.tokens = tokens;
  auto session = (*sessions)->Open(open, kv);
  if (!session.ok())
    return std::fprintf(stderr, "session: %s\n", session.status().ToString().c_str()), 1;
  kv.clear();
  kv.shrink_to_fit();

  auto qdt = ParseDType(absl::GetFlag(FLAGS_query_dtype));
  if (!qdt.ok()) return 1;
  const int hq = absl::GetFlag(FLAGS_query_heads);
  std::string q(static_cast<size_t>(hq) * spec.head_dim * DTypeSize(*qdt), '\0');
  {
    std::normal_distribution<float> normal(0.f, 1.f);
    for (size_t i = 0; i < q.size() / DTypeSize(*qdt); ++i)
      StoreFromFloat(q.data(), i, *qdt, normal(rng));
  }

  std::vector<Row> rows;
  std::printf("%-8s %-18s %12s %12s %12s %12s %8s\n", "source", "mode", "cpu_med_ms", "cpu_min_ms",
              "gpu_med_ms", "gpu_min_ms", "speedup");
  const auto select_args = [&](absl::string_view source, topk::Mode mode) {
    SelectArgs a;
    if (source == "session") {
      a.source.session_id = session->id;
    } else {
      a.source.model = "llama-3-8b";
      a.source.tokens = tokens;
    }
    a.layer = 0;
    a.query_heads = hq;
    a.queries = q;
    a.query_dtype = *qdt;
    a.k = absl::GetFlag(FLAGS_k);
    a.n_sink = 4;
    a.n_local = 64;
    a.mode = mode;
    a.reduction = topk::GqaReduction::kMax;
    return a;
  };
  for (absl::string_view source : absl::StrSplit(absl::GetFlag(FLAGS_source), ',')) {
    for (topk::Mode mode : {topk::Mode::kExact, topk::Mode::kBound, topk::Mode::kBoundThenExact}) {
      const SelectArgs a = select_args(source, mode);
      Row row;
      row.source = std::string(source);
      row.mode = ModeName(mode);
      std::vector<int32_t> first_cpu, first_gpu;
      std::vector<RetrievalStore*> stores = {cpu->get()};
      if (!cpu_only) stores.push_back(gpu->get());
      for (RetrievalStore* store : stores) {
        std::vector<double> ms;
        for (int r = 0; r <= reps; ++r) {
          const absl::Time s = absl::Now();
          auto out = store->Select(a);
          const double t = absl::ToDoubleMilliseconds(absl::Now() - s);
          if (!out.ok()) {
            std::fprintf(stderr, "select: %s\n", out.status().ToString().c_str());
            return 1;
          }
          if (r == 0) {
            (store == cpu->get() ? first_cpu : first_gpu) = out->indices;
          } else {
            ms.push_back(t);
          }
        }
        if (store == cpu->get()) {
          Summarise(ms, &row.cpu_ms, &row.cpu_min);
        } else {
          Summarise(ms, &row.gpu_ms, &row.gpu_min);
        }
      }
      row.same = cpu_only || first_cpu == first_gpu;
      if (!cpu_only) row.gpu_selects = (*gpu)->stats().gpu_selects;
      PrintRow(row, cpu_only);
      rows.push_back(row);
    }
    // Gather of a kept selection at one layer (what the other layers of a step ask for; always on
    // the CPU): cpu columns only.
    SelectArgs a = select_args(source, topk::Mode::kExact);
    a.keep = true;
    auto kept = (*cpu)->Select(a);
    if (!kept.ok()) {
      std::fprintf(stderr, "select to keep: %s\n", kept.status().ToString().c_str());
      return 1;
    }
    std::vector<double> ms;
    for (int r = 0; r <= reps; ++r) {
      const absl::Time s = absl::Now();
      auto g = (*cpu)->Gather(kept->selection_id, 0);
      const double t = absl::ToDoubleMilliseconds(absl::Now() - s);
      if (!g.ok()) return std::fprintf(stderr, "gather: %s\n", g.status().ToString().c_str()), 1;
      if (r > 0) ms.push_back(t);
    }
    const auto gather_row = [&](const char* mode, const std::vector<double>& times) {
      Row row;
      row.source = std::string(source);
      row.mode = mode;
      Summarise(times, &row.cpu_ms, &row.cpu_min);
      row.same = true;
      std::printf("%-8s %-18s %12.2f %12.2f %12s %12s %8s\n", row.source.c_str(), row.mode.c_str(),
                  row.cpu_ms, row.cpu_min, "-", "-", "-");
      std::fflush(stdout);
      rows.push_back(row);
    };
    gather_row("gather", ms);
    if (spec.layers > 1) {
      // Every layer of the kept selection (a TidalDecode step's other layers), the source
      // acquired at each layer (gather_layers) or held once for all (gather_layers_held, as
      // DataPlane.GatherToBuffer does).
      auto sel = (*cpu)->FindSelection(kept->selection_id);
      if (!sel.ok()) return 1;
      std::string buf((*sel)->layer_bytes(), '\0');
      for (bool held : {false, true}) {
        ms.clear();
        for (int r = 0; r <= reps; ++r) {
          const absl::Time s = absl::Now();
          std::shared_ptr<const RetrievalStore::HeldSource> h;
          if (held) h = *(*cpu)->HoldSource(**sel);
          for (int l = 0; l < spec.layers; ++l) {
            const absl::Status st = held ? (*cpu)->GatherLayer(**sel, *h, l, buf.data())
                                         : (*cpu)->GatherLayer(**sel, l, buf.data());
            if (!st.ok()) return std::fprintf(stderr, "gather: %s\n", st.ToString().c_str()), 1;
          }
          const double t = absl::ToDoubleMilliseconds(absl::Now() - s);
          if (r > 0) ms.push_back(t);
        }
        gather_row(held ? "gather_layers_held" : "gather_layers", ms);
      }
    }
  }
  // An editor's step (one token inserted at the session's middle and filled; the keys after it
  // move, so half the pages' metadata is re-derived) or a decode step (one token appended and
  // filled), then a BOUND Select; the edit and Fill untimed. The same document for both paths.
  const auto step_row = [&](const char* name, bool append) -> bool {
    const SelectArgs a = select_args("session", topk::Mode::kBound);
    Row row;
    row.source = "session";
    row.mode = name;
    row.same = true;
    std::vector<double> cpu_ms, gpu_ms;
    std::string fill_kv(RangeBytes(spec, 1), '\0');
    std::normal_distribution<float> normal(0.f, 1.f);
    for (int r = 0; r <= reps; ++r) {
      auto info = (*sessions)->Info(session->id);
      if (!info.ok()) return false;
      const int64_t at = append ? info->length : info->length / 2;
      if (!(*sessions)->Edit(session->id, {EditOp::Insert(at, {7})}).ok()) return false;
      for (size_t i = 0; i < fill_kv.size() / 2; ++i) {
        StoreFromFloat(fill_kv.data(), i, spec.dtype, normal(rng));
      }
      FillArgs fill;
      fill.range = TokenRange{at, at + 1};
      if (!(*sessions)->Fill(session->id, fill, fill_kv).ok()) return false;
      std::vector<int32_t> first;
      for (RetrievalStore* store : {cpu->get(), cpu_only ? nullptr : gpu->get()}) {
        if (store == nullptr) continue;
        const absl::Time s = absl::Now();
        auto out = store->Select(a);
        const double t = absl::ToDoubleMilliseconds(absl::Now() - s);
        if (!out.ok()) {
          std::fprintf(stderr, "select: %s\n", out.status().ToString().c_str());
          return false;
        }
        if (r > 0) (store == cpu->get() ? cpu_ms : gpu_ms).push_back(t);
        if (store == cpu->get()) {
          first = out->indices;
        } else {
          row.same = row.same && first == out->indices;
        }
      }
    }
    Summarise(cpu_ms, &row.cpu_ms, &row.cpu_min);
    if (!cpu_only) Summarise(gpu_ms, &row.gpu_ms, &row.gpu_min);
    PrintRow(row, cpu_only);
    rows.push_back(row);
    return true;
  };
  if (absl::StrContains(absl::GetFlag(FLAGS_source), "session") &&
      (!step_row("bound_after_edit", false) || !step_row("bound_after_append", true))) {
    return std::fprintf(stderr, "editing the session failed\n"), 1;
  }
  if (batch > 1) {
    // The batch's other prefixes and every item's queries.
    std::vector<std::vector<int32_t>> prompts = {tokens};
    std::string more(kv_bytes, '\0');
    std::normal_distribution<float> normal(0.f, 1.f);
    for (int b = 1; b < batch; ++b) {
      prompts.emplace_back(n);
      for (auto& t : prompts.back()) t = static_cast<int32_t>(rng() % 128000);
      for (uint64_t i = 0; i < kv_bytes / 2; ++i) {
        StoreFromFloat(more.data(), i, spec.dtype, normal(rng));
      }
      if (!PutPrompt(**cache, prompts.back(), more)) {
        return std::fprintf(stderr, "put of the batch failed\n"), 1;
      }
    }
    // Each prefix named by its last block, as a frontend's decode loop does.
    std::vector<BlockHash> last_blocks;
    for (const std::vector<int32_t>& prompt : prompts) {
      auto found = (*cache)->Lookup("llama-3-8b", "", prompt);
      if (!found.ok() || found->blocks.empty()) return std::fprintf(stderr, "lookup failed\n"), 1;
      last_blocks.push_back(found->blocks.back().hash);
    }
    std::vector<std::string> queries(batch, q);
    for (std::string& qb : queries) {
      for (size_t i = 0; i < qb.size() / DTypeSize(*qdt); ++i) {
        StoreFromFloat(qb.data(), i, *qdt, normal(rng));
      }
    }
    // The three modes, then (m 3) exact over the first prefix `batch` times (warm in the caches).
    for (int m = 0; m < 4; ++m) {
      const topk::Mode mode = m == 1   ? topk::Mode::kBound
                              : m == 2 ? topk::Mode::kBoundThenExact
                                       : topk::Mode::kExact;
      std::vector<SelectArgs> items;
      for (int b = 0; b < batch; ++b) {
        items.push_back(select_args("prefix", mode));
        items.back().source.tokens.clear();
        items.back().source.last_block = last_blocks[m == 3 ? 0 : b];
        items.back().queries = queries[b];
      }
      Row row;
      row.source = "prefix";
      row.mode = absl::StrCat("batch", batch, m == 3 ? "_same_" : "_", ModeName(mode));
      row.same = true;
      std::vector<double> alone_ms, pass_ms, prepare_ms;
      RetrievalStore* store = cpu_only ? cpu->get() : gpu->get();
      for (int r = 0; r <= reps; ++r) {
        std::vector<std::vector<int32_t>> alone;
        absl::Time s = absl::Now();
        for (const SelectArgs& a : items) {
          auto out = store->Select(a);
          if (!out.ok()) return std::fprintf(stderr, "%s\n", out.status().ToString().c_str()), 1;
          alone.push_back(out->indices);
        }
        const double t_alone = absl::ToDoubleMilliseconds(absl::Now() - s);
        s = absl::Now();
        std::vector<std::shared_ptr<RetrievalStore::PreparedSelect>> prepared;
        for (const SelectArgs& a : items) {
          auto p = store->Prepare(a);
          if (!p.ok()) return std::fprintf(stderr, "%s\n", p.status().ToString().c_str()), 1;
          prepared.push_back(*std::move(p));
        }
        const absl::Time prepared_at = absl::Now();
        std::vector<absl::StatusOr<SelectOutput>> outs = store->Run(std::move(prepared));
        const double t_pass = absl::ToDoubleMilliseconds(absl::Now() - s);
        for (int b = 0; b < batch; ++b) {
          if (!outs[b].ok()) {
            return std::fprintf(stderr, "%s\n", outs[b].status().ToString().c_str()), 1;
          }
          row.same = row.same && outs[b]->indices == alone[b];
        }
        if (r > 0) {  // the first is the warm-up
          alone_ms.push_back(t_alone);
          pass_ms.push_back(t_pass);
          prepare_ms.push_back(absl::ToDoubleMilliseconds(prepared_at - s));
        }
      }
      Summarise(alone_ms, &row.cpu_ms, &row.cpu_min);
      Summarise(pass_ms, &row.gpu_ms, &row.gpu_min);
      PrintRow(row, false);
      double prep_med = 0, prep_min = 0;
      Summarise(prepare_ms, &prep_med, &prep_min);
      std::printf("%-8s %-18s %12s %12s %12.2f %12.2f  (of which Prepare)\n", "", "", "", "",
                  prep_med, prep_min);
      rows.push_back(row);
    }
  }
  const auto st = cpu_only ? RetrievalStore::Stats() : (*gpu)->stats();
  std::string json = absl::StrFormat(
      "{\"bench\":\"retrieval_gpu\",\"tokens\":%d,\"kv_heads\":8,\"query_heads\":%d,"
      "\"head_dim\":128,\"dtype\":\"bf16\",\"query_dtype\":\"%s\",\"k\":%d,\"reps\":%d,"
      "\"gpu_selects\":%d,\"gpu_fallbacks\":%d,\"rows\":[",
      n, hq, DTypeName(*qdt), absl::GetFlag(FLAGS_k), reps, st.gpu_selects, st.gpu_fallbacks);
  for (size_t i = 0; i < rows.size(); ++i) {
    absl::StrAppendFormat(&json,
                          "%s{\"source\":\"%s\",\"mode\":\"%s\",\"cpu_ms\":%.3f,\"gpu_ms\":%.3f,"
                          "\"cpu_min_ms\":%.3f,\"gpu_min_ms\":%.3f,\"same\":%s}",
                          i ? "," : "", rows[i].source, rows[i].mode, rows[i].cpu_ms,
                          rows[i].gpu_ms, rows[i].cpu_min, rows[i].gpu_min,
                          rows[i].same ? "true" : "false");
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ropekv::Main();
}
