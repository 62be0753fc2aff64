#include "bench/quality/suite.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "cache/compose.h"
#include "kernels/ape/ape.h"

namespace ropekv {
namespace quality {
namespace {

#define QUALITY_RETURN_IF_ERROR(expr)         \
  do {                                        \
    if (absl::Status _s = (expr); !_s.ok()) { \
      return _s;                              \
    }                                         \
  } while (0)

#define QUALITY_ASSIGN_OR_RETURN(lhs, expr)     \
  auto lhs##_or = (expr);                       \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = *std::move(lhs##_or)

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<int32_t> Bytes(absl::string_view s) {
  std::vector<int32_t> t(s.size());
  for (size_t i = 0; i < s.size(); ++i) t[i] = static_cast<unsigned char>(s[i]);
  return t;
}

std::vector<int64_t> Iota(int64_t n, int64_t start) {
  std::vector<int64_t> p(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) p[static_cast<size_t>(i)] = start + i;
  return p;
}

std::vector<int32_t> Slice(const std::vector<int32_t>& v, int64_t b, int64_t e) {
  return std::vector<int32_t>(v.begin() + b, v.begin() + e);
}

// Appends tokens [b, e) of src (K/V bytes as stored) to dst with the given ids and positions.
absl::Status AppendRange(const llama::KvCache& src, int64_t b, int64_t e,
                         absl::Span<const int32_t> ids, absl::Span<const int64_t> positions,
                         llama::KvCache* dst) {
  if (e <= b) return absl::OkStatus();
  std::vector<uint8_t> bytes(src.BytesFor(e - b));
  QUALITY_RETURN_IF_ERROR(src.ExportTokens(b, e, absl::MakeSpan(bytes)));
  return dst->AppendBytes(ids, positions, bytes);
}

// Runs fn(i) for i = 0, 1, ..., n - 1 on `threads` threads, claiming indices in order and
// stopping to claim once max_seconds (> 0) have passed. Returns how many ran (indices 0..m-1),
// or the first error.
absl::StatusOr<int> RunSamples(int n, int threads, double max_seconds,
                               const std::function<absl::Status(int)>& fn) {
  const Clock::time_point t0 = Clock::now();
  absl::Mutex mu;
  int next = 0;
  bool stop = false;
  absl::Status error;
  auto worker = [&] {
    for (;;) {
      int i;
      {
        absl::MutexLock lock(&mu);
        if (stop || next >= n) return;
        if (max_seconds > 0 && next > 0 && SecondsSince(t0) > max_seconds) {
          stop = true;
          return;
        }
        i = next++;
      }
      absl::Status s = fn(i);
      if (!s.ok()) {
        absl::MutexLock lock(&mu);
        if (error.ok())
          error = absl::Status(s.code(), absl::StrCat("sample ", i, ": ", s.message()));
        stop = true;
        return;
      }
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (!error.ok()) return error;
  return next;
}

// ----------------------------------------------------------------------------------------------
// Attention hooks.

// Attention restricted to the tokens a kernels/topk selection picks, per query token and layer,
// with the query's own layer query; collects index recall and captured mass.
class TopkHook : public AttentionHook {
 public:
  TopkHook(topk::Mode mode, int64_t budget, int64_t sink, int64_t local)
      : mode_(mode), budget_(budget), sink_(sink), local_(local) {}

  absl::Status Attend(const AttentionInputs& in, float* out) override {
    const int K = in.kv_heads, H = in.heads, d = in.head_dim, group = H / K;
    const int64_t pages_total = topk::NumPages(in.total);
    // [kv_heads][pages][2 * head_dim]: Quest page metadata of the tokens a query sees.
    std::vector<float> meta(static_cast<size_t>(K * pages_total * 2 * d));
    const topk::MutableMatrixView meta_out =
        topk::DenseMatrix<void*>(meta.data(), DType::kF32, pages_total, 2 * d);
    const topk::MatrixView meta_in =
        topk::DenseMatrix<const void*>(meta.data(), DType::kF32, pages_total, 2 * d);
    const topk::MatrixView keys = topk::DenseMatrix<const void*>(in.k, DType::kF32, in.total, d);
    std::vector<double> p, acc(static_cast<size_t>(d));
    for (int64_t i = 0; i < in.n; ++i) {
      const int64_t N = in.past + i + 1;
      const topk::PageMetaShape shape{K, d, N};
      if (mode_ != topk::Mode::kExact) {
        QUALITY_RETURN_IF_ERROR(i == 0 ? topk::BuildPageMetaCpu(keys, shape, meta_out)
                                       : topk::AppendPageMetaCpu(keys, shape, N - 1, meta_out));
      }
      topk::SelectRequest req;
      req.kv_heads = K;
      req.query_heads = H;
      req.head_dim = d;
      req.num_tokens = N;
      req.queries = in.q + i * H * d;
      req.query_dtype = DType::kF32;
      req.keys = keys;
      req.page_meta = meta_in;
      req.mode = mode_;
      req.reduction = topk::GqaReduction::kMax;
      req.k = budget_;
      req.n_sink = sink_;
      req.n_local = local_;
      const int64_t cap = topk::SelectCapacity(req);
      std::vector<int32_t> idx(static_cast<size_t>(K * cap)), counts(static_cast<size_t>(K));
      std::vector<float> mass(static_cast<size_t>(K));
      QUALITY_RETURN_IF_ERROR(topk::SelectCpu(
          req, topk::SelectResult{idx.data(), counts.data(), nullptr, mass.data()}));
      std::vector<int32_t> eidx, ecounts;
      int64_t ecap = 0;
      if (mode_ != topk::Mode::kExact) {
        topk::SelectRequest ereq = req;
        ereq.mode = topk::Mode::kExact;
        ecap = topk::SelectCapacity(ereq);
        eidx.resize(static_cast<size_t>(K * ecap));
        ecounts.resize(static_cast<size_t>(K));
        QUALITY_RETURN_IF_ERROR(topk::SelectCpu(
            ereq, topk::SelectResult{eidx.data(), ecounts.data(), nullptr, nullptr}));
      }
      for (int g = 0; g < K; ++g) {
        const int32_t* sel = idx.data() + g * cap;
        const int32_t cnt = counts[g];
        mass_sum_ += mass[g];
        double recall = 1.0;
        if (mode_ != topk::Mode::kExact) {
          std::set<int32_t> chosen(sel, sel + cnt);
          int64_t wanted = 0, got = 0;
          for (int32_t j = 0; j < ecounts[g]; ++j) {
            const int32_t t = eidx[g * ecap + j];
            if (t < sink_ || t >= N - local_) continue;  // always selected
            ++wanted;
            got += chosen.count(t);
          }
          if (wanted > 0) recall = static_cast<double>(got) / wanted;
        }
        recall_sum_ += recall;
        ++rows_;
        for (int hh = g * group; hh < (g + 1) * group; ++hh) {
          const float* q = in.q + (i * H + hh) * d;
          const float* kg = in.k + g * in.total * d;
          const float* vg = in.v + g * in.total * d;
          p.assign(static_cast<size_t>(cnt), 0.0);
          double m = -std::numeric_limits<double>::infinity();
          for (int32_t j = 0; j < cnt; ++j) {
            const float* kt = kg + static_cast<int64_t>(sel[j]) * d;
            double s = 0;
            for (int c = 0; c < d; ++c) s += static_cast<double>(q[c]) * kt[c];
            p[j] = s * in.scale;
            m = std::max(m, p[j]);
          }
          double sum = 0;
          for (int32_t j = 0; j < cnt; ++j) sum += (p[j] = std::exp(p[j] - m));
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int32_t j = 0; j < cnt; ++j) {
            const float* vt = vg + static_cast<int64_t>(sel[j]) * d;
            for (int c = 0; c < d; ++c) acc[c] += p[j] * vt[c];
          }
          float* o = out + (i * H + hh) * d;
          for (int c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / sum);
        }
      }
    }
    return absl::OkStatus();
  }

  double recall_sum() const { return recall_sum_; }
  double mass_sum() const { return mass_sum_; }
  int64_t rows() const { return rows_; }

 private:
  topk::Mode mode_;
  int64_t budget_, sink_, local_;
  double recall_sum_ = 0, mass_sum_ = 0;
  int64_t rows_ = 0;
};

// APE: the new tokens attend to a group of parallel contexts (cache tokens [start, start + len)
// each) with temperature T and scale S, and to the prefix (cache tokens [0, prefix)) and
// themselves normally; merged by kernels/ape's ApeAttentionCpu.
class ApeHook : public AttentionHook {
 public:
  ApeHook(int64_t prefix, std::vector<std::pair<int64_t, int64_t>> contexts, float t, float s)
      : prefix_(prefix), contexts_(std::move(contexts)), t_(t), s_(s) {}

  absl::Status Attend(const AttentionInputs& in, float* out) override {
    const int64_t d = in.head_dim, hs = in.total * d;
    std::vector<KvSegment> context, other;
    for (const auto& [start, len] : contexts_) {
      context.push_back(KvSegment{in.k + start * d, in.v + start * d, len, hs, d});
    }
    if (prefix_ > 0) other.push_back(KvSegment{in.k, in.v, prefix_, hs, d});
    other.push_back(KvSegment{in.k + in.past * d, in.v + in.past * d, in.n, hs, d});
    ApeArgs a;
    a.shape.num_queries = static_cast<int32_t>(in.n);
    a.shape.q_heads = in.heads;
    a.shape.kv_heads = in.kv_heads;
    a.shape.head_dim = in.head_dim;
    a.shape.q_dtype = DType::kF32;
    a.shape.kv_dtype = DType::kF32;
    a.shape.out_dtype = DType::kF32;
    a.temperature = t_;
    a.scale = s_;
    a.q = in.q;
    a.context = context;
    a.other = other;
    a.out = out;
    return ApeAttentionCpu(a);
  }

 private:
  int64_t prefix_;
  std::vector<std::pair<int64_t, int64_t>> contexts_;
  float t_, s_;
};

const char* ModeName(topk::Mode m) {
  switch (m) {
    case topk::Mode::kExact:
      return "EXACT";
    case topk::Mode::kBound:
      return "BOUND";
    case topk::Mode::kBoundThenExact:
      return "BOUND_THEN_EXACT";
  }
  return "?";
}

std::string Pair(const Score& s) {
  return absl::StrFormat("%.4f / %.3f", s.accuracy(), s.bits_per_byte());
}

std::string JsonScore(const Score& s) {
  return absl::StrFormat("{\"n\":%d,\"acc\":%.5f,\"bpb\":%.4f}", s.count, s.accuracy(),
                         s.bits_per_byte());
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Score.

void Score::Add(const std::vector<float>& logits, int64_t vocab,
                const std::vector<int32_t>& labels) {
  for (size_t i = 0; i < labels.size(); ++i) {
    const float* row = logits.data() + static_cast<int64_t>(i) * vocab;
    const int64_t best = std::max_element(row, row + vocab) - row;
    double m = row[best], sum = 0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<double>(row[j]) - m);
    const double lse = m + std::log(sum);
    bits += (lse - row[labels[i]]) / std::log(2.0);
    correct += best == labels[i] ? 1 : 0;
    ++count;
  }
}

void Score::Merge(const Score& o) {
  count += o.count;
  correct += o.correct;
  bits += o.bits;
}

// ----------------------------------------------------------------------------------------------
// Suite.

Suite::~Suite() = default;

absl::StatusOr<std::unique_ptr<Suite>> Suite::Create(const SuiteOptions& options) {
  const SuiteOptions& o = options;
  if (o.threads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("threads must be >= 1, got ", o.threads));
  }
  if (o.pie_min_context < 64 + o.pie_min_suffix || o.pie_max_context < o.pie_min_context ||
      o.pie_target < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "PIE context range must satisfy 64 + min_suffix <= min <= max and target >= 2, got [",
        o.pie_min_context, ", ", o.pie_max_context, "], min_suffix ", o.pie_min_suffix, ", target ",
        o.pie_target));
  }
  if (o.topk_min_context < 64 || o.topk_max_context < o.topk_min_context || o.topk_target < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("top-k context range must satisfy 64 <= min <= max and target >= 2, got [",
                     o.topk_min_context, ", ", o.topk_max_context, "], target ", o.topk_target));
  }
  for (int64_t b : o.topk_budgets) {
    if (b < 1)
      return absl::InvalidArgumentError(absl::StrCat("top-k budget must be >= 1, got ", b));
  }
  for (int64_t r : o.repair) {
    if (r < 0) return absl::InvalidArgumentError(absl::StrCat("repair must be >= 0, got ", r));
  }
  if (o.topk_sink < 0 || o.topk_local < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sink and local must be >= 0, got ", o.topk_sink, " and ", o.topk_local));
  }
  if (o.ape_k < 1 || o.ape_rest < 2 || o.ape_max_context < 48) {
    return absl::InvalidArgumentError(
        absl::StrCat("APE needs k >= 1, rest >= 2, max_context >= 48, got k ", o.ape_k, ", rest ",
                     o.ape_rest, ", max_context ", o.ape_max_context));
  }
  for (float v : o.ape_temperatures) {
    if (!(v > 0)) return absl::InvalidArgumentError(absl::StrCat("APE T must be > 0, got ", v));
  }
  for (float v : o.ape_scales) {
    if (!(v > 0)) return absl::InvalidArgumentError(absl::StrCat("APE S must be > 0, got ", v));
  }

