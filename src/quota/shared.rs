//! Budgets and rates in Redis, shared by every instance. Each check is one
//! Lua script, which Redis runs atomically: a subject's period has a counter
//! of settled tokens (`…:used`) and a sorted set of reservations under way
//! (`…:held`, member `id:tokens`, scored by expiry), so a crashed request's
//! reservation stops counting once its time is up. A counter Redis does
//! not have (new period, or Redis came back empty) is seeded from the
//! database's copy. `None` from any call: Redis did not answer.

use std::time::Duration;

use super::{Hold, rate::Verdict};
use crate::{redis_link::RedisLink, store::Reserved};

/// How long one budget call may wait for Redis before the request is refused.
const REDIS_WAIT: Duration = Duration::from_millis(500);
/// How long a period's keys outlive the longest period.
const KEEP_MS: i64 = 32 * 86_400_000;

const RESERVE: &str = r"
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000)
local used = redis.call('GET', KEYS[1])
if not used then
  if ARGV[6] == '' then return {-1, 0, 0, at} end
  if redis.call('SET', KEYS[1], ARGV[6], 'PX', ARGV[5], 'NX') then
    redis.call('SET', KEYS[3], at, 'PX', ARGV[5])
  end
  used = redis.call('GET', KEYS[1])
end
used = tonumber(used)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  reserved = reserved + tonumber(string.match(m, ':(%d+)$'))
end
local tokens = tonumber(string.match(ARGV[3], ':(%d+)$'))
if used + reserved + tokens > tonumber(ARGV[2]) then return {0, used, reserved, at} end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, used, reserved + tokens, at}
";

// A settlement is added to the counter only if the counter is older than
// the reservation (Redis's own clock, `…:seeded`): a counter seeded later
// (Redis came back empty meanwhile) was seeded from the database, which
// settlements reach first, so it holds this one already.
const SETTLE: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local seeded = tonumber(redis.call('GET', KEYS[3]) or '0')
  if seeded <= tonumber(ARGV[3]) then redis.call('INCRBY', KEYS[1], ARGV[2]) end
end
return 1
";

const SPENT: &str = r"
local used = redis.call('GET', KEYS[1])
if not used then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local reserved = 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  reserved = reserved + tonumber(string.match(m, ':(%d+)$'))
end
return tonumber(used) + reserved
";

const GCRA: &str = r"
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local interval = math.floor(60000 / rpm)
local burst = interval * rpm
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local nxt = tat + interval
local allow_at = nxt - burst
if now < allow_at then return {allow_at - now, 0, tat - now} end
redis.call('SET', KEYS[1], nxt, 'PX', nxt - now)
return {0, math.floor((burst - (nxt - now)) / interval), nxt - now}
";

pub struct SharedBudgets {
    link: RedisLink,
    prefix: String,
}

pub enum Reserve {
    /// The answer, and when (Redis time, ms) it was given.
    Counted(Reserved, i64),
    /// Redis has no counter for the period: call again with the database's.
    NeedsSeed,
}

impl SharedBudgets {
    pub fn new(client: redis::Client, prefix: &str) -> Self {
        Self { link: RedisLink::new(client, REDIS_WAIT, "token budgets"), prefix: prefix.to_owned() }
    }

    /// The period's counter of settled tokens, its reservations, and when
    /// (Redis time, ms) the counter was seeded from the database.
    fn keys(&self, subject: &str, period_key: &str) -> [String; 3] {
        let base = format!("{}:budget:{subject}:{period_key}", self.prefix);
        [format!("{base}:used"), format!("{base}:held"), format!("{base}:seeded")]
    }

    fn script(body: &str, keys: &[&str]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("EVAL").arg(body).arg(keys.len());
        for k in keys {
            cmd.arg(*k);
        }
        pipe
    }

    pub(super) async fn reserve(
        &self,
        hold: &Hold,
        budget: i64,
        expires_at: i64,
        now: i64,
        seed: Option<i64>,
    ) -> Option<Reserve> {
        let [used, held, seeded] = self.keys(&hold.subject, &hold.period_key);
        let mut pipe = Self::script(RESERVE, &[&used, &held, &seeded]);
        pipe.arg(now)
            .arg(budget)
            .arg(format!("{}:{}", hold.id, hold.tokens))
            .arg(expires_at)
            .arg(KEEP_MS)
            .arg(seed.map(|s| s.to_string()).unwrap_or_default());
        let (answer,): (Vec<i64>,) = self.link.query(&pipe).await?;
        match answer.as_slice() {
            [-1, ..] => Some(Reserve::NeedsSeed),
            [granted, used, reserved, at] => {
                Some(Reserve::Counted(Reserved { granted: *granted == 1, used: *used, reserved: *reserved }, *at))
            }
            _ => None,
        }
    }

    pub(super) async fn settle(&self, hold: &Hold, actual: i64) -> bool {
        let [used, held, seeded] = self.keys(&hold.subject, &hold.period_key);
        let mut pipe = Self::script(SETTLE, &[&used, &held, &seeded]);
        pipe.arg(format!("{}:{}", hold.id, hold.tokens)).arg(actual.max(0)).arg(hold.shared_at);
        self.link.query::<(i64,)>(&pipe).await.is_some()
    }

    /// Tokens spent and held in the period; `Some(None)` when Redis has no
    /// counter for it.
    pub(super) async fn spent(&self, subject: &str, period_key: &str, now: i64) -> Option<Option<i64>> {
        let [used, held, _] = self.keys(subject, period_key);
        let mut pipe = Self::script(SPENT, &[&used, &held]);
        pipe.arg(now);
        let (n,): (i64,) = self.link.query(&pipe).await?;
        Some((n >= 0).then_some(n))
    }

    pub(super) async fn rate(&self, subject: &str, rpm: i64, now: i64) -> Option<Verdict> {
        let key = format!("{}:rate:{subject}", self.prefix);
        let mut pipe = Self::script(GCRA, &[&key]);
        pipe.arg(now).arg(rpm);
        let (answer,): (Vec<i64>,) = self.link.query(&pipe).await?;
        match answer.as_slice() {
            [wait_ms, remaining, reset_ms] => {
                Some(Verdict { wait_ms: *wait_ms, remaining: *remaining, reset_ms: *reset_ms })
            }
            _ => None,
        }
    }
}
