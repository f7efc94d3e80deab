"""Every build is run on random images and compared with the float64 reference pass.

The figure is max |out - ref| / max |ref| over the logits checked: scale-free, and
fp32 code that computes the same function lands near 1e-6, so the 1e-4 bound has ample
room for summation-order differences while a wrong layout or GELU flavour (2e-4 apart on
the test checkpoints) or a wrong weight fails it.

Half precision (passes/precision.py) rounds every stored activation and weight matrix to
the storage dtype while sums run in float32, so the error is a handful of roundings of
unit roundoff u (fp16 2^-11 = 4.9e-4, bf16 2^-8 = 3.9e-3) per block, which LayerNorm keeps
from compounding: measured with random weights, fp16 lands at 5e-4..8e-4 and bf16 at
3e-3..5.4e-3 (tiny specs, Mixer-S/32, Mixer-B/16: 5.9e-4 and 3.8e-3). The bound is 1e-2 for both: above bf16's figures
with room for deeper models, yet 10x tighter than a broken lowering (a lost bias, a wrong
layout or a half-precision accumulation that swallows small terms lands at 1e-1 or worse).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from mixer_compile.model import reference
from mixer_compile.errors import ValidationError, WeightsError
from mixer_compile.model.spec import MixerSpec

FP32_TOLERANCE = 1e-4
# Image i's logits depend on image i alone, so the reference runs on the first few images of
# the batch: a layout or batch-mixing bug still shows (the others are different random images),
# and the float64 pass over a GPU benchmark's batch of 256 (minutes of CPU for Mixer-B/16)
# shrinks 32-fold.
REFERENCE_IMAGES = 8
TOLERANCES = {"float32": FP32_TOLERANCE, "float16": 1e-2, "bfloat16": 1e-2}


@dataclass(frozen=True)
class Validation:
    max_rel_error: float
    max_abs_error: float
    tolerance: float
    seed: int
    batch: int  # images the module ran on
    passed: bool
    where: str = ""  # what ran: "this CPU", a GPU's name, or the host stand-in for a GPU build
    checked: int = 0  # of those, the ones compared with the reference (the first ones)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return (f"{verdict}: max |out-ref|/max|ref| = {self.max_rel_error:.2e} "
                f"(bound {self.tolerance:.0e}), max abs {self.max_abs_error:.2e}"
                + (f", run on {self.where}" if self.where else ""))


def random_images(spec: MixerSpec, seed: int) -> np.ndarray:
    """Seeded standard-normal NCHW float32 images, drawn as float32: no float64 copy of the
    batch (a float64 draw of Mixer-B/16 at batch 100000 alone was 112 GiB)."""
    h, w = spec.image_size
    return np.random.default_rng(seed).standard_normal((spec.batch, spec.in_channels, h, w), dtype=np.float32)


def compare(out: np.ndarray, ref: np.ndarray, tolerance: float, seed: int, where: str = "",
            batch: int | None = None) -> Validation:
    """`out` against `ref`, both the first images of a batch of `batch` (default: all of it)."""
    err = np.abs(out.astype(np.float64) - ref)
    scale = float(np.abs(ref).max()) or 1.0
    rel = float(err.max() / scale) if np.isfinite(out).all() else float("inf")
    return Validation(rel, float(err.max()), tolerance, seed, batch or int(out.shape[0]), rel < tolerance, where,
                      int(out.shape[0]))


def validate(run: Callable[[np.ndarray], np.ndarray], spec: MixerSpec, weights: dict[str, np.ndarray],
             seed: int = 0, tolerance: float = FP32_TOLERANCE, where: str = "") -> Validation:
    """Runs `run` on a batch of seeded random images and compares the logits of its first
    REFERENCE_IMAGES with the reference's; raises if they disagree."""
    images = random_images(spec, seed)
    checked = images[:REFERENCE_IMAGES]
    out = np.asarray(run(images))[:len(checked)]
    ref = reference.forward(spec, weights, checked)
    result = compare(out, ref, tolerance, seed, where, batch=len(images))
    if not result.passed:
        try:  # weights beyond float32's range: no float32 build can follow them
            with np.errstate(over="raise", invalid="raise"):
                reference.forward(spec, weights, checked, np.float32)
        except FloatingPointError:
            largest = max(float(np.abs(np.asarray(v, np.float64)).max(initial=0)) for v in weights.values())
            raise WeightsError(f"these weights overflow float32 (the reference forward pass overflows in float32; "
                               f"the largest |weight| is {largest:.3g}): the checkpoint is damaged or was scaled, "
                               "use a trained model's weights") from None
        raise ValidationError(f"compiled module disagrees with the reference: {result.summary()}; "
                              "no artifact was marked good")
    return result