  std::unique_ptr<Suite> s(new Suite(options));
  llama::LlamaModel::Options mo;
  mo.threads = 1;  // samples run in parallel instead
  QUALITY_ASSIGN_OR_RETURN(model, llama::LlamaModel::Load(o.model_dir, mo));
  s->model_ = std::move(model);
  QUALITY_ASSIGN_OR_RETURN(forward, HookedForward::Create(s->model_.get()));
  s->forward_ = std::move(forward);
  QUALITY_ASSIGN_OR_RETURN(corpus, LoadPythonCorpus(o.corpus_root, 2048));
  s->corpus_ = std::move(corpus);

  KvCache::Options co;
  co.background_maintenance = false;
  co.host_capacity_bytes = 8ull << 30;
  QUALITY_ASSIGN_OR_RETURN(cache, KvCache::Create(std::move(co)));
  s->store_cache_ = std::move(cache);
  const llama::LlamaConfig& c = s->model_->config();
  ModelSpec spec;
  spec.layers = static_cast<int>(c.num_hidden_layers);
  spec.kv_heads = static_cast<int>(c.num_key_value_heads);
  spec.head_dim = static_cast<int>(c.head_dim);
  spec.dtype = o.dtype;
  spec.block_tokens = 16;
  spec.rope = s->model_->rope();
  QUALITY_RETURN_IF_ERROR(s->store_cache_->RegisterModel(spec, s->model_name_).status());
  SessionStore::Options so;
  so.max_sessions = 4096;
  so.capacity_bytes = 8ull << 30;
  QUALITY_ASSIGN_OR_RETURN(store, SessionStore::Create(s->store_cache_.get(), std::move(so)));
  s->sessions_ = std::move(store);
  return s;
}

