"""Server arguments shared by the tests that start real SGLang servers on this CPU."""

# float32: bfloat16 matmuls are ~100x slower on CPUs without AVX512-BF16 or AMX, and both
# configurations compared use the same dtype. --sleep-on-idle: an idle scheduler otherwise
# spins on a core.
SERVER_BASE = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "32768",
               "--sleep-on-idle"]
