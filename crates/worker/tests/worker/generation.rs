//! `GenerationService` over the real SmolLM2-135M-Instruct that `cargo xtask models` converts
//! into the cache. Exactness tests use the fp32 reference graph: with greedy decoding, a
//! sequence decoded inside a continuous batch must produce exactly the tokens it produces
//! alone. Without the converted models these tests fail, saying what to run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use lmgrid_proto::lmgrid::v1 as pb;
use lmgrid_proto::lmgrid::v1::generation_service_client::GenerationServiceClient;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

use crate::support::{
    PATIENCE, Repo, TestWorker, assert_status, cached_model, linked_repo, metric, state,
};

const FP32: &str = "smollm2-135m-instruct-fp32";
const FAST: &str = "smollm2-135m-instruct";

fn smollm_repo(variant: &str, name: &str, config: Option<&str>) -> anyhow::Result<Repo> {
    linked_repo(&cached_model(variant, "generation"), name, config)
}

/// The converted config with `generation` keys replaced, or added when it has none.
fn config_with(variant: &str, replace: &[(&str, &str)]) -> String {
    let source = cached_model(variant, "generation").join("config.yaml");
    let text = std::fs::read_to_string(&source).unwrap_or_default();
    // Where keys the config does not have go: first in the generation section.
    const MISSING: &str = "\u{0}";
    let mut lines = Vec::new();
    let mut replaced = Vec::new();
    for line in text.lines() {
        let key = line.trim_start().split(':').next().unwrap_or_default();
        match replace.iter().find(|(k, _)| *k == key) {
            Some((k, v)) => {
                lines.push(format!("  {k}: {v}"));
                replaced.push(*k);
            }
            None => lines.push(line.to_string()),
        }
        if line == "generation:" {
            lines.push(MISSING.to_string());
        }
    }
    let added: Vec<String> = replace
        .iter()
        .filter(|(k, _)| !replaced.contains(k))
        .map(|(k, v)| format!("  {k}: {v}"))
        .collect();
    if let Some(at) = lines.iter().position(|l| l == MISSING) {
        lines.splice(at..=at, added);
    }
    lines.join("\n")
}

async fn client(worker: &TestWorker) -> anyhow::Result<GenerationServiceClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", worker.addr))?
        .connect()
        .await
        .context("connect to the worker")?;
    Ok(GenerationServiceClient::new(channel))
}

fn chat(model: &str, question: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: Some(pb::ModelRef {
            name: model.to_string(),
            version: String::new(),
        }),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: question.into(),
                name: String::new(),
            }],
        })),
        sampling: Some(pb::SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        return_token_ids: true,
        ..Default::default()
    }
}

fn prompt(model: &str, text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(text.into())),
        ..chat(model, "", max_tokens)
    }
}

fn sampled(mut request: pb::GenerateRequest, temperature: f32, seed: u64) -> pb::GenerateRequest {
    if let Some(s) = request.sampling.as_mut() {
        s.temperature = Some(temperature);
        s.top_p = Some(0.95);
        s.seed = Some(seed);
    }
    request
}

async fn generate(
    client: &mut GenerationServiceClient<Channel>,
    request: pb::GenerateRequest,
) -> anyhow::Result<pb::GenerateResponse> {
    Ok(client.generate(request).await?.into_inner())
}

fn only(response: &pb::GenerateResponse) -> &pb::Completion {
    &response.completions[0]
}

#[tokio::test]
async fn greedy_chat_says_paris_is_the_capital_of_france() -> anyhow::Result<()> {
    for variant in [FP32, FAST] {
        let worker = TestWorker::start(smollm_repo(variant, variant, None)?).await?;
        let mut client = client(&worker).await?;
        let answer = generate(
            &mut client,
            chat(variant, "What is the capital of France?", 24),
        )
        .await?;
        let completion = only(&answer);
        assert!(
            completion.text.contains("Paris"),
            "{variant}: {:?}",
            completion.text
        );
        let usage = answer.usage.context("usage")?;
        assert!(
            usage.prompt_tokens > 10,
            "the chat template adds a system prompt"
        );
        assert_eq!(
            usage.completion_tokens as usize,
            completion.token_ids.len()
                + usize::from(completion.finish_reason == pb::FinishReason::Stop as i32)
        );
        assert_eq!(
            usage.total_tokens,
            usage.prompt_tokens + usage.completion_tokens
        );
        assert_eq!(answer.model.context("model")?.version, "1");
        worker.stop().await?;
    }
    Ok(())
}

