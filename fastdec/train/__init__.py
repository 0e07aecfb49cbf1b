"""Train fastdec decoders on a frozen encoder's latent space: ``fastdec.train.train`` and ``fastdec train``."""

from fastdec.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
