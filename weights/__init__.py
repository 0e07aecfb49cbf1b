"""Decoders trained with ``fastdec train`` and shipped with fastdec: one save_pretrained folder each (config.json,
fp16 model.safetensors, model_card.json). ``fastdec.load("<folder name>")`` loads them offline; in a wheel they are
package data under fastdec/weights/."""
