//! Usage reports: `GET /admin/v1/usage` (every tenant, or `?tenant=`) and
//! `GET /v1/usage` (the caller's own tenant), each over UTC days
//! `?start=YYYY-MM-DD&end=YYYY-MM-DD` (both default to today).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Json;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use crate::auth::ANONYMOUS;
use crate::http::call::Call;
use crate::http::error::ApiError;
use crate::usage::{self, MAX_REPORT_DAYS};

/// The query of a usage report.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct UsageQuery {
    start: Option<String>,
    end: Option<String>,
    tenant: Option<String>,
}

/// The days a query asks for, checked.
fn days(query: &UsageQuery) -> Result<(i64, i64), ApiError> {
    let today = usage::today();
    let parse = |param: &str, value: &Option<String>| match value {
        None => Ok(today),
        Some(text) => usage::parse_date(text).ok_or_else(|| {
            ApiError::invalid(
                param,
                format!("'{param}' is {text:?}; expected a date as YYYY-MM-DD"),
            )
        }),
    };
    let end = parse("end", &query.end)?;
    let start = match &query.start {
        None => end.min(today),
        some => parse("start", some)?,
    };
    if start > end {
        return Err(ApiError::invalid("start", "'start' is after 'end'"));
    }
    if end - start >= MAX_REPORT_DAYS {
        return Err(ApiError::invalid(
            "start",
            format!("a report spans at most {MAX_REPORT_DAYS} days"),
        ));
    }
    Ok((start, end))
}

fn query_of(query: Result<Query<UsageQuery>, QueryRejection>) -> Result<UsageQuery, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// `GET /admin/v1/usage`.
pub(super) async fn all(
    State(state): State<AdminState>,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query_of(query)?;
    let (start, end) = days(&query)?;
    let mut tenants: Vec<String> = state.auth.directory().tenants.keys().cloned().collect();
    tenants.push(ANONYMOUS.to_string());
    if let Some(only) = &query.tenant {
        tenants.retain(|t| t == only);
    }
    let (data, source) = state.usage.report(&tenants, start, end).await;
    Ok(Json(json!({
        "object": "list",
        "start": usage::date(start),
        "end": usage::date(end),
        "source": source,
        "data": data,
    })))
}

/// `GET /v1/usage`: the caller's own tenant.
pub(crate) async fn own(
    call: Call,
    query: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let query = query_of(query)?;
    let (start, end) = days(&query)?;
    let tenant = call.identity().name().to_string();
    let (mut report, source) = call
        .state()
        .usage
        .report(std::slice::from_ref(&tenant), start, end)
        .await;
    let mine = report.pop();
    Ok(Json(json!({
        "object": "usage",
        "tenant": tenant,
        "start": usage::date(start),
        "end": usage::date(end),
        "source": source,
        "totals": mine.as_ref().map(|u| &u.totals),
        "models": mine.as_ref().map(|u| &u.models),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_days_default_to_today_and_are_checked() {
        let today = usage::today();
        assert_eq!(days(&UsageQuery::default()).unwrap(), (today, today));
        let range = UsageQuery {
            start: Some("2024-02-01".into()),
            end: Some("2024-02-29".into()),
            tenant: None,
        };
        assert_eq!(days(&range).unwrap(), (19_754, 19_782));
        for (start, end, param) in [
            ("2024-03-01", "2024-02-01", "start"),
            ("2020-01-01", "2024-01-01", "start"),
            ("2024-02-30", "2024-03-01", "start"),
            ("2024-02-01", "soon", "end"),
        ] {
            let query = UsageQuery {
                start: Some(start.into()),
                end: Some(end.into()),
                tenant: None,
            };
            let error = days(&query).unwrap_err();
            assert_eq!(error.status(), 400);
            assert_eq!(
                error.openai_body()["error"]["param"],
                param,
                "{start}..{end}"
            );
        }
    }
}
