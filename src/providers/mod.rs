//! Provider payload parsers. Each submodule turns one provider's webhook JSON into canonical
//! [`Event`](crate::event::Event)s and says, precisely, what is wrong with a payload it cannot
//! use. Parsers are pure functions of the request body (no I/O, no clock), which is what lets
//! them be unit-tested against the providers' documented examples and fuzzed.

pub mod lox24;
pub mod sendios;
pub mod tencent;

use serde_json::{Map, Value};

/// A payload that cannot identify its event; answered with 400 and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PayloadError {
    pub message: String,
    /// The JSON path of the offending field, where one applies (`data.phone`).
    pub field: Option<String>,
}

impl PayloadError {
    pub fn body(message: impl Into<String>) -> Self {
        PayloadError {
            message: message.into(),
            field: None,
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        PayloadError {
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }
}

/// Deepest JSON nesting a webhook body may have. Provider payloads use four or five levels;
/// the limit keeps a hostile body from costing recursion (serde_json's own limit is 128).
pub const MAX_JSON_DEPTH: usize = 32;

/// Most entries one batch webhook (Tencent's account list, a Sendios batch) may carry.
pub const MAX_BATCH_ENTRIES: usize = 10_000;

/// Parses a request body as JSON, naming the position of a syntax error.
pub fn parse_json(body: &[u8]) -> Result<Value, PayloadError> {
    if nesting_exceeds(body, MAX_JSON_DEPTH) {
        return Err(PayloadError::body(format!(
            "body is nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| PayloadError::body(format!("body is not valid JSON: {e}")))
}

/// Whether brackets outside strings nest deeper than `limit`; one pass, no allocation. Invalid
/// JSON is left for the parser to describe.
fn nesting_exceeds(body: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Refuses a batch with more than [`MAX_BATCH_ENTRIES`] entries.
pub fn check_batch_len(field: &str, len: usize) -> Result<(), PayloadError> {
    if len > MAX_BATCH_ENTRIES {
        return Err(PayloadError::field(
            field,
            format!("at most {MAX_BATCH_ENTRIES} entries per request, got {len}"),
        ));
    }
    Ok(())
}

/// Copies descriptive fields into an event's details, never failing: a field that is missing or
/// of the wrong type is left out and reported in `warnings`, because an opt-out must not be
/// dropped over a cosmetic field.
pub struct Details<'a> {
    pub details: Map<String, Value>,
    pub warnings: Vec<String>,
    source: &'a Map<String, Value>,
    path: &'a str,
}

/// The JSON type a descriptive field is expected to have.
#[derive(Clone, Copy)]
pub enum Expect {
    Integer,
    String,
}

impl<'a> Details<'a> {
    pub fn new(source: &'a Map<String, Value>, path: &'a str) -> Self {
        Details {
            details: Map::new(),
            warnings: Vec::new(),
            source,
            path,
        }
    }

    /// Moves what was read into an event's details and warnings.
    pub fn merge_into(mut self, details: &mut Map<String, Value>, warnings: &mut Vec<String>) {
        details.append(&mut self.details);
        warnings.append(&mut self.warnings);
    }

    /// Reads `source[name]` into `details[as_name]`; `required` fields warn when missing.
    pub fn take(&mut self, name: &str, as_name: &str, expect: Expect, required: bool) {
        let full = if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        };
        match self.source.get(name) {
            None | Some(Value::Null) => {
                if required {
                    self.warnings.push(format!("{full} is missing"));
                }
            }
            Some(value) => {
                let fits = match expect {
                    Expect::Integer => value.is_i64() || value.is_u64(),
                    Expect::String => value.is_string(),
                };
                if fits {
                    self.details.insert(as_name.to_owned(), value.clone());
                } else {
                    let wanted = match expect {
                        Expect::Integer => "an integer",
                        Expect::String => "a string",
                    };
                    self.warnings
                        .push(format!("{full} is not {wanted}; stored as absent"));
                }
            }
        }
    }
}

/// Reads a Unix-seconds timestamp field as milliseconds; `None` (with a warning) when absent or
/// ill-typed.
pub fn seconds_as_ms(
    object: &Map<String, Value>,
    name: &str,
    path: &str,
    warnings: &mut Vec<String>,
) -> Option<i64> {
    let value = object.get(name)?;
    // Senders that serialise numbers as strings or with a fraction still mean a Unix time.
    let seconds = match value {
        Value::String(digits) => digits.trim().parse::<i64>().ok(),
        _ => value.as_i64(),
    };
    let ms = match seconds {
        Some(seconds) if seconds >= 0 => seconds.checked_mul(1000),
        Some(_) => None,
        None => value
            .as_f64()
            .map(|s| (s * 1000.0).round())
            .filter(|ms| (0.0..9.0e15).contains(ms))
            .map(|ms| ms as i64),
    };
    if ms.is_none() && !value.is_null() {
        warnings.push(format!(
            "{path} is not a Unix timestamp in seconds; ignored"
        ));
    }
    ms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_seconds_are_read_from_integers_fractions_and_digit_strings() {
        let object = serde_json::json!({
            "int": 1_757_849_748, "fraction": 1_757_849_748.25, "digits": " 1757849748 ",
            "negative": -5, "words": "yesterday", "null": null, "huge": 1e300,
        });
        let Value::Object(object) = object else {
            unreachable!()
        };
        let mut warnings = Vec::new();
        let mut read = |name: &str| seconds_as_ms(&object, name, name, &mut warnings);
        assert_eq!(read("int"), Some(1_757_849_748_000));
        assert_eq!(read("fraction"), Some(1_757_849_748_250));
        assert_eq!(read("digits"), Some(1_757_849_748_000));
        assert_eq!(read("negative"), None);
        assert_eq!(read("words"), None);
        assert_eq!(read("huge"), None);
        assert_eq!(read("null"), None);
        assert_eq!(read("absent"), None);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }

    #[test]
    fn nesting_limit_counts_brackets_outside_strings_only() {
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert!(parse_json(deep.as_bytes())
            .unwrap_err()
            .message
            .contains("nested deeper than 32"));
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(parse_json(ok.as_bytes()).is_ok());
        let in_string = format!("{{\"a\": \"{}\\\"\"}}", "[".repeat(100));
        assert!(parse_json(in_string.as_bytes()).is_ok(), "{in_string}");
    }

    #[test]
    fn batch_length_is_limited() {
        assert!(check_batch_len("x", MAX_BATCH_ENTRIES).is_ok());
        let error = check_batch_len("x", MAX_BATCH_ENTRIES + 1).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("x"));
    }
}
