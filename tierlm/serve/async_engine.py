"""One engine, many asyncio clients: a background thread owns the (not thread-safe) EngineCore.

    asyncio side                          engine thread (the only code that touches EngineCore)
    ------------                          -----------------------------------------------------
    add_request() --_Add-->  commands  -->  loop:  publish gauges
    stream.close() --_Abort-->  queue          if idle: block on commands.get()   (no busy-wait)
                                               drain every pending command
    stream <-- call_soon_threadsafe --------   step(); route each RequestOutput to its stream

Invariants:
  * EngineCore is only called from the engine thread; the asyncio side only puts commands.
  * Commands run in order, between steps, so an abort always follows its add.
  * Every accepted request gets exactly one terminal item: its finished output, or an exception
    (EngineStepError when a step raised). A stream closed early sends an abort, which frees the
    request's KV blocks at the next command drain.
  * ``num_in_flight`` counts requests from submission until their stream ends or closes; it is
    the queue length that admission control compares against ``max_queue`` (it also counts adds
    the engine thread has not drained yet, which ``num_waiting + num_running`` would miss).
A step that raises fails the requests it held (they are aborted, their streams get the error)
and the loop goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tierlm.engine.engine import EngineCore
from tierlm.outputs import RequestOutput
from tierlm.sampling_params import SamplingParams
from tierlm.serve.metrics import ServerMetrics

log = logging.getLogger("tierlm.serve")


class QueueFullError(RuntimeError):
    """``max_queue`` requests are already waiting or running."""


class EngineStepError(RuntimeError):
    """The engine raised while running this request; the request was aborted."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down, or crashed outside a step)."""


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float  # perf_counter()
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


_STOP = object()  # the shutdown command
_CLOSED = object()  # put in a stream's own queue by close()


class RequestStream:
    """Async iterator over one request's outputs; ends after the finished one.

    ``close()`` (idempotent, event loop only) aborts the request if it has not finished and ends
    the iteration, also one blocked in another task: call it in a ``finally``.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue):
        self.request_id = request_id
        self._engine = engine
        self._outputs = outputs
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if self._done or item is _CLOSED:  # close() was called while this waited
            raise StopAsyncIteration
        if isinstance(item, BaseException) or item.finished:
            self._done = True
            self._engine._release(self)
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._engine._release(self)
            self._engine._commands.put(_Abort(self.request_id))
            self._outputs.put_nowait(_CLOSED)  # wakes a consumer blocked in __anext__


class AsyncEngine:
    def __init__(self, engine: EngineCore, metrics: ServerMetrics | None = None, max_queue: int = 64):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.max_queue = max_queue
        self.num_in_flight = 0  # touched only on the event loop
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Engine thread only: request id -> (loop, output queue, arrival time).
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, float]] = {}
        self._thread = threading.Thread(target=self._run, name="tierlm-engine", daemon=True)

    # -- asyncio side -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                          prompt: str | None = None) -> RequestStream:
        """Queue a request; returns once the engine accepted it.

        Raises QueueFullError (nothing queued), EngineDeadError, or the engine's own error for a
        request it refuses (RequestError: empty prompt, longer than the context, ...).
        """
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if self.num_in_flight >= self.max_queue:
            raise QueueFullError(f"{self.num_in_flight} requests are queued or running (--max-queue "
                                 f"{self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, f"req-{uuid.uuid4().hex}", asyncio.Queue())
        accepted = loop.create_future()
        self.num_in_flight += 1
        self._commands.put(_Add(stream.request_id, list(prompt_token_ids), params, prompt, time.perf_counter(),
                                loop, stream._outputs, accepted))
        try:
            await accepted
        except BaseException:
            stream.close()  # refused (the abort is then a no-op) or the caller was cancelled meanwhile
            raise
        return stream

    def _release(self, stream: RequestStream) -> None:
        self.num_in_flight -= 1

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._publish_state()
                if not self.engine.has_unfinished():
                    if not self._apply(self._commands.get()):  # idle: sleep until a command comes
                        return
                while True:
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    if not self._apply(cmd):
                        return
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as err:  # a bug outside step(): fail everyone rather than hang them
            log.exception("the engine thread crashed")
            for rid in list(self._streams):
                self._fail(rid, EngineDeadError(f"the engine thread crashed: {err}"))
            raise
        finally:
            for rid in list(self._streams):
                self._fail(rid, EngineDeadError("the server is shutting down"))

    def _apply(self, cmd) -> bool:
        """Run one command; False means stop."""
        if cmd is _STOP:
            return False
        if isinstance(cmd, _Abort):
            self._streams.pop(cmd.request_id, None)
            if cmd.request_id in self.engine.requests:  # unfinished: this abort frees its blocks
                self.engine.abort(cmd.request_id)
                self.metrics.record_finished("abort")
            return True
        try:
            self.engine.add_request(cmd.prompt_token_ids, cmd.params, request_id=cmd.request_id, prompt=cmd.prompt)
        except Exception as err:  # a request the engine refuses; the handler turns it into a 400
            _call_in_loop(cmd.loop, _settle, cmd.accepted, err)
            return True
        self._streams[cmd.request_id] = (cmd.loop, cmd.outputs, cmd.arrival_time)
        self.metrics.record_added(len(cmd.prompt_token_ids))
        _call_in_loop(cmd.loop, _settle, cmd.accepted, None)
        return True

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as err:
            log.exception("an engine step failed; failing the requests it held")
            # The step's requests are the running ones (schedule() moves joiners there). If none
            # are running the failure came before any joined, so the waiting ones are failed.
            held = [r.request_id for r in self.engine.scheduler.running] or list(self.engine.requests)
            for rid in held:
                try:
                    self.engine.abort(rid)
                except Exception:
                    log.exception("aborting %s after the failed step also failed", rid)
                self.metrics.record_finished("error")
                self._fail(rid, EngineStepError(f"the engine failed while running this request: {err}"))
            return
        self.metrics.record_step(time.perf_counter() - t0)
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is None:
                continue
            loop, outputs_queue, arrival = entry
            self.metrics.record_output(out, arrival)
            if out.finished:
                del self._streams[out.request_id]
            _call_in_loop(loop, outputs_queue.put_nowait, out)

    def _fail(self, request_id: str, err: BaseException) -> None:
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            _call_in_loop(entry[0], entry[1].put_nowait, err)

    def _publish_state(self) -> None:
        blocks = self.engine.blocks
        self.metrics.set_engine_state(num_waiting=self.engine.num_waiting, num_running=self.engine.num_running,
                                      num_used_blocks=blocks.num_used_blocks, num_free_blocks=blocks.num_free_blocks)


def _settle(future: asyncio.Future, err: BaseException | None) -> None:
    if future.done():  # the submitter was cancelled; its close() already sent the abort
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(err)


def _call_in_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed (server shutting down): nobody is listening any more
        pass
