//! The 4-bit SmolLM2's `model.cpu.onnx` (lmgrid's `ai.lmgrid.MatMulQ4` in place of
//! `MatMulNBits` and its corrections) against its `model.onnx`, which the converter's
//! verifier holds to a float64 forward pass: both dequantize the same blocks exactly and sum
//! in fp32, so their logits may differ only by summation order.

use std::path::Path;

use lmgrid_worker::engine::{ProviderConfig, Runtime};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_test_support::onnx::{
    self, AttributeProto, Dim, ElemType, GraphBuilder, OperatorSetIdProto, TensorProto,
};

use crate::support::{TestWorker, cached_model, linked_repo, state};

const FAST: &str = "smollm2-135m-instruct";
const LAYERS: usize = 30;

/// The chat-templated France question, as token ids.
fn france(dir: &Path) -> Vec<i64> {
    let tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
    let text = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tokenizer
        .encode(text, false)
        .expect("encode")
        .get_ids()
        .to_vec();
    ids.into_iter().map(i64::from).collect()
}

/// One forward pass over right-padded rows (`lengths` real tokens each, `ids` padded to
/// the longest) after `past` positions cached per row; returns each row's logits and the
/// cache grown by the new columns.
fn run(
    session: &mut Session,
    ids: &[Vec<i64>],
    lengths: &[usize],
    past: Vec<DynValue>,
    past_len: usize,
) -> anyhow::Result<(Vec<Vec<f32>>, Vec<DynValue>)> {
    let rows = ids.len();
    let seq = ids[0].len();
    let flat: Vec<i64> = ids.iter().flatten().copied().collect();
    let mut mask = Vec::new();
    for &len in lengths {
        mask.extend((0..past_len + seq).map(|c| i64::from(c < past_len + len)));
    }
    let mut inputs: Vec<(String, DynValue)> = vec![
        (
            "input_ids".into(),
            Tensor::from_array(([rows, seq], flat))?.into_dyn(),
        ),
        (
            "attention_mask".into(),
            Tensor::from_array(([rows, past_len + seq], mask))?.into_dyn(),
        ),
    ];
    for (i, value) in past.into_iter().enumerate() {
        let part = if i % 2 == 0 { "key" } else { "value" };
        inputs.push((format!("past_key_values.{}.{part}", i / 2), value));
    }
    let mut outputs = session.run(inputs)?;
    let (_, logits) = outputs["logits"].try_extract_tensor::<f32>()?;
    let vocab = logits.len() / rows;
    let logits = logits.chunks(vocab).map(<[f32]>::to_vec).collect();
    let mut present = Vec::new();
    for i in 0..2 * LAYERS {
        let part = if i % 2 == 0 { "key" } else { "value" };
        present.push(
            outputs
                .remove(format!("present.{}.{part}", i / 2).as_str())
                .expect("present"),
        );
    }
    Ok((logits, present))
}

fn empty_cache(rows: usize) -> anyhow::Result<Vec<DynValue>> {
    (0..2 * LAYERS)
        .map(|_| Ok(Tensor::from_array(([rows, 3, 0, 64], Vec::<f32>::new()))?.into_dyn()))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(logits: &[f32]) -> i64 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i);
    best as i64
}

