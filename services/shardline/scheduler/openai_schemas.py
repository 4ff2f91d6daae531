"""Request bodies of the OpenAI HTTP API (pydantic), and their translation to GenerateRequest.

Fields are OpenAI's; `top_k`, `repetition_penalty`, `ignore_eos` and `priority` (admission
order, higher first; see GenerateRequest.priority) are Shardline extensions
(as in vLLM). Fields OpenAI defines that Shardline does not implement are refused with a 400
that names them (never silently ignored); unknown fields are ignored, as OpenAI's own clients
send new ones before servers know them.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from shardline.common.server import InvalidArgument
from shardline.protocol.limits import MAX_TOP_LOGPROBS
from shardline.scheduler.waiting_queue import MAX_PRIORITY
from shardline.v1 import common_pb2, generate_pb2

MAX_N = 16                       # choices per request (n), and prompts per completions request
OPENAI_DEFAULT_TEMPERATURE = 1.0
COMPLETIONS_DEFAULT_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
SEED_LIMIT = 1 << 63


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What both endpoints share."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-SEED_LIMIT, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # Shardline extensions
    top_k: int = Field(0, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)

    def refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise UnsupportedField(name, f"{name} is not supported; use repetition_penalty "
                                             "(a Shardline extension) instead")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def request(self, max_tokens: Optional[int], logprobs: bool, top_logprobs: int,
                choice: int) -> generate_pb2.GenerateRequest:
        """The GenerateRequest of one choice (the prompt is set by the caller)."""
        temperature = OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        s = common_pb2.SamplingParams(temperature=temperature, top_k=self.top_k,
                                        logprobs=logprobs, top_logprobs=top_logprobs)
        if self.top_p is not None:
            s.top_p = self.top_p
        if self.repetition_penalty is not None:
            s.repetition_penalty = self.repetition_penalty
        if self.seed is not None:           # choice i of a seeded request draws with seed + i
            s.seed = (self.seed + choice) % (1 << 64)
            s.has_seed = True
        return generate_pb2.GenerateRequest(max_tokens=max_tokens or 0, sampling=s,
                                            stop=self.stops(), ignore_eos=self.ignore_eos,
                                            priority=self.priority)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "best_of other than n is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts: text or token ids, one or several."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [p]
        else:
            out = list(p)
        if not out:
            raise InvalidArgument("prompt is empty")
        if len(out) * self.n > MAX_N:
            raise InvalidArgument(f"prompts x n must be <= {MAX_N}, got {len(out)} x {self.n}")
        return out

    def requests(self) -> list[generate_pb2.GenerateRequest]:
        """One GenerateRequest per (prompt, choice), prompt-major, as OpenAI numbers choices."""
        self.refuse_unsupported()
        max_tokens = self.max_tokens or COMPLETIONS_DEFAULT_MAX_TOKENS
        out = []
        for prompt in self.prompts():
            for i in range(self.n):
                req = self.request(max_tokens, self.logprobs is not None, self.logprobs or 0, i)
                if isinstance(prompt, str):
                    req.text = prompt
                else:
                    req.token_ids.ids.extend(prompt)
                out.append(req)
        return out


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    response_format: Optional[ResponseFormat] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported")
        if self.tool_choice not in (None, "none"):
            raise UnsupportedField("tool_choice", "tool_choice is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedField("response_format", "only response_format type 'text' is "
                                                      "supported")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs: true")

    def requests(self) -> list[generate_pb2.GenerateRequest]:
        self.refuse_unsupported()
        max_tokens = self.max_completion_tokens or self.max_tokens
        messages = [generate_pb2.ChatMessage(role=m.role, content=m.text()) for m in self.messages]
        out = []
        for i in range(self.n):
            req = self.request(max_tokens, self.logprobs, self.top_logprobs or 0, i)
            req.messages.messages.extend(messages)
            out.append(req)
        return out


class UnsupportedField(InvalidArgument):
    """A field OpenAI defines that Shardline does not implement (a 400 naming it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
