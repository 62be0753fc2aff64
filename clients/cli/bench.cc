#include "clients/cli/bench.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "clients/cli/random_kv.h"

namespace ropekv::cli {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

// A Llama-3-8B-shaped model: 32 layers x 8 KV heads x 128 dims, bf16, 16-token blocks = 2 MiB.
v1::ModelSpec BenchSpec() {
  v1::ModelSpec spec;
  spec.set_layers(32);
  spec.set_kv_heads(8);
  spec.set_head_dim(128);
  spec.set_dtype(v1::DTYPE_BF16);
  spec.set_block_tokens(16);
  spec.mutable_rope()->set_theta(500000);
  return spec;
}

// Minimal blocking RESP2 client: enough for SET, GET and EXISTS of binary values.
class Redis {
 public:
  ~Redis() {
    if (fd_ >= 0) close(fd_);
  }
  absl::Status Connect(const std::string& hostport) {
    std::vector<std::string> parts = absl::StrSplit(hostport, ':');
    if (parts.size() != 2) return absl::InvalidArgumentError("--redis needs HOST:PORT");
    addrinfo hints{}, *res = nullptr;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(parts[0].c_str(), parts[1].c_str(), &hints, &res) != 0 || res == nullptr) {
      return absl::UnavailableError("cannot resolve " + hostport);
    }
    fd_ = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    const int rc = connect(fd_, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (rc != 0) return absl::UnavailableError("cannot connect to redis at " + hostport);
    return absl::OkStatus();
  }
  absl::Status Command(std::initializer_list<absl::string_view> args, std::string* reply) {
    std::string head = absl::StrCat("*", args.size(), "\r\n");
    for (absl::string_view a : args) {
      absl::StrAppend(&head, "$", a.size(), "\r\n");
      if (a.size() < 4096) {
        absl::StrAppend(&head, a, "\r\n");
      } else {  // large payload: send what we have, then the payload without copying it
        if (!SendAll(head.data(), head.size()) || !SendAll(a.data(), a.size())) {
          return absl::UnavailableError("redis send failed");
        }
        head = "\r\n";
      }
    }
    if (!SendAll(head.data(), head.size())) return absl::UnavailableError("redis send failed");
    return ReadReply(reply);
  }

 private:
  bool SendAll(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t k = send(fd_, p, n, 0);
      if (k <= 0) return false;
      p += k;
      n -= k;
    }
    return true;
  }
  bool Fill() {
    char tmp[1 << 16];
    const ssize_t k = recv(fd_, tmp, sizeof(tmp), 0);
    if (k <= 0) return false;
    buf_.append(tmp, k);
    return true;
  }
  absl::Status ReadLine(std::string* line) {
    size_t eol;
    while ((eol = buf_.find("\r\n")) == std::string::npos) {
      if (!Fill()) return absl::UnavailableError("redis closed the connection");
    }
    *line = buf_.substr(0, eol);
    buf_.erase(0, eol + 2);
    return absl::OkStatus();
  }
  absl::Status ReadReply(std::string* reply) {
    std::string line;
    if (auto s = ReadLine(&line); !s.ok()) return s;
    if (line.empty()) return absl::InternalError("empty redis reply");
    if (line[0] == '-') return absl::InternalError("redis: " + line.substr(1));
    if (line[0] != '$') {
      *reply = line.substr(1);
      return absl::OkStatus();
    }
    int64_t n = 0;
    if (!absl::SimpleAtoi(line.substr(1), &n)) return absl::InternalError("bad redis reply");
    if (n < 0) {
      reply->clear();
      return absl::OkStatus();
    }
    while (buf_.size() < static_cast<size_t>(n) + 2) {
      if (!Fill()) return absl::UnavailableError("redis closed the connection");
    }
    reply->assign(buf_, 0, n);
    buf_.erase(0, n + 2);
    return absl::OkStatus();
  }

  int fd_ = -1;
  std::string buf_;
};

struct Row {
  std::string system;
  double put_mib_s = 0, get_mib_s = 0, lookup_p50_us = 0, lookup_p99_us = 0;
};

}  // namespace

