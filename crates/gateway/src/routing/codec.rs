//! Requests go upstream already encoded: a message is encoded once, and
//! every attempt (the first and any retry) sends the same bytes, so retrying
//! never clones a message, however large its tensors. Answers decode as
//! usual.

use std::marker::PhantomData;

use bytes::{BufMut as _, Bytes};
use lmgrid_proto::inference as oip_pb;
use lmgrid_proto::lmgrid::v1 as pb;
use tonic::Status;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;

/// Sends pre-encoded bytes, decodes `R`.
#[derive(Debug)]
pub(super) struct Encoded<R>(PhantomData<fn() -> R>);

impl<R> Default for Encoded<R> {
    fn default() -> Self {
        Encoded(PhantomData)
    }
}

impl<R: prost::Message + Default + Send + 'static> Codec for Encoded<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = BytesEncoder;
    type Decoder = ProstDecoder<R>;

    fn encoder(&mut self) -> BytesEncoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder::default()
    }
}

/// Writes bytes as they are.
#[derive(Debug)]
pub(super) struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

/// A request that names a model version, which routing may set: to the
/// version an alias names, or to the one a traffic split picked.
pub(crate) trait Versioned: prost::Message {
    fn set_version(&mut self, version: String);
}

impl Versioned for oip_pb::ModelInferRequest {
    fn set_version(&mut self, version: String) {
        self.model_version = version;
    }
}

impl Versioned for oip_pb::ModelMetadataRequest {
    fn set_version(&mut self, version: String) {
        self.version = version;
    }
}

impl Versioned for oip_pb::ModelReadyRequest {
    fn set_version(&mut self, version: String) {
        self.version = version;
    }
}

impl Versioned for pb::GenerateRequest {
    fn set_version(&mut self, version: String) {
        self.model.get_or_insert_with(Default::default).version = version;
    }
}

impl Versioned for pb::EmbedRequest {
    fn set_version(&mut self, version: String) {
        self.model.get_or_insert_with(Default::default).version = version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_set_where_each_message_keeps_them() {
        let mut infer = oip_pb::ModelInferRequest::default();
        infer.set_version("2".into());
        assert_eq!(infer.model_version, "2");
        let mut generate = pb::GenerateRequest::default();
        generate.set_version("canary".into());
        assert_eq!(generate.model.unwrap().version, "canary");
        let mut embed = pb::EmbedRequest {
            model: Some(pb::ModelRef {
                name: "m".into(),
                version: String::new(),
            }),
            ..Default::default()
        };
        embed.set_version("1".into());
        assert_eq!(embed.model.as_ref().unwrap().name, "m");
        assert_eq!(embed.model.unwrap().version, "1");
    }
}
