"""Synthetic models with realistic tensor names and shapes for checking quantization presets.

Random weights (numpy PCG64, fixed seed): the presets choose types from names, shapes and
hyper-parameters only, so the values do not matter; they are random so that benchmarks time real
work. The models have no tokenizer (llama.cpp's quantizer does not need one).

* ``moe8``   qwen3moe, 8 layers, hidden 256, 4 query / 1 KV heads of 48 (GQA 4: attn_output rows
             of 192 are not whole 256-blocks), 8 experts of 256, untied output.
* ``moe16``  qwen3moe, 12 layers, hidden 256, 8 / 4 heads of 32 (GQA 2), 16 experts of 96
             (ffn_down rows of 96 fall back), tied embeddings (no output.weight).
* ``moe8-large`` the same layout at about 200M parameters, for benchmarks.
* ``a3b-2layers`` two Qwen3-30B-A3B layers at real shapes (1.25B parameters), for benchmarks.
* ``dense``  qwen3 (no experts: the layer schedules use llama.cpp's counters), 16 layers,
             hidden 256, 4 / 4 heads of 64, FFN 512.

``--tokenizer-from MODEL.gguf`` copies a model's ``tokenizer.*`` metadata (same vocabulary size) so
that inference engines can load the result, e.g. the bundled model's for ``a3b-2layers``.

Usage: python tests/data/make_preset_model.py NAME OUT.gguf [--dtype f32|f16|bf16] [--tokenizer-from GGUF]
"""

from __future__ import annotations

import argparse

import gguf
import numpy as np

CONFIGS = {
    "moe8": dict(
        arch="qwen3moe", n_layer=8, hidden=256, n_head=4, n_head_kv=1, head_dim=48, n_expert=8, n_ff=256, vocab=320
    ),
    "moe16": dict(
        arch="qwen3moe",
        n_layer=12,
        hidden=256,
        n_head=8,
        n_head_kv=4,
        head_dim=32,
        n_expert=16,
        n_ff=96,
        vocab=320,
        tied=True,
    ),
    # Larger, for benchmarks only (about 200M parameters, 400 MB in F16).
    "moe8-large": dict(
        arch="qwen3moe", n_layer=12, hidden=1024, n_head=8, n_head_kv=2, head_dim=128, n_expert=8, n_ff=512, vocab=8192
    ),
    # Two layers of Qwen3-30B-A3B at its real tensor shapes (128 experts of 768, hidden 2048, 32/4
    # heads of 128) with a small vocabulary: about 1.25B parameters, 2.5 GB in F16; benchmarks only.
    "a3b-2layers": dict(
        arch="qwen3moe",
        n_layer=2,
        hidden=2048,
        n_head=32,
        n_head_kv=4,
        head_dim=128,
        n_expert=128,
        n_expert_used=8,
        n_ff=768,
        vocab=8192,
    ),
    "dense": dict(
        arch="qwen3", n_layer=16, hidden=256, n_head=4, n_head_kv=4, head_dim=64, n_expert=0, n_ff=512, vocab=320
    ),
}


def _to_dtype(a: np.ndarray, dtype: str):
    """(array, raw_dtype) for GGUFWriter.add_tensor."""
    if dtype == "f32":
        return a.astype(np.float32), None
    if dtype == "f16":
        return a.astype(np.float16), None
    bits = a.astype(np.float32).view(np.uint32)
    bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return bf16, gguf.GGMLQuantizationType.BF16


def copy_tokenizer(w: gguf.GGUFWriter, source: str) -> None:
    """Adds every ``tokenizer.*`` key of ``source`` to ``w``, with its GGUF types."""
    r = gguf.GGUFReader(source)
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)


