"""gRPC servicer for the tokenizer: protobuf <-> TokenizerCore, nothing else."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from shardline.tokenizer.core import DetokenizeItem, TokenizerCore
from shardline.v1 import generate_pb2, tokenizer_pb2, tokenizer_pb2_grpc

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Runs core calls on one worker thread: the event loop stays free for health checks and
    cancellations, and the (not thread-safe) tokenizer is only ever used by one thread."""

    def __init__(self, core: TokenizerCore):
        self.core = core
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def Tokenize(self, request, context):
        results = await self._run(self.core.tokenize, list(request.texts), request.add_special_tokens)
        return tokenizer_pb2.TokenizeResponse(results=[generate_pb2.TokenIds(ids=ids) for ids in results])

    async def ApplyChatTemplate(self, request, context):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        prompt = await self._run(self.core.apply_chat_template, messages, request.add_generation_prompt)
        return tokenizer_pb2.TokenizeResponse(results=[generate_pb2.TokenIds(ids=prompt.token_ids)],
                                              rendered=prompt.text)

    async def Detokenize(self, request, context):
        items = [DetokenizeItem(list(it.token_ids), it.read_offset, it.skip_special_tokens)
                 for it in request.items]
        results = await self._run(self.core.detokenize, items)
        return tokenizer_pb2.DetokenizeResponse(results=[
            tokenizer_pb2.DetokenizeResult(text=r.text, prefix_advance=r.prefix_advance,
                                           read_offset=r.read_offset) for r in results])

    async def GetInfo(self, request, context):
        info = self.core.info()
        return tokenizer_pb2.TokenizerInfo(
            vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids, bos_token_id=info.bos_token_id,
            has_chat_template=info.has_chat_template, name=info.name)
