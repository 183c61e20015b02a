"""Triton kernels for packed ternary (and binary) weights, installed as bitnet.kernels."""
