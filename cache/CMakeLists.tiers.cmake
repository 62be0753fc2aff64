# Tiers (issue 4), included at the end of cache/CMakeLists.txt: the disk tier over RocksDB (in
# ropekv_cache), the GPU tier and pinned host memory (ropekv_gpu_tier: CUDA when built with it,
# stubs that report the tier absent otherwise). Tests under tests/unit/cache and tests/gpu;
# benchmarks bench/disk_bench.cc and bench/tier_bench.cu.
add_library(ropekv_gpu_tier gpu_tier.cc)
if(ROPEKV_WITH_CUDA)
  target_sources(ropekv_gpu_tier PRIVATE gpu_tier.cu pinned_allocator.cu)
  target_link_libraries(ropekv_gpu_tier PUBLIC CUDA::cudart_static)
else()
  target_sources(ropekv_gpu_tier PRIVATE tiers_nocuda.cc)
endif()
target_link_libraries(ropekv_gpu_tier PUBLIC
  ropekv_allocator ropekv_kernels_common absl::status absl::statusor absl::strings
  absl::synchronization absl::flat_hash_map absl::span)
target_compile_options(ropekv_gpu_tier PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${ROPEKV_WARNINGS}>)

target_sources(ropekv_cache PRIVATE disk_tier.cc tier_policy.cc)
target_link_libraries(ropekv_cache PUBLIC ropekv_gpu_tier RocksDB::rocksdb-shared)

ropekv_test(NAME disk_tier_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/disk_tier_test.cc
  LIBS ropekv_cache)
ropekv_test(NAME tier_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/tier_test.cc
  LIBS ropekv_cache)
ropekv_test(NAME gpu_tier_unit_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/tier_test_gpu_slots.cc
  LIBS ropekv_gpu_tier)

if(EXISTS ${PROJECT_SOURCE_DIR}/bench/disk_bench.cc)
  add_executable(disk_bench ${PROJECT_SOURCE_DIR}/bench/disk_bench.cc)
  target_link_libraries(disk_bench PRIVATE ropekv_cache)
endif()

if(ROPEKV_WITH_CUDA)
  ropekv_test(NAME gpu_tier_test LABELS gpu
    SOURCES ${PROJECT_SOURCE_DIR}/tests/gpu/gpu_tier_test.cc
    LIBS ropekv_cache)
  if(EXISTS ${PROJECT_SOURCE_DIR}/bench/tier_bench.cu)
    add_executable(tier_bench ${PROJECT_SOURCE_DIR}/bench/tier_bench.cu)
    target_link_libraries(tier_bench PRIVATE ropekv_gpu_tier)
  endif()
endif()
