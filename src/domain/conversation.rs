//! Conversation and message values: titles, prompts, message content, model
//! ids and message statuses.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::validation::{char_len, check_len};

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_SYSTEM_PROMPT_CHARS: usize = 32_000;
/// Length of a title derived from the first message.
const DERIVED_TITLE_CHARS: usize = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        check_len(s, 1, MAX_TITLE_CHARS)?;
        Ok(Self(s.to_owned()))
    }

    /// A title for an untitled conversation: the start of its first message,
    /// on one line, cut at a word boundary where one is near.
    pub fn derive_from(message: &str) -> Self {
        let flat: String = message.split_whitespace().collect::<Vec<_>>().join(" ");
        if char_len(&flat) <= DERIVED_TITLE_CHARS {
            return Self(if flat.is_empty() { "New conversation".into() } else { flat });
        }
        let cut: String = flat.chars().take(DERIVED_TITLE_CHARS).collect();
        let cut = match cut.rfind(' ') {
            Some(i) if i > DERIVED_TITLE_CHARS / 2 => &cut[..i],
            _ => &cut,
        };
        Self(format!("{cut}…"))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPrompt(String);

impl SystemPrompt {
    pub fn parse(s: &str) -> Result<Self, String> {
        check_len(s, 0, MAX_SYSTEM_PROMPT_CHARS)?;
        Ok(Self(s.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A chat message's text: 1 to `max_chars` characters, not only white space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageContent(String);

impl MessageContent {
    pub fn parse(s: String, max_chars: usize) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("must not be empty".into());
        }
        check_len(&s, 1, max_chars)?;
        Ok(Self(s))
    }

    /// From JSON as any front door receives it (a REST body's field, a
    /// socket frame's): only a string is text.
    pub fn from_json(v: serde_json::Value, max_chars: usize) -> Result<Self, String> {
        match v {
            serde_json::Value::String(s) => Self::parse(s, max_chars),
            _ => Err("must be a string".into()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// `provider/model`; everything after the first `/` goes to the provider verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelId {
    provider: String,
    model: String,
}

impl ModelId {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        check_len(s, 3, 200)?;
        let Some((provider, model)) = s.split_once('/') else {
            return Err("must look like provider/model, e.g. openai/gpt-4o-mini".into());
        };
        let provider_ok =
            !provider.is_empty() && provider.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !provider_ok || model.is_empty() || model.chars().any(char::is_control) {
            return Err("must look like provider/model, e.g. openai/gpt-4o-mini".into());
        }
        Ok(Self { provider: provider.to_ascii_lowercase(), model: model.to_owned() })
    }

    pub fn provider(&self) -> &str {
        &self.provider
    }

    pub fn model(&self) -> &str {
        &self.model
    }
}

impl std::fmt::Display for ModelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    User,
    Assistant,
    /// A human support agent (support desk sessions only).
    Agent,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::User => "user",
            MessageRole::Assistant => "assistant",
            MessageRole::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageStatus {
    Complete,
    Streaming,
    Failed,
    Cancelled,
}

impl MessageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Complete => "complete",
            MessageStatus::Streaming => "streaming",
            MessageStatus::Failed => "failed",
            MessageStatus::Cancelled => "cancelled",
        }
    }
}

impl FromStr for MessageStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "complete" => Ok(Self::Complete),
            "streaming" => Ok(Self::Streaming),
            "failed" => Ok(Self::Failed),
            "cancelled" => Ok(Self::Cancelled),
            other => Err(format!("unknown message status {other:?}")),
        }
    }
}

impl FromStr for MessageRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            "agent" => Ok(Self::Agent),
            other => Err(format!("unknown message role {other:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_split_at_the_first_slash() {
        let m = ModelId::parse("openrouter/meta-llama/llama-3-8b").unwrap();
        assert_eq!((m.provider(), m.model()), ("openrouter", "meta-llama/llama-3-8b"));
        assert_eq!(m.to_string(), "openrouter/meta-llama/llama-3-8b");
        assert!(ModelId::parse("gpt-4o").is_err());
        assert!(ModelId::parse("/gpt").is_err());
        assert!(ModelId::parse("openai/").is_err());
    }

    #[test]
    fn content_rules() {
        assert!(MessageContent::parse("  ".into(), 10).is_err());
        assert!(MessageContent::parse("ééé".into(), 3).is_ok());
        assert!(MessageContent::parse("éééé".into(), 3).is_err());
    }

    #[test]
    fn derived_titles_are_short_single_lines() {
        assert_eq!(Title::derive_from("Hello\nthere").into_inner(), "Hello there");
        let long = "word ".repeat(40);
        let t = Title::derive_from(&long).into_inner();
        assert!(t.ends_with('…') && t.chars().count() <= 61, "{t}");
    }
}

/// What a conversation export is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    Json,
    Markdown,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Self::Json),
            "markdown" => Ok(Self::Markdown),
            _ => Err("must be json or markdown".into()),
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Markdown => "md",
        }
    }
}

/// A file name for a conversation's export: its title in lowercase ASCII
/// words joined by `-` (at most 60 characters), or its id when the title
/// gives none.
pub fn export_file_stem(title: Option<&str>, id: &str) -> String {
    let mut slug = String::new();
    for c in title.unwrap_or_default().chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
        if slug.len() >= 60 {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() { id.to_owned() } else { slug.to_owned() }
}

#[cfg(test)]
mod export_tests {
    use super::*;

    #[test]
    fn export_file_stems_are_safe_slugs() {
        assert_eq!(export_file_stem(Some("Trip to Lisbon 🇵🇹!"), "x"), "trip-to-lisbon");
        assert_eq!(export_file_stem(Some("\"; rm -rf /"), "x"), "rm-rf");
        assert_eq!(export_file_stem(Some("日本語"), "abc"), "abc");
        assert_eq!(export_file_stem(None, "abc"), "abc");
        assert!(export_file_stem(Some(&"word ".repeat(50)), "x").len() <= 60);
        assert_eq!(ExportFormat::parse("markdown"), Ok(ExportFormat::Markdown));
        assert!(ExportFormat::parse("pdf").is_err());
    }
}
