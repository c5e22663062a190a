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

/// Parses a request body as JSON, naming the position of a syntax error.
pub fn parse_json(body: &[u8]) -> Result<Value, PayloadError> {
    serde_json::from_slice(body)
        .map_err(|e| PayloadError::body(format!("body is not valid JSON: {e}")))
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
    let ms = value
        .as_i64()
        .filter(|s| *s >= 0)
        .and_then(|s| s.checked_mul(1000));
    if ms.is_none() && !value.is_null() {
        warnings.push(format!(
            "{path} is not a Unix timestamp in seconds; ignored"
        ));
    }
    ms
}