// ----------------------------------------------------------------------------------------------
// PIE.

absl::StatusOr<PieResults> Suite::RunPie(int n) {
  const SuiteOptions& o = options_;
  const Clock::time_point t0 = Clock::now();
  const int64_t V = model_->config().vocab_size;
  const EditKind kinds[3] = {EditKind::kInsert, EditKind::kDelete, EditKind::kRename};
  std::vector<std::vector<std::optional<PieKindResult>>> per(static_cast<size_t>(std::max(n, 0)));

  auto new_cache = [&]() { return model_->NewCache(o.dtype, 16); };
  // Teacher-forces `fed` at `positions` over `cache` and scores the labels.
  auto eval = [&](llama::KvCache* cache, const std::vector<int32_t>& fed, int64_t pos0,
                  const std::vector<int32_t>& labels, Score* score) -> absl::Status {
    QUALITY_ASSIGN_OR_RETURN(
        logits, model_->Prefill(fed, Iota(static_cast<int64_t>(fed.size()), pos0), cache));
    score->Add(logits, V, labels);
    return absl::OkStatus();
  };

  auto run_window = [&](int index) -> absl::Status {
    QUALITY_ASSIGN_OR_RETURN(win, PickWindow(corpus_, o.seed, static_cast<uint64_t>(index),
                                             o.pie_min_context, o.pie_max_context, o.pie_target));
    std::vector<std::optional<EditSample>> samples;
    for (EditKind k : kinds) {
      samples.push_back(MakeEdit(corpus_, win, k, o.seed, static_cast<uint64_t>(index),
                                 o.pie_min_suffix, o.pie_target));
    }
    const SourceFile& file = corpus_[win.file];
    const std::vector<int32_t> old = Bytes(absl::string_view(file.text).substr(
        static_cast<size_t>(win.offset), static_cast<size_t>(win.length)));
    const int64_t L = static_cast<int64_t>(old.size());

    // The frontend's cache of the old document, and a session opened from it.
    QUALITY_ASSIGN_OR_RETURN(old_cache, new_cache());
    QUALITY_RETURN_IF_ERROR(model_->Prefill(old, Iota(L, 0), old_cache.get()).status());
    std::string blocks;
    for (int64_t b = 0; b < old_cache->num_blocks(); ++b) {
      const absl::Span<const uint8_t> bd = old_cache->BlockData(b);
      blocks.append(reinterpret_cast<const char*>(bd.data()), bd.size());
    }
    OpenSessionArgs args;
    args.model = model_name_;
    args.tokens = old;
    QUALITY_ASSIGN_OR_RETURN(opened, sessions_->Open(args, blocks));
    struct Closer {
      SessionStore* store;
      std::string id;
      ~Closer() { (void)store->Close(id); }
    } closer{sessions_.get(), opened.id};

    auto& out = per[static_cast<size_t>(index)];
    out.resize(3);
    for (int ki = 0; ki < 3; ++ki) {
      if (!samples[ki]) continue;
      const EditSample& s = *samples[ki];
      PieKindResult r;
      r.kind = s.kind;
      r.samples = 1;
      const std::vector<int32_t> nw = Bytes(s.new_context);
      const int64_t Ln = static_cast<int64_t>(nw.size());
      const std::vector<int32_t> target = Bytes(s.new_target);
      // Fed: the document's last byte then the target but its last byte; row i predicts
      // target[i]. The caches hold the document but its last byte.
      std::vector<int32_t> fed = {nw[Ln - 1]};
      fed.insert(fed.end(), target.begin(), target.end() - 1);

      // Full re-encode.
      {
        QUALITY_ASSIGN_OR_RETURN(c, new_cache());
        QUALITY_RETURN_IF_ERROR(
            model_->Prefill(Slice(nw, 0, Ln - 1), Iota(Ln - 1, 0), c.get()).status());
        QUALITY_RETURN_IF_ERROR(eval(c.get(), fed, Ln - 1, target, &r.full));
      }
      // Stale: the old document's cache, edit ignored.
      {
        QUALITY_ASSIGN_OR_RETURN(c, new_cache());
        QUALITY_RETURN_IF_ERROR(
            AppendRange(*old_cache, 0, L - 1, Slice(old, 0, L - 1), Iota(L - 1, 0), c.get()));
        std::vector<int32_t> fed_stale = {old[L - 1]};
        fed_stale.insert(fed_stale.end(), target.begin(), target.end() - 1);
        QUALITY_RETURN_IF_ERROR(eval(c.get(), fed_stale, L - 1, target, &r.stale));
      }
      // Naive reuse: kept tokens' K/V as they were (keys rotated at their old positions), new
      // tokens encoded over what comes before them.
      {
        QUALITY_ASSIGN_OR_RETURN(c, new_cache());
        int64_t at = 0;  // in the old document
        for (const TextEdit& e : s.edits) {
          const int64_t pos = c->tokens();
          QUALITY_RETURN_IF_ERROR(AppendRange(*old_cache, at, e.start,
                                              Slice(nw, pos, pos + e.start - at),
                                              Iota(e.start - at, pos), c.get()));
          const std::vector<int32_t> ins = Bytes(e.text);
          if (!ins.empty()) {
            QUALITY_RETURN_IF_ERROR(
                model_->Prefill(ins, Iota(static_cast<int64_t>(ins.size()), c->tokens()), c.get())
                    .status());
          }
          at = e.end;
        }
        const int64_t pos = c->tokens();
        QUALITY_RETURN_IF_ERROR(AppendRange(*old_cache, at, L, Slice(nw, pos, pos + L - at),
                                            Iota(L - at, pos), c.get()));
        if (c->tokens() != Ln) {
          return absl::InternalError(
              absl::StrCat("naive cache holds ", c->tokens(), " tokens, expected ", Ln));
        }
        QUALITY_RETURN_IF_ERROR(c->Truncate(Ln - 1));
        QUALITY_RETURN_IF_ERROR(eval(c.get(), fed, Ln - 1, target, &r.naive));
      }
      // ropekv sessions: PIE, and PIE with a repair budget (renames).
      std::vector<EditOp> ops;
      for (const TextEdit& e : s.edits) {
        if (e.start == e.end) {
          ops.push_back(EditOp::Insert(e.start, Bytes(e.text)));
        } else if (e.text.empty()) {
          ops.push_back(EditOp::Delete(e.start, e.end));
        } else {
          ops.push_back(EditOp::Replace(e.start, e.end, Bytes(e.text)));
        }
      }
      std::vector<int64_t> budgets = {0};
      if (s.kind == EditKind::kRename) budgets = o.repair;
      for (int64_t budget : budgets) {
        QUALITY_ASSIGN_OR_RETURN(snap, sessions_->Snapshot(opened.id));
        Closer snap_closer{sessions_.get(), snap.id};
        EditOptions eo;
        eo.repair_tokens = budget;
        QUALITY_ASSIGN_OR_RETURN(edited, sessions_->Edit(snap.id, ops, eo));
        if (edited.length != Ln) {
          return absl::InternalError(
              absl::StrCat("edited session has ", edited.length, " tokens, expected ", Ln));
        }
        QUALITY_ASSIGN_OR_RETURN(c, new_cache());
        // Reads [c->tokens(), end) of the session (suffix keys re-rotated once) into c.
        auto read_into = [&](int64_t end) -> absl::Status {
          const int64_t b = c->tokens();
          if (end <= b) return absl::OkStatus();
          QUALITY_ASSIGN_OR_RETURN(reader, sessions_->Read(snap.id, TokenRange{b, end}));
          std::vector<uint8_t> bytes(reader.bytes(), 0xFF);
          QUALITY_RETURN_IF_ERROR(reader.WriteAll(bytes.data()));
          return c->AppendBytes(Slice(nw, b, end), Iota(end - b, b), bytes);
        };
        int64_t reencoded = 0;
        for (const TokenRange& f : edited.fill) {
          QUALITY_RETURN_IF_ERROR(read_into(f.start));
          QUALITY_RETURN_IF_ERROR(
              model_->Prefill(Slice(nw, f.start, f.end), Iota(f.size(), f.start), c.get())
                  .status());
          std::string kv(c->BytesFor(f.size()), '\0');
          QUALITY_RETURN_IF_ERROR(c->ExportTokens(
              f.start, f.end, absl::MakeSpan(reinterpret_cast<uint8_t*>(kv.data()), kv.size())));
          FillArgs fa;
          fa.range = f;
          QUALITY_RETURN_IF_ERROR(sessions_->Fill(snap.id, fa, kv).status());
          reencoded += f.size();
        }
        QUALITY_RETURN_IF_ERROR(read_into(Ln - 1));
        if (c->tokens() > Ln - 1) QUALITY_RETURN_IF_ERROR(c->Truncate(Ln - 1));
        Score score;
        QUALITY_RETURN_IF_ERROR(eval(c.get(), fed, Ln - 1, target, &score));
        if (budget == 0) r.pie = score;
        if (s.kind == EditKind::kRename) {
          r.repaired.push_back(score);
          r.repaired_tokens.push_back(reencoded);
        }
      }
      out[ki] = std::move(r);
    }
    return absl::OkStatus();
  };

  QUALITY_ASSIGN_OR_RETURN(done, RunSamples(n, o.threads, o.max_seconds, run_window));
  PieResults res;
  res.windows = done;
  res.repair = o.repair;
  for (int ki = 0; ki < 3; ++ki) {
    PieKindResult agg;
    agg.kind = kinds[ki];
    if (kinds[ki] == EditKind::kRename) {
      agg.repaired.resize(o.repair.size());
      agg.repaired_tokens.assign(o.repair.size(), 0);
    }
    for (int i = 0; i < done; ++i) {
      const auto& x = per[static_cast<size_t>(i)][static_cast<size_t>(ki)];
      if (!x) continue;
      agg.samples += x->samples;
      agg.full.Merge(x->full);
      agg.pie.Merge(x->pie);
      agg.naive.Merge(x->naive);
      agg.stale.Merge(x->stale);
      for (size_t j = 0; j < x->repaired.size() && j < agg.repaired.size(); ++j) {
        agg.repaired[j].Merge(x->repaired[j]);
        agg.repaired_tokens[j] += x->repaired_tokens[j];
      }
    }
    res.kinds.push_back(std::move(agg));
  }
  res.seconds = SecondsSince(t0);
  return res;
}

