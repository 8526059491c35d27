//! `lmgrid.v1.RegistryService`, to be filled in by the registry issue.

use std::pin::Pin;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

const ISSUE: &str = "the model registry issue (versions, digests, aliases, artifacts)";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Api;

#[tonic::async_trait]
impl pb::registry_service_server::RegistryService for Api {
    type DownloadVersionStream =
        Pin<Box<dyn Stream<Item = Result<pb::DownloadVersionResponse, Status>> + Send>>;

    async fn create_model(
        &self,
        _: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        Err(not_yet_implemented("CreateModel", ISSUE))
    }

    async fn get_model(
        &self,
        _: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::Model>, Status> {
        Err(not_yet_implemented("GetModel", ISSUE))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(not_yet_implemented("ListModels", ISSUE))
    }

    async fn delete_model(
        &self,
        _: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<pb::DeleteModelResponse>, Status> {
        Err(not_yet_implemented("DeleteModel", ISSUE))
    }

    async fn upload_version(
        &self,
        _: Request<Streaming<pb::UploadVersionRequest>>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        Err(not_yet_implemented("UploadVersion", ISSUE))
    }

    async fn get_version(
        &self,
        _: Request<pb::GetVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        Err(not_yet_implemented("GetVersion", ISSUE))
    }

    async fn list_versions(
        &self,
        _: Request<pb::ListVersionsRequest>,
    ) -> Result<Response<pb::ListVersionsResponse>, Status> {
        Err(not_yet_implemented("ListVersions", ISSUE))
    }

    async fn delete_version(
        &self,
        _: Request<pb::DeleteVersionRequest>,
    ) -> Result<Response<pb::DeleteVersionResponse>, Status> {
        Err(not_yet_implemented("DeleteVersion", ISSUE))
    }

    async fn download_version(
        &self,
        _: Request<pb::DownloadVersionRequest>,
    ) -> Result<Response<Self::DownloadVersionStream>, Status> {
        Err(not_yet_implemented("DownloadVersion", ISSUE))
    }

    async fn set_alias(
        &self,
        _: Request<pb::SetAliasRequest>,
    ) -> Result<Response<pb::Alias>, Status> {
        Err(not_yet_implemented("SetAlias", ISSUE))
    }

    async fn delete_alias(
        &self,
        _: Request<pb::DeleteAliasRequest>,
    ) -> Result<Response<pb::DeleteAliasResponse>, Status> {
        Err(not_yet_implemented("DeleteAlias", ISSUE))
    }
}
