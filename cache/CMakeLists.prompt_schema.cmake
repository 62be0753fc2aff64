# cache/prompt_schema: Prompt Cache schemas (PML with token ids) and prompt layouts. Pure: no
# storage, no gRPC. Included from cache/CMakeLists.txt.
add_library(ropekv_prompt_schema prompt_schema.cc)
target_link_libraries(ropekv_prompt_schema PUBLIC
  absl::status absl::statusor absl::strings absl::flat_hash_map absl::span)
target_compile_options(ropekv_prompt_schema PRIVATE ${ROPEKV_WARNINGS})

ropekv_test(NAME prompt_schema_test LABELS unit
  SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/prompt_schema_test.cc
  LIBS ropekv_prompt_schema)
