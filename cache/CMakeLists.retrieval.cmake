# Retrieval (issue 7, the service half), included at the end of cache/CMakeLists.txt: the page
# metadata store, Select over cached prefixes and sessions, kept selections and Gather
# (cache/retrieval.{h,cc}, over kernels/topk's CPU path) join ropekv_cache; the gRPC side
# (server/retrieval_service.cc, clients/cpp/retrieval_client.cc) sits in ropekv_server and
# ropekv_client. The feature's tests are registered here too (targets of other directories are
# linked by name, resolved at generate time).
target_sources(ropekv_cache PRIVATE retrieval.cc)
target_link_libraries(ropekv_cache PUBLIC ropekv_topk)

# Unit tests: Select over an in-process KvCache / SessionStore against fp64 references.
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/unit/cache/retrieval_test.cc)
  ropekv_test(NAME retrieval_test LABELS unit
    SOURCES ${PROJECT_SOURCE_DIR}/tests/unit/cache/retrieval_test.cc
    LIBS ropekv_cache)
endif()

# Integration test: a real ropekvd on loopback, the real RetrievalClient.
if(EXISTS ${PROJECT_SOURCE_DIR}/tests/integration/retrieval_test.cc)
  ropekv_test(NAME retrieval_service_test LABELS integration
    SOURCES ${PROJECT_SOURCE_DIR}/tests/integration/retrieval_test.cc
    LIBS ropekv_client ropekv_cache ropekv_test_daemon)
  add_dependencies(retrieval_service_test ropekvd)
endif()