// ----------------------------------------------------------------------------------------------
// Top-k.

absl::StatusOr<TopkResults> Suite::RunTopk(int n) {
  const SuiteOptions& o = options_;
  const Clock::time_point t0 = Clock::now();
  const int64_t V = model_->config().vocab_size;
  struct Config {
    topk::Mode mode;
    int64_t budget;
  };
  std::vector<Config> configs;
  for (topk::Mode m : {topk::Mode::kExact, topk::Mode::kBound, topk::Mode::kBoundThenExact}) {
    for (int64_t b : o.topk_budgets) configs.push_back({m, b});
  }
  struct PerSample {
    Score full;
    std::vector<TopkConfigResult> configs;
  };
  std::vector<PerSample> per(static_cast<size_t>(std::max(n, 0)));

  auto run = [&](int index) -> absl::Status {
    QUALITY_ASSIGN_OR_RETURN(
        win, PickWindow(corpus_, o.seed ^ 0x70b4, static_cast<uint64_t>(index), o.topk_min_context,
                        o.topk_max_context, o.topk_target));
    const std::string& text = corpus_[win.file].text;
    const std::vector<int32_t> all = Bytes(absl::string_view(text).substr(
        static_cast<size_t>(win.offset), static_cast<size_t>(win.length + o.topk_target)));
    const int64_t L = win.length;
    const std::vector<int32_t> labels = Slice(all, L, L + o.topk_target);
    const std::vector<int32_t> fed = Slice(all, L - 1, L + o.topk_target - 1);
    const std::vector<int64_t> pos = Iota(o.topk_target, L - 1);
    QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
    QUALITY_RETURN_IF_ERROR(
        model_->Prefill(Slice(all, 0, L - 1), Iota(L - 1, 0), c.get()).status());
    PerSample& ps = per[static_cast<size_t>(index)];
    {
      QUALITY_ASSIGN_OR_RETURN(logits, forward_->Run(fed, pos, c.get(), nullptr));
      ps.full.Add(logits, V, labels);
      QUALITY_RETURN_IF_ERROR(c->Truncate(L - 1));
    }
    for (const Config& cfg : configs) {
      TopkHook hook(cfg.mode, cfg.budget, o.topk_sink, o.topk_local);
      QUALITY_ASSIGN_OR_RETURN(logits, forward_->Run(fed, pos, c.get(), &hook));
      QUALITY_RETURN_IF_ERROR(c->Truncate(L - 1));
      TopkConfigResult r;
      r.mode = cfg.mode;
      r.budget = cfg.budget;
      r.score.Add(logits, V, labels);
      r.recall = hook.recall_sum();
      r.mass = hook.mass_sum();
      r.rows = hook.rows();
      ps.configs.push_back(r);
    }
    return absl::OkStatus();
  };
  QUALITY_ASSIGN_OR_RETURN(done, RunSamples(n, o.threads, o.max_seconds, run));
  TopkResults res;
  res.samples = done;
  for (const Config& cfg : configs) {
    TopkConfigResult r;
    r.mode = cfg.mode;
    r.budget = cfg.budget;
    res.configs.push_back(r);
  }
  for (int i = 0; i < done; ++i) {
    const PerSample& ps = per[static_cast<size_t>(i)];
    res.full.Merge(ps.full);
    for (size_t j = 0; j < ps.configs.size(); ++j) {
      res.configs[j].score.Merge(ps.configs[j].score);
      res.configs[j].recall += ps.configs[j].recall;
      res.configs[j].mass += ps.configs[j].mass;
      res.configs[j].rows += ps.configs[j].rows;
    }
  }
  for (TopkConfigResult& r : res.configs) {
    if (r.rows > 0) {
      r.recall /= static_cast<double>(r.rows);
      r.mass /= static_cast<double>(r.rows);
    }
  }
  res.seconds = SecondsSince(t0);
  return res;
}

