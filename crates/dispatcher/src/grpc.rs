//! `lmgrid.v1.JobService`, to be filled in by the dispatcher issue.

use std::pin::Pin;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const ISSUE: &str = "the dispatcher issue (durable batch jobs in Redis)";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Api;

#[tonic::async_trait]
impl pb::job_service_server::JobService for Api {
    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send>>;

    async fn submit_job(
        &self,
        _: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("SubmitJob", ISSUE))
    }

    async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("GetJob", ISSUE))
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Err(not_yet_implemented("ListJobs", ISSUE))
    }

    async fn cancel_job(
        &self,
        _: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        Err(not_yet_implemented("CancelJob", ISSUE))
    }

    async fn watch_job(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        Err(not_yet_implemented("WatchJob", ISSUE))
    }

    async fn get_job_result(
        &self,
        _: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResult>, Status> {
        Err(not_yet_implemented("GetJobResult", ISSUE))
    }
}