#[test]
fn the_cpu_graph_gives_the_logits_of_model_onnx() -> anyhow::Result<()> {
    let dir = cached_model(FAST, "generation");
    let runtime = Runtime::get(&Default::default())?;
    let open = |file: &str| {
        runtime.session(
            &dir.join("1").join(file),
            None,
            &ProviderConfig::default(),
            2,
        )
    };
    let (mut portable, _, _) = open("model.onnx")?;
    let (mut cpu, _, _) = open("model.cpu.onnx")?;
    let prompt = france(&dir);

    // The prompt, then four greedy steps with the cache, on both graphs.
    let (mut a, mut cache_a) = run(
        &mut portable,
        std::slice::from_ref(&prompt),
        &[prompt.len()],
        empty_cache(1)?,
        0,
    )?;
    let (mut b, mut cache_b) = run(
        &mut cpu,
        std::slice::from_ref(&prompt),
        &[prompt.len()],
        empty_cache(1)?,
        0,
    )?;
    let mut worst = 0f32;
    for (step, len) in (0..5).zip(prompt.len()..) {
        let diff = max_diff(&a[0], &b[0]);
        worst = worst.max(diff);
        // Each graph is ~5e-5 from float64 here (the verifier's figure for model.onnx, whose
        // limit is 1e-3); 2.5e-4 keeps the CPU graph well inside that limit too.
        assert!(diff <= 2.5e-4, "step {step}: logits differ by {diff}");
        assert_eq!(
            argmax(&a[0]),
            argmax(&b[0]),
            "step {step}: greedy tokens differ"
        );
        if step == 4 {
            break;
        }
        let next = vec![argmax(&a[0])];
        (a, cache_a) = run(
            &mut portable,
            std::slice::from_ref(&next),
            &[1],
            cache_a,
            len,
        )?;
        (b, cache_b) = run(&mut cpu, &[next], &[1], cache_b, len)?;
    }
    eprintln!("cpu graph vs model.onnx: max abs logit difference {worst:.2e}");

    // Three right-padded prompts of different lengths in one batch, each against itself alone.
    // (24 tokens or more each: calls of that many rows take the kernel's prompt path alone
    // and in the batch.)
    let prompts = [prompt[..24].to_vec(), prompt.clone(), prompt[..31].to_vec()];
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let padded: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            p.iter()
                .copied()
                .chain(std::iter::repeat(0))
                .take(longest)
                .collect()
        })
        .collect();
    let lengths: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let (batch, _) = run(&mut cpu, &padded, &lengths, empty_cache(3)?, 0)?;
    for (row, p) in prompts.iter().enumerate() {
        let (alone, _) = run(
            &mut cpu,
            std::slice::from_ref(p),
            &[p.len()],
            empty_cache(1)?,
            0,
        )?;
        // lmgrid's kernels sum each output in an order that does not depend on the other
        // rows (within one path), and so do ONNX Runtime's norms and GroupQueryAttention
        // here: a row's logits in a padded batch are bit for bit its logits alone
        // (model.onnx differs by ~1e-4).
        assert_eq!(
            alone[0], batch[row],
            "row {row} in a batch differs from alone"
        );
    }
    Ok(())
}

#[tokio::test]
async fn the_worker_loads_the_cpu_graph_on_the_cpu_and_refuses_a_missing_one() -> anyhow::Result<()>
{
    let dir = cached_model(FAST, "generation");
    let config = std::fs::read_to_string(dir.join("config.yaml"))?;
    assert!(
        config.contains("cpu_graph: model.cpu.onnx"),
        "run `cargo xtask models`"
    );

    // A config naming a graph the version does not have fails that model's load, saying so.
    let missing = config.replace("cpu_graph: model.cpu.onnx", "cpu_graph: absent.onnx");
    let worker = TestWorker::start(linked_repo(&dir, "broken", Some(&missing))?).await?;
    let models = worker.list().await?;
    let broken = models.iter().find(|m| m.name == "broken").expect("listed");
    assert_eq!(state(broken), pb::ModelState::Failed, "{broken:?}");
    assert!(
        broken
            .error
            .contains("cpu_graph: 'absent.onnx' is not a file"),
        "{broken:?}"
    );
    worker.stop().await?;

    let bad = config.replace("cpu_graph: model.cpu.onnx", "cpu_graph: ../model.onnx");
    let worker = TestWorker::start(linked_repo(&dir, "escaping", Some(&bad))?).await?;
    let models = worker.list().await?;
    let escaping = models
        .iter()
        .find(|m| m.name == "escaping")
        .expect("listed");
    assert_eq!(state(escaping), pb::ModelState::Failed, "{escaping:?}");
    assert!(
        escaping.error.contains("must be the name of an .onnx file"),
        "{escaping:?}"
    );
    worker.stop().await?;
    Ok(())
}

