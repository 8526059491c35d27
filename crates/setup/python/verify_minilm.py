"""Checks a converted all-MiniLM-L6-v2 against an independent float64 numpy BERT.

    verify_minilm.py SOURCE_DIR MODEL_DIR

SOURCE_DIR: what the package ships (config.json, model.safetensors); MODEL_DIR: what
convert_minilm.py wrote (tokenizer.json, 1/model.onnx). The reference shares no code with the
converter: it reads the safetensors file itself and runs the encoder in float64 numpy.
Exits non-zero, saying why, when any check fails. Run by `cargo xtask models --verify`.
"""

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

TOLERANCE = 1e-5

SENTENCES = [
    "This is a test sentence.",
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
    "Share prices dropped steeply on Tuesday once the central bank increased rates.",
    "Penguins live in the southern hemisphere.",
    "ok",
    "How do I bake bread at home without a bread machine, using only flour, water, salt and "
    "yeast, and how long should the dough rise before it goes into a hot oven?",
]
# (anchor, paraphrase, unrelated) indices into SENTENCES.
TRIPLES = [(1, 2, 5), (3, 4, 5), (2, 1, 3), (4, 3, 7)]


def read_safetensors(path):
    """Parses the format directly: u64 header length, JSON header, raw little-endian data."""
    dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8", "F16": "<f2"}
    data = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(data[base + start : base + end], dtype=dtypes[info["dtype"]])
        tensors[name] = array.reshape(info["shape"]).astype(np.float64)
    return tensors


def norm_layer(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def reference(config, t, ids, mask, types):
    """float64 BERT + masked mean pooling + L2 normalisation, one sentence per row."""
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    batch, seq = ids.shape
    dim = config["hidden_size"] // heads

    def dense(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.token_type_embeddings.weight"][types]
        + t["embeddings.position_embeddings.weight"][np.arange(seq)][None, :, :]
    )
    x = norm_layer(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    keep = mask.astype(bool)[:, None, None, :]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def heads_of(name):
            return dense(x, p + name).reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)

        q, k, v = (heads_of(f"attention.self.{name}") for name in ("query", "key", "value"))
        scores = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(dim)
        scores = np.where(keep, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(axis=-1, keepdims=True)
        ctx = np.einsum("bhqk,bhkd->bhqd", weights, v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        x = norm_layer(
            dense(ctx, p + "attention.output.dense") + x,
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        ffn = dense(gelu(dense(x, p + "intermediate.dense")), p + "output.dense")
        x = norm_layer(
            ffn + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps
        )
    m = mask.astype(np.float64)[:, :, None]
    pooled = (x * m).sum(axis=1) / m.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def encode(tokenizer, sentences):
    encodings = tokenizer.encode_batch(sentences)
    fields = ("ids", "attention_mask", "type_ids")
    return tuple(np.array([getattr(e, f) for e in encodings], dtype=np.int64) for f in fields)


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: verify_minilm.py SOURCE_DIR MODEL_DIR")
    source, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((source / "config.json").read_text())
    tensors = read_safetensors(source / "model.safetensors")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    session = ort.InferenceSession(
        str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    failures = []

    def check(ok, message):
        print(("ok    " if ok else "FAIL  ") + message)
        if not ok:
            failures.append(message)

    # Tokenizer: pads to the longest in the batch, truncates at 256.
    ids, mask, types = encode(tokenizer, SENTENCES)
    lengths = mask.sum(axis=1)
    check(ids.shape[1] == lengths.max(), f"batch padded to its longest ({ids.shape[1]} tokens)")
    long_ids, _, _ = encode(tokenizer, ["word " * 400])
    check(long_ids.shape[1] == 256, f"400 words are truncated to 256 tokens ({long_ids.shape[1]})")

    run = lambda i, m, t: session.run(  # noqa: E731
        ["sentence_embedding"], {"input_ids": i, "attention_mask": m, "token_type_ids": t}
    )[0]
    onnx_batch = run(ids, mask, types)
    expected = reference(config, tensors, ids, mask, types)
    diff = float(np.abs(onnx_batch - expected).max())
    print(f"max abs difference, padded batch of {len(SENTENCES)} vs float64 numpy: {diff:.3e}")
    check(diff <= TOLERANCE, f"ONNX matches the numpy reference within {TOLERANCE:g} ({diff:.3e})")

    # Each sentence alone (no padding) must give its row of the padded batch.
    alone = np.concatenate([run(*encode(tokenizer, [s])) for s in SENTENCES])
    alone_diff = float(np.abs(alone - onnx_batch).max())
    print(f"max abs difference, batch-1 vs padded batch: {alone_diff:.3e}")
    check(alone_diff <= TOLERANCE, f"padding does not change embeddings ({alone_diff:.3e})")

    norms = np.linalg.norm(onnx_batch.astype(np.float64), axis=1)
    norm_dev = float(np.abs(norms - 1.0).max())
    check(norm_dev <= TOLERANCE, f"every embedding has norm 1 (max deviation {norm_dev:.3e})")
    test_norm = float(np.linalg.norm(run(*encode(tokenizer, [SENTENCES[0]]))[0].astype(np.float64)))
    check(abs(test_norm - 1.0) <= TOLERANCE, f'"{SENTENCES[0]}" has norm {test_norm:.7f}')

    cosine = onnx_batch.astype(np.float64) @ onnx_batch.astype(np.float64).T
    for anchor, paraphrase, unrelated in TRIPLES:
        near, far = cosine[anchor, paraphrase], cosine[anchor, unrelated]
        check(
            near > far,
            f"cos(#{anchor}, paraphrase #{paraphrase}) = {near:.3f} > "
            f"cos(#{anchor}, unrelated #{unrelated}) = {far:.3f}",
        )

    if failures:
        print(f"verify_minilm: {len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print(f"verify_minilm: all checks passed (max abs difference {diff:.3e})")


if __name__ == "__main__":
    main()