absl::Status RunBench(client::Client& c, const BenchOptions& o) {
  const v1::ModelSpec spec = BenchSpec();
  auto reg = c.RegisterModel(spec, "bench-llama3-8b");
  if (!reg.ok()) return reg.status();
  const std::string model = reg->model_id();
  const uint32_t bt = spec.block_tokens();
  const uint32_t per = std::max<uint32_t>(1, std::min(o.blocks_per_put, o.blocks));
  const uint32_t calls = std::max<uint32_t>(1, o.blocks / per);
  const uint64_t block_bytes = client::KvShape::Of(spec, 1).BlockBytes();
  const std::vector<uint8_t> kv = RandomKv(spec, 7, per);
  const double mib = double(calls) * per * block_bytes / (1 << 20);
  // Each call stores its own prompt (a fresh seed), so nothing is deduplicated.
  std::vector<std::vector<int32_t>> prompts;
  const uint64_t run = static_cast<uint64_t>(Clock::now().time_since_epoch().count());
  for (uint32_t i = 0; i < calls; ++i) prompts.push_back(RandomTokens(run + i, per * bt));

  Row grpc_row{"ropekv gRPC"};
  auto t0 = Clock::now();
  for (uint32_t i = 0; i < calls; ++i) {
    client::PutArgs args;
    args.model = model;
    args.tokens = prompts[i];
    auto r = c.Put(args, client::KvView{kv, client::KvShape::Of(spec, per)});
    if (!r.ok()) return r.status();
  }
  auto t1 = Clock::now();
  std::vector<uint8_t> dst(uint64_t{per} * block_bytes);
  for (uint32_t i = 0; i < calls; ++i) {
    client::GetArgs args;
    args.model = model;
    args.tokens = prompts[i];
    auto r = c.GetInto(args, absl::MakeSpan(dst));
    if (!r.ok()) return r.status();
    if (r->blocks() != per) {
      return absl::InternalError(absl::StrCat("Get returned ", r->blocks(), " blocks, expected ",
                                              per, " (host tier too small for --blocks?)"));
    }
  }
  auto t2 = Clock::now();
  grpc_row.put_mib_s = mib / Seconds(t0, t1);
  grpc_row.get_mib_s = mib / Seconds(t1, t2);
  if (std::memcmp(dst.data(), kv.data(), dst.size()) != 0) {
    return absl::DataLossError("bench: bytes read back differ from bytes stored");
  }
  const std::vector<int32_t> lookup_prompt = RandomTokens(run + calls + 1, o.lookup_tokens);
  {
    client::PutArgs args;
    args.model = model;
    args.tokens = lookup_prompt;
    const uint32_t n = o.lookup_tokens / bt;
    const std::vector<uint8_t> lkv = RandomKv(spec, 9, n);
    if (auto r = c.Put(args, client::KvView{lkv, client::KvShape::Of(spec, n)}); !r.ok()) {
      return r.status();
    }
  }
  std::vector<double> lat;
  for (uint32_t i = 0; i < o.lookups; ++i) {
    auto a = Clock::now();
    auto r = c.Lookup(model, "", lookup_prompt);
    if (!r.ok()) return r.status();
    lat.push_back(Seconds(a, Clock::now()) * 1e6);
  }
  grpc_row.lookup_p50_us = Percentile(lat, 0.5);
  grpc_row.lookup_p99_us = Percentile(lat, 0.99);
  std::vector<Row> rows{grpc_row};

  if (!o.redis.empty()) {
    Redis redis;
    if (auto s = redis.Connect(o.redis); !s.ok()) return s;
    Row r{"redis SET/GET"};
    const absl::string_view value(reinterpret_cast<const char*>(kv.data()), kv.size());
    std::string reply;
    auto a = Clock::now();
    for (uint32_t i = 0; i < calls; ++i) {
      if (auto s = redis.Command({"SET", absl::StrCat("ropekv-bench-", i), value}, &reply);
          !s.ok()) {
        return s;
      }
    }
    auto b = Clock::now();
    for (uint32_t i = 0; i < calls; ++i) {
      if (auto s = redis.Command({"GET", absl::StrCat("ropekv-bench-", i)}, &reply); !s.ok()) {
        return s;
      }
      if (reply.size() != value.size()) return absl::InternalError("redis GET size differs");
    }
    auto e = Clock::now();
    r.put_mib_s = mib / Seconds(a, b);
    r.get_mib_s = mib / Seconds(b, e);
    lat.clear();
    for (uint32_t i = 0; i < o.lookups; ++i) {
      auto t = Clock::now();
      if (auto s = redis.Command({"EXISTS", "ropekv-bench-0"}, &reply); !s.ok()) return s;
      lat.push_back(Seconds(t, Clock::now()) * 1e6);
    }
    r.lookup_p50_us = Percentile(lat, 0.5);
    r.lookup_p99_us = Percentile(lat, 0.99);
    for (uint32_t i = 0; i < calls; ++i) {
      redis.Command({"DEL", absl::StrCat("ropekv-bench-", i)}, &reply).IgnoreError();
    }
    rows.push_back(r);
  }
  c.Evict(model, "", {}).IgnoreError();

  std::printf("payload: %u calls x %u blocks x %llu bytes (%.0f MiB); lookups of %u tokens\n",
              calls, per, (unsigned long long)block_bytes, mib, o.lookup_tokens);
  std::printf("%-16s %12s %12s %14s %14s\n", "system", "put MiB/s", "get MiB/s", "lookup p50 us",
              "lookup p99 us");
  std::string json =
      "{\"bench\":\"grpc_data_path\",\"block_bytes\":" + std::to_string(block_bytes) +
      ",\"rows\":[";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    std::printf("%-16s %12.0f %12.0f %14.1f %14.1f\n", r.system.c_str(), r.put_mib_s, r.get_mib_s,
                r.lookup_p50_us, r.lookup_p99_us);
    absl::StrAppend(&json, i ? "," : "", "{\"system\":\"", r.system,
                    "\",\"put_mib_s\":", r.put_mib_s, ",\"get_mib_s\":", r.get_mib_s,
                    ",\"lookup_p50_us\":", r.lookup_p50_us, ",\"lookup_p99_us\":", r.lookup_p99_us,
                    "}");
  }
  json += "]}";
  std::printf("%s\n", json.c_str());
  return absl::OkStatus();
}

}  // namespace ropekv::cli
