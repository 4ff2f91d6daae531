"""The scheduler's view of the tokenizer service: tokenize, chat template, and batched
incremental detokenization (concurrent requests' deltas share one message on a stream that
stays open)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from shardline.common import telemetry
from shardline.common.server import InvalidArgument, Unavailable, channel
from shardline.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc


def tokenizer_error(exc: grpc.aio.AioRpcError) -> Exception:
    """A failed tokenizer call as the error its request gets: the code mapped, only the
    details kept (never the channel's debug string)."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:    # the request is over its size limits
        return InvalidArgument(f"the tokenizer refused the prompt: {details}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return Unavailable(f"tokenizer {code.name}: {details}")
    return RuntimeError(f"tokenizer call failed: {code.name}: {details}")


@dataclass
class DetokenizeState:
    """One sequence's incremental detokenization: ids from the prefix offset on."""
    token_ids: list[int] = field(default_factory=list)
    read_offset: int = 0


# how a broken detokenize stream ends (None: not a gRPC status: closed, or already finished)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
              None)


def _code(exc: BaseException):
    return exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None


class TokenizerClient:
    def __init__(self, address: str, timeout_s: float):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = channel(address)
        self._stub = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self._pending: list[tuple[DetokenizeState, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._stream = None                 # the open DetokenizeStream call
        self.info: tokenizer_pb2.TokenizerInfo | None = None

    async def connect(self, timeout_s: float) -> tokenizer_pb2.TokenizerInfo:
        self.info = await self._stub.GetInfo(tokenizer_pb2.TokenizerInfoRequest(),
                                             timeout=timeout_s, wait_for_ready=True)
        return self.info

    async def _call(self, rpc, request):
        """One unary call; a failure raised as tokenizer_error says."""
        try:
            return await rpc(request, timeout=self.timeout_s, metadata=telemetry.metadata())
        except grpc.aio.AioRpcError as exc:
            raise tokenizer_error(exc) from None

    async def tokenize(self, text: str) -> list[int]:
        res = await self._call(self._stub.Tokenize, tokenizer_pb2.TokenizeRequest(
            texts=[text], add_special_tokens=True))
        return list(res.results[0].ids)

    async def apply_chat_template(self, messages: list[generate_pb2.ChatMessage]) -> list[int]:
        res = await self._call(self._stub.ApplyChatTemplate, tokenizer_pb2.ChatTemplateRequest(
            messages=messages, add_generation_prompt=True))
        return list(res.results[0].ids)

    async def token_texts(self, ids: list[int]) -> list[str]:
        """Each id's own text (special tokens included), e.g. for logprobs."""
        res = await self._call(self._stub.Detokenize, tokenizer_pb2.DetokenizeRequest(items=[
            tokenizer_pb2.DetokenizeItem(token_ids=[i], skip_special_tokens=False) for i in ids]))
        return [r.text for r in res.results]

    async def detokenize(self, state: DetokenizeState, new_ids: list[int]) -> str:
        """Append new_ids to state and return the text they complete (maybe '')."""
        state.token_ids.extend(new_ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((state, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)          # let concurrent handlers join this batch
            batch, self._pending = self._pending, []
            req = tokenizer_pb2.DetokenizeRequest(items=[
                tokenizer_pb2.DetokenizeItem(token_ids=s.token_ids, read_offset=s.read_offset,
                                             skip_special_tokens=True) for s, _ in batch])
            try:
                res = await self._detokenize_retrying(req)
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                if isinstance(exc, grpc.aio.AioRpcError):
                    exc = tokenizer_error(exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (state, fut), r in zip(batch, res.results):
                del state.token_ids[:r.prefix_advance]
                state.read_offset = r.read_offset - r.prefix_advance
                if not fut.done():
                    fut.set_result(r.text)

    async def _detokenize_retrying(self, req: tokenizer_pb2.DetokenizeRequest):
        """_detokenize, sent again on a new stream while the stream breaks (a restarted or
        drained tokenizer: the batch carries its whole state), for up to the timeout. The
        first resend can meet the dead connection still taken for open (the kernel has not
        yet reported the peer gone: "sendmsg: Broken pipe"), so it backs off and tries again."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        delay = 0.05
        while True:
            try:
                return await self._detokenize(req)
            except (grpc.aio.AioRpcError, Unavailable, asyncio.InvalidStateError) as exc:
                if (_code(exc) not in _RETRYABLE
                        or asyncio.get_running_loop().time() + delay > deadline):
                    raise
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)

    async def _detokenize(self, req: tokenizer_pb2.DetokenizeRequest) -> tokenizer_pb2.DetokenizeResponse:
        """One batch through the DetokenizeStream call (opened on first use, reopened after an
        error; _flush sends one batch at a time, so responses pair with requests in order)."""
        if self._stream is None:       # waits (up to the timeout) for a tokenizer to connect
            self._stream = self._stub.DetokenizeStream(wait_for_ready=True)
        call = self._stream
        try:
            await asyncio.wait_for(call.write(req), self.timeout_s)
            res = await asyncio.wait_for(call.read(), self.timeout_s)
            if res is grpc.aio.EOF:
                raise Unavailable("tokenizer closed the detokenize stream")
            return res
        except BaseException:
            call.cancel()
            self._stream = None
            raise

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        await self._channel.close()