// ----------------------------------------------------------------------------------------------
// Prompt modules.

absl::StatusOr<ModuleResults> Suite::RunModules(int n) {
  const SuiteOptions& o = options_;
  const Clock::time_point t0 = Clock::now();
  const int64_t V = model_->config().vocab_size;
  struct PerSample {
    Score full, composed, naive, body_only;
  };
  std::vector<PerSample> per(static_cast<size_t>(std::max(n, 0)));

  auto run = [&](int index) -> absl::Status {
    QUALITY_ASSIGN_OR_RETURN(s, MakeModuleSample(corpus_, o.seed, static_cast<uint64_t>(index),
                                                 o.module_max, o.module_body_max));
    PerSample& ps = per[static_cast<size_t>(index)];
    std::vector<int32_t> mods;
    std::vector<std::vector<int32_t>> mod_ids;
    for (const std::string& m : s.modules) {
      mod_ids.push_back(Bytes(m));
      mods.insert(mods.end(), mod_ids.back().begin(), mod_ids.back().end());
    }
    const int64_t M = static_cast<int64_t>(mods.size());
    const std::vector<int32_t> body = Bytes(s.body);
    const int64_t B = static_cast<int64_t>(body.size());
    // Row i of the body's logits predicts body[i + 1].
    const std::vector<int32_t> labels = Slice(body, 1, B);
    auto score = [&](llama::KvCache* c, int64_t pos0, Score* out) -> absl::Status {
      QUALITY_ASSIGN_OR_RETURN(logits, model_->Prefill(body, Iota(B, pos0), c));
      logits.resize(static_cast<size_t>((B - 1) * V));
      out->Add(logits, V, labels);
      return absl::OkStatus();
    };
    {
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(model_->Prefill(mods, Iota(M, 0), c.get()).status());
      QUALITY_RETURN_IF_ERROR(score(c.get(), M, &ps.full));
    }
    {
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(score(c.get(), 0, &ps.body_only));
    }
    // Each module encoded alone at 0.., Put as a position-independent segment.
    std::vector<std::unique_ptr<llama::KvCache>> alone;
    std::vector<ComposePart> parts;
    const std::string tenant = "quality";
    int64_t at = 0;
    for (const std::vector<int32_t>& ids : mod_ids) {
      const int64_t m = static_cast<int64_t>(ids.size());
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(model_->Prefill(ids, Iota(m, 0), c.get()).status());
      PutOptions po;
      po.model = model_name_;
      po.tenant = tenant;
      po.tokens = ids;
      po.segment = true;
      QUALITY_ASSIGN_OR_RETURN(writer, store_cache_->BeginPut(po));
      for (int64_t b = 0; b < c->num_blocks(); ++b) {
        const absl::Span<const uint8_t> bd = c->BlockData(b);
        QUALITY_RETURN_IF_ERROR(
            writer->Write(absl::string_view(reinterpret_cast<const char*>(bd.data()), bd.size())));
      }
      QUALITY_RETURN_IF_ERROR(writer->Finish().status());
      ComposePart part;
      part.tokens = ids;
      part.segment = true;
      part.target_position = at;
      parts.push_back(part);
      at += m;
      alone.push_back(std::move(c));
    }
    {
      QUALITY_ASSIGN_OR_RETURN(prompt, Compose(*store_cache_, model_name_, tenant, parts));
      if (static_cast<int64_t>(prompt.total_tokens()) != M) {
        return absl::InternalError(
            absl::StrCat("composed prompt has ", prompt.total_tokens(), " tokens, expected ", M));
      }
      std::vector<uint8_t> bytes(prompt.layer_bytes() * static_cast<uint64_t>(prompt.layers()),
                                 0xFF);
      for (int l = 0; l < prompt.layers(); ++l) {
        QUALITY_RETURN_IF_ERROR(prompt.WriteLayer(l, bytes.data() + l * prompt.layer_bytes()));
      }
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(c->AppendBytes(mods, Iota(M, 0), bytes));
      QUALITY_RETURN_IF_ERROR(score(c.get(), M, &ps.composed));
    }
    {
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      for (size_t j = 0; j < alone.size(); ++j) {
        const int64_t m = static_cast<int64_t>(mod_ids[j].size());
        QUALITY_RETURN_IF_ERROR(
            AppendRange(*alone[j], 0, m, mod_ids[j], Iota(m, c->tokens()), c.get()));
      }
      QUALITY_RETURN_IF_ERROR(score(c.get(), M, &ps.naive));
    }
    return absl::OkStatus();
  };
  QUALITY_ASSIGN_OR_RETURN(done, RunSamples(n, o.threads, o.max_seconds, run));
  ModuleResults res;
  res.samples = done;
  for (int i = 0; i < done; ++i) {
    const PerSample& ps = per[static_cast<size_t>(i)];
    res.full.Merge(ps.full);
    res.composed.Merge(ps.composed);
    res.naive.Merge(ps.naive);
    res.body_only.Merge(ps.body_only);
  }
  res.seconds = SecondsSince(t0);
  return res;
}

