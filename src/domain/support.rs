//! Support desk rules: who a visitor says they are, when their words ask for
//! a human, and the statuses a support session moves through
//! (`ai` → `queued` → `human` → `closed`; a release puts it back in the queue).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    Validator,
    user::{DisplayName, Email},
    validation::check_len,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SupportStatus {
    Ai,
    Queued,
    Human,
    Closed,
}

impl SupportStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SupportStatus::Ai => "ai",
            SupportStatus::Queued => "queued",
            SupportStatus::Human => "human",
            SupportStatus::Closed => "closed",
        }
    }
}

impl FromStr for SupportStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ai" => Ok(Self::Ai),
            "queued" => Ok(Self::Queued),
            "human" => Ok(Self::Human),
            "closed" => Ok(Self::Closed),
            _ => Err("must be one of ai, queued, human, closed".into()),
        }
    }
}

/// A visitor's details, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
}

impl ClientInfo {
    /// Checks name, email and optional phone, recording errors under
    /// `client_info.<field>`.
    pub fn parse(v: &mut Validator, name: String, email: String, phone: Option<String>) -> Option<Self> {
        let name = v.check("client_info.name", DisplayName::parse(&name));
        let email = v.check("client_info.email", Email::parse(&email));
        let phone = v.check_opt("client_info.phone", phone.filter(|p| !p.trim().is_empty()), |p| parse_phone(&p));
        Some(Self { name: name?.into_inner(), email: email?.as_str().to_owned(), phone: phone? })
    }
}

/// 5–30 characters of digits, spaces and `+-().`, with at least 5 digits.
fn parse_phone(s: &str) -> Result<String, String> {
    let s = s.trim();
    check_len(s, 5, 30)?;
    let allowed = s.chars().all(|c| c.is_ascii_digit() || " +-().".contains(c));
    if !allowed || s.chars().filter(char::is_ascii_digit).count() < 5 {
        return Err("must be a phone number (digits, spaces and + - ( ) .)".into());
    }
    Ok(s.to_owned())
}

/// Phrases that ask for a human when they appear as whole words.
pub const DEFAULT_HANDOFF_PHRASES: &[&str] = &[
    "a human",
    "to human",
    "real human",
    "human agent",
    "human being",
    "real person",
    "live person",
    "talk to an agent",
    "speak to an agent",
    "speak with an agent",
    "talk to agent",
    "live agent",
    "real agent",
    "representative",
    "talk to someone",
    "speak to someone",
];

/// Matches messages against handoff phrases word by word, ignoring case
/// and punctuation, so "humanity" never matches "human".
#[derive(Debug, Clone)]
pub struct HandoffPhrases(Vec<Vec<String>>);

impl HandoffPhrases {
    pub fn new<S: AsRef<str>>(phrases: &[S]) -> Self {
        Self(phrases.iter().map(|p| words(p.as_ref())).filter(|w| !w.is_empty()).collect())
    }

    pub fn asks_for_human(&self, message: &str) -> bool {
        let said = words(message);
        self.0.iter().any(|phrase| said.windows(phrase.len()).any(|w| w == phrase.as_slice()))
    }
}

impl Default for HandoffPhrases {
    fn default() -> Self {
        Self::new(DEFAULT_HANDOFF_PHRASES)
    }
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric() && c != '\'').filter(|w| !w.is_empty()).map(|w| w.to_lowercase()).collect()
}

/// Seconds a visitor at `position` may expect to wait, from the average of
/// recent waits between joining the queue and being claimed.
pub fn estimated_wait_seconds(position: i64, recent_wait_ms: Option<i64>) -> i64 {
    const DEFAULT_WAIT_SECS: i64 = 120;
    let per_session = recent_wait_ms.map_or(DEFAULT_WAIT_SECS, |ms| ((ms + 500) / 1000).max(1));
    position.max(1) * per_session
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_phrases_match_whole_words_only() {
        let p = HandoffPhrases::default();
        assert!(p.asks_for_human("I want to speak to a human"));
        assert!(p.asks_for_human("Can I talk to a REAL PERSON, please?"));
        assert!(p.asks_for_human("talk to an agent"));
        assert!(!p.asks_for_human("What is the future of humanity?"));
        assert!(!p.asks_for_human("The agents of change"));
        assert!(!p.asks_for_human("humane treatment"));
        let custom = HandoffPhrases::new(&["menschen"]);
        assert!(custom.asks_for_human("Bitte einen Menschen... nein: menschen!"));
    }

    #[test]
    fn client_info_is_validated() {
        let mut v = Validator::new();
        let ok = ClientInfo::parse(&mut v, "Ann".into(), "Ann@Example.com".into(), Some("+1 (555) 010-2000".into()));
        assert_eq!(ok.unwrap().email, "ann@example.com");
        assert!(v.is_ok());
        let mut v = Validator::new();
        assert!(ClientInfo::parse(&mut v, "".into(), "nope".into(), Some("call me".into())).is_none());
        let fields: Vec<String> = v.finish().unwrap_err().into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["client_info.name", "client_info.email", "client_info.phone"]);
    }

    #[test]
    fn waits_scale_with_position() {
        assert_eq!(estimated_wait_seconds(3, Some(30_000)), 90);
        assert_eq!(estimated_wait_seconds(1, None), 120);
    }
}
