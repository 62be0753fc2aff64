# Issue 4, included at the end of server/CMakeLists.txt: the YAML configuration file
# (server/config_file.{h,cc}, yaml-cpp) and the tier persistence tests that need ropekvd.
target_sources(ropekv_server PRIVATE config_file.cc)
target_link_libraries(ropekv_server PUBLIC yaml-cpp absl::flags_reflection)

if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/server/config_file_test.cc)
  ropekv_test(NAME server_config_file_test LABELS unit
    SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/server/config_file_test.cc
    LIBS ropekv_server)
endif()

# Restart persistence, kill -9 during puts, corrupted records: a real ropekvd and the real client
# (and the disk tier itself, to find the record it damages).
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/persistence_test.cc)
  ropekv_test(NAME persistence_test LABELS integration
    SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/persistence_test.cc
    LIBS ropekv_client ropekv_test_daemon ropekv_cache)
  add_dependencies(persistence_test ropekvd)
endif()

if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/persistence_cli_test.sh)
  add_test(NAME persistence_cli_test
           COMMAND ${PROJECT_SOURCE_DIR}/tests/integration/persistence_cli_test.sh
                   $<TARGET_FILE:ropekvd> $<TARGET_FILE:ropekv>
                   ${PROJECT_SOURCE_DIR}/deploy/ropekvd.yaml)
  set_tests_properties(persistence_cli_test PROPERTIES LABELS integration TIMEOUT 300)
endif()
if(TARGET server_config_file_test)
  target_compile_definitions(server_config_file_test PRIVATE
                             ROPEKV_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
endif()
