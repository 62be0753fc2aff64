# Helpers shared by every directory's CMakeLists.txt.

# Every target sees the repository root, so includes read "kernels/rope/rope.h".
include_directories(${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})

set(ROPEKV_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)

# ropekv_test(NAME name SOURCES a.cc ... LIBS lib ... LABELS unit|integration|gpu|python
#             [ARGS arg ...])
# A GoogleTest binary registered with ctest under its labels, run with ARGS (e.g. a filter).
function(ropekv_test)
  cmake_parse_arguments(T "" "NAME" "SOURCES;LIBS;LABELS;ARGS" ${ARGN})
  add_executable(${T_NAME} ${T_SOURCES})
  target_link_libraries(${T_NAME} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main GTest::gmock)
  target_compile_options(${T_NAME} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${ROPEKV_WARNINGS}>)
  add_test(NAME ${T_NAME} COMMAND ${T_NAME} ${T_ARGS})
  set_tests_properties(${T_NAME} PROPERTIES LABELS "${T_LABELS}" TIMEOUT 900)
endfunction()