/// A one-node graph: `MatMulQ4` (domain `ai.lmgrid`) over a 4 × 32 matrix of 4-bit blocks
/// with the skip norm in front and the gating after it, as the converter writes them, and
/// `attributes` in place of the converter's; `x` and `skip` are graph inputs `[2, 32]`.
/// The fused graph's weights: nibbles, scales and minimums of a `[4, 32]` matrix.
fn fused_weights() -> (Vec<u8>, Vec<half::f16>, Vec<half::f16>) {
    let f16s = |v: &[f32]| {
        v.iter()
            .map(|&v| half::f16::from_f32(v))
            .collect::<Vec<_>>()
    };
    (
        (0..64).map(|i| (i * 37 % 251) as u8).collect(),
        f16s(&[0.02, 0.03, 0.015, 0.025]),
        f16s(&[-0.15, -0.2, -0.1, -0.18]),
    )
}

/// A one-node graph of a fused `MatMulQ4` over [`fused_weights`]: as
/// initializers, or (`weights_fed`) as graph inputs `q`, `scale`, `minimum`.
fn fused_graph(
    dir: &Path,
    attributes: Vec<AttributeProto>,
    weights_fed: bool,
) -> anyhow::Result<std::path::PathBuf> {
    let half_bytes =
        |values: &[half::f16]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let (k, n) = (32i64, 4i64);
    let (q, scale, minimum) = fused_weights();
    let mut graph = GraphBuilder::new("fused");
    graph
        .input("x", ElemType::Float, &[Dim::Fixed(2), Dim::Fixed(k)])
        .input("skip", ElemType::Float, &[Dim::Fixed(2), Dim::Fixed(k)]);
    if weights_fed {
        graph
            .input(
                "q",
                ElemType::Uint8,
                &[Dim::Fixed(n), Dim::Fixed(1), Dim::Fixed(16)],
            )
            .input("scale", ElemType::Float16, &[Dim::Fixed(n), Dim::Fixed(1)])
            .input(
                "minimum",
                ElemType::Float16,
                &[Dim::Fixed(n), Dim::Fixed(1)],
            );
    } else {
        graph
            .initializer(TensorProto::from_raw("q", ElemType::Uint8, &[n, 1, 16], q))
            .initializer(TensorProto::from_raw(
                "scale",
                ElemType::Float16,
                &[n, 1],
                half_bytes(&scale),
            ))
            .initializer(TensorProto::from_raw(
                "minimum",
                ElemType::Float16,
                &[n, 1],
                half_bytes(&minimum),
            ));
    }
    graph
        .initializer_f32(
            "gamma",
            &[k],
            &(0..k).map(|i| 0.8 + i as f32 * 0.01).collect::<Vec<_>>(),
        )
        .node(
            "MatMulQ4",
            &["x", "q", "scale", "minimum", "skip", "gamma"],
            &["y", "sum"],
            attributes,
        )
        .output("y", ElemType::Float, &[Dim::Fixed(2), Dim::Fixed(n / 2)])
        .output("sum", ElemType::Float, &[Dim::Fixed(2), Dim::Fixed(k)]);
    write_lmgrid_graph(dir, &graph)
}

/// Writes a one-node graph whose node is one of lmgrid's operators (domain
/// `ai.lmgrid`, which the model imports) into `dir`.
fn write_lmgrid_graph(dir: &Path, graph: &GraphBuilder) -> anyhow::Result<std::path::PathBuf> {
    let mut model = graph.build();
    if let Some(graph) = model.graph.as_mut() {
        graph.node[0].domain = Some(lmgrid_kernels::DOMAIN.into());
    }
    model.opset_import.push(OperatorSetIdProto {
        domain: Some(lmgrid_kernels::DOMAIN.into()),
        version: Some(1),
    });
    Ok(onnx::write_model(dir, &model)?)
}

fn inputs() -> (Vec<f32>, Vec<f32>) {
    let x = (0..64)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.1)
        .collect();
    let skip = (0..64).map(|i| ((i * 7 % 17) as f32 - 8.0) * 0.2).collect();
    (x, skip)
}

/// The fused node's attributes: K 32, N 4, gated, normalized.
fn fused_attributes() -> Vec<AttributeProto> {
    vec![
        AttributeProto::int("K", 32),
        AttributeProto::int("N", 4),
        AttributeProto::int("swiglu", 1),
        AttributeProto::float("epsilon", 1e-5),
    ]
}

