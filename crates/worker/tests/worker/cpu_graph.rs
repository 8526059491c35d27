//! The 4-bit SmolLM2's `model.cpu.onnx` (lmgrid's `ai.lmgrid.MatMulQ4` in place of
//! `MatMulNBits` and its corrections) against its `model.onnx`, which the converter's
//! verifier holds to a float64 forward pass: both dequantize the same blocks exactly and sum
//! in fp32, so their logits may differ only by summation order.

use std::path::Path;

use lmgrid_worker::engine::{ProviderConfig, Runtime};
use ort::session::Session;
use ort::value::{DynValue, Tensor};

use lmgrid_proto::lmgrid::v1 as pb;

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
