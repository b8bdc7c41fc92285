"""Write a float checkpoint's projections in AWQ or GPTQ format, for the tiny model.

``mistral-serve tiny-model DIR --quantize awq|gptq`` uses this so the pre-quantized loading
path is tested on a real checkpoint directory, exactly as a downloaded AWQ/GPTQ repo loads.
The quantization itself is plain round-to-nearest min/max (what AWQ/GPTQ refine with
calibration data is the choice of scales and rounding, not the format). Act-order is
data-dependent (columns sorted by the Hessian's diagonal); without data, a seeded random
permutation stands in, shared by the projections that read the same input (q/k/v, gate/up),
as GPTQ's is.
"""

from __future__ import annotations

import re

import torch

from mistral_serve.model.quantization import awq, gptq

_PROJ = re.compile(r"^(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))\.weight$")
# Projections sharing an input get one act-order permutation.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}


def prequantize(weights: dict[str, torch.Tensor], method: str, group_size: int = 128, desc_act: bool = False,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors with every decoder projection in ``method``'s format, quantization_config)."""
    if method not in ("awq", "gptq"):
        raise ValueError(f"method must be 'awq' or 'gptq', got {method!r}")
    if desc_act and method != "gptq":
        raise ValueError("act-order (desc_act) is a GPTQ option")
    gen = torch.Generator().manual_seed(seed)
    perms: dict[tuple[str, str], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        m = _PROJ.match(name)
        if m is None or m[4] not in _INPUT_GROUP:
            out[name] = w
            continue
        if method == "awq":
            tensors = awq.encode(w, group_size)
        else:
            perm = None
            if desc_act:
                key = (m[2], _INPUT_GROUP[m[4]])
                if key not in perms:
                    perms[key] = torch.randperm(w.shape[1], generator=gen)
                perm = perms[key]
            tensors = gptq.encode(w, group_size, perm)
        out.update({f"{m[1]}.{suffix}": t for suffix, t in tensors.items()})
    config = awq.quantization_config(group_size) if method == "awq" else gptq.quantization_config(group_size, desc_act)
    return out, config
