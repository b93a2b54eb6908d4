# Fails in TEST 3 on purpose: proves the harness sees failures.
.include "common.inc"
START
main:
    TEST 3
    li a0, 1
    CHECK a0, 2
    j pass
