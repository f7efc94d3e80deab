"""Relax module -> compiled TVM executable for one target.

The stock CPU pipeline of `tvm.compile` does no operator fusion; ours always runs the
target's full default pipeline (legalize, FuseOps, FuseTIR, ...), so a fused IR op really
becomes one kernel.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

from mixer_compile.targets import TargetInfo


def compile_module(mod: tvm.IRModule, target: TargetInfo) -> Any:
    """A `relax.VMExecutable` for `target`."""
    tvm_target = target.tvm_target()
    with tvm_target:
        return tvm.compile(mod, tvm_target, relax_pipeline=relax.get_default_pipeline(tvm_target))
