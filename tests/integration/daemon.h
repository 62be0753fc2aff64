// Starts a real ropekvd on a free loopback port for a test, and stops it. The daemon binary's path
// comes from the ROPEKVD compile definition.
#ifndef ROPEKV_TESTS_INTEGRATION_DAEMON_H_
#define ROPEKV_TESTS_INTEGRATION_DAEMON_H_

#include <string>
#include <vector>

namespace ropekv::testing {

class Daemon {
 public:
  // Starts ropekvd with a fresh data folder under the test's temp dir, plus `extra_flags`.
  // Blocks until the port file appears (up to 30 s); aborts the test on failure.
  explicit Daemon(std::vector<std::string> extra_flags = {}, std::string data_dir = "");
  ~Daemon();
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  const std::string& data_dir() const { return data_dir_; }
  // SIGTERM and wait (clean shutdown), or SIGKILL when `hard`.
  void Stop(bool hard = false);
  bool running() const { return pid_ > 0; }

 private:
  int pid_ = -1;
  int port_ = 0;
  std::string data_dir_;
  bool owns_dir_ = false;  // made by the constructor: removed by the destructor
};

// A fresh, empty folder under TEST_TMPDIR or /tmp.
std::string FreshDir(const std::string& name);

}  // namespace ropekv::testing

#endif  // ROPEKV_TESTS_INTEGRATION_DAEMON_H_
