"""Triton's interpreter mode (the README's CPU test set-up) is safe from threads: interpreted launches are serialised,
so ops and decoders called from several threads at once give the reference's results instead of crashing."""

from __future__ import annotations

import inspect
import threading

import torch
from helpers import needs_interpreter

from fastdec import ops
from fastdec.kernels import attention, group_norm_act, patch_unembed, rms_norm_act
from fastdec.kernels.support import dispatch
from fastdec.models.autoencoder_kl import AutoencoderKLDecoder

THREADS = 4


def run_in_threads(work) -> list[str]:
    """Runs work(index) in THREADS threads started together; returns the errors they raised."""
    errors: list[str] = []
    barrier = threading.Barrier(THREADS)

    def target(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except Exception as error:  # collected: a thread's exception does not fail the test by itself
            errors.append(f"thread {index}: {type(error).__name__}: {str(error)[:300]}")

    threads = [threading.Thread(target=target, args=(index,)) for index in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors


def test_every_triton_op_runs_on_cpu_through_the_locked_launcher():
    """Each Triton op's CPU kernel (in its kernels/<op>.py) picks its launcher through dispatch.cpu_kernel (the
    lock), never directly."""
    sources = {name: inspect.getsource(module) for name, module in ops.OP_MODULES.items()}
    source = inspect.getsource(ops) + inspect.getsource(dispatch) + "".join(sources.values())
    assert source.count("if triton_on_cpu() else") == 1, "a CPU kernel picks its Triton launcher without the lock"
    assert all(f"cpu_kernel({name}_triton, {name}_reference)" in sources[name] for name in ops.TRITON_OPS)


@needs_interpreter("group_norm_act", "rms_norm_act", "attention", "patch_unembed")
def test_every_triton_op_from_threads_matches_its_reference():
    def work(index: int) -> None:
        g = torch.Generator().manual_seed(index)
        for _ in range(2):
            x = torch.randn(1, 32, 9, 7, generator=g)
            torch.testing.assert_close(ops.group_norm_act(x, 8, None, None, 1e-6, "silu"),
                                       group_norm_act.group_norm_act_reference(x, 8, None, None, 1e-6, "silu"))
            q, k, v = torch.randn(3, 1, 2, 17, 16, generator=g)
            torch.testing.assert_close(ops.attention(q, k, v), attention.attention_reference(q, k, v, None),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ops.rms_norm_act(x, None, None, 1e-6, "silu"),
                                       rms_norm_act.rms_norm_act_reference(x, None, None, 1e-6, "silu"))
            tokens = torch.randn(1, 6, 2 * 2 * 3, generator=g)
            torch.testing.assert_close(ops.patch_unembed(tokens, 2, 2, 3),
                                       patch_unembed.patch_unembed_reference(tokens, 2, 2, 3))

    assert run_in_threads(work) == []


@needs_interpreter("group_norm_act", "attention")
def test_decoding_from_threads():
    torch.manual_seed(0)
    decoder = AutoencoderKLDecoder(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                   latent_channels=4).eval()
    latents = torch.randn(THREADS, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = [decoder.decode(z) for z in latents]
    outputs: dict[int, torch.Tensor] = {}

    def work(index: int) -> None:
        with torch.no_grad():
            outputs[index] = decoder.decode(latents[index])

    assert run_in_threads(work) == []
    for index in range(THREADS):
        torch.testing.assert_close(outputs[index], expected[index], rtol=0, atol=0)
