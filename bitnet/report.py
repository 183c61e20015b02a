"""Sizes of a model in each linear format, and plain-text / markdown tables."""

from __future__ import annotations

import torch

from .config import BitNetConfig
from .convert import count_parameters, freeze, weight_bytes
from .model import BitNetForCausalLM

# (label, config.linear, packing or None)
FORMATS = [
    ("bf16 twin", "bf16", None),
    ("bitnet b1.58, 2 bit", "bitnet", "2bit"),
    ("bitnet b1.58, 1.6 bit", "bitnet", "1.6bit"),
    ("bitnet (binary), 1 bit", "bitnet1", "1bit"),
]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def size_rows(config: BitNetConfig) -> list[dict]:
    """Parameters and weight bytes (float tensors counted as bf16) of `config` in every format,
    measured on meta-device models: exact shapes, no memory."""
    rows = []
    for label, linear, packing in FORMATS:
        with torch.device("meta"):
            model = BitNetForCausalLM(config.replace(linear=linear))
        if packing:
            freeze(model, packing)
        b = weight_bytes(model, float_bytes=2)
        rows.append({"format": label, "linear": linear, "packing": packing, "parameters": count_parameters(model), **b})
    base = rows[0]["total"]
    base_linear = rows[0]["linear"]
    for r in rows:
        r["total_vs_bf16"] = base / r["total"]
        r["linear_vs_bf16"] = base_linear / r["linear"]
    return rows


def table(rows: list[dict], columns: list[tuple[str, str, str]], markdown: bool = False) -> str:
    """rows -> aligned text (or markdown) table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], spec) if spec else str(r[k])) for k, _, spec in columns])
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