// ----------------------------------------------------------------------------------------------
// APE.

absl::StatusOr<ApeResults> Suite::RunApe(int n) {
  const SuiteOptions& o = options_;
  const Clock::time_point t0 = Clock::now();
  const int64_t V = model_->config().vocab_size;
  std::vector<std::pair<float, float>> grid;
  for (float t : o.ape_temperatures) {
    for (float s : o.ape_scales) grid.push_back({t, s});
  }
  struct PerSample {
    Score sequential, parallel;
    std::vector<Score> grid;
  };
  std::vector<PerSample> per(static_cast<size_t>(std::max(n, 0)));

  auto run = [&](int index) -> absl::Status {
    QUALITY_ASSIGN_OR_RETURN(
        s, MakeParallelSample(corpus_, o.seed, static_cast<uint64_t>(index), o.ape_k,
                              o.ape_max_prefix, o.ape_max_context, o.ape_rest));
    PerSample& ps = per[static_cast<size_t>(index)];
    const std::vector<int32_t> prefix = Bytes(s.prefix);
    const std::vector<int32_t> rest = Bytes(s.rest);
    const int64_t P = static_cast<int64_t>(prefix.size());
    const int64_t R = static_cast<int64_t>(rest.size());
    const std::vector<int32_t> labels = Slice(rest, 1, R);
    auto add = [&](std::vector<float> logits, Score* out) {
      logits.resize(static_cast<size_t>((R - 1) * V));
      out->Add(logits, V, labels);
    };
    // Sequential.
    {
      std::vector<int32_t> seq = prefix;
      for (const std::string& ctx : s.contexts) {
        const std::vector<int32_t> ids = Bytes(ctx);
        seq.insert(seq.end(), ids.begin(), ids.end());
      }
      const int64_t S = static_cast<int64_t>(seq.size());
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(model_->Prefill(seq, Iota(S, 0), c.get()).status());
      QUALITY_ASSIGN_OR_RETURN(logits, model_->Prefill(rest, Iota(R, S), c.get()));
      add(std::move(logits), &ps.sequential);
    }
    // Parallel: the prefix once; each context over it at positions P..; all in one cache.
    QUALITY_ASSIGN_OR_RETURN(pc, model_->NewCache(o.dtype, 16));
    QUALITY_RETURN_IF_ERROR(model_->Prefill(prefix, Iota(P, 0), pc.get()).status());
    QUALITY_ASSIGN_OR_RETURN(all, model_->NewCache(o.dtype, 16));
    QUALITY_RETURN_IF_ERROR(AppendRange(*pc, 0, P, prefix, Iota(P, 0), all.get()));
    std::vector<std::pair<int64_t, int64_t>> ranges;
    int64_t longest = 0;
    for (const std::string& ctx : s.contexts) {
      const std::vector<int32_t> ids = Bytes(ctx);
      const int64_t m = static_cast<int64_t>(ids.size());
      QUALITY_ASSIGN_OR_RETURN(c, model_->NewCache(o.dtype, 16));
      QUALITY_RETURN_IF_ERROR(AppendRange(*pc, 0, P, prefix, Iota(P, 0), c.get()));
      QUALITY_RETURN_IF_ERROR(model_->Prefill(ids, Iota(m, P), c.get()).status());
      ranges.push_back({all->tokens(), m});
      QUALITY_RETURN_IF_ERROR(AppendRange(*c, P, P + m, ids, Iota(m, P), all.get()));
      longest = std::max(longest, m);
    }
    const int64_t past = all->tokens();
    const std::vector<int64_t> qpos = Iota(R, P + longest);
    {
      QUALITY_ASSIGN_OR_RETURN(logits, model_->Prefill(rest, qpos, all.get()));
      QUALITY_RETURN_IF_ERROR(all->Truncate(past));
      add(std::move(logits), &ps.parallel);
    }
    for (const auto& [t, sc] : grid) {
      ApeHook hook(P, ranges, t, sc);
      QUALITY_ASSIGN_OR_RETURN(logits, forward_->Run(rest, qpos, all.get(), &hook));
      QUALITY_RETURN_IF_ERROR(all->Truncate(past));
      ps.grid.emplace_back();
      add(std::move(logits), &ps.grid.back());
    }
    return absl::OkStatus();
  };
  QUALITY_ASSIGN_OR_RETURN(done, RunSamples(n, o.threads, o.max_seconds, run));
  ApeResults res;
  res.samples = done;
  for (const auto& [t, sc] : grid) res.grid.push_back(ApeConfigResult{t, sc, Score()});
  for (int i = 0; i < done; ++i) {
    const PerSample& ps = per[static_cast<size_t>(i)];
    res.sequential.Merge(ps.sequential);
    res.parallel.Merge(ps.parallel);
    for (size_t j = 0; j < ps.grid.size(); ++j) res.grid[j].score.Merge(ps.grid[j]);
  }
  res.seconds = SecondsSince(t0);
  return res;
}

