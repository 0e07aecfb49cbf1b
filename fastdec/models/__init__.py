"""Decoder families, one module each, built from fastdec.ops only."""
