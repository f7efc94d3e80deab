"""Spec -> Graph: the Mixer exactly as the paper (and vit_jax/models_mixer.py) writes it.

Tokens-major (B, S, C) with token mixing done on the transposed (B, C, S) tensor, every
bias, GELU and residual add as its own op. The passes start from this literal form.
"""

from __future__ import annotations

from mixer_compile.ir.graph import Graph, Op, Param, Tensor
from mixer_compile.model.spec import MixerSpec


class _Builder:
    def __init__(self, spec: MixerSpec) -> None:
        self.spec = spec
        self.params: dict[str, Param] = {}
        self.ops: list[Op] = []

    def param(self, name: str, source: str, shape: tuple[int, ...], layout: str) -> str:
        self.params[name] = Param(Tensor(name, shape, layout=layout), source)
        return name

    def op(self, kind: str, inputs: list[str], name: str, shape: tuple[int, ...], layout: str,
           **attrs: object) -> str:
        self.ops.append(Op(kind, inputs, Tensor(name, shape, layout=layout), attrs))
        return name

    def mlp(self, x: str, prefix: str, source: str, n: int, hidden: int, lead: tuple[int, int],
            layout: str) -> str:
        """Dense -> bias -> GELU -> Dense -> bias along the last axis of a 3-D tensor."""
        flavour = self.spec.resolved_gelu
        w0 = self.param(f"{prefix}.fc1.w", f"{source}/Dense_0/kernel", (n, hidden), "KN")
        b0 = self.param(f"{prefix}.fc1.b", f"{source}/Dense_0/bias", (hidden,), "N")
        w1 = self.param(f"{prefix}.fc2.w", f"{source}/Dense_1/kernel", (hidden, n), "KN")
        b1 = self.param(f"{prefix}.fc2.b", f"{source}/Dense_1/bias", (n,), "N")
        hid, out = lead + (hidden,), lead + (n,)
        y = self.op("dense", [x, w0], f"{prefix}.fc1", hid, layout, axis=2, kernel_layout="KN")
        y = self.op("bias_add", [y, b0], f"{prefix}.fc1.bias", hid, layout, axes=(2,))
        y = self.op("gelu", [y], f"{prefix}.gelu", hid, layout, flavour=flavour)
        y = self.op("dense", [y, w1], f"{prefix}.fc2", out, layout, axis=2, kernel_layout="KN")
        return self.op("bias_add", [y, b1], f"{prefix}.fc2.bias", out, layout, axes=(2,))

    def layer_norm(self, x: str, name: str, source: str, shape: tuple[int, ...]) -> str:
        c = (self.spec.hidden_dim,)
        scale = self.param(f"{name}.scale", f"{source}/scale", c, "C")
        bias = self.param(f"{name}.bias", f"{source}/bias", c, "C")
        return self.op("layer_norm", [x, scale, bias], name, shape, "BSC", axis=2,
                       eps=self.spec.layer_norm_eps)


def build_graph(spec: MixerSpec) -> Graph:
    """The literal Mixer graph for `spec` at its batch size."""
    g = _Builder(spec)
    B, S, C, P = spec.batch, spec.tokens, spec.hidden_dim, spec.patch_size
    h, w = spec.image_size
    image = Tensor("image", (B, spec.in_channels, h, w), layout="NCHW")
    bsc = (B, S, C)

    k = P * P * spec.in_channels
    x = g.op("patchify", [image.name], "patches", (B, S, k), "BSK", patch=P)
    stem_w = g.params["stem.w"] = Param(Tensor("stem.w", (P, P, spec.in_channels, C), layout="HWIO"),
                                        "stem/kernel").with_step("reshape", (k, C), (k, C), "KN")
    g.param("stem.b", "stem/bias", (C,), "N")
    x = g.op("dense", [x, stem_w.tensor.name], "stem", bsc, "BSC", axis=2, kernel_layout="KN")
    x = g.op("bias_add", [x, "stem.b"], "stem.bias", bsc, "BSC", axes=(2,))

    for i in range(spec.num_blocks):
        src, pre = f"MixerBlock_{i}", f"b{i}"
        y = g.layer_norm(x, f"{pre}.ln0", f"{src}/LayerNorm_0", bsc)
        y = g.op("transpose", [y], f"{pre}.tok.in", (B, C, S), "BCS", perm=(0, 2, 1))
        y = g.mlp(y, f"{pre}.tok", f"{src}/token_mixing", S, spec.tokens_mlp_dim, (B, C), "BCS")
        y = g.op("transpose", [y], f"{pre}.tok.out", bsc, "BSC", perm=(0, 2, 1))
        x = g.op("add", [x, y], f"{pre}.tok.res", bsc, "BSC")
        y = g.layer_norm(x, f"{pre}.ln1", f"{src}/LayerNorm_1", bsc)
        y = g.mlp(y, f"{pre}.ch", f"{src}/channel_mixing", C, spec.channels_mlp_dim, (B, S), "BSC")
        x = g.op("add", [x, y], f"{pre}.ch.res", bsc, "BSC")

    x = g.layer_norm(x, "head.ln", "pre_head_layer_norm", bsc)
    x = g.op("mean", [x], "pool", (B, C), "BC", axis=1)
    g.param("head.w", "head/kernel", (C, spec.num_classes), "KN")
    g.param("head.b", "head/bias", (spec.num_classes,), "N")
    x = g.op("dense", [x, "head.w"], "head", (B, spec.num_classes), "BN", axis=1, kernel_layout="KN")
    x = g.op("bias_add", [x, "head.b"], "logits", (B, spec.num_classes), "BN", axes=(1,))
    meta = {"spec": spec.to_dict(), "grid": spec.grid, "gelu": spec.resolved_gelu}
    return Graph(spec.name, image, g.params, g.ops, x, meta)
