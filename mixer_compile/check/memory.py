"""Sizes the machine cannot hold, refused before any work.

A batch (or the top of a batch range) whose weights, activations or validation images do not
fit the memory that has to hold them fails minutes into a build with an allocation error, or
takes the machine down. `check_fits` estimates what a build needs (`footprint`) and refuses it
in one line naming the figures and the largest batch that fits, before TVM is imported.
"""

from __future__ import annotations

import os
from typing import Callable

from mixer_compile.artifact.format import BatchRange
from mixer_compile.errors import MixerCompileError
from mixer_compile.model.spec import MixerSpec

GIB = float(1 << 30)
MEMORY_SHARE = 0.9  # of the physical memory a build may plan to use; the rest is the OS's and TVM's own


def footprint(spec: MixerSpec, batch: int, dtype: str = "float32") -> dict[str, float]:
    """Bytes a model at `batch` needs, by kind: `weights` (stored at `dtype` where the model runs),
    `activations` (per image: its input, the largest live set of a block: the channel-mixing
    hidden S x D_C, or the token-mixing C x D_S, beside three S x C tensors; accumulation is
    float32, so counted at 4 bytes whatever the storage dtype) and `validation` (the host's
    float32 random images and the copy handed to the module)."""
    h, w = spec.image_size
    image = 4 * spec.in_channels * h * w
    live = 4 * (max(spec.tokens * spec.channels_mlp_dim, spec.hidden_dim * spec.tokens_mlp_dim)
                + 3 * spec.tokens * spec.hidden_dim)
    element = 4 if dtype == "float32" else 2
    return {"weights": float(spec.param_count() * element), "activations": float(batch * (image + live)),
            "validation": float(2 * batch * image)}


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(spec: MixerSpec, batches: BatchRange, target_name: str, dtype: str = "float32") -> None:
    """Refuses, before any work and in one line, a batch whose activations, weights or validation
    would not fit the memory that must hold them: the host's RAM for a CPU build (and for the
    validation images and the compiler's three float32 copies of the weights, always); the
    GPU's memory for a CUDA build when a GPU is visible here."""
    from mixer_compile.machine import local_gpu

    kind, arch = _target_kind(target_name)
    gpu = local_gpu() if kind == "cuda" else None
    on_host = kind != "cuda" or gpu is not None  # a CUDA build without a GPU is checked at batch 2 on the host
    need = footprint(spec, batches.max, dtype)
    host = {"weights": 3 * footprint(spec, 1)["weights"],
            "activations": need["activations"] if kind != "cuda" else 0.0,
            "validation": need["validation"] if on_host else 0.0}
    _refuse_unless_fits(spec, batches, host, host_memory(), "of memory (RAM)", "this machine has",
                        lambda b: footprint(spec, b, dtype), kind != "cuda", on_host)
    device = {"weights": need["weights"], "activations": need["activations"]}
    if gpu is not None:
        _refuse_unless_fits(spec, batches, device, int(gpu.total_global_memory), "of GPU memory",
                            f"the {gpu.device_name} has", lambda b: footprint(spec, b, dtype), True, False)
    elif kind == "cuda" and arch in LARGEST_GPU:  # no GPU here: what the largest GPU of the target's kind holds
        name, have = LARGEST_GPU[arch]
        _refuse_unless_fits(spec, batches, device, have, "of GPU memory",
                            f"the largest {arch} GPU ({name}) has", lambda b: footprint(spec, b, dtype), True, False)


# The most memory a GPU of an architecture has: with no GPU visible at build time, a batch
# beyond it cannot run on any GPU the build is for.
LARGEST_GPU = {"sm_80": ("A100 80GB", 80 * 10**9), "sm_86": ("RTX A6000", 48 * 2**30),
               "sm_89": ("L40S", 48 * 2**30), "sm_90": ("H200", 141 * 10**9), "sm_90a": ("H200", 141 * 10**9),
               "sm_100": ("B200", 180 * 10**9), "sm_120": ("RTX PRO 6000", 96 * 2**30)}


def _target_kind(name: str) -> tuple[str, str | None]:
    """A target's kind (and GPU architecture) from its file, without resolving it (resolving the
    host CPU or a local GPU imports TVM: seconds a refusal need not wait)."""
    from mixer_compile.backend.target import known_targets

    for stem, data in known_targets().items():
        if name == stem or name in data.get("aliases", []):
            target = data["target"]
            arch = target.get("arch")
            arch = data.get("default") if arch == "local" else arch
            if "kind" in target:
                return str(target["kind"]), arch
            break
    from mixer_compile.backend.target import get_target

    target = get_target(name)  # a tag, or a target file given by path
    return target.kind, target.config.get("arch")


def _refuse_unless_fits(spec: MixerSpec, batches: BatchRange, need: dict[str, float], have: int | None,
                        what: str, where: str, at: Callable[[int], dict[str, float]],
                        activations: bool, validation: bool) -> None:
    total = sum(need.values())
    if have is None or total <= MEMORY_SHARE * have:
        return
    per_image = (at(1)["activations"] if activations else 0.0) + (at(1)["validation"] if validation else 0.0)
    fixed = total - batches.max * per_image
    largest = int((MEMORY_SHARE * have - fixed) // per_image) if per_image else 0
    parts = ", ".join(f"{k} {v / GIB:,.1f} GiB" for k, v in need.items() if v)
    fits = (f"the largest batch that fits is about {largest}" if largest >= 1
            else "no batch fits: the weights alone do not")
    raise MixerCompileError(f"batch {batches.describe()} of {spec.name} needs about {total / GIB:,.1f} GiB {what} "
                            f"({parts}) and {where} {have / GIB:,.1f} GiB; {fits}")