/// Eight prompts of different lengths, each started once the previous one is decoding, so
/// that they join the running batch at different steps: every one gives exactly the tokens
/// it gives alone. The fp32 graph is left-padded.
#[tokio::test]
async fn sequences_joining_a_running_batch_decode_exactly_as_alone() -> anyhow::Result<()> {
    joining_sequences_decode_as_alone(FP32).await
}

/// The same over the 4-bit graph, whose cache is right-padded (GroupQueryAttention): rows
/// joining and leaving are regathered from column 0. On AVX2 and AVX-512 the worker runs
/// its CPU graph, whose kernels sum a row in one order whatever rows are beside it (AVX2: at
/// any size; AVX-512: within decode-sized calls), so this holds by construction there; on
/// other CPUs `MatMulNBits` sums one row and many in different orders (logits within ~1e-4,
/// docs/performance.md) and greedy tokens could part at a near tie.
#[tokio::test]
async fn right_padded_sequences_joining_a_running_batch_decode_as_alone() -> anyhow::Result<()> {
    joining_sequences_decode_as_alone(FAST).await
}

/// The 4-bit graph updates its cache in place (`kv_cache: shared`): one buffer per layer is
/// bound as past and present, with room for 128 more positions, and copied into a wider one
/// when the longest row reaches its edge. Decoded alone, each prompt gives exactly the tokens
/// the same graph gives when it copies its cache every step (`kv_cache: copy`), across the
/// widening (prompts of ~10 tokens, 150 new ones); decoded together, joining at different
/// steps, they give the tokens they give alone.
#[tokio::test]
async fn an_in_place_cache_decodes_as_a_copied_one() -> anyhow::Result<()> {
    let source = cached_model(FAST, "generation");
    let converted = std::fs::read_to_string(source.join("config.yaml"))?;
    assert!(
        converted.contains("kv_cache: shared"),
        "the converter asks for the in-place cache: {converted}"
    );
    let copy = config_with(FAST, &[("kv_cache", "copy")]);
    let repo =
        Repo::new()?
            .linked(&source, "in-place", None)?
            .linked(&source, "copied", Some(&copy))?;
    let worker = TestWorker::start(repo).await?;
    let mut client = client(&worker).await?;
    let prompts = [
        "1, 2, 3, 4, 5, 6,",
        "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday, Monday, Tuesday,",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c",
    ];
    let max_tokens = 150;
    for text in prompts {
        let in_place = generate(&mut client, prompt("in-place", text, max_tokens)).await?;
        let copied = generate(&mut client, prompt("copied", text, max_tokens)).await?;
        assert_eq!(
            only(&in_place).token_ids,
            only(&copied).token_ids,
            "{text:?} decoded differently with the in-place cache"
        );
        assert_eq!(
            only(&in_place).token_ids.len(),
            max_tokens as usize,
            "{text:?} ran to max_tokens, past the first buffer's edge"
        );
    }

    let mut alone = Vec::new();
    for text in prompts {
        let response = generate(&mut client, prompt("in-place", text, max_tokens)).await?;
        alone.push(only(&response).token_ids.clone());
    }
    let mut streams = JoinSet::new();
    for (i, text) in prompts.iter().enumerate() {
        let mut stream = client
            .generate_stream(prompt("in-place", text, max_tokens))
            .await?
            .into_inner();
        // A few steps apart, so each joins a batch already decoding.
        let mut tokens = Vec::new();
        while tokens.len() < 5 {
            let Some(message) = stream.message().await? else {
                break;
            };
            tokens.extend(message.token_ids);
        }
        streams.spawn(async move {
            while let Some(message) = stream.message().await? {
                tokens.extend(message.token_ids);
            }
            anyhow::Ok((i, tokens))
        });
    }
    while let Some(done) = streams.join_next().await {
        let (i, tokens) = done??;
        assert_eq!(
            tokens, alone[i],
            "{:?} decoded differently in the batch",
            prompts[i]
        );
    }
    let rows = metric("lmgrid_worker_decode_batch_size_sum", "in-place");
    let steps = metric("lmgrid_worker_decode_batch_size_count", "in-place");
    assert!(rows > steps, "the streams shared decode steps");
    worker.stop().await?;
    Ok(())
}

