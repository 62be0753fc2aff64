// ropekvd: the ropekv daemon. Starts with embedded defaults; flags override them.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "cache/kv_cache.h"
#include "kernels/common/device.h"
#include "server/config.h"
#include "server/kvcache_service.h"
#include "server/session_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "HOST:PORT to listen on (port 0: any free port)");
ABSL_FLAG(std::string, data_dir, "./data", "data folder (created if missing)");
ABSL_FLAG(std::string, host_capacity, "2GiB", "host tier capacity, e.g. 2GiB, 512MiB");
ABSL_FLAG(std::string, max_block_size, "64MiB", "largest block a registered model may have");
ABSL_FLAG(std::string, max_message_size, "64MiB", "gRPC maximum message size");
ABSL_FLAG(std::string, chunk_size, "4MiB", "bulk bytes per streamed message");
ABSL_FLAG(std::string, port_file, "", "if set, write the bound port to this file");

namespace ropekv {
namespace {

absl::StatusOr<ServerConfig> ConfigFromFlags() {
  ServerConfig c;
  c.listen = absl::GetFlag(FLAGS_listen);
  c.data_dir = absl::GetFlag(FLAGS_data_dir);
  c.port_file = absl::GetFlag(FLAGS_port_file);
  struct {
    std::string text;
    uint64_t* out;
  } sizes[] = {{absl::GetFlag(FLAGS_host_capacity), &c.host_capacity_bytes},
               {absl::GetFlag(FLAGS_max_block_size), &c.max_block_bytes},
               {absl::GetFlag(FLAGS_max_message_size), &c.max_message_bytes},
               {absl::GetFlag(FLAGS_chunk_size), &c.chunk_bytes}};
  for (auto& s : sizes) {
    auto v = ParseSize(s.text);
    if (!v.ok()) return v.status();
    *s.out = *v;
  }
  if (auto s = ValidateConfig(c); !s.ok()) return s;
  return c;
}

int Run(const ServerConfig& config) {
  std::error_code ec;
  std::filesystem::create_directories(config.data_dir, ec);
  if (ec) {
    std::cerr << "ropekvd: cannot create data folder " << config.data_dir << ": " << ec.message()
              << "\n";
    return 1;
  }
  KvCache::Options options;
  options.host_capacity_bytes = config.host_capacity_bytes;
  options.max_block_bytes = config.max_block_bytes;
  auto cache = KvCache::Create(std::move(options));
  if (!cache.ok()) {
    std::cerr << "ropekvd: " << cache.status() << "\n";
    return 1;
  }
  KvCacheService service(cache->get(), config);
  SessionService sessions(cache->get(), config);  // PIE editor sessions (--session_* flags)
  if (!sessions.status().ok()) {
    std::cerr << "ropekvd: " << sessions.status().message() << "\n";
    return 1;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  builder.RegisterService(&service);
  builder.RegisterService(&sessions);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "ropekvd: cannot listen on " << config.listen << "\n";
    return 1;
  }
  if (!config.port_file.empty()) {
    std::ofstream(config.port_file + ".tmp") << port << "\n";
    std::filesystem::rename(config.port_file + ".tmp", config.port_file, ec);
  }
  std::cout << "ropekvd listening on port " << port << " (" << config.listen << "); host tier "
            << config.host_capacity_bytes << " bytes; data folder " << config.data_dir
            << "; GPU tier " << (GpuAvailable() ? "present" : "absent (no GPU)") << std::endl;

  // Wait for SIGINT/SIGTERM (blocked in every thread, taken here), then shut down cleanly.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  int sig = 0;
  sigwait(&signals, &sig);
  std::cout << "ropekvd: signal " << sig << ", shutting down" << std::endl;
  server->Shutdown();
  return 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so that only sigwait takes them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::SetProgramUsageMessage("ropekvd: the ropekv KV-cache daemon");
  absl::ParseCommandLine(argc, argv);
  auto config = ropekv::ConfigFromFlags();
  if (!config.ok()) {
    std::cerr << "ropekvd: " << config.status().message() << "\n";
    return 2;
  }
  return ropekv::Run(*config);
}
