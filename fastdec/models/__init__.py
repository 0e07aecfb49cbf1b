"""Decoder families, one module each, built from fastdec.ops; each registers itself in fastdec.models.registry."""
