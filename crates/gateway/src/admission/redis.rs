//! The shared limiter: every gateway replica charges the same buckets in
//! Redis, so a tenant's limits hold across replicas. One Lua script checks
//! and charges all three limits atomically (requests and tokens by GCRA,
//! concurrency as a sorted set of in-flight request ids scored by when their
//! lease ends, so the entries of a crashed gateway expire on their own).
//! Scripts run by `EVALSHA`, loaded on `NOSCRIPT`. Times come from the Redis
//! server's clock (`TIME`), so replicas' clocks need not agree.
//!
//! The gateway touches only its own keys, all under `admission.redis.key_prefix`
//! (`lmgrid:gw:` by default): `<prefix>{<tenant>}:rpm`, `…:tpm` (GCRA
//! times) and `…:inflight` (the sorted set); usage is in `usage.rs`.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Ask, Refusal, Verdict, Window};
use crate::auth::Limits;

/// Checks and charges a request: KEYS = rpm, tpm, in-flight;
/// ARGV = rpm, tpm, max concurrent, tokens, request id, lease (µs).
/// Returns {refusal, retry after µs, requests left, requests reset µs,
/// tokens left, tokens reset µs}; refusal 0 none, 1 requests, 2 tokens,
/// 3 concurrency, 4 larger than the token limit.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period, eps = 60000000, 0.5
local rpm, tpm, conc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost, id, lease = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local function f(x) return string.format('%.0f', x) end
local function current(key)
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then tat = now end
  return tat
end
local function window(tat, limit)
  local used = tat - now
  if used < 0 then used = 0 end
  local left = math.floor((period - used + eps) / (period / limit))
  if left < 0 then left = 0 end
  if left > limit then left = limit end
  return left, math.ceil(used)
end
local r_tat, r_next, t_tat, t_next = now, now, now, now
if rpm > 0 then r_tat = current(KEYS[1]); r_next = r_tat + period / rpm end
if tpm > 0 then t_tat = current(KEYS[2]); t_next = t_tat + cost * (period / tpm) end
local in_flight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', f(now))
  in_flight = redis.call('ZCARD', KEYS[3])
end
local refusal, retry = 0, 0
if tpm > 0 and cost > tpm then refusal = 4
elseif conc > 0 and in_flight >= conc then refusal, retry = 3, 1000000
elseif rpm > 0 and r_next - now > period + eps then refusal, retry = 1, r_next - period - now
elseif tpm > 0 and t_next - now > period + eps then refusal, retry = 2, t_next - period - now
end
if refusal == 0 then
  if rpm > 0 then
    r_tat = r_next
    redis.call('SET', KEYS[1], f(r_tat), 'PX', f(math.ceil((r_tat - now) / 1000) + 1000))
  end
  if tpm > 0 then
    t_tat = t_next
    redis.call('SET', KEYS[2], f(t_tat), 'PX', f(math.ceil((t_tat - now) / 1000) + 1000))
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[3], f(now + lease), id)
    local ttl = redis.call('PTTL', KEYS[3])
    local want = math.ceil(lease / 1000) + 1000
    if ttl < want then redis.call('PEXPIRE', KEYS[3], f(want)) end
  end
end
local r_left, r_reset, t_left, t_reset = 0, 0, 0, 0
if rpm > 0 then r_left, r_reset = window(r_tat, rpm) end
if tpm > 0 then t_left, t_reset = window(t_tat, tpm) end
return {refusal, math.ceil(retry), r_left, r_reset, t_left, t_reset}
";

/// Moves the token bucket by ARGV[2] tokens (negative: a refund) under a
/// limit of ARGV[1] per minute, never before now.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = 60000000
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
tat = tat + delta * (period / tpm)
if tat <= now then redis.call('DEL', KEYS[1]); return 0 end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
  string.format('%.0f', math.ceil((tat - now) / 1000) + 1000))
return 1
";

/// A failure of the shared limiter; the caller falls back to its own.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: unexpected script answer {0:?}")]
    Answer(Vec<i64>),
}

/// The limiter whose state is in Redis.
#[derive(Clone)]
pub(crate) struct RedisLimiter {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    admit: Script,
    settle: Script,
}

impl std::fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The connection to Redis shared by the limiter and usage metering:
/// connected lazily, so a gateway starts while Redis is down, and
/// reconnected in the background after failures.
pub(crate) fn connect(
    url: &str,
    timeout: Duration,
) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config)
}

