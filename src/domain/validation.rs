//! Collects field errors so that one 422 answer names every bad field at once.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Gathers the results of several `parse()` calls.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the value, or records the error under `field` and returns `None`.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(message) => {
                self.errors.push(FieldError::new(field, message));
                None
            }
        }
    }

    /// Like `check` for an optional input: `None` stays `None` without error.
    pub fn check_opt<I, T>(
        &mut self,
        field: &str,
        input: Option<I>,
        parse: impl FnOnce(I) -> Result<T, String>,
    ) -> Option<Option<T>> {
        match input {
            None => Some(None),
            Some(i) => self.check(field, parse(i)).map(Some),
        }
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else all the errors.
    pub fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.errors.is_empty() { Ok(()) } else { Err(self.errors) }
    }
}

/// Counts Unicode scalar values, which is what the SPEC calls characters.
pub fn char_len(s: &str) -> usize {
    s.chars().count()
}

/// Checks a length range in characters, with a message naming the bounds.
/// NUL characters are refused everywhere: PostgreSQL cannot store them, so
/// allowing them would make the two engines disagree.
pub fn check_len(s: &str, min: usize, max: usize) -> Result<(), String> {
    if s.contains('\0') {
        return Err("must not contain NUL characters".into());
    }
    let n = char_len(s);
    if n < min {
        if min == 1 {
            return Err("must not be empty".into());
        }
        return Err(format!("must be at least {min} characters"));
    }
    if n > max {
        return Err(format!("must be at most {max} characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_characters_not_bytes() {
        assert_eq!(char_len("héllo"), 5);
        assert!(check_len("ééé", 1, 3).is_ok());
        assert!(check_len("éééé", 1, 3).is_err());
        assert_eq!(check_len("", 1, 3).unwrap_err(), "must not be empty");
        assert!(check_len("a\0b", 1, 10).is_err());
    }

    #[test]
    fn collects_every_error() {
        let mut v = Validator::new();
        assert_eq!(v.check::<()>("a", Err("bad".into())), None);
        assert_eq!(v.check("b", Ok(1)), Some(1));
        v.error("c", "worse");
        let errs = v.finish().unwrap_err();
        assert_eq!(errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    }
}
