"""A live PyTorch MLP-Mixer (timm's `MlpMixer`, or any module with its structure and names)
read into a spec and canonical weights, for `mixer_compile.compile(model)`.

The configuration is read off the module: image size (the stem's `img_size` when it has one,
as timm's PatchEmbed does; else a square grid of the token count), patch, widths, depth,
classes, the GELU flavour (`nn.GELU(approximate='none')` is erf, `'tanh'` tanh) and the
LayerNorm epsilon; the weights come from its `state_dict` through the timm reader. A module
that does not have that structure (a ResMLP or gMLP block, a stem norm, a pooling other than
the mean, no classifier head, mixed GELU flavours or epsilons...) is refused with one line
naming what did not match. Last, the module itself runs one random image and its logits are
compared with the float64 reference of the configuration read off it, so a module whose
forward is not a Mixer's is refused too, rather than compiled into something else.

Checkpoints without a spec (`compile("mixer.pth")`) get theirs from the weights' shapes
(`spec_from_weights`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mixer_compile.errors import SpecError
from mixer_compile.frontends import InMemoryWeights, read_checkpoint
from mixer_compile.frontends.timm import canonical, to_numpy
from mixer_compile.model.params import Weights
from mixer_compile.model.spec import MixerSpec

CHECK_TOLERANCE = 1e-4  # the module (float32) against the float64 reference of what was read off it


def _refuse(what: str, name: str) -> None:
    raise SpecError(f"the module ({name}) is not an MLP-Mixer this compiler reads: {what}")


def spec_from_weights(weights: Weights, name: str = "checkpoint", image_size: tuple[int, int] | None = None,
                      gelu: str | None = None, layer_norm_eps: float = 1e-6, batch: int = 1) -> MixerSpec:
    """The spec that canonical `weights` imply: widths, depth and classes from the shapes; the
    image size from the token count (a square grid) unless given."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in weights:
            raise SpecError(f"cannot read a Mixer configuration off {name}: it has no '{key}' "
                            f"(found {', '.join(sorted(weights)[:6])}...)")
        dims = tuple(weights[key].shape)
        if 0 in dims:  # a width of 0 would be a division by zero, or a spec error about fields not given
            raise SpecError(f"cannot read a Mixer configuration off {name}: its '{key}' has shape {dims}, with "
                            "no elements; save the weights of a trained model")
        return dims

    p, _, in_channels, c = shape("stem/kernel")
    tokens, ds = shape("MixerBlock_0/token_mixing/Dense_0/kernel")
    dc = shape("MixerBlock_0/channel_mixing/Dense_0/kernel")[1]
    classes = shape("head/kernel")[1]
    blocks = len({k.split("/")[0] for k in weights if k.startswith("MixerBlock_")})
    if image_size is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise SpecError(f"{name} has {tokens} tokens, not a square grid; give the image size: a spec "
                            "file with image_size = [height, width] (--spec), or image_size=(height, width) "
                            "in Python")
        image_size = (side * p, side * p)
    if (image_size[0] // p) * (image_size[1] // p) != tokens:
        raise SpecError(f"{name} has {tokens} tokens of patch {p}; image size {image_size[0]}x{image_size[1]} "
                        f"has {(image_size[0] // p) * (image_size[1] // p)}")
    return MixerSpec(name, tuple(image_size), p, c, ds, dc, blocks, num_classes=classes, in_channels=in_channels,
                     gelu=gelu, layer_norm_eps=layer_norm_eps, batch=batch)


def checkpoint_spec(path: str | Path, image_size: tuple[int, int] | None = None, gelu: str | None = None,
                    batch: int = 1) -> MixerSpec:
    """The spec a checkpoint's shapes imply (spec_from_weights), named after its file: what a
    checkpoint given without a spec is compiled as."""
    path = Path(path)
    return spec_from_weights(read_checkpoint(path)[0], path.stem, image_size, gelu=gelu, batch=batch)


def read_module(module: Any, image_size: tuple[int, int] | None = None, batch: int = 1,
                check: bool = True) -> tuple[MixerSpec, InMemoryWeights]:
    """The spec and the canonical weights of a live timm-style MLP-Mixer (see the module docstring)."""
    import torch
    from torch import nn

    name = type(module).__name__
    if not isinstance(module, nn.Module):
        raise SpecError(f"model of type {name} is neither a torch module, a preset name, a spec file nor a checkpoint")
    for attr in ("stem", "blocks", "norm", "head"):
        if not isinstance(getattr(module, attr, None), nn.Module):
            _refuse(f"it has no '{attr}' submodule (a timm MlpMixer has stem, blocks, norm, head)", name)
    proj = getattr(module.stem, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        _refuse("its stem has no Conv2d 'proj' (the patch embedding)", name)
    p = proj.kernel_size
    if p[0] != p[1] or tuple(proj.stride) != tuple(p) or any(proj.padding) or proj.groups != 1 \
            or any(d != 1 for d in proj.dilation) or proj.bias is None:
        _refuse(f"its stem conv is not a biased {p[0]}x{p[0]} patch embedding (kernel {tuple(p)}, stride "
                f"{tuple(proj.stride)}, padding {proj.padding}, groups {proj.groups})", name)
    stem_norm = getattr(module.stem, "norm", None)
    if stem_norm is not None and not isinstance(stem_norm, nn.Identity):
        _refuse(f"its stem has a norm ({type(stem_norm).__name__}; timm's stem_norm=True)", name)
    if getattr(module, "global_pool", "avg") != "avg":
        _refuse(f"its global pooling is {module.global_pool!r}, not the mean over tokens ('avg')", name)
    if not isinstance(module.head, nn.Linear):
        _refuse(f"its head is {type(module.head).__name__}, not a Linear classifier (num_classes=0?)", name)
    blocks = list(module.blocks)
    if not blocks:
        _refuse("it has no blocks", name)
    norms, flavours = [module.norm], set()
    for i, block in enumerate(blocks):
        for attr in ("norm1", "norm2"):
            norm = getattr(block, attr, None)
            if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine:
                _refuse(f"block {i} ({type(block).__name__}) has no LayerNorm '{attr}' with scale and bias "
                        f"(found {type(norm).__name__})", name)
            norms.append(norm)
        for attr in ("mlp_tokens", "mlp_channels"):
            mlp = getattr(block, attr, None)
            if mlp is None:
                _refuse(f"block {i} ({type(block).__name__}) has no '{attr}' MLP", name)
            fc1, fc2, act = (getattr(mlp, a, None) for a in ("fc1", "fc2", "act"))
            if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or fc1.bias is None or fc2.bias is None:
                _refuse(f"block {i}'s {attr} is not Linear fc1 -> act -> Linear fc2 with biases "
                        f"({type(mlp).__name__})", name)
            if not isinstance(act, nn.GELU):
                _refuse(f"block {i}'s {attr} activation is {type(act).__name__}, not GELU", name)
            flavours.add("erf" if act.approximate == "none" else "tanh")
            extra = getattr(mlp, "norm", None)
            if extra is not None and not isinstance(extra, nn.Identity):
                _refuse(f"block {i}'s {attr} has a norm between fc1 and fc2 ({type(extra).__name__})", name)
    if not isinstance(module.norm, nn.LayerNorm):
        _refuse(f"its final norm is {type(module.norm).__name__}, not LayerNorm", name)
    if len(flavours) > 1:
        _refuse("its MLPs mix GELU flavours (erf and tanh); a Mixer spec has one", name)
    epsilons = {float(n.eps) for n in norms}
    if len(epsilons) > 1:
        _refuse(f"its LayerNorms have different epsilons ({', '.join(map(str, sorted(epsilons)))})", name)
    size = getattr(module.stem, "img_size", None) if image_size is None else image_size
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(v) for v in size) if size is not None else None

    source = f"the {name} module's state_dict"
    weights = canonical(to_numpy(module.state_dict(), source), source)
    spec = spec_from_weights(weights, name, size, gelu=flavours.pop(), layer_norm_eps=epsilons.pop(), batch=batch)
    if spec.in_channels != proj.in_channels:
        _refuse("its stem's input channels disagree with its weights", name)
    loaded = InMemoryWeights(weights, "timm", f"{name} module ({spec.num_blocks} blocks, "
                                               f"{spec.image_size[0]}x{spec.image_size[1]}, patch {spec.patch_size})")
    if check:
        _check_forward(module, spec, weights, name, torch)
    return spec, loaded


def _check_forward(module: Any, spec: MixerSpec, weights: Weights, name: str, torch: Any) -> None:
    """Refuses a module whose own forward disagrees with the Mixer of the configuration read
    off it (one random image, the float64 reference)."""
    from mixer_compile.model import reference
    from mixer_compile.model.params import check_weights

    try:
        checked = check_weights(weights, spec.replace(batch=1), f"the {name} module")
    except Exception as exc:  # extra or mis-shaped parameters: not a plain Mixer
        _refuse(str(exc), name)
    h, w = spec.image_size
    image = np.random.default_rng(0).standard_normal((1, spec.in_channels, h, w), dtype=np.float32)
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.from_numpy(image).to(device=param.device, dtype=param.dtype))
    except Exception as exc:  # the module's own forward failing on an image of the size read off it
        _refuse(f"its forward fails on a {h}x{w} image ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", name)
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, spec.num_classes):
        _refuse(f"its forward returns {getattr(out, 'shape', type(out).__name__)}, not (1, {spec.num_classes}) logits",
                name)
    ref = reference.forward(spec.replace(batch=1), checked, image)
    got = out.detach().float().cpu().numpy().astype(np.float64)
    error = float(np.abs(got - ref).max() / (np.abs(ref).max() or 1.0))
    tolerance = CHECK_TOLERANCE if param.dtype == torch.float32 else 2e-2
    if not error < tolerance:
        _refuse(f"its output differs from a Mixer's with the configuration read off it (max |out-ref|/max|ref| = "
                f"{error:.1e}, bound {tolerance:.0e}): its forward is not an MLP-Mixer's", name)
