//! Literal message search: the validated term, the case folding both the
//! store's candidates and the exact check use, and the snippet shown around
//! a match. No character of a term is an operator or a wildcard.

use super::validation::char_len;

pub const MAX_TERM_CHARS: usize = 200;
/// Shortest term the trigram indexes can serve; shorter ones scan.
pub const INDEXED_TERM_CHARS: usize = 3;
/// Characters of context shown on each side of a match.
const SNIPPET_CONTEXT_CHARS: usize = 60;

/// A search term: not blank, at most 200 characters, kept as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchTerm {
    text: String,
    folded: String,
}

impl SearchTerm {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("must not be blank".into());
        }
        if char_len(s) > MAX_TERM_CHARS {
            return Err(format!("must be at most {MAX_TERM_CHARS} characters"));
        }
        Ok(Self { text: s.to_owned(), folded: fold(s) })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The term case-folded, as matches compare it.
    pub fn folded(&self) -> &str {
        &self.folded
    }

    /// Whether the trigram indexes can find candidates for this term.
    pub fn is_indexable(&self) -> bool {
        char_len(&self.text) >= INDEXED_TERM_CHARS
    }

    /// The term as one FTS5 string: quoted, inner quotes doubled, so the
    /// trigram tokenizer matches it as a plain substring.
    pub fn fts5_phrase(&self) -> String {
        format!("\"{}\"", self.text.replace('"', "\"\""))
    }

    /// The term for `LIKE '%' || $n || '%' ESCAPE '\'`: `%`, `_` and `\` escaped.
    pub fn like_escaped(&self) -> String {
        let mut out = String::with_capacity(self.text.len());
        for c in self.text.chars() {
            if matches!(c, '%' | '_' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    /// Whether `content` contains the term (as `snippet` finds it), without
    /// building a snippet: how the candidates beyond a page are counted.
    pub fn matches(&self, content: &str) -> bool {
        if content.is_ascii() {
            // ASCII folds to ASCII lowercase, so no folded copy is needed;
            // a term whose folded form is not ASCII cannot be in it.
            let (hay, needle) = (content.as_bytes(), self.folded.as_bytes());
            return self.folded.is_ascii() && hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle));
        }
        fold(content).contains(&self.folded)
    }

    /// The snippet around the first match in `content`, or `None` when the
    /// content does not contain the term (the exact check on candidates).
    pub fn snippet(&self, content: &str) -> Option<String> {
        let (folded, origin) = fold_with_origin(content);
        let at = folded.find(&self.folded)?;
        let end = at + self.folded.len();
        let start_char = origin[at];
        let end_char = if end < origin.len() { origin[end] } else { content.len() };
        let before: Vec<(usize, char)> = content[..start_char].char_indices().collect();
        let from = before.len().saturating_sub(SNIPPET_CONTEXT_CHARS);
        let from_byte = before.get(from).map_or(start_char, |(i, _)| *i);
        let to_byte =
            content[end_char..].char_indices().nth(SNIPPET_CONTEXT_CHARS).map_or(content.len(), |(i, _)| end_char + i);
        let mut snippet = String::new();
        if from_byte > 0 {
            snippet.push('…');
        }
        snippet.push_str(&content[from_byte..to_byte]);
        if to_byte < content.len() {
            snippet.push('…');
        }
        Some(snippet.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

/// Unicode lowercase, one character at a time (so "ÉCOLE" folds to "école"
/// and a folded match maps back to the original text).
pub fn fold(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

/// `fold(s)` and, for each of its bytes, the byte offset in `s` of the
/// character it came from.
fn fold_with_origin(s: &str) -> (String, Vec<usize>) {
    let mut folded = String::with_capacity(s.len());
    let mut origin = Vec::with_capacity(s.len());
    for (i, c) in s.char_indices() {
        for lower in c.to_lowercase() {
            folded.push(lower);
            origin.resize(folded.len(), i);
        }
    }
    (folded, origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_not_blank_nor_too_long() {
        assert!(SearchTerm::parse("").is_err());
        assert!(SearchTerm::parse("  \t").is_err());
        assert!(SearchTerm::parse(&"é".repeat(200)).is_ok());
        assert!(SearchTerm::parse(&"é".repeat(201)).is_err());
    }

    #[test]
    fn matching_is_literal_and_case_folded() {
        let t = SearchTerm::parse("ÉCOLE").unwrap();
        assert_eq!(t.snippet("à l'école demain").as_deref(), Some("à l'école demain"));
        assert!(SearchTerm::parse("a_c").unwrap().snippet("abc").is_none());
        assert!(SearchTerm::parse("%").unwrap().snippet("100%").is_some());
        assert!(SearchTerm::parse("a OR b").unwrap().snippet("a or b!").is_some());
        assert!(SearchTerm::parse("a OR b").unwrap().snippet("a b").is_none());
    }

    #[test]
    fn matches_agrees_with_snippet() {
        let contents = ["plain ascii text", "MIXED Case Text", "à l'école", "İx", "Kelvin \u{212A}", "", "a_c 100%"];
        for term in ["text", "CASE", "École", "x", "i", "k", "_c", "%", "zzz", "İ"] {
            let t = SearchTerm::parse(term).unwrap();
            for c in contents {
                assert_eq!(t.matches(c), t.snippet(c).is_some(), "{term:?} in {c:?}");
            }
        }
    }

    #[test]
    fn snippets_cut_around_the_match() {
        let content = format!("{} needle {}", "x".repeat(100), "y".repeat(100));
        let s = SearchTerm::parse("NEEDLE").unwrap().snippet(&content).unwrap();
        assert!(s.starts_with('…') && s.ends_with('…'), "{s}");
        assert!(s.contains("needle"));
        assert!(s.chars().count() < 140, "{s}");
        // A folded form longer than the original still maps back.
        assert_eq!(SearchTerm::parse("X").unwrap().snippet("İx").as_deref(), Some("İx"));
        assert_eq!(SearchTerm::parse("i").unwrap().snippet("İx").as_deref(), Some("İx"));
    }

    #[test]
    fn store_forms_escape_everything() {
        let t = SearchTerm::parse(r#"a"b%_\"#).unwrap();
        assert_eq!(t.fts5_phrase(), r#""a""b%_\""#);
        assert_eq!(t.like_escaped(), r#"a"b\%\_\\"#);
    }
}
