# Sessions (PIE edits over a cached document): cache/session.{h,cc} join ropekv_cache; the gRPC
# side (server/session_service.cc, clients/cpp/session_client.cc) sits in ropekv_server and
# ropekv_client. This file also registers the feature's tests, example and benchmark, so that
# they live together (targets of other directories are linked by name, resolved at generate time;
# ropekv_cache itself stays free of gRPC).
target_sources(ropekv_cache PRIVATE session.cc)
target_link_libraries(ropekv_cache PUBLIC absl::flat_hash_set absl::time)

# GPU-resident sessions (cache/session_gpu.h): device pool, staged uploads, the fused rope launch.
# Without CUDA a stub that answers UNAVAILABLE, so the store keeps its host path.
if(ROPEKV_WITH_CUDA)
  add_library(ropekv_session_gpu session_gpu.cu)
  target_link_libraries(ropekv_session_gpu PUBLIC ropekv_rope ropekv_kernels_common
    absl::status absl::statusor absl::strings absl::synchronization absl::flat_hash_map
    absl::span)
  target_link_libraries(ropekv_session_gpu PRIVATE ropekv_rope_cuda CUDA::cudart_static)
else()
  add_library(ropekv_session_gpu session_gpu_nocuda.cc)
  target_link_libraries(ropekv_session_gpu PUBLIC ropekv_rope absl::status absl::statusor
    absl::strings absl::span)
  target_compile_options(ropekv_session_gpu PRIVATE ${ROPEKV_WARNINGS})
endif()
target_link_libraries(ropekv_cache PUBLIC ropekv_session_gpu)

# Each target below is registered only once its source exists, so that a configure in the middle
# of this feature's work never fails for others sharing the tree.
# Unit tests: the piece list, the store, and a tiny reference transformer (tests/unit/cache).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/cache/session_test.cc)
ropekv_test(NAME session_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/session_test.cc
  LIBS ropekv_cache)
endif()

# Integration test: a real ropekvd on loopback, the real SessionClient.
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/session_test.cc)
ropekv_test(NAME session_service_test LABELS integration
  SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/session_test.cc
  LIBS ropekv_client ropekv_cache ropekv_test_daemon)
add_dependencies(session_service_test ropekvd)
endif()

# The editor loop example (clients/examples): open, edit, fill, read against a running daemon.
if(EXISTS ${PROJECT_SOURCE_DIR}/clients/examples/editor_loop.cc)
add_executable(editor_loop ${PROJECT_SOURCE_DIR}/clients/examples/editor_loop.cc)
target_link_libraries(editor_loop PRIVATE ropekv_client ropekv_rope ropekv_kernels_common
  absl::flags absl::flags_parse absl::flags_usage)
target_compile_options(editor_loop PRIVATE ${ROPEKV_WARNINGS})
set_target_properties(editor_loop PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR})
endif()

# GPU benchmark of an edit on a 32K-token Llama-3-8B-shaped cache (the lead runs it on an H100).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/bench/pie_bench.cu)
  add_executable(pie_bench ${PROJECT_SOURCE_DIR}/bench/pie_bench.cu)
  target_link_libraries(pie_bench PRIVATE ropekv_cache ropekv_rope_cuda CUDA::cudart_static)
  set_target_properties(pie_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR})
endif()

# Device-resident sessions: the CPU-side contract (device option, KvSource copies, capacity
# layouts) runs everywhere; the GPU test compares GPU sessions with host sessions (skips itself
# without a GPU).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/cache/session_device_test.cc)
ropekv_test(NAME session_device_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/session_device_test.cc
  LIBS ropekv_cache)
endif()
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/tests/gpu/session_gpu_test.cc)
  ropekv_test(NAME session_gpu_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/session_gpu_test.cc
    LIBS ropekv_cache CUDA::cudart_static)
endif()

# Integration test: sessions through the data plane (OpenFromBuffer / FillFromBuffer /
# ReadToBuffer with a capacity layout) over shared memory, against a real ropekvd.
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/session_dataplane_test.cc)
ropekv_test(NAME session_dataplane_test LABELS integration
  SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/session_dataplane_test.cc
  LIBS ropekv_dataplane_client ropekv_client ropekv_cache ropekv_test_daemon)
add_dependencies(session_dataplane_test ropekvd)
endif()

# GPU test: a frontend's CUDA IPC buffer through a real ropekvd, GPU and host sessions (skips
# without a GPU).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/tests/gpu/session_dataplane_gpu_test.cc)
  ropekv_test(NAME session_dataplane_gpu_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/session_dataplane_gpu_test.cc
    LIBS ropekv_dataplane_client ropekv_client ropekv_kernels_common ropekv_test_daemon
         CUDA::cudart_static)
  add_dependencies(session_dataplane_gpu_test ropekvd)
endif()
