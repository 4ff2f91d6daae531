"""Fixtures of the GPU engine's tests. Without CUDA the Triton kernels run under
TRITON_INTERPRET=1 (tests/conftest.py sets it before anything imports Triton); this file
patches two bugs of Triton 3.6's interpreter (the compiled kernels are not affected)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import triton

from tests.unit.conftest import make_tiny_model


def _fix_interpreter() -> None:
    """Two bugs of Triton 3.6's interpreter (the compiled kernels are not affected):

    - a loop bound made of a loaded scalar goes through int() of a 1-element array, which
      numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172);
    - tl.dot multiplies bfloat16 operands as the uint16 bit patterns it stores them in.
    """
    from triton.runtime import interpreter
    original_patch = interpreter._patch_lang_tensor
    if getattr(original_patch, "fixed", False):
        return

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32),
                                         triton.language.float32)
                if x.dtype == triton.language.bfloat16 else x for x in (a, b))
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    patch_lang_tensor.fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter()


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A random tiny Llama checkpoint (HF transformers, from a config)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_mistral_swa(tmp_path_factory):
    """A random tiny Mistral checkpoint whose every layer has an 8-token sliding window."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mistral-swa"), "mistral-swa")
