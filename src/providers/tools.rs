//! Tool calls as the formats stream them, turned into our one shape: each
//! call gets the next index (counting tool calls only), an id (minted when
//! the provider gives none), and a first piece that carries id and name.
//! Also what the request side of every format needs: arguments as a JSON
//! object.

use serde_json::Value;

use super::ChatEvent;

/// A fresh tool call id, for providers that give none (Gemini).
pub fn mint_call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// The arguments of a call as the JSON object the Anthropic and Gemini
/// formats want. Text that is no JSON object (a reply cut short mid-call)
/// becomes `{}`: the conversation can go on, and the model sees the tool's
/// result about the failed call.
pub fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => object,
        _ => Value::Object(Default::default()),
    }
}

#[derive(Debug)]
struct Call {
    /// What the format tells this call's pieces apart by.
    key: String,
    id: Option<String>,
    name: Option<String>,
    /// The first piece went out.
    announced: bool,
    /// Argument text that arrived before the name.
    held: String,
    has_arguments: bool,
    closed: bool,
}

/// The tool calls of one streamed reply, keyed the way the format keys
/// them (OpenAI's `index`, Anthropic's content block index, a counter).
#[derive(Debug, Default)]
pub struct ToolCallStream {
    calls: Vec<Call>,
}

impl ToolCallStream {
    /// Whether any tool call has started.
    pub fn seen(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Whether `key` names a call.
    pub fn knows(&self, key: &str) -> bool {
        self.calls.iter().any(|c| c.key == key)
    }

    /// The key of the call started last.
    pub fn last_key(&self) -> Option<&str> {
        self.calls.last().map(|c| c.key.as_str())
    }

    /// A piece of the call `key` (started by its first piece): the id and
    /// name when this piece carries them, and argument text. Repeated ids
    /// and names are ignored; the first piece goes out once the name is known.
    pub fn piece(
        &mut self,
        key: &str,
        id: Option<&str>,
        name: Option<&str>,
        arguments: &str,
        out: &mut Vec<ChatEvent>,
    ) {
        let index = match self.calls.iter().position(|c| c.key == key) {
            Some(i) => i,
            None => {
                self.calls.push(Call {
                    key: key.to_owned(),
                    id: None,
                    name: None,
                    announced: false,
                    held: String::new(),
                    has_arguments: false,
                    closed: false,
                });
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[index];
        if call.id.is_none() {
            call.id = id.filter(|i| !i.is_empty()).map(str::to_owned);
        }
        if call.name.is_none() {
            call.name = name.filter(|n| !n.is_empty()).map(str::to_owned);
        }
        call.has_arguments |= !arguments.is_empty();
        if call.announced {
            if !arguments.is_empty() {
                out.push(ChatEvent::ToolCallDelta { index, id: None, name: None, arguments: arguments.to_owned() });
            }
        } else {
            call.held.push_str(arguments);
            if call.name.is_some() {
                Self::announce(index, call, out);
            }
        }
    }

    /// The call `key` is complete: announced if it was not (with whatever
    /// name it got), and `{}` as its arguments if it had none, so they parse.
    pub fn close(&mut self, key: &str, out: &mut Vec<ChatEvent>) {
        if let Some(index) = self.calls.iter().position(|c| c.key == key) {
            Self::close_at(index, &mut self.calls[index], out);
        }
    }

    /// The reply is over: every call is complete.
    pub fn close_all(&mut self, out: &mut Vec<ChatEvent>) {
        for (index, call) in self.calls.iter_mut().enumerate() {
            Self::close_at(index, call, out);
        }
    }

    fn close_at(index: usize, call: &mut Call, out: &mut Vec<ChatEvent>) {
        if call.closed {
            return;
        }
        call.closed = true;
        if !call.has_arguments {
            call.held.push_str("{}");
            call.has_arguments = true;
            if call.announced {
                out.push(ChatEvent::ToolCallDelta { index, id: None, name: None, arguments: "{}".into() });
            }
        }
        if !call.announced {
            Self::announce(index, call, out);
        }
    }

    fn announce(index: usize, call: &mut Call, out: &mut Vec<ChatEvent>) {
        call.announced = true;
        let id = call.id.get_or_insert_with(mint_call_id).clone();
        out.push(ChatEvent::ToolCallDelta {
            index,
            id: Some(id),
            name: Some(call.name.clone().unwrap_or_default()),
            arguments: std::mem::take(&mut call.held),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pieces_carry_id_and_name_once_and_empty_arguments_become_an_object() {
        let mut calls = ToolCallStream::default();
        let mut out = Vec::new();
        calls.piece("0", Some("a"), Some("f"), "", &mut out);
        calls.piece("0", Some("a"), None, "{\"x\"", &mut out);
        calls.piece("1", Some("b"), Some("g"), "", &mut out);
        calls.piece("0", None, Some("f"), ":1}", &mut out);
        calls.piece("1", None, None, "", &mut out);
        calls.close_all(&mut out);
        assert_eq!(
            out,
            [
                ChatEvent::tool_delta(0, Some("a"), Some("f"), ""),
                ChatEvent::tool_delta(0, None, None, "{\"x\""),
                ChatEvent::tool_delta(1, Some("b"), Some("g"), ""),
                ChatEvent::tool_delta(0, None, None, ":1}"),
                ChatEvent::tool_delta(1, None, None, "{}"),
            ]
        );
    }

    #[test]
    fn arguments_before_the_name_wait_for_it_and_a_missing_id_is_minted() {
        let mut calls = ToolCallStream::default();
        let mut out = Vec::new();
        calls.piece("k", None, None, "{\"a\":", &mut out);
        assert!(out.is_empty());
        calls.piece("k", None, Some("f"), "2}", &mut out);
        let ChatEvent::ToolCallDelta { index: 0, id: Some(id), name: Some(name), arguments } = &out[0] else {
            panic!("{out:?}")
        };
        assert!(id.starts_with("call_") && id.len() > 20, "{id}");
        assert_eq!((name.as_str(), arguments.as_str()), ("f", "{\"a\":2}"));
    }

    #[test]
    fn arguments_that_are_no_object_become_an_empty_one() {
        assert_eq!(arguments_object(r#"{"q":"ä \"x\""}"#), serde_json::json!({"q": "ä \"x\""}));
        assert_eq!(arguments_object(r#"{"q":"cut"#), serde_json::json!({}));
        assert_eq!(arguments_object("[1]"), serde_json::json!({}));
        assert_eq!(arguments_object(""), serde_json::json!({}));
    }
}
