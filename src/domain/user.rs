//! Account values and roles. A value of these types has passed validation.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use super::validation::check_len;

/// An email address, lowercased so that uniqueness ignores case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        check_len(s, 3, 254)?;
        if !email_address::EmailAddress::is_valid(s) || !s.contains('@') {
            return Err("must be a valid email address".into());
        }
        Ok(Self(s.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// 3–32 characters of `[A-Za-z0-9_.-]`; unique without regard to case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(s: &str) -> Result<Self, String> {
        check_len(s, 3, 32)?;
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err("may contain only letters, digits, '_', '.' and '-'".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form used for uniqueness and lookup.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

/// A plaintext password that meets the length rule (8–128 characters).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn parse(s: String) -> Result<Self, String> {
        check_len(&s, 8, 128)?;
        Ok(Self(s))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        check_len(s, 1, 100)?;
        if s.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The most days a retention may name (a hundred years).
pub const MAX_RETENTION_DAYS: i64 = 36_500;

/// How many days a user's idle conversations are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionDays(i64);

impl RetentionDays {
    pub fn parse(days: i64) -> Result<Self, String> {
        if (1..=MAX_RETENTION_DAYS).contains(&days) {
            Ok(Self(days))
        } else {
            Err(format!("must be a whole number of days from 1 to {MAX_RETENTION_DAYS}"))
        }
    }

    pub fn days(self) -> i64 {
        self.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Agent,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }

    /// Agents and admins staff the support desk.
    pub fn is_staff(self) -> bool {
        matches!(self, Role::Agent | Role::Admin)
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "user" => Ok(Role::User),
            "agent" => Ok(Role::Agent),
            "admin" => Ok(Role::Admin),
            _ => Err("must be one of user, agent, admin".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_is_validated_and_lowercased() {
        assert_eq!(Email::parse(" Ann@Example.COM ").unwrap().as_str(), "ann@example.com");
        assert!(Email::parse("not-an-email").is_err());
        assert!(Email::parse("a@").is_err());
        assert!(Email::parse(&format!("{}@x.io", "a".repeat(260))).is_err());
    }

    #[test]
    fn username_rules() {
        assert!(Username::parse("ann_b.c-d").is_ok());
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse(&"a".repeat(33)).is_err());
        assert!(Username::parse("ann b").is_err());
        assert!(Username::parse("änn").is_err());
        assert_eq!(Username::parse("Ann").unwrap().key(), "ann");
    }

    #[test]
    fn password_counts_characters() {
        assert!(Password::parse("ééééééé".into()).is_err());
        assert!(Password::parse("éééééééé".into()).is_ok());
        assert!(Password::parse("x".repeat(129)).is_err());
        assert_eq!(format!("{:?}", Password::parse("secret123".into()).unwrap()), "Password(***)");
    }

    #[test]
    fn roles_parse() {
        assert_eq!("agent".parse::<Role>(), Ok(Role::Agent));
        assert!("root".parse::<Role>().is_err());
        assert!(Role::Admin.is_staff() && !Role::User.is_staff());
    }
}