// ----------------------------------------------------------------------------------------------
// Output.

std::string FormatPie(const PieResults& r) {
  std::string s = absl::StrFormat(
      "PIE: next-byte accuracy / bits per byte over the %s bytes after the cursor (%d windows, "
      "%.0f s)\n\n",
      "64", r.windows, r.seconds);
  absl::StrAppend(&s, "| edit | samples | full re-encode | ropekv PIE | naive | stale |\n");
  absl::StrAppend(&s, "|---|---|---|---|---|---|\n");
  for (const PieKindResult& k : r.kinds) {
    absl::StrAppend(&s, "| ", EditKindName(k.kind), " | ", k.samples, " | ", Pair(k.full), " | ",
                    Pair(k.pie), " | ", Pair(k.naive), " | ", Pair(k.stale), " |\n");
  }
  absl::StrAppend(&s, "\nPIE minus full re-encode, accuracy points: ");
  for (const PieKindResult& k : r.kinds) {
    absl::StrAppend(&s, EditKindName(k.kind), " ",
                    absl::StrFormat("%+.2f", 100 * (k.pie.accuracy() - k.full.accuracy())), "  ");
  }
  absl::StrAppend(&s, "\n");
  for (const PieKindResult& k : r.kinds) {
    if (k.repaired.empty() || k.samples == 0) continue;
    absl::StrAppend(&s, "\nBudgeted repair (EditOptions::repair_tokens = r) on ",
                    EditKindName(k.kind), "s, ", k.samples, " samples; full re-encode ",
                    Pair(k.full), "\n\n");
    absl::StrAppend(&s,
                    "| r | tokens re-encoded per sample | accuracy / bits per byte | vs full "
                    "(points) |\n|---|---|---|---|\n");
    for (size_t j = 0; j < k.repaired.size(); ++j) {
      absl::StrAppend(
          &s, "| ", r.repair[j], " | ",
          absl::StrFormat("%.1f", static_cast<double>(k.repaired_tokens[j]) / k.samples), " | ",
          Pair(k.repaired[j]), " | ",
          absl::StrFormat("%+.2f", 100 * (k.repaired[j].accuracy() - k.full.accuracy())), " |\n");
    }
  }
  return s;
}

std::string FormatTopk(const TopkResults& r) {
  std::string s = absl::StrFormat(
      "Top-k: decode of 64 bytes after a ~1000-byte context, every layer attending only to the "
      "selected tokens (%d samples, %.0f s); full attention %s\n\n",
      r.samples, r.seconds, Pair(r.full));
  absl::StrAppend(&s,
                  "| mode | budget | accuracy / bits per byte | vs full (points) | index recall | "
                  "captured mass |\n|---|---|---|---|---|---|\n");
  for (const TopkConfigResult& c : r.configs) {
    absl::StrAppend(&s, "| ", ModeName(c.mode), " | ", c.budget, " | ", Pair(c.score), " | ",
                    absl::StrFormat("%+.2f", 100 * (c.score.accuracy() - r.full.accuracy())), " | ",
                    absl::StrFormat("%.3f", c.recall), " | ", absl::StrFormat("%.3f", c.mass),
                    " |\n");
  }
  return s;
}

