//! Token budgets and request rates for every chat path (SPEC §6): a request
//! is admitted (rate checked, its worst case reserved against each budget
//! that applies) before the provider is called, and settled to the
//! provider's real usage after. With REDIS_URL the budgets live in Redis
//! (one atomic script per check, shared by every instance) and a Redis that
//! does not answer refuses budgeted requests; without it, the database.
//! Rates are a GCRA per user and per key, in Redis or, without it (or while
//! it is away), in this instance's memory.

mod rate;
mod shared;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{
    clock::Clock,
    config::LimitSettings,
    ids::Ids,
    store::{SUPPORT_USER_ID, Store, StoreError, SubjectUsage, SubjectUsageKey, TokenBudget, UsagePeriod},
};

pub use shared::SharedBudgets;

/// Who pays for a request, and the limits that come with them.
#[derive(Debug, Clone, Default)]
pub struct Payer {
    pub user_id: String,
    pub user_budget: Option<TokenBudget>,
    pub key_id: Option<String>,
    pub key_budget: Option<TokenBudget>,
    pub key_rpm: Option<i64>,
}

/// One limit as the `x-ratelimit-*` headers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: i64,
    pub remaining: i64,
    /// Milliseconds until the limit is whole again.
    pub reset_ms: i64,
}

/// What a client is told about its limits (the tightest of each kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitState {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

