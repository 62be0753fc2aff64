# The data plane (issue 8), included at the end of cache/CMakeLists.txt: registered buffers
# (cache/buffer_registry.{h,cc}: POSIX shared memory, CUDA IPC handles through cache/cuda_ipc.h)
# and the copies into and out of them (cache/dataplane.{h,cc}) join ropekv_cache; the gRPC side
# (server/dataplane_service.cc) sits in ropekv_server; the C++ client of the DataPlane service is
# ropekv_dataplane_client. The feature's tests and benchmark are registered here too (targets of
# other directories are linked by name, resolved at generate time).

# CUDA IPC: the real thing in a CUDA build, a stub that answers UNAVAILABLE otherwise.
if(ROPEKV_WITH_CUDA)
  add_library(ropekv_cuda_ipc cuda_ipc.cu)
  target_link_libraries(ropekv_cuda_ipc PUBLIC ropekv_kernels_common ropekv_rope_cuda ropekv_topk
    CUDA::cudart_static absl::status absl::statusor absl::strings absl::synchronization
    absl::flat_hash_map)
  # cuda.h for the driver's types only: the entry point is fetched at run time (no libcuda link).
  target_include_directories(ropekv_cuda_ipc PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
else()
  add_library(ropekv_cuda_ipc cuda_ipc_nocuda.cc)
  target_link_libraries(ropekv_cuda_ipc PUBLIC ropekv_rope ropekv_topk absl::status
    absl::statusor absl::strings)
  target_compile_options(ropekv_cuda_ipc PRIVATE ${ROPEKV_WARNINGS})
endif()

target_sources(ropekv_cache PRIVATE buffer_registry.cc dataplane.cc)
target_link_libraries(ropekv_cache PUBLIC ropekv_cuda_ipc)

# The C++ client of the DataPlane service, and a helper that creates shared-memory regions.
add_library(ropekv_dataplane_client ${PROJECT_SOURCE_DIR}/clients/cpp/dataplane_client.cc)
target_link_libraries(ropekv_dataplane_client PUBLIC ropekv_client ropekv_proto gRPC::grpc++
  absl::status absl::statusor absl::strings)
target_compile_options(ropekv_dataplane_client PRIVATE ${ROPEKV_WARNINGS})

# Unit tests: the registry (names, ranges, leases, the SIGBUS guard, unregister waiting) and the
# copies over an in-process KvCache / SessionStore.
ropekv_test(NAME buffer_registry_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/buffer_registry_test.cc
          ${PROJECT_SOURCE_DIR}/tests/unit/cache/dataplane_test.cc
  LIBS ropekv_cache)

# Integration test: a real ropekvd on loopback, shared memory made by the test (the client).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/dataplane_test.cc)
  ropekv_test(NAME dataplane_test LABELS integration
    SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/dataplane_test.cc
    LIBS ropekv_dataplane_client ropekv_client ropekv_cache ropekv_test_daemon)
  add_dependencies(dataplane_test ropekvd)
endif()

# GPU test: CUDA IPC buffers of this process registered with a real ropekvd (skips without a GPU).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/tests/gpu/dataplane_gpu_test.cc)
  ropekv_test(NAME dataplane_gpu_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/dataplane_gpu_test.cc
    LIBS ropekv_dataplane_client ropekv_client ropekv_cache ropekv_test_daemon
         CUDA::cudart_static)
  add_dependencies(dataplane_gpu_test ropekvd)
endif()

# Benchmark: Get of a Llama-3-8B-shaped cache by gRPC bytes, shared memory, CUDA IPC (CUDA builds
# with a GPU) vs memcpy / cudaMemcpy of the same bytes, against a ropekvd it starts.
if(EXISTS ${PROJECT_SOURCE_DIR}/bench/dataplane_bench.cc)
  add_executable(dataplane_bench ${PROJECT_SOURCE_DIR}/bench/dataplane_bench.cc)
  target_link_libraries(dataplane_bench PRIVATE ropekv_dataplane_client ropekv_client
    absl::flags absl::flags_parse absl::str_format)
  if(ROPEKV_WITH_CUDA)
    target_link_libraries(dataplane_bench PRIVATE CUDA::cudart_static)
  endif()
  target_compile_options(dataplane_bench PRIVATE ${ROPEKV_WARNINGS})
  target_compile_definitions(dataplane_bench PRIVATE ROPEKVD_PATH="$<TARGET_FILE:ropekvd>")
  set_target_properties(dataplane_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR})
endif()

# Python: torch CUDA tensors registered by IPC handle (tests/python/test_cuda_ipc.py), flat and as
# paged pools. pytest exits 5 when the module skips itself (no torch, no GPU): ctest shows a skip.
find_program(ROPEKV_PYTHON3 python3 PATHS /usr/bin NO_DEFAULT_PATH)
if(ROPEKV_PYTHON3 AND EXISTS ${PROJECT_SOURCE_DIR}/tests/python/test_cuda_ipc.py)
  add_test(NAME python_cuda_ipc
           COMMAND ${ROPEKV_PYTHON3} -m pytest -q -p no:cacheprovider
                   ${PROJECT_SOURCE_DIR}/tests/python/test_cuda_ipc.py)
  set_tests_properties(python_cuda_ipc PROPERTIES
    LABELS "python;gpu"
    TIMEOUT 300
    SKIP_RETURN_CODE 5
    ENVIRONMENT
      "PYTHONPATH=${PROJECT_BINARY_DIR}/python;ROPEKVD=$<TARGET_FILE:ropekvd>;PYTHONDONTWRITEBYTECODE=1")
endif()
