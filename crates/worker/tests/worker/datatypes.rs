//! Every datatype round-trips exactly through typed and raw contents, and outputs come back
//! as asked: the ones named, in the order named, typed for typed requests and raw for raw.

use half::f16;
use lmgrid_proto::inference::model_infer_request::InferInputTensor;
use lmgrid_proto::inference::{InferTensorContents, ModelInferRequest};
use lmgrid_test_support::onnx::{self, ElemType};
use tonic::Code;

use crate::support::{Repo, TestWorker, assert_status, fp32_input, fp32_output, with_outputs};

/// One datatype's test values: the same six values as typed contents (where the protocol has
/// a field for the type) and as little-endian raw bytes.
struct Case {
    elem: ElemType,
    datatype: &'static str,
    typed: Option<InferTensorContents>,
    raw: Vec<u8>,
}

fn bytes<T, const N: usize>(values: &[T], le: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(le).collect()
}

/// Extremes and signed zeros, infinities and NaN where the type has them.
fn cases() -> Vec<Case> {
    let bools = [true, false, false, true, true, false];
    let u8s = [0u8, 1, 2, 127, 128, u8::MAX];
    let u16s = [0u16, 1, 255, 256, 32768, u16::MAX];
    let u32s = [0u32, 1, 65536, 1 << 31, u32::MAX - 1, u32::MAX];
    let u64s = [0u64, 1, 1 << 32, 1 << 63, u64::MAX - 1, u64::MAX];
    let i8s = [i8::MIN, -1, 0, 1, 64, i8::MAX];
    let i16s = [i16::MIN, -1, 0, 1, 256, i16::MAX];
    let i32s = [i32::MIN, -1, 0, 1, 65536, i32::MAX];
    let i64s = [i64::MIN, -1, 0, 1, 1 << 40, i64::MAX];
    let f16s = [
        f16::NEG_ZERO,
        f16::ONE,
        f16::from_f32(-2.5),
        f16::MAX,
        f16::INFINITY,
        f16::NAN,
    ];
    let f32s = [
        -0.0f32,
        1.5,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    let f64s = [
        -0.0f64,
        1.5,
        f64::MIN_POSITIVE,
        f64::MAX,
        f64::NEG_INFINITY,
        f64::NAN,
    ];
    // Text of every size class: empty, ASCII, multi-byte UTF-8, spaces and punctuation.
    let texts = [
        "",
        "a",
        "héllo wörld",
        "東京",
        " spaced out ",
        "tab\tand, comma",
    ];
    let typed = |contents: InferTensorContents| Some(contents);
    vec![
        Case {
            elem: ElemType::Bool,
            datatype: "BOOL",
            typed: typed(InferTensorContents {
                bool_contents: bools.to_vec(),
                ..Default::default()
            }),
            raw: bools.iter().map(|&b| u8::from(b)).collect(),
        },
        Case {
            elem: ElemType::Uint8,
            datatype: "UINT8",
            typed: typed(InferTensorContents {
                uint_contents: u8s.iter().map(|&v| u32::from(v)).collect(),
                ..Default::default()
            }),
            raw: u8s.to_vec(),
        },
        Case {
            elem: ElemType::Uint16,
            datatype: "UINT16",
            typed: typed(InferTensorContents {
                uint_contents: u16s.iter().map(|&v| u32::from(v)).collect(),
                ..Default::default()
            }),
            raw: bytes(&u16s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Uint32,
            datatype: "UINT32",
            typed: typed(InferTensorContents {
                uint_contents: u32s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&u32s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Uint64,
            datatype: "UINT64",
            typed: typed(InferTensorContents {
                uint64_contents: u64s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&u64s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Int8,
            datatype: "INT8",
            typed: typed(InferTensorContents {
                int_contents: i8s.iter().map(|&v| i32::from(v)).collect(),
                ..Default::default()
            }),
            raw: bytes(&i8s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Int16,
            datatype: "INT16",
            typed: typed(InferTensorContents {
                int_contents: i16s.iter().map(|&v| i32::from(v)).collect(),
                ..Default::default()
            }),
            raw: bytes(&i16s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Int32,
            datatype: "INT32",
            typed: typed(InferTensorContents {
                int_contents: i32s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&i32s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Int64,
            datatype: "INT64",
            typed: typed(InferTensorContents {
                int64_contents: i64s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&i64s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Float16,
            datatype: "FP16",
            // The protocol has no typed field for FP16: raw only.
            typed: None,
            raw: bytes(&f16s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Float,
            datatype: "FP32",
            typed: typed(InferTensorContents {
                fp32_contents: f32s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&f32s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::Double,
            datatype: "FP64",
            typed: typed(InferTensorContents {
                fp64_contents: f64s.to_vec(),
                ..Default::default()
            }),
            raw: bytes(&f64s, |v| v.to_le_bytes()),
        },
        Case {
            elem: ElemType::String,
            datatype: "BYTES",
            typed: typed(InferTensorContents {
                bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
                ..Default::default()
            }),
            // Each element a 4-byte little-endian length, then its bytes.
            raw: texts
                .iter()
                .flat_map(|t| [&(t.len() as u32).to_le_bytes()[..], t.as_bytes()].concat())
                .collect(),
        },
    ]
}

fn model_name(case: &Case) -> String {
    format!("identity_{}", case.datatype.to_lowercase())
}

fn request(case: &Case, contents: Option<InferTensorContents>, raw: bool) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model_name(case),
        id: format!("{}-{raw}", case.datatype),
        inputs: vec![InferInputTensor {
            name: "x".to_string(),
            datatype: case.datatype.to_string(),
            shape: vec![2, 3],
            contents,
            ..Default::default()
        }],
        raw_input_contents: if raw { vec![case.raw.clone()] } else { vec![] },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_datatype_round_trips_through_typed_and_raw_contents() -> anyhow::Result<()> {
    let cases = cases();
    assert_eq!(cases.len(), ElemType::ALL.len(), "a case per element type");
    let mut repo = Repo::new()?;
    for case in &cases {
        let model = onnx::identity(case.elem, &[3]);
        repo = repo.model(&model_name(case), &[("1", &model)], "max_batch_size: 4\n")?;
    }
    let worker = TestWorker::start(repo).await?;
    let mut client = worker.infer.clone();

    for case in &cases {
        let what = case.datatype;
        // Raw in, raw out, byte for byte (NaN payloads included).
        let response = client
            .model_infer(request(case, None, true))
            .await
            .map_err(|e| anyhow::anyhow!("{what} raw: {e:?}"))?
            .into_inner();
        assert_eq!(response.id, format!("{what}-true"));
        assert_eq!(response.model_version, "1");
        let output = &response.outputs[0];
        assert_eq!(
            (
                output.name.as_str(),
                output.datatype.as_str(),
                &output.shape[..]
            ),
            ("y", what, &[2, 3][..]),
            "{what} raw"
        );
        assert!(
            output.contents.is_none(),
            "{what}: raw request, typed output"
        );
        assert_eq!(
            response.raw_output_contents,
            vec![case.raw.clone()],
            "{what}"
        );

        match &case.typed {
            Some(contents) => {
                // Typed in, typed out, in the same field. Debug output tells apart -0.0 and
                // 0.0 and shows NaN, which `==` on floats cannot.
                let response = client
                    .model_infer(request(case, Some(contents.clone()), false))
                    .await
                    .map_err(|e| anyhow::anyhow!("{what} typed: {e:?}"))?
                    .into_inner();
                let output = &response.outputs[0];
                assert_eq!(output.datatype, what);
                assert_eq!(output.shape, vec![2, 3], "{what} typed");
                assert!(
                    response.raw_output_contents.is_empty(),
                    "{what}: typed in, raw out"
                );
                assert_eq!(
                    format!("{:?}", output.contents),
                    format!("{:?}", Some(contents)),
                    "{what} typed"
                );
            }
            None => {
                let result = client
                    .model_infer(request(case, Some(InferTensorContents::default()), false))
                    .await;
                assert_status(
                    result,
                    Code::InvalidArgument,
                    &["'x'", "FP16", "raw_input_contents"],
                );
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_come_back_as_named_and_in_the_order_named() -> anyhow::Result<()> {
    let repo = Repo::new()?.model("add_mul", &[("1", &onnx::add_mul())], "max_batch_size: 4\n")?;
    let worker = TestWorker::start(repo).await?;
    let mut client = worker.infer.clone();
    let a = vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 8.0, 0.0];
    let b = vec![2.0, 2.0, -3.0, 0.25, 4.0, 4.0, 0.125, 7.0];
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let product: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    let request = ModelInferRequest {
        model_name: "add_mul".to_string(),
        inputs: vec![
            fp32_input("a", &[2, 4], a.clone()),
            fp32_input("b", &[2, 4], b.clone()),
        ],
        ..Default::default()
    };
    let names = |r: &lmgrid_proto::inference::ModelInferResponse| {
        r.outputs.iter().map(|o| o.name.clone()).collect::<Vec<_>>()
    };

    // None named: all, in the model's order.
    let all = client.model_infer(request.clone()).await?.into_inner();
    assert_eq!(names(&all), ["sum", "product"]);
    assert_eq!(
        (fp32_output(&all, 0), fp32_output(&all, 1)),
        (sum.clone(), product.clone())
    );

    let only = client
        .model_infer(with_outputs(request.clone(), &["product"]))
        .await?
        .into_inner();
    assert_eq!(names(&only), ["product"]);
    assert_eq!(fp32_output(&only, 0), product);

    let swapped = client
        .model_infer(with_outputs(request.clone(), &["product", "sum"]))
        .await?
        .into_inner();
    assert_eq!(names(&swapped), ["product", "sum"]);
    assert_eq!(
        (fp32_output(&swapped, 0), fp32_output(&swapped, 1)),
        (product.clone(), sum)
    );

    // Inputs may come in any order; raw outputs follow the requested order too.
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut raw = with_outputs(request, &["product"]);
    raw.inputs.reverse();
    for input in &mut raw.inputs {
        input.contents = None;
    }
    raw.raw_input_contents = vec![le(&b), le(&a)];
    let response = client.model_infer(raw).await?.into_inner();
    assert_eq!(names(&response), ["product"]);
    assert_eq!(response.raw_output_contents, vec![le(&product)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_typed_request_gets_raw_outputs_when_an_output_is_fp16() -> anyhow::Result<()> {
    use lmgrid_test_support::onnx::{AttributeProto, Dim, GraphBuilder};

    // FP16 has no typed contents field, so the whole response is raw rather than a mix.
    let model = GraphBuilder::new("halves")
        .input("x", ElemType::Float, &[Dim::batch(), Dim::Fixed(3)])
        .output("y", ElemType::Float, &[Dim::batch(), Dim::Fixed(3)])
        .output("half", ElemType::Float16, &[Dim::batch(), Dim::Fixed(3)])
        .node("Identity", &["x"], &["y"], vec![])
        .node(
            "Cast",
            &["x"],
            &["half"],
            vec![AttributeProto::int("to", 10)],
        )
        .build();
    let repo = Repo::new()?.model("halves", &[("1", &model)], "max_batch_size: 4\n")?;
    let worker = TestWorker::start(repo).await?;
    let x = vec![1.0f32, -2.5, 0.25];
    let request = ModelInferRequest {
        model_name: "halves".into(),
        inputs: vec![fp32_input("x", &[1, 3], x.clone())],
        ..Default::default()
    };
    let response = worker
        .infer
        .clone()
        .model_infer(request)
        .await?
        .into_inner();
    assert_eq!(response.raw_output_contents.len(), 2, "every output raw");
    assert!(response.outputs.iter().all(|o| o.contents.is_none()));
    let y: Vec<f32> = response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let half: Vec<f32> = response.raw_output_contents[1]
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32())
        .collect();
    assert_eq!((y, half), (x.clone(), x));
    worker.stop().await
}
