//! `lmgrid.v1.NotificationService`, to be filled in by the notification issue.

use std::pin::Pin;

use lmgrid_core::error::not_yet_implemented;
use lmgrid_proto::lmgrid::v1 as pb;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const ISSUE: &str = "the notification issue (event log, subscriptions, webhooks, alerts)";

#[derive(Debug, Clone, Copy)]
pub(crate) struct Api;

#[tonic::async_trait]
impl pb::notification_service_server::NotificationService for Api {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn publish(
        &self,
        _: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        Err(not_yet_implemented("Publish", ISSUE))
    }

    async fn query(
        &self,
        _: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        Err(not_yet_implemented("Query", ISSUE))
    }

    async fn subscribe(
        &self,
        _: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(not_yet_implemented("Subscribe", ISSUE))
    }

    async fn create_webhook(
        &self,
        _: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        Err(not_yet_implemented("CreateWebhook", ISSUE))
    }

    async fn list_webhooks(
        &self,
        _: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        Err(not_yet_implemented("ListWebhooks", ISSUE))
    }

    async fn delete_webhook(
        &self,
        _: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        Err(not_yet_implemented("DeleteWebhook", ISSUE))
    }

    async fn create_alert_rule(
        &self,
        _: Request<pb::CreateAlertRuleRequest>,
    ) -> Result<Response<pb::AlertRule>, Status> {
        Err(not_yet_implemented("CreateAlertRule", ISSUE))
    }

    async fn list_alert_rules(
        &self,
        _: Request<pb::ListAlertRulesRequest>,
    ) -> Result<Response<pb::ListAlertRulesResponse>, Status> {
        Err(not_yet_implemented("ListAlertRules", ISSUE))
    }

    async fn delete_alert_rule(
        &self,
        _: Request<pb::DeleteAlertRuleRequest>,
    ) -> Result<Response<pb::DeleteAlertRuleResponse>, Status> {
        Err(not_yet_implemented("DeleteAlertRule", ISSUE))
    }
}