/// `kv_cache: shared` on a graph that concatenates its cache (the fp32 reference) is refused
/// when the model loads, naming the setting, rather than failing requests later.
#[tokio::test]
async fn an_in_place_cache_on_a_copying_graph_is_refused_at_load() -> anyhow::Result<()> {
    let config = config_with(FP32, &[("padding", "right"), ("kv_cache", "shared")]);
    let worker = TestWorker::start(smollm_repo(FP32, "fp32-shared", Some(&config))?).await?;
    let listed = worker.list().await?;
    let model = listed
        .iter()
        .find(|m| m.name == "fp32-shared")
        .context("the model is listed")?;
    assert_eq!(state(model), pb::ModelState::Failed, "{model:?}");
    assert!(
        model.error.contains("generation.kv_cache: shared"),
        "{model:?}"
    );
    worker.stop().await?;
    Ok(())
}

async fn joining_sequences_decode_as_alone(variant: &str) -> anyhow::Result<()> {
    let name = format!("{variant}-batch");
    let worker = TestWorker::start(smollm_repo(variant, &name, None)?).await?;
    let mut client = client(&worker).await?;
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea and the wind over the water at night.",
        "2+2=?",
        "Who wrote Hamlet?",
        "List the days of the week, starting from Monday, separated by commas, please.",
        "Hi!",
        "Explain in a few words why the sky is blue during the day.",
    ];
    let max_tokens = 20;
    let mut alone = Vec::new();
    for q in questions {
        let response = generate(&mut client, chat(&name, q, max_tokens)).await?;
        alone.push(only(&response).token_ids.clone());
    }

    let mut streams = JoinSet::new();
    for (i, q) in questions.iter().enumerate() {
        let mut stream = client
            .generate_stream(chat(&name, q, max_tokens))
            .await?
            .into_inner();
        // Wait for this one's first tokens, so the next joins a batch already decoding.
        let mut tokens = Vec::new();
        while tokens.len() < 2 {
            let Some(message) = stream.message().await? else {
                break;
            };
            tokens.extend(message.token_ids);
            if message.finish_reason != 0 {
                break;
            }
        }
        streams.spawn(async move {
            while let Some(message) = stream.message().await? {
                tokens.extend(message.token_ids);
            }
            anyhow::Ok((i, tokens))
        });
    }
    let mut together = vec![Vec::new(); questions.len()];
    while let Some(done) = streams.join_next().await {
        let (i, tokens) = done??;
        together[i] = tokens;
    }
    for (i, q) in questions.iter().enumerate() {
        assert_eq!(
            together[i], alone[i],
            "{variant}: {q:?} decoded differently in the batch"
        );
    }
    let rows = metric("lmgrid_worker_decode_batch_size_sum", &name);
    let steps = metric("lmgrid_worker_decode_batch_size_count", &name);
    assert!(
        rows / steps > 1.5,
        "the streams shared decode steps ({rows} rows in {steps} steps)"
    );
    worker.stop().await?;
    Ok(())
}

