"""Shipped models (NAME.safetensors + NAME.json model cards, package data); see rnan_fast.weights.zoo."""
from rnan_fast.weights.zoo import (DEFAULT_MODEL, ENV_FOLDER, WeightsError, available, card, check_sigma, export,
                                   folder, load, load_with_card, sha256_of, sigma_range, verify, weights_path,
                                   write_weights)

__all__ = ["DEFAULT_MODEL", "ENV_FOLDER", "WeightsError", "available", "card", "check_sigma", "export", "folder",
           "load", "load_with_card", "sha256_of", "sigma_range", "verify", "weights_path", "write_weights"]
