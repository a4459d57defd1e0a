"""One client call, several requests: ``n`` samples of a prompt and OpenAI's prompt lists.

vLLM runs ``n`` > 1 as ``n`` child requests of one parent (``vllm/v1/engine/parallel_sampling.py``)
and a list of prompts as one request per prompt. We do the same at the gateway: each sample is
its own request at the scheduler (its own id, SLO accounting and place in the batch), so the
scheduler needs to know nothing about ``n``. ``expand`` makes the children (with a seed, child i
samples with seed + i, as vLLM's ``ParentRequest`` does), ``start_choices`` submits them all,
and ``Choices`` streams them as one: ``deltas`` interleaves the children's deltas tagged with
their index, ``collect`` waits for every outcome, and ``close`` ends them all — a client that
leaves cancels every sample still running, not just the first.

Each child takes a place under its key's concurrency cap (the call's ``lease``, widened to the
number of children before any is submitted), all held until every child's stream is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from typing import AsyncGenerator

from accelgen.v1 import scheduler_pb2
from gateway.generation import ActiveRequest, Delta, GenerationService, Outcome, Prepared
from gateway.limits import NO_LEASE, Lease


def expand(prepared: Prepared, n: int) -> list[Prepared]:
    """``n`` independent samples of ``prepared`` (0 or 1: just it). Child 0 keeps its request id;
    each other child gets a fresh one. With a seed, child i samples with seed + i."""
    if n <= 1:
        return [prepared]
    children = []
    for i in range(n):
        submit = scheduler_pb2.SubmitRequest()
        submit.CopyFrom(prepared.submit)
        if i:
            submit.request_id = uuid.uuid4().hex
            if submit.sampling_params.HasField("seed"):
                submit.sampling_params.seed = prepared.submit.sampling_params.seed + i
        children.append(dataclasses.replace(prepared, submit=submit))
    return children


class Choices:
    """The requests of one client call, in choice order (OpenAI's ``index``)."""

    def __init__(self, actives: list[ActiveRequest], lease: Lease = NO_LEASE) -> None:
        self.actives = actives
        self.lease = lease

    @property
    def request_id(self) -> str:
        """The first child's id: the call's id in responses (``cmpl-ID``) and ``x-request-id``."""
        return self.actives[0].request_id

    async def deltas(self) -> AsyncGenerator[tuple[int, Delta], None]:
        """``(index, delta)`` of every child as they come; ends when all have finished. A child's
        failure (its stream could not be resumed) ends the whole call with that error."""
        try:
            if len(self.actives) == 1:
                async with contextlib.aclosing(self.actives[0].deltas()) as only:
                    async for delta in only:
                        yield 0, delta
                return
            queue: asyncio.Queue[tuple[int, Delta | None, BaseException | None]] = asyncio.Queue()

            async def pump(index: int, active: ActiveRequest) -> None:
                try:
                    async with contextlib.aclosing(active.deltas()) as deltas:
                        async for delta in deltas:
                            queue.put_nowait((index, delta, None))
                except Exception as exc:  # handed to the reader, which raises it
                    queue.put_nowait((index, None, exc))
                    return
                queue.put_nowait((index, None, None))

            tasks = [asyncio.ensure_future(pump(i, a)) for i, a in enumerate(self.actives)]
            try:
                running = len(tasks)
                while running:
                    index, delta, exc = await queue.get()
                    if exc is not None:
                        raise exc
                    if delta is None:
                        running -= 1
                        continue
                    yield index, delta
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self.close()

    async def collect(self) -> list[Outcome]:
        """Every child's outcome, in index order (non-streaming clients). Cancelled or failing,
        it ends every child (each one still running is cancelled at the scheduler)."""
        tasks = [asyncio.ensure_future(a.collect()) for a in self.actives]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    def close(self) -> None:
        """End every child's stream (cancelling those not finished) and give back the call's place."""
        try:
            for active in self.actives:
                active.close()
        finally:
            self.lease.release()


async def start_choices(service: GenerationService, children: list[Prepared], lease: Lease = NO_LEASE) -> Choices:
    """Submit every child; if one is refused, those already accepted are cancelled and the
    refusal is raised (the caller's ``lease`` is released by its ``until_failure``)."""
    if len(children) == 1:
        return Choices([await service.start(children[0])], lease)
    results = await asyncio.gather(*(service.start(p) for p in children), return_exceptions=True)
    actives = [r for r in results if isinstance(r, ActiveRequest)]
    failure = next((r for r in results if isinstance(r, BaseException)), None)
    if failure is not None:
        for active in actives:
            active.close()
        raise failure
    return Choices(actives, lease)