std::string FormatModules(const ModuleResults& r) {
  std::string s = absl::StrFormat(
      "Prompt modules: import block + class (modules) + function body, scored on the body (%d "
      "samples, %.0f s)\n\n",
      r.samples, r.seconds);
  absl::StrAppend(&s, "| KV of the modules | accuracy / bits per byte | vs full (points) |\n");
  absl::StrAppend(&s, "|---|---|---|\n");
  auto row = [&](const char* name, const Score& x) {
    absl::StrAppend(&s, "| ", name, " | ", Pair(x), " | ",
                    absl::StrFormat("%+.2f", 100 * (x.accuracy() - r.full.accuracy())), " |\n");
  };
  row("full encode of the prompt", r.full);
  row("ropekv Compose (segments re-rotated)", r.composed);
  row("concatenated, not re-rotated", r.naive);
  row("no modules (body alone)", r.body_only);
  return s;
}

std::string FormatApe(const ApeResults& r) {
  std::string s = absl::StrFormat(
      "APE: function definitions encoded in parallel after a shared prefix, the rest of the file "
      "scored (%d samples, %.0f s)\n\n",
      r.samples, r.seconds);
  absl::StrAppend(&s, "| encoding | T | S | accuracy / bits per byte | vs sequential (points) |\n");
  absl::StrAppend(&s, "|---|---|---|---|---|\n");
  auto row = [&](const std::string& name, const std::string& t, const std::string& sc,
                 const Score& x) {
    absl::StrAppend(&s, "| ", name, " | ", t, " | ", sc, " | ", Pair(x), " | ",
                    absl::StrFormat("%+.2f", 100 * (x.accuracy() - r.sequential.accuracy())),
                    " |\n");
  };
  row("sequential", "", "", r.sequential);
  row("parallel (plain)", "", "", r.parallel);
  const ApeConfigResult* best = nullptr;
  for (const ApeConfigResult& g : r.grid) {
    row("APE", absl::StrFormat("%.2f", g.temperature), absl::StrFormat("%.2f", g.scale), g.score);
    if (best == nullptr || g.score.bits_per_byte() < best->score.bits_per_byte()) best = &g;
  }
  if (best != nullptr) {
    absl::StrAppend(&s, absl::StrFormat("\nBest APE (lowest bits per byte): T = %.2f, S = %.2f\n",
                                        best->temperature, best->scale));
  }
  return s;
}

std::string ToJson(const SuiteOptions& options, const PieResults* pie, const TopkResults* topk,
                   const ModuleResults* modules, const ApeResults* ape) {
  std::string s = absl::StrFormat(
      "{\"suite\":\"quality\",\"model\":\"%s\",\"corpus\":\"%s\",\"seed\":%d,\"threads\":%d,"
      "\"dtype\":\"%s\"",
      options.model_dir, options.corpus_root, options.seed, options.threads,
      options.dtype == DType::kF32 ? "f32" : (options.dtype == DType::kBF16 ? "bf16" : "f16"));
  if (pie != nullptr) {
    absl::StrAppend(&s, ",\"pie\":{\"windows\":", pie->windows,
                    absl::StrFormat(",\"seconds\":%.1f", pie->seconds), ",\"edits\":[");
    for (size_t i = 0; i < pie->kinds.size(); ++i) {
      const PieKindResult& k = pie->kinds[i];
      absl::StrAppend(&s, i ? "," : "", "{\"edit\":\"", EditKindName(k.kind),
                      "\",\"samples\":", k.samples, ",\"full\":", JsonScore(k.full),
                      ",\"pie\":", JsonScore(k.pie), ",\"naive\":", JsonScore(k.naive),
                      ",\"stale\":", JsonScore(k.stale));
      if (!k.repaired.empty()) {
        absl::StrAppend(&s, ",\"repair\":[");
        for (size_t j = 0; j < k.repaired.size(); ++j) {
          absl::StrAppend(&s, j ? "," : "", "{\"r\":", pie->repair[j],
                          ",\"tokens\":", k.repaired_tokens[j],
                          ",\"score\":", JsonScore(k.repaired[j]), "}");
        }
        absl::StrAppend(&s, "]");
      }
      absl::StrAppend(&s, "}");
    }
    absl::StrAppend(&s, "]}");
  }
  if (topk != nullptr) {
    absl::StrAppend(&s, ",\"topk\":{\"samples\":", topk->samples,
                    absl::StrFormat(",\"seconds\":%.1f", topk->seconds),
                    ",\"sink\":", options.topk_sink, ",\"local\":", options.topk_local,
                    ",\"full\":", JsonScore(topk->full), ",\"configs\":[");
    for (size_t i = 0; i < topk->configs.size(); ++i) {
      const TopkConfigResult& c = topk->configs[i];
      absl::StrAppend(&s, i ? "," : "", "{\"mode\":\"", ModeName(c.mode),
                      "\",\"budget\":", c.budget, ",\"score\":", JsonScore(c.score),
                      absl::StrFormat(",\"recall\":%.4f,\"mass\":%.4f}", c.recall, c.mass));
    }
    absl::StrAppend(&s, "]}");
  }
  if (modules != nullptr) {
    absl::StrAppend(&s, ",\"modules\":{\"samples\":", modules->samples,
                    absl::StrFormat(",\"seconds\":%.1f", modules->seconds),
                    ",\"full\":", JsonScore(modules->full),
                    ",\"composed\":", JsonScore(modules->composed),
                    ",\"naive\":", JsonScore(modules->naive),
                    ",\"body_only\":", JsonScore(modules->body_only), "}");
  }
  if (ape != nullptr) {
    absl::StrAppend(&s, ",\"ape\":{\"samples\":", ape->samples, ",\"k\":", options.ape_k,
                    absl::StrFormat(",\"seconds\":%.1f", ape->seconds),
                    ",\"sequential\":", JsonScore(ape->sequential),
                    ",\"parallel\":", JsonScore(ape->parallel), ",\"grid\":[");
    for (size_t i = 0; i < ape->grid.size(); ++i) {
      const ApeConfigResult& g = ape->grid[i];
      absl::StrAppend(&s, i ? "," : "",
                      absl::StrFormat("{\"T\":%.3f,\"S\":%.3f,\"score\":", g.temperature, g.scale),
                      JsonScore(g.score), "}");
    }
    absl::StrAppend(&s, "]}");
  }
  absl::StrAppend(&s, "}");
  return s;
}

}  // namespace quality
}  // namespace ropekv
