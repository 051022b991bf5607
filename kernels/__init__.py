"""Triton kernels of rnan_fast, installed as rnan_fast.kernels. Imports only torch and triton."""
