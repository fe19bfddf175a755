"""Every native kernel builds wherever a C compiler exists: the kernel tests skip without one, so a source
that stopped compiling must fail here instead of turning those tests into skips."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from marserve_kernels import (cpu_attention_native, cpu_decode_layer_native, cpu_dense_native, cpu_moe_native,
                              cpu_norm_native)

HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
@pytest.mark.skipif(os.environ.get("MARSERVE_NATIVE") == "0", reason="native kernels switched off")
def test_every_native_kernel_builds_here():
    built = {
        "cpu_moe_small fp32": cpu_moe_native.available(torch.float32),
        "cpu_moe_small bf16": cpu_moe_native.available(torch.bfloat16),
        "cpu_decode_attention fp32": cpu_attention_native.available(torch.float32),
        "cpu_decode_attention bf16": cpu_attention_native.available(torch.bfloat16),
        "cpu_rms_norm": cpu_norm_native.available(),
        "cpu_dense_small fp32": cpu_dense_native.available(torch.float32),
        "cpu_dense_small bf16": cpu_dense_native.available(torch.bfloat16),
        "cpu_decode_layer fp32": cpu_decode_layer_native.available(torch.float32),
        "cpu_decode_layer bf16": cpu_decode_layer_native.available(torch.bfloat16),
    }
    assert all(built.values()), f"failed to build (see the warning logged above): {built}"