/// A long prompt's prefill is spread over turns, `prefill_chunk_tokens` per turn, each
/// followed by a decode step of the running sequences: a stream already decoding keeps
/// getting tokens while ~200 prompt tokens go in 8 at a time (~25 turns), instead of waiting
/// for the whole prefill; and the long prompt gets the answer it gets alone.
#[tokio::test]
async fn a_long_prefill_does_not_stall_running_streams() -> anyhow::Result<()> {
    // The prefix cache off: the long prompt runs twice, and must be prefilled both times.
    let config = config_with(
        FAST,
        &[("prefill_chunk_tokens", "8"), ("prefix_cache_tokens", "0")],
    );
    let worker = TestWorker::start(smollm_repo(FAST, "smollm-chunks", Some(&config))?).await?;
    let mut client = client(&worker).await?;
    let long_text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let alone = generate(&mut client, prompt("smollm-chunks", &long_text, 8)).await?;
    let prompt_tokens = alone.usage.context("usage")?.prompt_tokens;
    assert!(prompt_tokens >= 200, "{prompt_tokens} prompt tokens");

    let mut running = client
        .generate_stream(prompt("smollm-chunks", "1, 2, 3, 4, 5, 6,", 400))
        .await?
        .into_inner();
    running.message().await?.context("a first delta")?;
    let received = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let received = received.clone();
        async move {
            while let Some(message) = running.message().await? {
                received.fetch_add(message.token_ids.len(), Ordering::SeqCst);
            }
            anyhow::Ok(())
        }
    });
    let before = received.load(Ordering::SeqCst);
    let mut long = client
        .generate_stream(prompt("smollm-chunks", &long_text, 8))
        .await?
        .into_inner();
    let first = long
        .message()
        .await?
        .context("the long prompt's first delta")?;
    let during = received.load(Ordering::SeqCst) - before;
    assert!(
        during >= 15,
        "the running stream got {during} tokens while {prompt_tokens} prompt tokens were prefilled 8 per turn"
    );
    let mut tokens = first.token_ids;
    while let Some(message) = long.message().await? {
        tokens.extend(message.token_ids);
    }
    assert_eq!(tokens, only(&alone).token_ids, "decoded as alone");
    reader.abort();

    // A deadline that passes while a prompt is part-way in (400 tokens, ~50 turns) ends it
    // there, before the rest of the prompt runs, and gives its reservation back.
    let before = metric("lmgrid_worker_generation_cancelled_total", "smollm-chunks");
    let prompted = metric("lmgrid_worker_prompt_tokens_total", "smollm-chunks");
    let long_prompt = prompt("smollm-chunks", &long_text.repeat(2), 8);
    a_deadline_frees_the_slot(&mut client, long_prompt, Duration::from_millis(300)).await?;
    assert!(metric("lmgrid_worker_generation_cancelled_total", "smollm-chunks") > before);
    let prefilled = metric("lmgrid_worker_prompt_tokens_total", "smollm-chunks") - prompted;
    assert!(
        prefilled < 100.0,
        "only the short prompt completed its prefill: {prefilled} prompt tokens"
    );
    worker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn stop_sequences_max_tokens_and_streams_agree() -> anyhow::Result<()> {
    let worker = TestWorker::start(smollm_repo(FP32, "smollm-stop", None)?).await?;
    let mut client = client(&worker).await?;
    let question = "What is the capital of France?";

    let mut stopped = chat("smollm-stop", question, 24);
    if let Some(s) = stopped.sampling.as_mut() {
        s.stop = vec!["Paris".into()];
    }
    let response = generate(&mut client, stopped).await?;
    let completion = only(&response);
    assert_eq!(completion.finish_reason, pb::FinishReason::Stop as i32);
    assert_eq!(completion.stop_sequence, "Paris");
    assert!(!completion.text.contains("Paris"), "{:?}", completion.text);
    assert!(!completion.text.is_empty());

    let short = generate(&mut client, chat("smollm-stop", question, 3)).await?;
    assert_eq!(only(&short).finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(only(&short).token_ids.len(), 3);
    assert_eq!(short.usage.context("usage")?.completion_tokens, 3);

    // The stream's deltas add up to the unary text; usage comes last.
    let whole = generate(&mut client, chat("smollm-stop", question, 16)).await?;
    let mut request = chat("smollm-stop", question, 16);
    request.include_usage = true;
    let mut stream = client.generate_stream(request).await?.into_inner();
    let mut text = String::new();
    let mut last = None;
    while let Some(message) = stream.message().await? {
        text.push_str(&message.text_delta);
        last = Some(message);
    }
    let last = last.context("no message")?;
    assert_eq!(text, only(&whole).text);
    assert_eq!(last.finish_reason, only(&whole).finish_reason);
    assert_eq!(last.usage, whole.usage);
    worker.stop().await?;
    Ok(())
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text() -> anyhow::Result<()> {
    let worker = TestWorker::start(smollm_repo(FAST, "smollm-seed", None)?).await?;
    let mut client = client(&worker).await?;
    let request = |seed| {
        sampled(
            chat("smollm-seed", "Tell me a short story about a cat.", 24),
            1.0,
            seed,
        )
    };
    let a = generate(&mut client, request(42)).await?;
    let b = generate(&mut client, request(42)).await?;
    assert_eq!(only(&a).text, only(&b).text);
    assert_eq!(only(&a).token_ids, only(&b).token_ids);
    let mut others = Vec::new();
    for seed in [1, 2, 3] {
        others.push(
            only(&generate(&mut client, request(seed)).await?)
                .token_ids
                .clone(),
        );
    }
    assert!(
        others.iter().any(|t| t != &only(&a).token_ids),
        "four seeds gave the same 24 sampled tokens"
    );

    // n completions: one prompt, n answers, usage over all of them.
    let mut two = request(7);
    if let Some(s) = two.sampling.as_mut() {
        s.n = 2;
    }
    let both = generate(&mut client, two).await?;
    assert_eq!(both.completions.len(), 2);
    assert_eq!(both.completions[1].index, 1);
    let usage = both.usage.context("usage")?;
    assert!(
        usage.completion_tokens as usize
            >= both.completions[0].token_ids.len() + both.completions[1].token_ids.len()
    );
    worker.stop().await?;
    Ok(())
}

/// With one slot, a second request can only run once the first is gone: dropping the first
/// stream must free its slot at the next step.
#[tokio::test]
async fn a_cancelled_stream_frees_its_slot() -> anyhow::Result<()> {
    let config = config_with(FAST, &[("max_sequences", "1")]);
    let worker = TestWorker::start(smollm_repo(FAST, "smollm-cancel", Some(&config))?).await?;
    let mut client = client(&worker).await?;
    let mut long = client
        .generate_stream(prompt(
            "smollm-cancel",
            "Count from one to one thousand:",
            4000,
        ))
        .await?
        .into_inner();
    long.message().await?.context("a first delta")?;
    drop(long);
    let answer = tokio::time::timeout(
        PATIENCE,
        generate(&mut client, chat("smollm-cancel", "Hi!", 4)),
    )
    .await
    .context("the second request never got the slot")??;
    assert_eq!(only(&answer).token_ids.len(), 4);
    assert!(metric("lmgrid_worker_generation_cancelled_total", "smollm-cancel") >= 1.0);

    // A deadline that passes mid-generation ends it and frees the slot too.
    let counting = prompt("smollm-cancel", "Count from one to one thousand:", 4000);
    a_deadline_frees_the_slot(&mut client, counting, Duration::from_millis(500)).await?;
    worker.stop().await?;
    Ok(())
}

/// Sends `request` with a deadline of `timeout`, which passes while it runs: the call ends
/// in DEADLINE_EXCEEDED (or CANCELLED), and a short request to the same model gets the slot
/// afterwards.
async fn a_deadline_frees_the_slot(
    client: &mut GenerationServiceClient<Channel>,
    request: pb::GenerateRequest,
    timeout: Duration,
) -> anyhow::Result<()> {
    let model = request.model.clone().context("a model")?.name;
    let mut timed = tonic::Request::new(request);
    timed.set_timeout(timeout);
    let status = client.generate(timed).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    let answer = tokio::time::timeout(PATIENCE, generate(client, chat(&model, "Hi!", 2)))
        .await
        .context("the slot stayed taken after the deadline")??;
    assert_eq!(only(&answer).token_ids.len(), 2);
    Ok(())
}

#[tokio::test]
async fn bad_requests_name_their_problem() -> anyhow::Result<()> {
    let config = config_with(
        FAST,
        &[("context_length", "64"), ("default_max_tokens", "16")],
    );
    let worker = TestWorker::start(smollm_repo(FAST, "smollm-bad", Some(&config))?).await?;
    let client = client(&worker).await?;
    let call = |request: pb::GenerateRequest| {
        let mut client = client.clone();
        async move { client.generate(request).await.map(|r| r.into_inner()) }
    };
    assert_status(
        call(prompt("smollm-bad", "", 4)).await,
        Code::InvalidArgument,
        &["empty"],
    );
    let long = "word ".repeat(200);
    assert_status(
        call(prompt("smollm-bad", &long, 4)).await,
        Code::InvalidArgument,
        &["context of 64"],
    );
    assert_status(
        call(prompt("smollm-bad", "Hello", 100)).await,
        Code::InvalidArgument,
        &["max_tokens is 100"],
    );
    assert_status(
        call(sampled(prompt("smollm-bad", "Hello", 4), -1.0, 1)).await,
        Code::InvalidArgument,
        &["temperature"],
    );
    let mut no_input = prompt("smollm-bad", "x", 4);
    no_input.input = None;
    assert_status(
        call(no_input).await,
        Code::InvalidArgument,
        &["neither a prompt nor chat"],
    );
    let mut bad_role = chat("smollm-bad", "Hello", 4);
    if let Some(pb::generate_request::Input::Chat(c)) = bad_role.input.as_mut() {
        c.messages[0].role = "robot".into();
    }
    assert_status(
        call(bad_role).await,
        Code::InvalidArgument,
        &["messages[0].role"],
    );
    let mut many_stops = prompt("smollm-bad", "Hello", 4);
    if let Some(s) = many_stops.sampling.as_mut() {
        s.stop = vec!["x".into(); 17];
    }
    assert_status(call(many_stops).await, Code::InvalidArgument, &["stop"]);
    assert_status(
        call(prompt("no-such-model", "Hello", 4)).await,
        Code::NotFound,
        &["no-such-model"],
    );
    // The default max_tokens fits what the context leaves.
    let fits = call(prompt("smollm-bad", "Hello", 0)).await?;
    assert!(only(&fits).token_ids.len() <= 16);
    worker.stop().await?;
    Ok(())
}

/// The 4-bit model keeps recently prefilled prompts (`prefix_cache_tokens` in its converted
/// config): a prompt sharing the chat template's system prompt with an earlier one prefills
/// only the rest, the same prompt again runs nothing before its first token, and either way
/// the tokens are those of the same model without the cache.
#[tokio::test]
async fn prompts_beginning_like_earlier_ones_reuse_their_cache() -> anyhow::Result<()> {
    const REUSED: &str = "lmgrid_worker_prefix_cache_tokens_total";
    let source = cached_model(FAST, "generation");
    let converted = std::fs::read_to_string(source.join("config.yaml"))?;
    assert!(
        converted.contains("prefix_cache_tokens: 2048"),
        "the converter turns the prefix cache on: {converted}"
    );
    let cold = config_with(FAST, &[("prefix_cache_tokens", "0")]);
    let repo = Repo::new()?
        .linked(&source, "prefix-cached", None)?
        .linked(&source, "prefix-cold", Some(&cold))?;
    let worker = TestWorker::start(repo).await?;
    let mut client = client(&worker).await?;
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "What is the capital of France?",
    ];
    let mut before = 0;
    for (i, question) in questions.into_iter().enumerate() {
        let warm = generate(&mut client, chat("prefix-cached", question, 16)).await?;
        let cold = generate(&mut client, chat("prefix-cold", question, 16)).await?;
        assert_eq!(
            only(&warm).token_ids,
            only(&cold).token_ids,
            "{question}: {:?} vs {:?}",
            only(&warm).text,
            only(&cold).text
        );
        let prompt_tokens = u64::from(warm.usage.context("usage")?.prompt_tokens);
        let reused = metric(REUSED, "prefix-cached") as u64 - before;
        match i {
            0 => assert_eq!(reused, 0, "nothing cached yet"),
            1 => assert!(
                (16..prompt_tokens).contains(&reused),
                "the system prompt is shared: {reused} of {prompt_tokens}"
            ),
            _ => assert_eq!(reused, prompt_tokens, "the same prompt again"),
        }
        before += reused;
    }
    assert_eq!(metric(REUSED, "prefix-cold"), 0.0);
    // Two different prompts kept (the third was the first again), none by the cold model.
    let held = metric(
        "lmgrid_worker_generation_prefix_cache_positions",
        "prefix-cached",
    );
    assert!(held > 32.0 && held <= 2048.0, "{held} positions kept");
    assert_eq!(
        metric(
            "lmgrid_worker_generation_prefix_cache_positions",
            "prefix-cold"
        ),
        0.0
    );
    worker.stop().await?;
    Ok(())
}
