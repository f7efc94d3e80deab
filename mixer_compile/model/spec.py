"""The declarative model description: the paper's presets and user spec files.

A MixerSpec is the single source of truth for every shape in the pipeline; it is validated
once, here, so later stages can trust it. The field names follow the official JAX config
(`hidden_dim`, `tokens_mlp_dim`, ...), so a user can copy them from vit_jax.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixer_compile.errors import SpecError, did_you_mean
from mixer_compile.util.config_file import read_config

GELU_FLAVOURS = ("tanh", "erf")


@dataclass(frozen=True)
class MixerSpec:
    """One MLP-Mixer configuration, plus the batch size a module is compiled for.

    `gelu` is None when the spec leaves the flavour to the weights' origin (timm
    checkpoints use erf, official JAX checkpoints tanh); see `with_gelu_for`.
    """

    name: str
    image_size: tuple[int, int]
    patch_size: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_blocks: int
    num_classes: int = 1000
    in_channels: int = 3
    gelu: str | None = None
    layer_norm_eps: float = 1e-6
    batch: int = 1

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns); tokens are in raster order over it."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def tokens(self) -> int:
        """S, the number of patches."""
        return self.grid[0] * self.grid[1]

    @property
    def resolved_gelu(self) -> str:
        """The GELU flavour to compute with: the official models' tanh when unset."""
        return self.gelu or "tanh"

    def with_gelu_for(self, origin: str) -> "MixerSpec":
        """The spec with the GELU flavour of a weights origin, unless the spec set one."""
        if self.gelu is not None:
            return self
        return self.replace(gelu={"timm": "erf"}.get(origin, "tanh"))

    def replace(self, **changes: Any) -> "MixerSpec":
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Parameters including the head (the paper's Table 1 counts exclude it)."""
        c, s = self.hidden_dim, self.tokens
        ds, dc, p = self.tokens_mlp_dim, self.channels_mlp_dim, self.patch_size
        stem = p * p * self.in_channels * c + c
        block = 4 * c + (s * ds + ds + ds * s + s) + (c * dc + dc + dc * c + c)
        head = 2 * c + c * self.num_classes + self.num_classes
        return stem + self.num_blocks * block + head

    def macs_per_image(self) -> int:
        """Multiply-accumulates of the matmuls (stem, mixing MLPs, head) for one image."""
        c, s = self.hidden_dim, self.tokens
        stem = s * self.patch_size**2 * self.in_channels * c
        block = 2 * s * self.tokens_mlp_dim * c + 2 * s * c * self.channels_mlp_dim
        return stem + self.num_blocks * block + c * self.num_classes

    def flops_per_image(self) -> int:
        return 2 * self.macs_per_image()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    def fingerprint(self) -> str:
        """A short stable name for caches and file names, e.g. mixer_b16-224x224-b1-tanh: the
        name's characters other than letters, digits, '.', '_' and '-' become '_', so that a
        spec's name ("../x", say) cannot place a file outside the folder it is named into."""
        h, w = self.image_size
        name = re.sub(r"[^A-Za-z0-9._-]", "_", self.name).lstrip(".") or "spec"
        return f"{name}-{h}x{w}-b{self.batch}-{self.resolved_gelu}"


FIELDS = tuple(f.name for f in dataclasses.fields(MixerSpec))
INT_FIELDS = ("patch_size", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim", "num_blocks",
              "num_classes", "in_channels", "batch")


def _validate(spec: MixerSpec) -> None:
    if not isinstance(spec.name, str) or not spec.name:
        raise SpecError("spec field 'name' must be a non-empty string")
    size = spec.image_size
    if (not isinstance(size, tuple) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise SpecError(f"spec field 'image_size' must be an integer or [height, width], got {size!r}")
    for field in INT_FIELDS:
        value = getattr(spec, field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise SpecError(f"spec field '{field}' must be an integer, got {value!r}")
    for field in ("image_size",) + INT_FIELDS:
        values = size if field == "image_size" else (getattr(spec, field),)
        if any(v <= 0 for v in values):
            raise SpecError(f"spec field '{field}' must be positive, got {getattr(spec, field)!r}")
    h, w = size
    if h % spec.patch_size or w % spec.patch_size:
        raise SpecError(
            f"image size {h}x{w} is not divisible by patch size {spec.patch_size}; "
            f"use an image size that is a multiple of {spec.patch_size}"
        )
    if spec.gelu is not None and spec.gelu not in GELU_FLAVOURS:
        raise SpecError(f"spec field 'gelu' must be one of {', '.join(GELU_FLAVOURS)}, got {spec.gelu!r}")
    eps = spec.layer_norm_eps
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise SpecError(f"spec field 'layer_norm_eps' must be a number in (0, 1), got {eps!r}")
    if spec.param_count() > 4_000_000_000:
        raise SpecError(f"spec '{spec.name}' has {spec.param_count():,} parameters; "
                        "more than 4e9 is not a Mixer this compiler can hold")


def _preset(name: str, blocks: int, patch: int, c: int, ds: int, dc: int) -> MixerSpec:
    return MixerSpec(name, (224, 224), patch, c, ds, dc, blocks)


PRESETS: dict[str, MixerSpec] = {
    s.name: s
    for s in (
        _preset("mixer_s32", 8, 32, 512, 256, 2048),
        _preset("mixer_s16", 8, 16, 512, 256, 2048),
        _preset("mixer_b32", 12, 32, 768, 384, 3072),
        _preset("mixer_b16", 12, 16, 768, 384, 3072),
        _preset("mixer_l32", 24, 32, 1024, 512, 4096),
        _preset("mixer_l16", 24, 16, 1024, 512, 4096),
        _preset("mixer_h14", 32, 14, 1280, 640, 5120),
    )
}

def spec_from_dict(data: dict[str, Any], name: str = "custom") -> MixerSpec:
    """Builds a spec from a mapping; a `base` key starts from a preset and overrides fields."""
    data = dict(data)
    base = data.pop("base", None)
    for key in data:
        if key not in FIELDS:
            raise SpecError(f"unknown spec key '{key}'{did_you_mean(key, FIELDS)} "
                            f"(valid keys: base, {', '.join(FIELDS)})")
    if "image_size" in data:
        size = data["image_size"]
        data["image_size"] = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, list) else size
    if base is not None:
        if not isinstance(base, str):
            raise SpecError(f"spec key 'base' must be a preset name (a string), got {base!r}")
        return dataclasses.replace(get_preset(base), **data)
    data.setdefault("name", name)
    missing = [f.name for f in dataclasses.fields(MixerSpec)
               if f.default is dataclasses.MISSING and f.name not in data]
    if missing:
        raise SpecError(f"spec is missing required keys: {', '.join(missing)} "
                        "(or set 'base' to a preset to start from)")
    return MixerSpec(**data)


def get_preset(name: str) -> MixerSpec:
    if name not in PRESETS:
        raise SpecError(f"unknown preset '{name}'{did_you_mean(name, list(PRESETS))} "
                        f"(presets: {', '.join(PRESETS)}; or pass a .toml/.json spec file)")
    return PRESETS[name]


def parse_batch(batch: Any) -> tuple[int, int]:
    """A batch size or a range of them, as (min, max): 8, "8", "1-16", (1, 16) or range(1, 17)."""
    if isinstance(batch, range) and batch.step == 1 and len(batch):
        return parse_batch((batch.start, batch.stop - 1))
    if isinstance(batch, int) and not isinstance(batch, bool):
        low = high = batch
    elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in batch):
        low, high = batch
    elif isinstance(batch, str) and all(part.strip().isdigit() for part in batch.split("-")) \
            and batch.count("-") <= 1:
        parts = [int(part) for part in batch.split("-")]
        low, high = parts[0], parts[-1]
    else:
        raise SpecError(f"batch must be a positive integer or a range MIN-MAX (e.g. 8 or 1-16), got {batch!r}")
    if low == high and low < 1:
        raise SpecError(f"batch must be a positive integer or a range MIN-MAX (e.g. 8 or 1-16), got {batch!r}")
    if not 0 < low <= high:
        raise SpecError(f"batch range {low}-{high} is empty or not positive; give MIN-MAX with 0 < MIN <= MAX")
    return low, high


def load_spec(name_or_path: str | Path, **overrides: Any) -> MixerSpec:
    """A preset name or a TOML/JSON spec file, with CLI overrides (e.g. batch) applied last."""
    text = str(name_or_path)
    path = Path(text)
    if text not in PRESETS and path.suffix.lower() not in (".toml", ".json") and path.is_file():
        raise SpecError(f"spec file '{path}' must be a .toml or .json file (name it so); "
                        f"presets: {', '.join(PRESETS)}")
    if text in PRESETS or path.suffix.lower() not in (".toml", ".json"):
        spec = get_preset(text)
    else:
        if not path.is_file():
            raise SpecError(f"spec file '{path}' " + ("is not a file" if path.exists() else "does not exist"))
        data = read_config(path, "spec", SpecError, toml=path.suffix.lower() == ".toml")
        if not isinstance(data, dict):
            raise SpecError(f"spec file '{path}' must hold a table/object of spec fields")
        spec = spec_from_dict(data, name=path.stem)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(spec, **overrides) if overrides else spec
