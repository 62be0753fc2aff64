# Retrieval (issue 7, the service half), included at the end of cache/CMakeLists.txt: the page
# metadata store, Select over cached prefixes and sessions, kept selections and Gather
# (cache/retrieval.{h,cc}, over kernels/topk's CPU path, and its CUDA path through
# cache/retrieval_gpu.h) join ropekv_cache; the gRPC side
# (server/retrieval_service.cc, clients/cpp/retrieval_client.cc) sits in ropekv_server and
# ropekv_client. The feature's tests are registered here too (targets of other directories are
# linked by name, resolved at generate time).
target_sources(ropekv_cache PRIVATE retrieval.cc)
target_link_libraries(ropekv_cache PUBLIC ropekv_topk)

# The GPU path of Select (cache/retrieval_gpu.h: host views packed into a device arena, SelectCuda).
# Without CUDA a stub that answers UNAVAILABLE, so the store keeps SelectCpu.
if(ROPEKV_WITH_CUDA)
  add_library(ropekv_retrieval_gpu retrieval_gpu.cu)
  target_link_libraries(ropekv_retrieval_gpu PUBLIC ropekv_topk ropekv_kernels_common
    absl::status absl::statusor absl::strings absl::synchronization)
  target_link_libraries(ropekv_retrieval_gpu PRIVATE CUDA::cudart_static)
else()
  add_library(ropekv_retrieval_gpu retrieval_gpu_nocuda.cc)
  target_link_libraries(ropekv_retrieval_gpu PUBLIC ropekv_topk absl::status absl::statusor)
  target_compile_options(ropekv_retrieval_gpu PRIVATE ${ROPEKV_WARNINGS})
endif()
target_link_libraries(ropekv_cache PUBLIC ropekv_retrieval_gpu)

# Unit tests: Select over an in-process KvCache / SessionStore against fp64 references.
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/cache/retrieval_test.cc)
  ropekv_test(NAME retrieval_test LABELS unit
    SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/retrieval_test.cc
    LIBS ropekv_cache)
endif()

# Integration test: a real ropekvd on loopback, the real RetrievalClient. Its tests of a daemon
# selecting on the GPU (fixtures named *Gpu*) are a second ctest entry labelled gpu (they skip
# themselves without a GPU).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/retrieval_test.cc)
  ropekv_test(NAME retrieval_service_test LABELS integration
    SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/retrieval_test.cc
    LIBS ropekv_client ropekv_cache ropekv_test_daemon
    ARGS --gtest_filter=-*Gpu*)
  add_dependencies(retrieval_service_test ropekvd)
  add_test(NAME retrieval_service_gpu_test COMMAND retrieval_service_test --gtest_filter=*Gpu*)
  set_tests_properties(retrieval_service_gpu_test PROPERTIES LABELS gpu TIMEOUT 900)
endif()

# GPU test: Select through the store with device 0 equals device -1 (SelectCpu) on the same data
# (skips itself without a GPU).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/tests/gpu/retrieval_gpu_test.cc)
  ropekv_test(NAME retrieval_gpu_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/retrieval_gpu_test.cc
    LIBS ropekv_cache)
endif()

# Benchmark: one Select through the store on a 32K-token Llama-3-8B-shaped prefix and session, CPU
# path vs GPU path (docs/retrieval.md has the H100 figures).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/bench/retrieval_gpu_bench.cc)
  add_executable(retrieval_gpu_bench ${PROJECT_SOURCE_DIR}/bench/retrieval_gpu_bench.cc)
  target_link_libraries(retrieval_gpu_bench PRIVATE ropekv_cache absl::flags absl::flags_parse
    absl::str_format)
  target_compile_options(retrieval_gpu_bench PRIVATE ${ROPEKV_WARNINGS})
  set_target_properties(retrieval_gpu_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY
    ${PROJECT_BINARY_DIR})
endif()
