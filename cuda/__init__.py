"""Native sources of hf_fff (C++ CPU kernel, CUDA kernel). Installed as the package `hf_fff.csrc` so that
the JIT builder finds them in a wheel as well as in a source checkout; there is no Python code here."""