/// The fused node's output for [`inputs`] computed from its parts — norm,
/// matrix product, gating — on this CPU's path.
fn fused_from_parts(
    q: &[u8],
    scale: &[half::f16],
    minimum: &[half::f16],
) -> anyhow::Result<Vec<f32>> {
    use lmgrid_kernels::{Isa, norm, q4, swiglu};
    let (x, skip) = inputs();
    let gamma: Vec<f32> = (0..32).map(|i| 0.8 + i as f32 * 0.01).collect();
    let (mut sum, mut normed) = (vec![0f32; 64], vec![0f32; 64]);
    norm::skip_rms_norm(&x, &skip, &gamma, 1e-5, &mut sum, &mut normed);
    let w = q4::Q4Matrix::new(32, 4, q, scale, minimum).map_err(anyhow::Error::msg)?;
    let full = q4::matmul(&w, &normed);
    let mut want = vec![0f32; 4];
    for r in 0..2 {
        let row = &full[r * 4..(r + 1) * 4];
        swiglu::swiglu(
            &row[..2],
            &row[2..],
            &mut want[r * 2..(r + 1) * 2],
            Isa::best(),
        );
    }
    Ok(want)
}

#[test]
fn the_fused_matmul_q4_normalizes_multiplies_and_gates_like_its_parts() -> anyhow::Result<()> {
    use lmgrid_kernels::norm;
    let dir = tempfile::tempdir()?;
    let path = fused_graph(dir.path(), fused_attributes(), false)?;
    let runtime = Runtime::get(&Default::default())?;
    let (mut session, _, _) = runtime.session(&path, None, &ProviderConfig::default(), 2)?;
    let (x, skip) = inputs();
    let outputs = session.run(ort::inputs![
        "x" => Tensor::from_array(([2usize, 32], x.clone()))?,
        "skip" => Tensor::from_array(([2usize, 32], skip.clone()))?,
    ])?;
    let (y_shape, y) = outputs["y"].try_extract_tensor::<f32>()?;
    assert_eq!(&**y_shape, &[2, 2]);
    let y = y.to_vec();
    let (_, sum) = outputs["sum"].try_extract_tensor::<f32>()?;
    let sum = sum.to_vec();

    // The same from the parts, on this CPU's path: bit for bit.
    let gamma: Vec<f32> = (0..32).map(|i| 0.8 + i as f32 * 0.01).collect();
    let (mut want_sum, mut normed) = (vec![0f32; 64], vec![0f32; 64]);
    norm::skip_rms_norm(&x, &skip, &gamma, 1e-5, &mut want_sum, &mut normed);
    assert_eq!(sum, want_sum, "the second output is x + skip");
    let (q, scale, minimum) = fused_weights();
    assert_eq!(y, fused_from_parts(&q, &scale, &minimum)?);
    Ok(())
}

#[test]
fn matmul_q8_weights_fed_at_run_time_are_used_as_fed_on_every_run() -> anyhow::Result<()> {
    use lmgrid_kernels::q8;
    let dir = tempfile::tempdir()?;
    let (k, n) = (64i64, 20i64);
    let mut graph = GraphBuilder::new("q8");
    graph
        .input("x", ElemType::Float, &[Dim::Fixed(3), Dim::Fixed(k)])
        .input(
            "q",
            ElemType::Int8,
            &[Dim::Fixed(n), Dim::Fixed(2), Dim::Fixed(32)],
        )
        .input("scale", ElemType::Float, &[Dim::Fixed(n), Dim::Fixed(2)])
        .node(
            "MatMulQ8",
            &["x", "q", "scale"],
            &["y"],
            vec![AttributeProto::int("K", k), AttributeProto::int("N", n)],
        )
        .output("y", ElemType::Float, &[Dim::Fixed(3), Dim::Fixed(n)]);
    let path = write_lmgrid_graph(dir.path(), &graph)?;
    let runtime = Runtime::get(&Default::default())?;
    let (mut session, _, _) = runtime.session(&path, None, &ProviderConfig::default(), 2)?;
    let x: Vec<f32> = (0..3 * k)
        .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.1)
        .collect();
    let scale: Vec<f32> = (0..n * 2).map(|i| 0.01 + i as f32 * 1e-3).collect();
    for seed in [3i64, 5] {
        let q: Vec<i8> = (0..n * k).map(|i| ((i * seed) % 255 - 127) as i8).collect();
        let outputs = session.run(ort::inputs![
            "x" => Tensor::from_array(([3usize, k as usize], x.clone()))?,
            "q" => Tensor::from_array(([n as usize, 2, 32], q.clone()))?,
            "scale" => Tensor::from_array(([n as usize, 2], scale.clone()))?,
        ])?;
        let (_, y) = outputs["y"].try_extract_tensor::<f32>()?;
        let w =
            q8::Q8Matrix::new(k as usize, n as usize, &q, &scale).map_err(anyhow::Error::msg)?;
        assert_eq!(y.to_vec(), q8::matmul(&w, &x), "weights of seed {seed}");
    }
    Ok(())
}