def write_model(path, name: str, dtype: str = "f16", seed: int = 1234, tokenizer_from: str | None = None) -> None:
    c = dict(CONFIGS[name])
    arch, L, h = c["arch"], c["n_layer"], c["hidden"]
    nh, nkv, hd, ne, ff, vocab = c["n_head"], c["n_head_kv"], c["head_dim"], c["n_expert"], c["n_ff"], c["vocab"]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(f"pyqmoe-preset-{name}")
    w.add_block_count(L)
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ff if ne == 0 else 4 * h)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    if ne:
        w.add_expert_count(ne)
        w.add_expert_used_count(c.get("n_expert_used", 2))
        w.add_expert_feed_forward_length(ff)
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32}[dtype])
    if tokenizer_from:
        copy_tokenizer(w, tokenizer_from)

    def mat(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def add(tname, a, keep_f32=False):
        if keep_f32:
            w.add_tensor(tname, a.astype(np.float32))
        else:
            arr, raw = _to_dtype(a, dtype)
            if raw is None:
                w.add_tensor(tname, arr)
            else:
                w.add_tensor(tname, arr, raw_shape=a.shape, raw_dtype=raw)

    # numpy shapes are (rows, row length): ggml ne = reversed.
    add("token_embd.weight", mat(vocab, h))
    add("output_norm.weight", 1 + mat(h, scale=0.1), keep_f32=True)
    if not c.get("tied"):
        add("output.weight", mat(vocab, h))
    for i in range(L):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", 1 + mat(h, scale=0.1), keep_f32=True)
        add(b + "attn_q.weight", mat(nh * hd, h))
        add(b + "attn_k.weight", mat(nkv * hd, h))
        add(b + "attn_v.weight", mat(nkv * hd, h))
        add(b + "attn_output.weight", mat(h, nh * hd))
        add(b + "attn_q_norm.weight", 1 + mat(hd, scale=0.1), keep_f32=True)
        add(b + "attn_k_norm.weight", 1 + mat(hd, scale=0.1), keep_f32=True)
        add(b + "ffn_norm.weight", 1 + mat(h, scale=0.1), keep_f32=True)
        if ne:
            add(b + "ffn_gate_inp.weight", mat(ne, h), keep_f32=True)
            add(b + "ffn_gate_exps.weight", mat(ne, ff, h))
            add(b + "ffn_up_exps.weight", mat(ne, ff, h))
            add(b + "ffn_down_exps.weight", mat(ne, h, ff))
        else:
            add(b + "ffn_gate.weight", mat(ff, h))
            add(b + "ffn_up.weight", mat(ff, h))
            add(b + "ffn_down.weight", mat(h, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def imatrix_entries(model_path, seed: int = 7) -> dict[str, tuple[int, np.ndarray]]:
    """Random positive importance sums for every 2-D+ weight of a model, as llama-imatrix would
    collect them: {name: (n_calls, sums of n_per_row x n_expert values)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in gguf.GGUFReader(str(model_path)).tensors:
        dims = [int(d) for d in t.shape]
        if len(dims) < 2 or not t.name.endswith(".weight") or "norm" in t.name:
            continue
        n = dims[0] * (dims[2] if len(dims) > 2 else 1)
        out[t.name] = (10, (rng.random(n, dtype=np.float32) * 10 + 0.01).astype(np.float32))
    return out


def write_legacy_imatrix(path, entries, last_call=None, dataset=None) -> None:
    """llama.cpp's legacy imatrix layout; entries: {name: (ncall, sums)}."""
    import struct

    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, values) in entries.items():
            b = name.encode()
            v = np.asarray(values, dtype="<f4")
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.size) + v.tobytes())
        if last_call is not None:
            d = (dataset or "").encode()
            f.write(struct.pack("<ii", last_call, len(d)) + d)


def write_gguf_imatrix(path, entries, chunk_count=10, chunk_size=512, datasets=("synthetic",)) -> None:
    """llama.cpp's GGUF imatrix layout; entries: {name: (sums [n_mat, n], counts [n_mat])}."""
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (sums, counts) in entries.items():
        sums = np.asarray(sums, dtype=np.float32)
        sums = sums.reshape(len(counts), -1)
        w.add_tensor(name + ".in_sum2", sums)
        w.add_tensor(name + ".counts", np.asarray(counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("out")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f16")
    ap.add_argument("--tokenizer-from", default=None, help="copy tokenizer.* metadata from this GGUF")
    a = ap.parse_args()
    write_model(a.out, a.name, a.dtype, tokenizer_from=a.tokenizer_from)
