//! Usage metering per tenant, model and UTC day: requests, prompt and
//! completion tokens, errors, and requests refused at admission (by reason).
//!
//! Each replica counts in memory; with Redis configured every count is also
//! added to a hash per tenant and day (`<prefix>usage:{<tenant>}:<date>`,
//! fields `<counter>|<model>`, expiring after `usage_retention`), so every
//! replica reports the same totals. Reports read Redis when configured and
//! fall back to this replica's own counts (saying so) when it does not
//! answer. The same counts feed the Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use serde::Serialize;

use crate::metrics;

/// The most days one report may span.
pub(crate) const MAX_REPORT_DAYS: i64 = 366;

/// Days this replica keeps its own counts.
const MEMORY_DAYS: i64 = 35;

/// The counts of one tenant and model (or their totals).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Counters {
    pub(crate) requests: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) total_tokens: u64,
    pub(crate) errors: u64,
    /// Requests refused at admission, by reason.
    pub(crate) rejected: BTreeMap<String, u64>,
}

impl Counters {
    fn add(&mut self, counter: &str, value: u64) {
        match counter {
            "requests" => self.requests += value,
            "prompt_tokens" => self.prompt_tokens += value,
            "completion_tokens" => self.completion_tokens += value,
            "errors" => self.errors += value,
            other => {
                if let Some(reason) = other.strip_prefix("rejected.") {
                    *self.rejected.entry(reason.to_string()).or_default() += value;
                }
            }
        }
        self.total_tokens = self.prompt_tokens + self.completion_tokens;
    }

    fn merge(&mut self, other: &Counters) {
        for (counter, value) in other.fields() {
            self.add(&counter, value);
        }
    }

    fn fields(&self) -> Vec<(String, u64)> {
        let mut fields = vec![
            ("requests".to_string(), self.requests),
            ("prompt_tokens".to_string(), self.prompt_tokens),
            ("completion_tokens".to_string(), self.completion_tokens),
            ("errors".to_string(), self.errors),
        ];
        for (reason, value) in &self.rejected {
            fields.push((format!("rejected.{reason}"), *value));
        }
        fields
    }
}

/// One tenant's usage over a range of days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct TenantUsage {
    pub(crate) tenant: String,
    pub(crate) totals: Counters,
    /// By model label.
    pub(crate) models: BTreeMap<String, Counters>,
}

/// Where a report's numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Source {
    /// Every replica's counts, from Redis.
    Shared,
    /// This replica's own counts.
    Replica,
}

/// Usage metering for one gateway. Cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct Usage(Arc<Inner>);

struct Inner {
    /// (day, tenant, model) → counts.
    memory: Mutex<BTreeMap<(i64, String, String), Counters>>,
    redis: Option<Shared>,
}

struct Shared {
    connection: ConnectionManager,
    prefix: String,
    retention: Duration,
    timeout: Duration,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Usage")
            .field("shared", &self.redis.as_ref().map(|s| &s.prefix))
            .finish_non_exhaustive()
    }
}

impl Usage {
    /// Usage kept in memory only.
    pub(crate) fn local() -> Usage {
        Usage(Arc::new(Inner {
            memory: Mutex::default(),
            redis: None,
        }))
    }

    /// Usage also added up in Redis.
    pub(crate) fn shared(
        connection: ConnectionManager,
        prefix: &str,
        retention: Duration,
        timeout: Duration,
    ) -> Usage {
        Usage(Arc::new(Inner {
            memory: Mutex::default(),
            redis: Some(Shared {
                connection,
                prefix: prefix.to_string(),
                retention,
                timeout,
            }),
        }))
    }

    /// Counts an admitted request that ended, failed or not.
    pub(crate) fn request(&self, tenant: &str, model: &str, failed: bool) {
        metrics::tenant_request(tenant, model, failed);
        let mut counts = vec![("requests".to_string(), 1)];
        if failed {
            counts.push(("errors".to_string(), 1));
        }
        self.record(tenant, model, counts);
    }

    /// Counts the tokens the worker reported for a request.
    pub(crate) fn tokens(&self, tenant: &str, model: &str, prompt: u32, completion: u32) {
        metrics::tenant_tokens(tenant, model, prompt, completion);
        self.record(
            tenant,
            model,
            vec![
                ("prompt_tokens".to_string(), u64::from(prompt)),
                ("completion_tokens".to_string(), u64::from(completion)),
            ],
        );
    }

    /// Counts a request refused for `reason` (a fixed label).
    pub(crate) fn rejected(&self, tenant: &str, model: &str, reason: &str) {
        metrics::rejected(tenant, reason);
        self.record(tenant, model, vec![(format!("rejected.{reason}"), 1)]);
    }