impl LimitState {
    fn tighten(slot: &mut Option<Window>, w: Window) {
        if slot.is_none_or(|old| w.remaining < old.remaining) {
            *slot = Some(w);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("Too many requests: at most {} a minute.", .state.requests.map_or(0, |w| w.limit))]
    RateLimited { state: LimitState, wait_ms: i64 },
    #[error("The token budget of this {whom} is used up until the period ends.")]
    BudgetExceeded { state: LimitState, wait_ms: i64, whom: &'static str },
    #[error("The limits cannot be checked right now (Redis is not answering); try again shortly.")]
    Unavailable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The limit counters, present at 0 from the start (`startup::register_metrics`).
pub fn register_metrics() {
    for outcome in ["budget_exceeded", "limits_unavailable"] {
        metrics::counter!("palaver_budget_refusals_total", "outcome" => outcome).increment(0);
    }
    metrics::counter!("palaver_rate_limited_total", "outcome" => "rate_limited").increment(0);
}

/// The limits service; one per instance.
pub struct Quota {
    store: Store,
    clock: Arc<dyn Clock>,
    ids: Arc<dyn Ids>,
    settings: LimitSettings,
    shared: Option<SharedBudgets>,
    rates: rate::LocalRates,
    /// Settled usage by subject, period and model not yet written: gathered
    /// here and written in one batch (`flush_usage`), never per request.
    pending: Mutex<PendingUsage>,
}

/// A budget of one subject to reserve against.
struct Charge {
    subject: String,
    whom: &'static str,
    budget: TokenBudget,
}

/// A granted reservation of one subject's budget.
#[derive(Debug, Clone)]
struct Hold {
    subject: String,
    period_key: String,
    id: String,
    tokens: i64,
    /// When Redis granted it (its clock, ms); 0 without Redis.
    shared_at: i64,
}

/// An admitted request: what it was told and what it holds until settled.
pub struct Admission {
    pub state: LimitState,
    pub reservation: Reservation,
}

impl Quota {
    pub fn new(
        store: Store,
        clock: Arc<dyn Clock>,
        ids: Arc<dyn Ids>,
        settings: LimitSettings,
        shared: Option<SharedBudgets>,
    ) -> Arc<Self> {
        Arc::new(Self { store, clock, ids, settings, shared, rates: Default::default(), pending: Default::default() })
    }

    /// Tokens a budgeted request without `max_tokens` may answer with.
    pub fn default_reserve(&self) -> u32 {
        self.settings.budget_default_reserve
    }

    /// The payer with the support desk's budget, for the desk's user.
    fn with_desk(&self, payer: &Payer) -> Payer {
        let mut p = payer.clone();
        if p.user_id == SUPPORT_USER_ID {
            p.user_budget = self
                .settings
                .support_token_budget
                .map(|t| TokenBudget { tokens: t.min(i64::MAX as u64) as i64, period: UsagePeriod::Day });
        }
        p
    }

    /// Whether any budget applies to `payer` (its answers are then capped).
    pub fn budgeted(&self, payer: &Payer) -> bool {
        let p = self.with_desk(payer);
        p.user_budget.is_some() || p.key_budget.is_some()
    }

    fn charges(payer: &Payer) -> Vec<Charge> {
        let mut charges = Vec::new();
        if let Some(budget) = payer.user_budget {
            let (subject, whom) = if payer.user_id == SUPPORT_USER_ID {
                ("desk".to_owned(), "support desk")
            } else {
                (format!("user:{}", payer.user_id), "account")
            };
            charges.push(Charge { subject, whom, budget });
        }
        if let (Some(id), Some(budget)) = (&payer.key_id, payer.key_budget) {
            charges.push(Charge { subject: format!("key:{id}"), whom: "API key", budget });
        }
        charges
    }

    /// An admission that holds nothing and tells nothing: for a request
    /// that will not call the provider.
    pub fn nothing_to_admit(self: &Arc<Self>) -> Admission {
        let reservation = Reservation { quota: self.clone(), holds: Vec::new(), usage_of: UsageOf::default() };
        Admission { state: LimitState::default(), reservation }
    }

    /// Checks the rates and reserves `tokens` (the request's worst case)
    /// against every budget of `payer`; nothing is held when it is refused.
    pub async fn admit(self: &Arc<Self>, payer: &Payer, tokens: i64) -> Result<Admission, QuotaError> {
        let payer = self.with_desk(payer);
        let now = self.clock.now_ms();
        let mut state = LimitState::default();
        self.check_rates(&payer, now, &mut state).await?;
        self.reserve_budgets(&payer, tokens, now, state).await
    }

    /// Reserves `tokens` against every budget of `payer`, without counting a
    /// request against its rates: for work no request asked for just now (a
    /// reply taken over from a dead instance).
    pub async fn admit_budgets(self: &Arc<Self>, payer: &Payer, tokens: i64) -> Result<Admission, QuotaError> {
        let payer = self.with_desk(payer);
        self.reserve_budgets(&payer, tokens, self.clock.now_ms(), LimitState::default()).await
    }

    async fn reserve_budgets(
        self: &Arc<Self>,
        payer: &Payer,
        tokens: i64,
        now: i64,
        mut state: LimitState,
    ) -> Result<Admission, QuotaError> {
        let mut reservation = Reservation { quota: self.clone(), holds: Vec::new(), usage_of: usage_subjects(payer) };
        for charge in Self::charges(payer) {
            let period_key = charge.budget.period.key(now);
            let reset_ms = charge.budget.period.ends_at(now) - now;
            let mut hold = Hold { subject: charge.subject, period_key, id: self.ids.random(), tokens, shared_at: 0 };
            let (counted, shared_at) = self.reserve(&hold, charge.budget.tokens, now).await?;
            hold.shared_at = shared_at;
            let left = charge.budget.tokens - counted.used - counted.reserved;
            LimitState::tighten(
                &mut state.tokens,
                Window { limit: charge.budget.tokens, remaining: left.max(0), reset_ms },
            );
            if !counted.granted {
                metrics::counter!("palaver_budget_refusals_total", "outcome" => "budget_exceeded").increment(1);
                // `reservation` gives back what the other budgets granted.
                return Err(QuotaError::BudgetExceeded { state, wait_ms: reset_ms, whom: charge.whom });
            }
            reservation.holds.push(hold);
        }
        Ok(Admission { state, reservation })
    }

    async fn check_rates(&self, payer: &Payer, now: i64, state: &mut LimitState) -> Result<(), QuotaError> {
        let mut rates = Vec::new();
        if let Some(rpm) = self.settings.rate_limit_rpm
            && payer.user_id != SUPPORT_USER_ID
        {
            rates.push((format!("user:{}", payer.user_id), i64::from(rpm)));
        }
        if let (Some(id), Some(rpm)) = (&payer.key_id, payer.key_rpm) {
            rates.push((format!("key:{id}"), rpm));
        }
        for (subject, rpm) in rates {
            let shared = match &self.shared {
                Some(s) => s.rate(&subject, rpm, now).await,
                None => None,
            };
            let verdict = shared.unwrap_or_else(|| self.rates.check(&subject, rpm, now));
            LimitState::tighten(
                &mut state.requests,
                Window { limit: rpm, remaining: verdict.remaining, reset_ms: verdict.reset_ms },
            );
            if verdict.wait_ms > 0 {
                metrics::counter!("palaver_rate_limited_total", "outcome" => "rate_limited").increment(1);
                return Err(QuotaError::RateLimited { state: *state, wait_ms: verdict.wait_ms });
            }
        }
        Ok(())
    }

    /// Reserves the hold; answers the counter and, with Redis, when it granted it.
    async fn reserve(&self, hold: &Hold, budget: i64, now: i64) -> Result<(crate::store::Reserved, i64), QuotaError> {
        let expires_at = now + self.settings.budget_reservation_ttl as i64 * 1000;
        match &self.shared {
            Some(shared) => {
                let outcome = shared.reserve(hold, budget, expires_at, now, None).await;
                let outcome = match outcome {
                    Some(shared::Reserve::NeedsSeed) => {
                        let seed = self.store.tokens_used(&hold.subject, &hold.period_key).await?;
                        shared.reserve(hold, budget, expires_at, now, Some(seed)).await
                    }
                    other => other,
                };
                match outcome {
                    Some(shared::Reserve::Counted(r, at)) => Ok((r, at)),
                    _ => {
                        metrics::counter!("palaver_budget_refusals_total", "outcome" => "limits_unavailable")
                            .increment(1);
                        Err(QuotaError::Unavailable)
                    }
                }
            }
            None => Ok((
                self.store
                    .reserve_tokens(&hold.subject, &hold.period_key, budget, (&hold.id, hold.tokens), expires_at, now)
                    .await?,
                0,
            )),
        }
    }

    /// Settles the holds to `actual` tokens and counts the usage; runs
    /// detached, retrying a while, so no request waits for it.
    fn settle(self: &Arc<Self>, holds: Vec<Hold>, usage: Option<(UsageOf, String, i64, i64)>) {
        let actual = usage.as_ref().map_or(0, |(_, _, p, c)| p + c);
        if let Some((of, model, prompt, completion)) = usage {
            self.gather(of, model, prompt, completion);
        }
        if holds.is_empty() {
            return;
        }
        let quota = self.clone();
        tokio::spawn(async move {
            for hold in holds {
                quota.settle_one(&hold, actual).await;
            }
        });
    }

    /// Settles one hold, retrying a while. With Redis the database's copy is
    /// written first: a Redis that comes back empty seeds its counter from
    /// that copy, and so already counts this settlement (see `SETTLE`).
    async fn settle_one(&self, hold: &Hold, actual: i64) {
        let retry = |mut step: u32| async move {
            step = step.min(6);
            tokio::time::sleep(std::time::Duration::from_millis(100 << step)).await;
        };
        let Some(shared) = &self.shared else {
            for step in 0..8 {
                if self.store.settle_tokens(&hold.subject, &hold.period_key, Some(&hold.id), actual).await.is_ok() {
                    return;
                }
                retry(step).await;
            }
            tracing::warn!("could not settle a reservation; it expires by itself");
            return;
        };
        for step in 0..8 {
            match self.store.settle_tokens(&hold.subject, &hold.period_key, None, actual).await {
                Ok(_) => break,
                Err(e) if step == 7 => {
                    tracing::warn!(error = e.to_string().as_str(), "could not copy settled tokens to the database")
                }
                Err(_) => retry(step).await,
            }
        }
        for step in 0..8 {
            if shared.settle(hold, actual).await {
                return;
            }
            retry(step).await;
        }
    }

    /// Counts one request's usage for each of its subjects' day and month.
    fn gather(&self, of: UsageOf, model: String, prompt: i64, completion: i64) {
        let now = self.clock.now_ms();
        let mut pending = self.pending.lock().expect("usage lock poisoned");
        for subject in of.subjects {
            for period in [UsagePeriod::Day, UsagePeriod::Month] {
                let key =
                    SubjectUsageKey { subject: subject.clone(), period: period.key(now), owner: of.owner.clone() };
                add_pending(&mut pending, key, &model, (1, prompt, completion));
            }
        }
    }

    /// Writes the usage gathered since the last flush; what fails stays for
    /// the next one. True when nothing is left.
    pub async fn flush_usage(&self) -> bool {
        let batch: Vec<(SubjectUsageKey, SubjectUsage)> =
            std::mem::take(&mut *self.pending.lock().expect("usage lock poisoned"))
                .into_iter()
                .map(|((key, _), counts)| (key, counts))
                .collect();
        if batch.is_empty() {
            return true;
        }
        let Err(e) = self.store.add_subject_usage(&batch).await else { return true };
        tracing::warn!(error = e.to_string().as_str(), "could not store usage by model; kept for the next try");
        let mut pending = self.pending.lock().expect("usage lock poisoned");
        for (key, c) in batch {
            add_pending(&mut pending, key, &c.model, (c.requests, c.prompt_tokens, c.completion_tokens));
        }
        false
    }

    /// What `subject`'s budget has left now, without reserving anything.
    async fn remaining(&self, subject: &str, budget: TokenBudget) -> Result<i64, QuotaError> {
        let now = self.clock.now_ms();
        let period_key = budget.period.key(now);
        let spent = match &self.shared {
            Some(shared) => match shared.spent(subject, &period_key, now).await {
                Some(Some(spent)) => spent,
                Some(None) => self.store.tokens_used(subject, &period_key).await?,
                None => return Err(QuotaError::Unavailable),
            },
            None => self.store.tokens_used(subject, &period_key).await?,
        };
        Ok((budget.tokens - spent).max(0))
    }
}

/// A subject's usage in a period, with its budget and what is left of it.
#[derive(Debug, Clone)]
pub struct UsageReport {
    pub period: UsagePeriod,
    /// The period's key: `2026-11-22` or `2026-11`.
    pub period_key: String,
    /// When the period ends, in ms.
    pub resets_at: i64,
    pub models: Vec<crate::store::SubjectUsage>,
    pub budget: Option<TokenBudget>,
    /// Tokens left of the budget (reservations under way count as spent).
    pub remaining: Option<i64>,
}

impl Quota {
    /// The usage of a user (`user:<id>`) or key (`key:<id>`) in `period`
    /// (the budget's period when `None`, else the day).
    pub async fn usage(
        &self,
        subject: &str,
        period: Option<UsagePeriod>,
        budget: Option<TokenBudget>,
    ) -> Result<UsageReport, QuotaError> {
        let now = self.clock.now_ms();
        let period = period.or(budget.map(|b| b.period)).unwrap_or(UsagePeriod::Day);
        let period_key = period.key(now);
        let models = self.store.subject_usage(subject, &period_key).await?;
        let remaining = match budget {
            Some(b) => Some(match self.remaining(subject, b).await {
                Err(QuotaError::Unavailable) => {
                    (b.tokens - self.store.tokens_used(subject, &b.period.key(now)).await?).max(0)
                }
                other => other?,
            }),
            None => None,
        };
        Ok(UsageReport { period, period_key, resets_at: period.ends_at(now), models, budget, remaining })
    }
}

type PendingUsage = HashMap<(SubjectUsageKey, String), SubjectUsage>;

/// Adds `(requests, prompt, completion)` to `key`'s count for `model`.
fn add_pending(
    pending: &mut PendingUsage,
    key: SubjectUsageKey,
    model: &str,
    (requests, prompt, completion): (i64, i64, i64),
) {
    let counts = pending.entry((key, model.to_owned())).or_insert_with(|| SubjectUsage {
        model: model.to_owned(),
        requests: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
    });
    counts.requests += requests;
    counts.prompt_tokens += prompt;
    counts.completion_tokens += completion;
}

/// The subjects whose usage by model is counted for a request, and the user
/// they belong to.
#[derive(Default)]
struct UsageOf {
    subjects: Vec<String>,
    owner: String,
}

fn usage_subjects(payer: &Payer) -> UsageOf {
    let mut subjects =
        vec![if payer.user_id == SUPPORT_USER_ID { "desk".to_owned() } else { format!("user:{}", payer.user_id) }];
    if let Some(id) = &payer.key_id {
        subjects.push(format!("key:{id}"));
    }
    UsageOf { subjects, owner: payer.user_id.clone() }
}

/// The budgets a request holds. `settle` counts what it really used; dropped
/// unsettled (the request failed or went away before usage), it gives its
/// holds back, and should the process die they expire.
pub struct Reservation {
    quota: Arc<Quota>,
    holds: Vec<Hold>,
    usage_of: UsageOf,
}

impl Reservation {
    pub fn settle(mut self, model: &str, prompt_tokens: i64, completion_tokens: i64) {
        let holds = std::mem::take(&mut self.holds);
        let subjects = std::mem::take(&mut self.usage_of);
        metrics::counter!("palaver_budget_tokens_total", "model" => model.to_owned(), "outcome" => "settled")
            .increment((prompt_tokens + completion_tokens).max(0) as u64);
        self.quota.settle(holds, Some((subjects, model.to_owned(), prompt_tokens, completion_tokens)));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.holds.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            self.quota.settle(std::mem::take(&mut self.holds), None);
        }
    }
}

/// Milliseconds as OpenAI writes a reset (`1s`, `6m0s`, `0.25s`).
pub fn reset_text(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        let secs = ms as f64 / 1000.0;
        let text = format!("{secs:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    let total = ms / 1000;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 { format!("{h}h{m}m{s}s") } else { format!("{m}m{s}s") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_read_like_openai() {
        assert_eq!(reset_text(250), "0.25s");
        assert_eq!(reset_text(1000), "1s");
        assert_eq!(reset_text(360_000), "6m0s");
        assert_eq!(reset_text(3_723_000), "1h2m3s");
    }
}
