# Prompt modules (Prompt Cache) and parallel contexts (APE), issue 6: cache/modules.{h,cc} join
# ropekv_cache (over ropekv_prompt_schema's layouts, the KvCache's segments and kernels/ape); the
# gRPC side (server/modules_service.cc, clients/cpp/modules_client.cc) sits in ropekv_server and
# ropekv_client. Included at the end of cache/CMakeLists.txt; the feature's tests live here too
# (targets of other directories are linked by name, resolved at generate time).

# The CUDA path of the daemon's Attend check (host buffers in, host results out); a stub that
# answers UNIMPLEMENTED without CUDA.
if(ROPEKV_WITH_CUDA)
  add_library(ropekv_modules_cuda modules_cuda.cu)
  target_link_libraries(ropekv_modules_cuda PUBLIC ropekv_ape CUDA::cudart_static)
else()
  add_library(ropekv_modules_cuda modules_nocuda.cc)
  target_link_libraries(ropekv_modules_cuda PUBLIC ropekv_ape)
  target_compile_options(ropekv_modules_cuda PRIVATE ${ROPEKV_WARNINGS})
endif()

target_sources(ropekv_cache PRIVATE modules.cc)
target_link_libraries(ropekv_cache PUBLIC ropekv_prompt_schema ropekv_ape ropekv_modules_cuda)

# The reference Llama frontend (clients/llama) plays the frontend in the tests. Its option is
# declared in clients/, which is configured after cache/: unset means its default, ON.
if(NOT DEFINED ROPEKV_LLAMA OR ROPEKV_LLAMA)
  # Unit tests: schemas, module and context storage, composition vs a reference transformer, APE.
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/cache/modules_test.cc)
    ropekv_test(NAME modules_test LABELS unit
      SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/modules_test.cc
      LIBS ropekv_cache ropekv_llama)
  endif()
  # Integration test: a real ropekvd on loopback, the real ModulesClient.
  if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/modules_test.cc)
    ropekv_test(NAME modules_service_test LABELS integration
      SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/modules_test.cc
      LIBS ropekv_client ropekv_cache ropekv_llama ropekv_test_daemon)
    add_dependencies(modules_service_test ropekvd)
  endif()
endif()

# GPU test: Attend on CUDA equals the CPU reference (skips itself without a GPU).
if(ROPEKV_WITH_CUDA AND EXISTS ${PROJECT_SOURCE_DIR}/tests/gpu/modules_gpu_test.cc)
  ropekv_test(NAME modules_gpu_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/modules_gpu_test.cc
    LIBS ropekv_cache)
endif()
