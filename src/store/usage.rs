//! Running token totals per user, by UTC day and month, for quotas. Each
//! reply's usage is added to both periods in one upsert, so concurrent
//! replies (on any number of instances) never lose a count.

use time::{OffsetDateTime, macros::format_description};

use super::{Store, StoreResult, get, map_err};

/// A quota period; its key names the UTC day (`2026-11-22`) or month (`2026-11`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsagePeriod {
    Day,
    Month,
}

impl UsagePeriod {
    /// The key of the period containing `now_ms`.
    pub fn key(self, now_ms: i64) -> String {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let formatted = match self {
            UsagePeriod::Day => at.format(format_description!("[year]-[month]-[day]")),
            UsagePeriod::Month => at.format(format_description!("[year]-[month]")),
        };
        formatted.expect("a date always formats")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageTotals {
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

impl UsageTotals {
    pub fn total(&self) -> i64 {
        self.prompt_tokens + self.completion_tokens
    }
}

impl Store {
    /// Adds one reply's tokens to the user's day and month totals.
    pub async fn add_usage(&self, user_id: &str, now_ms: i64, prompt: i64, completion: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO user_usage (user_id, period, prompt_tokens, completion_tokens, updated_at) \
             VALUES ($1, $2, $3, $4, $5), ($6, $7, $8, $9, $10) \
             ON CONFLICT (user_id, period) DO UPDATE SET \
             prompt_tokens = user_usage.prompt_tokens + excluded.prompt_tokens, \
             completion_tokens = user_usage.completion_tokens + excluded.completion_tokens, \
             updated_at = excluded.updated_at",
        )
        .bind(user_id)
        .bind(UsagePeriod::Day.key(now_ms))
        .bind(prompt)
        .bind(completion)
        .bind(now_ms)
        .bind(user_id)
        .bind(UsagePeriod::Month.key(now_ms))
        .bind(prompt)
        .bind(completion)
        .bind(now_ms)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// The user's totals for the period containing `now_ms` (zero if none).
    pub async fn usage_totals(&self, user_id: &str, period: UsagePeriod, now_ms: i64) -> StoreResult<UsageTotals> {
        let row =
            sqlx::query("SELECT prompt_tokens, completion_tokens FROM user_usage WHERE user_id = $1 AND period = $2")
                .bind(user_id)
                .bind(period.key(now_ms))
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        let Some(row) = row else { return Ok(UsageTotals::default()) };
        Ok(UsageTotals {
            prompt_tokens: get(&row, "prompt_tokens").map_err(map_err)?,
            completion_tokens: get(&row, "completion_tokens").map_err(map_err)?,
        })
    }

    /// Every day and month the user has totals for, oldest first.
    pub async fn usage_periods(&self, user_id: &str) -> StoreResult<Vec<(String, UsageTotals)>> {
        let rows = sqlx::query(
            "SELECT period, prompt_tokens, completion_tokens FROM user_usage WHERE user_id = $1 ORDER BY period",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    get(r, "period")?,
                    UsageTotals {
                        prompt_tokens: get(r, "prompt_tokens")?,
                        completion_tokens: get(r, "completion_tokens")?,
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_keys_are_utc_days_and_months() {
        // 2026-11-22T23:59:59.999Z
        let ms = 1_795_391_999_999;
        assert_eq!(UsagePeriod::Day.key(ms), "2026-11-22");
        assert_eq!(UsagePeriod::Month.key(ms), "2026-11");
        assert_eq!(UsagePeriod::Day.key(ms + 1), "2026-11-23");
    }
}
