"""`pyqmoe inspect`: metadata, tensor table and the model-card summary of a GGUF file."""

from __future__ import annotations

import json
from typing import Any

from .gguf_file import GGUFFile

_MAX_ITEMS = 8  # long arrays (vocabularies, merges) are abbreviated to this many items


def _abbrev(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) <= _MAX_ITEMS:
            return [_abbrev(v) for v in value]
        return {"length": len(value), "head": [_abbrev(v) for v in value[:_MAX_ITEMS]]}
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def _show(value: Any) -> str:
    v = _abbrev(value)
    if isinstance(v, dict) and "length" in v:
        head = ", ".join(json.dumps(x, ensure_ascii=False) for x in v["head"])
        return f"[{head}, ...] ({v['length']} items)"
    return json.dumps(v, ensure_ascii=False)


def inspect_data(f: GGUFFile) -> dict[str, Any]:
    return {
        "version": f.version,
        "alignment": f.alignment,
        "metadata": {fld.key: {"type": fld.type, "value": _abbrev(fld.value)} for fld in f.fields},
        "tensors": [{"name": t.name, "shape": list(t.shape), "type": t.type, "bytes": t.nbytes} for t in f.tensors],
        "summary": f.summary(),
    }


def render_text(f: GGUFFile) -> str:
    s = f.summary()
    lines = [f"file: {', '.join(s['files'])}", f"GGUF version {f.version}, alignment {f.alignment}", ""]
    lines.append(f"metadata ({len(f.fields)} keys):")
    width = max((len(fld.key) for fld in f.fields), default=0)
    for fld in f.fields:
        lines.append(f"  {fld.key:<{width}}  {fld.type:<14} {_show(fld.value)}")
    lines.append("")
    lines.append(f"tensors ({len(f.tensors)}):")
    nw = max((len(t.name) for t in f.tensors), default=4)
    lines.append(f"  {'name':<{nw}}  {'shape':<22} {'type':<8} {'MiB':>10}")
    for t in f.tensors:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(f"  {t.name:<{nw}}  {shape:<22} {t.type:<8} {t.nbytes / 2**20:>10.3f}")
    lines.append("")
    arch = s["architecture"] or "unknown"
    lines.append(f"architecture: {arch}" + (f"  ({s['name']})" if s["name"] else ""))
    lines.append(f"parameters:   {s['n_params']:,}")
    lines.append(f"model size:   {s['size_gib']:.3f} GiB ({s['bpw']:.2f} BPW)")
    for ty, n in s["tensors_per_type"].items():
        lines.append(f"  {ty}: {n} tensors")
    return "\n".join(lines)
