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

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "day" => Some(UsagePeriod::Day),
            "month" => Some(UsagePeriod::Month),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UsagePeriod::Day => "day",
            UsagePeriod::Month => "month",
        }
    }

    /// When the period containing `now_ms` ends (the next one starts), in ms.
    pub fn ends_at(self, now_ms: i64) -> i64 {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let day = at.date();
        let next = match self {
            UsagePeriod::Day => day.next_day(),
            UsagePeriod::Month => {
                let (y, m) = if day.month() == time::Month::December {
                    (day.year() + 1, time::Month::January)
                } else {
                    (day.year(), day.month().next())
                };
                time::Date::from_calendar_date(y, m, 1).ok()
            }
        };
        next.map_or(i64::MAX, |d| (d.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64)
    }
}

/// A number of tokens per UTC day or month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBudget {
    pub tokens: i64,
    pub period: UsagePeriod,
}

impl TokenBudget {
    /// From the two nullable columns that keep it.
    pub(super) fn from_columns(tokens: Option<i64>, period: Option<String>) -> Option<Self> {
        let period = period.as_deref().and_then(UsagePeriod::parse).unwrap_or(UsagePeriod::Day);
        tokens.map(|tokens| TokenBudget { tokens, period })
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
        assert_eq!(UsagePeriod::Day.ends_at(ms), ms + 1);
        assert_eq!(UsagePeriod::Month.ends_at(ms), ms + 1 + 8 * 86_400_000);
    }
}
