"""fastdec's Triton kernels, one op per module: the @triton.jit kernel(s), the launcher and the eager reference.

Shipped as the subpackage ``fastdec.kernels``; import the ops through ``fastdec.ops``, which registers them as
``torch.ops.fastdec.*`` and picks the backend.
"""
