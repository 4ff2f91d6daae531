"""How big a request may be, checked before any work on it: bytes first (gRPC refuses a message
longer than a server's receive limit from its length prefix, before reading it), then
characters (before tokenizing), then tokens (the scheduler, after tokenizing).

Only the defaults and the arithmetic that sizes each server's receive limit from the limits it
enforces live here; the services raise their own errors. Imports nothing of shardline.
"""
from __future__ import annotations

# -- prompts (the scheduler and the tokenizer) ------------------------------------------------
# A prompt longer than this many characters per token of the context is refused untokenized:
# English averages about 4 characters a token, code with long runs of spaces more.
PROMPT_CHARS_PER_TOKEN = 8
# The context that sizes a byte limit when the real one is not known yet (the scheduler's gRPC
# server starts before its workers report theirs).
BYTES_LIMIT_CONTEXT_TOKENS = 131072
UTF8_MAX_BYTES = 4
# A request's bytes besides its prompt text: sampling, stop strings, message framing.
REQUEST_SLACK_BYTES = 1 << 20

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_CHAT_MESSAGES = 1024

# -- responses (channels to other services of the deployment) ---------------------------------
# Responses come from the deployment's own services and are small (tokens, a rendered chat
# template); this only bounds what a broken peer can make a caller allocate.
CHANNEL_RECEIVE_BYTES = 64 << 20

# -- Step messages (the workers) --------------------------------------------------------------
DEFAULT_MAX_STEP_TOKENS = 8192
HIDDEN_VALUE_BYTES = 4            # float32, the widest dtype hidden states travel in
PLAN_BYTES_PER_TOKEN = 256        # a token id, and its sequence's fields when it is alone
PLAN_ADMISSIONS = 256             # sequences admitted in one step, each with its whole table


def prompt_chars(context_tokens: int) -> int:
    """The longest prompt in characters for a context of context_tokens."""
    return PROMPT_CHARS_PER_TOKEN * context_tokens


def request_bytes(max_chars: int) -> int:
    """A receive limit that fits a request of max_chars characters of any kind."""
    return max_chars * UTF8_MAX_BYTES + REQUEST_SLACK_BYTES


def step_message_bytes(max_step_tokens: int, hidden_size: int, max_position: int) -> int:
    """The largest StepRequest a stage may be sent: max_step_tokens hidden states of
    hidden_size float32 values, their plan, and PLAN_ADMISSIONS admissions each carrying up to
    max_position prefix token ids and block ids (varints of up to 5 bytes)."""
    hidden = max_step_tokens * hidden_size * HIDDEN_VALUE_BYTES
    plan = max_step_tokens * PLAN_BYTES_PER_TOKEN + PLAN_ADMISSIONS * max_position * 2 * 5
    return hidden + plan + REQUEST_SLACK_BYTES