    fn record(&self, tenant: &str, model: &str, counts: Vec<(String, u64)>) {
        let today = today();
        {
            let mut memory = self.0.memory.lock().unwrap_or_else(|e| e.into_inner());
            let entry = memory
                .entry((today, tenant.to_string(), model.to_string()))
                .or_default();
            for (counter, value) in &counts {
                entry.add(counter, *value);
            }
            // Forget days long past, so memory stays bounded.
            if let Some(&(oldest, _, _)) = memory.keys().next()
                && oldest < today - MEMORY_DAYS
            {
                memory.retain(|(day, _, _), _| *day >= today - MEMORY_DAYS);
            }
        }
        let Some(shared) = &self.0.redis else {
            return;
        };
        let key = usage_key(&shared.prefix, tenant, today);
        let mut pipe = redis::pipe();
        for (counter, value) in counts.iter().filter(|(_, v)| *v > 0) {
            pipe.hincr(&key, format!("{counter}|{model}"), *value)
                .ignore();
        }
        let retention = i64::try_from(shared.retention.as_secs()).unwrap_or(i64::MAX);
        pipe.expire(&key, retention).ignore();
        let mut connection = shared.connection.clone();
        let timeout = shared.timeout;
        let tenant = tenant.to_string();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let written =
                    tokio::time::timeout(timeout, pipe.query_async::<()>(&mut connection)).await;
                if !matches!(written, Ok(Ok(()))) {
                    metrics::usage_write_failed();
                    tracing::debug!(tenant, "could not add usage to redis");
                }
            });
        }
    }

    /// The usage of each of `tenants` from day `start` to `end` (days since
    /// the Unix epoch, inclusive).
    pub(crate) async fn report(
        &self,
        tenants: &[String],
        start: i64,
        end: i64,
    ) -> (Vec<TenantUsage>, Source) {
        if let Some(shared) = &self.0.redis {
            match self.report_shared(shared, tenants, start, end).await {
                Ok(report) => return (report, Source::Shared),
                Err(error) => tracing::warn!(
                    %error,
                    "read usage from redis; reporting this replica's own counts"
                ),
            }
        }
        let memory = self.0.memory.lock().unwrap_or_else(|e| e.into_inner());
        let report = tenants
            .iter()
            .map(|tenant| {
                let mut usage = empty(tenant);
                for ((day, who, model), counts) in memory.iter() {
                    if who == tenant && (start..=end).contains(day) {
                        usage.totals.merge(counts);
                        usage.models.entry(model.clone()).or_default().merge(counts);
                    }
                }
                usage
            })
            .collect();
        (report, Source::Replica)
    }

    async fn report_shared(
        &self,
        shared: &Shared,
        tenants: &[String],
        start: i64,
        end: i64,
    ) -> Result<Vec<TenantUsage>, String> {
        let mut pipe = redis::pipe();
        for tenant in tenants {
            for day in start..=end {
                pipe.hgetall(usage_key(&shared.prefix, tenant, day));
            }
        }
        let mut connection = shared.connection.clone();
        let hashes: Vec<BTreeMap<String, u64>> =
            tokio::time::timeout(shared.timeout * 4, pipe.query_async(&mut connection))
                .await
                .map_err(|_| format!("no answer within {:?}", shared.timeout * 4))?
                .map_err(|e| e.to_string())?;
        let days = usize::try_from(end - start + 1).unwrap_or(0).max(1);
        Ok(tenants
            .iter()
            .zip(hashes.chunks(days))
            .map(|(tenant, hashes)| {
                let mut usage = empty(tenant);
                for (field, value) in hashes.iter().flatten() {
                    let Some((counter, model)) = field.split_once('|') else {
                        continue;
                    };
                    usage.totals.add(counter, *value);
                    usage
                        .models
                        .entry(model.to_string())
                        .or_default()
                        .add(counter, *value);
                }
                usage
            })
            .collect())
    }
}

fn empty(tenant: &str) -> TenantUsage {
    TenantUsage {
        tenant: tenant.to_string(),
        totals: Counters::default(),
        models: BTreeMap::new(),
    }
}

fn usage_key(prefix: &str, tenant: &str, day: i64) -> String {
    format!("{prefix}usage:{{{tenant}}}:{}", date(day))
}

/// Today (UTC) as days since the Unix epoch.
pub(crate) fn today() -> i64 {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(seconds / 86_400).unwrap_or(0)
}

/// Days since the Unix epoch as `YYYY-MM-DD` (proleptic Gregorian).
pub(crate) fn date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `YYYY-MM-DD` as days since the Unix epoch; none when not a real date.
pub(crate) fn parse_date(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: i64 = parts.next()?.parse().ok()?;
    let day: i64 = parts.next()?.parse().ok()?;
    if text.len() != 10 || !(1970..=9999).contains(&year) || !(1..=12).contains(&month) {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    // Rejects 2024-02-30 and the like: the date must come back unchanged.
    (day >= 1 && date(days) == text).then_some(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_both_ways() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_782), "2024-02-29");
        assert_eq!(date(20_000), "2024-10-04");
        assert_eq!(parse_date("2024-02-29"), Some(19_782));
        assert_eq!(parse_date("1970-01-01"), Some(0));
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-1-01",
            "yesterday",
            "",
            "2024-00-10",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
        for day in [0, 1, 59, 365, 11_016, 19_782, 30_000] {
            assert_eq!(parse_date(&date(day)), Some(day));
        }
    }

    #[tokio::test]
    async fn local_usage_adds_up_per_tenant_and_model() {
        let usage = Usage::local();
        usage.request("acme", "minilm", false);
        usage.tokens("acme", "minilm", 8, 0);
        usage.request("acme", "llm", true);
        usage.tokens("acme", "llm", 3, 5);
        usage.rejected("acme", "llm", "tokens_per_minute");
        usage.request("other", "llm", false);
        let day = today();
        let (report, source) = usage.report(&["acme".to_string()], day, day).await;
        assert_eq!(source, Source::Replica);
        let acme = &report[0];
        assert_eq!(acme.totals.requests, 2);
        assert_eq!(acme.totals.errors, 1);
        assert_eq!(acme.totals.total_tokens, 16);
        assert_eq!(acme.totals.rejected["tokens_per_minute"], 1);
        assert_eq!(acme.models["minilm"].prompt_tokens, 8);
        assert_eq!(acme.models["llm"].completion_tokens, 5);
        let (old, _) = usage.report(&["acme".to_string()], day - 3, day - 1).await;
        assert_eq!(old[0].totals, Counters::default());
    }
}
