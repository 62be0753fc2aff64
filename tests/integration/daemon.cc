#include "tests/integration/daemon.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "gtest/gtest.h"

namespace ropekv::testing {

std::string FreshDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::filesystem::path dir = std::filesystem::path(tmp ? tmp : "/tmp") /
                              ("ropekv-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

Daemon::Daemon(std::vector<std::string> extra_flags, std::string data_dir) {
  static int counter = 0;
  owns_dir_ = data_dir.empty();
  data_dir_ = owns_dir_ ? FreshDir("daemon" + std::to_string(counter++)) : data_dir;
  const std::string port_file = data_dir_ + "/port";
  std::filesystem::remove(port_file);
  // $ROPEKVD overrides the built path (a packed binary on another machine).
  const char* env_binary = std::getenv("ROPEKVD");
  std::vector<std::string> args = {env_binary != nullptr ? env_binary : ROPEKVD,
                                   "--listen=127.0.0.1:0", "--data_dir=" + data_dir_,
                                   "--port_file=" + port_file};
  args.insert(args.end(), extra_flags.begin(), extra_flags.end());
  pid_ = fork();
  if (pid_ == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    if (in >> port_ && port_ > 0) return;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      pid_ = -1;
      ADD_FAILURE() << "ropekvd exited during start, status " << status;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << "ropekvd did not report its port within 30 s";
}

void Daemon::Stop(bool hard) {
  if (pid_ <= 0) return;
  kill(pid_, hard ? SIGKILL : SIGTERM);
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
}

Daemon::~Daemon() {
  Stop();
  if (owns_dir_) {
    std::error_code ignored;
    std::filesystem::remove_all(data_dir_, ignored);
  }
}

}  // namespace ropekv::testing
