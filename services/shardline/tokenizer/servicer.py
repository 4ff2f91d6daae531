"""gRPC servicer for the tokenizer: protobuf <-> TokenizerCore, nothing else."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from shardline.common.request_limits import MAX_CHAT_MESSAGES
from shardline.common.server import InvalidArgument
from shardline.tokenizer.core import DetokenizeItem, TokenizerCore
from shardline.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc

# Detokenize calls of up to this many ids in all run on the event loop, larger ones on a thread
INLINE_DETOKENIZE_TOKENS = 4096

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Runs encoding calls on one worker thread: the event loop stays free for health checks and
    cancellations, and the encoder (not thread-safe) is only ever used by one thread. Decoding
    has its own backend: small Detokenize calls run on the loop, large ones on a second thread.
    Text longer than max_text_chars is refused on the loop, before it waits for the thread."""

    def __init__(self, core: TokenizerCore, max_text_chars: int):
        self.core = core
        self.max_text_chars = max_text_chars
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self._decode_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detokenize")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._decode_executor.shutdown(wait=False, cancel_futures=True)

    def _check_chars(self, n: int, what: str) -> None:
        if n > self.max_text_chars:
            raise InvalidArgument(f"{what} {n} characters; at most {self.max_text_chars} are "
                                  "accepted")

    async def Tokenize(self, request, context):
        self._check_chars(sum(len(t) for t in request.texts), "texts have")
        results = await self._run(self.core.tokenize, list(request.texts), request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(results=[generate_pb2.TokenIds(ids=ids) for ids in results])

    async def ApplyChatTemplate(self, request, context):
        if len(request.messages) > MAX_CHAT_MESSAGES:
            raise InvalidArgument(f"at most {MAX_CHAT_MESSAGES} messages, got "
                                  f"{len(request.messages)}")
        self._check_chars(sum(len(m.role) + len(m.content) for m in request.messages),
                          "messages have")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        prompt = await self._run(self.core.apply_chat_template, messages, request.add_generation_prompt)
        return tokenizer_pb2.TokenizeResponse(results=[generate_pb2.TokenIds(ids=prompt.token_ids)],
                                              rendered=prompt.text)

    async def Detokenize(self, request, context):
        return await self._detokenize(request)

    async def DetokenizeStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self._detokenize(request)

    async def _detokenize(self, request) -> tokenizer_pb2.DetokenizeResponse:
        items = [DetokenizeItem(list(it.token_ids), it.read_offset, it.skip_special_tokens)
                 for it in request.items]
        if sum(len(it.token_ids) for it in items) <= INLINE_DETOKENIZE_TOKENS:
            # a step's deltas (a few ids per sequence) decode in tens of microseconds: on the
            # event loop (decoding has its own backend, see TokenizerCore) rather than through
            # the worker thread, whose hand-off cost ~1 ms of CPU per call on 2 loaded cores
            results = self.core.detokenize(items)
        else:
            results = await asyncio.get_running_loop().run_in_executor(
                self._decode_executor, self.core.detokenize, items)
        return tokenizer_pb2.DetokenizeResponse(results=[
            tokenizer_pb2.DetokenizeResult(text=r.text, prefix_advance=r.prefix_advance,
                                           read_offset=r.read_offset) for r in results])

    async def GetInfo(self, request, context):
        info = self.core.info()
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids, bos_token_id=info.bos_token_id,
            has_chat_template=info.has_chat_template, name=info.name)
