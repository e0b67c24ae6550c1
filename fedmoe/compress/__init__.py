"""Compression for unlike clients: pruned sub-models (prune) and quantized weights and updates (quant)."""
