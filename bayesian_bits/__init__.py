"""Bayesian Bits: learned mixed-precision quantization and pruning (van Baalen et al., NeurIPS 2020)."""
