"""Official JAX checkpoints (google-research/vision_transformer `.npz`): already canonical."""

from __future__ import annotations

import math
import tokenize
import zipfile
from pathlib import Path

import numpy as np

from mixer_compile.errors import WeightsError
from mixer_compile.frontends.archive import first_line, zip_member
from mixer_compile.model.params import check_kernel_rank

# The header reader of each .npy format version; 3.0 differs from 2.0 only in the header's text
# encoding (UTF-8 for Latin-1), which the shape and the item size do not depend on.
_HEADER_READERS = {b"\x01\x00": np.lib.format.read_array_header_1_0, b"\x02\x00": np.lib.format.read_array_header_2_0,
                   b"\x03\x00": np.lib.format.read_array_header_2_0}


def read(path: Path) -> dict[str, np.ndarray]:
    """The archive's arrays by key, each kernel's rank checked (a spec is read off their shapes)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            weights = {}
            for member in data.zip.namelist():  # NumPy's keys are these, less '.npy'
                with zip_member(member):
                    _check_header(path, data.zip, member)
                    weights[member.removesuffix(".npy")] = data[member]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise WeightsError(f"weights file '{path}' is not a readable .npz archive ({first_line(exc)})") from None
    stray = [k for k, v in weights.items() if not isinstance(v, np.ndarray)]  # non-.npy members come as bytes
    if stray:
        torch_zip = any(k.endswith("data.pkl") for k in stray)
        hint = "a torch checkpoint? rename it to .pth" if torch_zip else "save one with np.savez"
        raise WeightsError(f"weights file '{path}' is not an .npz archive of arrays: '{stray[0]}' is not a .npy "
                           f"array ({hint})")
    if any("/kernel" in k and "MixerBlock" in k and "token_mixing" not in k and "channel_mixing" not in k
           for k in weights):
        found = sorted(k for k in weights if k.startswith("MixerBlock_0/"))
        raise WeightsError(f"weights file '{path}' uses an unsupported Mixer key layout "
                           f"(found {', '.join(found[:6])}); supported: the released "
                           "MixerBlock_i/token_mixing/Dense_{0,1} layout")
    for key, value in weights.items():
        check_kernel_rank(key, value, str(path))
    return weights


def _check_header(path: Path, archive: zipfile.ZipFile, member: str) -> None:
    """Refuses a .npy member whose header cannot be read, or claims more bytes than the member
    holds, before NumPy allocates them: a damaged header claiming shape (10**12,) would otherwise
    be a MemoryError (or, below that, memory taken for data that is not there)."""
    fmt = np.lib.format
    damaged = f"weights file '{path}' is damaged: its member '{member}'"
    with archive.open(member) as f:
        magic = f.read(fmt.MAGIC_LEN)
        read_header = magic.startswith(fmt.MAGIC_PREFIX) and _HEADER_READERS.get(magic[-2:])  # by the version
        if not read_header:
            return  # not a .npy array (read as bytes, refused below as such), or a version NumPy refuses by name
        try:
            shape, _, dtype = read_header(f)
        except (ValueError, tokenize.TokenError) as exc:  # TokenError: NumPy's parse of a header cut short
            raise WeightsError(f"{damaged} has no readable .npy header ({first_line(exc)}); save the weights again "
                               "with np.savez") from None
        claimed, held = math.prod(shape) * dtype.itemsize, archive.getinfo(member).file_size - f.tell()
    if claimed > held and not dtype.hasobject:  # an object array's pickle has no size to claim
        raise WeightsError(f"{damaged} claims a {dtype} array of shape {shape} ({claimed:,} bytes) but holds "
                           f"{held:,} bytes of data; save the weights again with np.savez")
