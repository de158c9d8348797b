"""A step's micro-batches side by side in one process: T threads, each computing one micro-batch
on one intra-op thread, instead of one micro-batch at a time on T threads.

One sequence's matmuls are too small for T threads to share well (SmolLM2, 2 threads: 114
tokens/s, where 2 single-threaded workers reach 195), so when a worker owns several micro-batches
of a step it computes up to T of them at once, as T data-parallel workers would, without T
copies of the model or a collective. Each micro-batch's gradients are its own
(`torch.autograd.grad`, never accumulated into .grad) and are summed in micro-batch order
afterwards, as one thread sums them, and every kernel runs on one thread as at --threads 1: the
bits are --threads 1's, which strict and portable make those of every thread count.

torch releases the GIL inside its kernels; the Python between them (PEFT and transformers'
forward) takes turns. The dropout masks (qlorax.dropout) and the portable rotary tables are safe
to use from several threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

Result = TypeVar("Result")


class MicroBatchPool:
    """Runs a function over micro-batch indices: on `threads` threads of one intra-op thread each
    when there are several, else on the calling thread (with its own intra-op threads)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qlorax-micro-batch") \
            if threads > 1 else None

    def map(self, compute: Callable[[int], Result], micro_batches: Sequence[int]) -> list[Result]:
        """[compute(k) for k in micro_batches], in that order."""
        if self._pool is None or len(micro_batches) < 2:
            return [compute(k) for k in micro_batches]
        import torch

        intra_op = torch.get_num_threads()

        def on_one_thread(k: int) -> Result:
            torch.set_num_threads(1)  # this thread's kernels, and MKL's (torch sets both)
            return compute(k)

        try:
            return list(self._pool.map(on_one_thread, micro_batches))
        finally:
            torch.set_num_threads(intra_op)  # the optimizer step and evaluation use every thread

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def gradients(loss: Any, trainable: list[Any]) -> tuple[Any, ...]:
    """d loss / d each trainable tensor, None for one outside the loss's graph (as .grad would
    stay), without touching any .grad: micro-batches computed side by side stay apart."""
    import torch

    return torch.autograd.grad(loss, trainable, allow_unused=True)


# The pool of one thread: micro-batches one after the other on the caller's intra-op threads.
ONE_AT_A_TIME = MicroBatchPool(1)