impl RedisLimiter {
    pub(crate) fn new(connection: ConnectionManager, prefix: &str, timeout: Duration) -> Self {
        RedisLimiter {
            connection,
            prefix: prefix.to_string(),
            timeout,
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
        }
    }

    fn key(&self, tenant: &str, what: &str) -> String {
        // The hash tag keeps one tenant's keys in one slot of a cluster.
        format!("{}{{{tenant}}}:{what}", self.prefix)
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, RedisError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout(self.timeout)),
        }
    }

    pub(crate) async fn admit(&self, ask: &Ask<'_>, limits: Limits) -> Result<Verdict, RedisError> {
        let mut connection = self.connection.clone();
        let lease = u64::try_from(ask.lease.as_micros()).unwrap_or(u64::MAX);
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(self.key(ask.tenant, "rpm"))
            .key(self.key(ask.tenant, "tpm"))
            .key(self.key(ask.tenant, "inflight"))
            .arg(limits.requests_per_minute)
            .arg(limits.tokens_per_minute)
            .arg(limits.max_concurrent)
            .arg(ask.tokens)
            .arg(ask.request_id)
            .arg(lease);
        let answer: Vec<i64> = self
            .bounded(invocation.invoke_async(&mut connection))
            .await?;
        decode(&answer, limits).ok_or(RedisError::Answer(answer))
    }

    pub(crate) async fn settle(
        &self,
        tenant: &str,
        limits: Limits,
        delta: i64,
    ) -> Result<(), RedisError> {
        if limits.tokens_per_minute == 0 || delta == 0 {
            return Ok(());
        }
        let mut connection = self.connection.clone();
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(self.key(tenant, "tpm"))
            .arg(limits.tokens_per_minute)
            .arg(delta);
        self.bounded(invocation.invoke_async::<i64>(&mut connection))
            .await
            .map(drop)
    }

    pub(crate) async fn release(&self, tenant: &str, request_id: &str) -> Result<(), RedisError> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("ZREM");
        command.arg(self.key(tenant, "inflight")).arg(request_id);
        self.bounded(command.query_async::<i64>(&mut connection))
            .await
            .map(drop)
    }
}

/// The script's answer as a verdict.
fn decode(answer: &[i64], limits: Limits) -> Option<Verdict> {
    let &[refusal, retry, r_left, r_reset, t_left, t_reset] = answer else {
        return None;
    };
    let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
    let refusal = match refusal {
        0 => None,
        1 => Some(Refusal::Requests(micros(retry))),
        2 => Some(Refusal::Tokens(micros(retry))),
        3 => Some(Refusal::Concurrency),
        4 => Some(Refusal::TooLarge),
        _ => return None,
    };
    let window = |limit: u64, left: i64, reset: i64| {
        (limit > 0).then(|| Window {
            limit,
            remaining: u64::try_from(left).unwrap_or(0),
            reset: micros(reset),
        })
    };
    Some(Verdict {
        refusal,
        requests: window(limits.requests_per_minute, r_left, r_reset),
        tokens: window(limits.tokens_per_minute, t_left, t_reset),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_answers_decode_to_verdicts() {
        let limits = Limits {
            requests_per_minute: 10,
            tokens_per_minute: 0,
            max_concurrent: 1,
        };
        let verdict = decode(&[1, 2_500_000, 0, 60_000_000, 0, 0], limits).unwrap();
        assert_eq!(
            verdict.refusal,
            Some(Refusal::Requests(Duration::from_millis(2500)))
        );
        let requests = verdict.requests.unwrap();
        assert_eq!((requests.limit, requests.remaining), (10, 0));
        assert_eq!(requests.reset, Duration::from_secs(60));
        assert!(verdict.tokens.is_none(), "an unlimited window is not shown");
        assert_eq!(
            decode(&[3, 1_000_000, 4, 0, 0, 0], limits).unwrap().refusal,
            Some(Refusal::Concurrency)
        );
        assert!(decode(&[9, 0, 0, 0, 0, 0], limits).is_none());
        assert!(decode(&[0, 0], limits).is_none());
        assert!(
            decode(&[0, -5, -1, -1, 0, 0], limits).is_some(),
            "no panic on negatives"
        );
    }
}