#[test]
fn matmul_q4_weights_fed_at_run_time_are_used_as_fed_on_every_run() -> anyhow::Result<()> {
    // Constant weights are repacked once, when the session is created (on AVX2); weights
    // that are graph inputs must be taken as they are on each run.
    let dir = tempfile::tempdir()?;
    let path = fused_graph(dir.path(), fused_attributes(), true)?;
    let runtime = Runtime::get(&Default::default())?;
    let (mut session, _, _) = runtime.session(&path, None, &ProviderConfig::default(), 2)?;
    let (x, skip) = inputs();
    let (q, scale, minimum) = fused_weights();
    let reversed: Vec<u8> = q.iter().rev().copied().collect();
    for q in [q, reversed] {
        let outputs = session.run(ort::inputs![
            "x" => Tensor::from_array(([2usize, 32], x.clone()))?,
            "skip" => Tensor::from_array(([2usize, 32], skip.clone()))?,
            "q" => Tensor::from_array(([4usize, 1, 16], q.clone()))?,
            "scale" => Tensor::from_array(([4usize, 1], scale.clone()))?,
            "minimum" => Tensor::from_array(([4usize, 1], minimum.clone()))?,
        ])?;
        let (_, y) = outputs["y"].try_extract_tensor::<f32>()?;
        assert_eq!(y.to_vec(), fused_from_parts(&q, &scale, &minimum)?);
    }
    Ok(())
}

#[test]
fn a_malformed_fused_matmul_q4_is_refused_with_the_reason() -> anyhow::Result<()> {
    let runtime = Runtime::get(&Default::default())?;
    let (x, skip) = inputs();
    let cases = [
        (
            vec![
                AttributeProto::int("K", 32),
                AttributeProto::int("N", 4),
                AttributeProto::int("swiglu", 2),
                AttributeProto::float("epsilon", 1e-5),
            ],
            "attribute swiglu is 2; it must be 0 or 1",
        ),
        (
            vec![
                AttributeProto::int("K", 32),
                AttributeProto::int("N", 4),
                AttributeProto::int("swiglu", 1),
                AttributeProto::float("epsilon", -1.0),
            ],
            "attribute epsilon is -1; it must be finite and not negative",
        ),
        (
            vec![
                AttributeProto::int("K", 32),
                AttributeProto::int("N", 4),
                AttributeProto::int("swiglu", 1),
            ],
            "skip needs a float attribute epsilon",
        ),
    ];
    for (attributes, reason) in cases {
        let dir = tempfile::tempdir()?;
        let path = fused_graph(dir.path(), attributes, false)?;
        let error = match runtime.session(&path, None, &ProviderConfig::default(), 2) {
            Err(e) => e.to_string(),
            Ok((mut session, _, _)) => session
                .run(ort::inputs![
                    "x" => Tensor::from_array(([2usize, 32], x.clone()))?,
                    "skip" => Tensor::from_array(([2usize, 32], skip.clone()))?,
                ])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "no error".into()),
        };
        assert!(error.contains(reason), "{reason:?} not in {error:?}");
    }
    Ok(())
}
