//! Parsing of raw stream entries (`[id, [field, value, ...]]`), shared by fetch, claim and the
//! dead-job listing.

use redis::Value;

use crate::queue::QueueError;

/// One stream entry with its fields as text.
#[derive(Debug, Clone)]
pub(crate) struct RawEntry {
    pub(crate) id: String,
    pub(crate) fields: Vec<(String, String)>,
}

impl RawEntry {
    /// The value of `name`, if present.
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Text of a bulk or simple string reply.
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Parses `[id, [field, value, ...]]`.
pub(crate) fn parse_entry(value: &Value) -> Result<RawEntry, QueueError> {
    let bad = || QueueError::Protocol(format!("stream entry: {value:?}"));
    let Value::Array(parts) = value else {
        return Err(bad());
    };
    let id = parts.first().and_then(text).ok_or_else(bad)?;
    let fields = match parts.get(1) {
        Some(Value::Array(flat)) => flat
            .chunks(2)
            .filter_map(|pair| Some((text(pair.first()?)?, text(pair.get(1)?)?)))
            .collect(),
        Some(Value::Map(pairs)) => pairs
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        // A deleted entry still listed in a pending list has no fields.
        Some(Value::Nil) | None => Vec::new(),
        _ => return Err(bad()),
    };
    Ok(RawEntry { id, fields })
}

/// Parses an array of entries (`XRANGE` reply).
pub(crate) fn parse_entries(value: &Value) -> Result<Vec<RawEntry>, QueueError> {
    match value {
        Value::Array(items) => items.iter().map(parse_entry).collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(QueueError::Protocol(format!("stream entries: {value:?}"))),
    }
}

/// Parses an `XREADGROUP` reply for a single stream (`[[key, entries]]`, or a RESP3 map).
pub(crate) fn parse_read_reply(value: &Value) -> Result<Vec<RawEntry>, QueueError> {
    match value {
        Value::Nil => Ok(Vec::new()),
        Value::Array(streams) => match streams.first() {
            Some(Value::Array(pair)) => pair.get(1).map_or(Ok(Vec::new()), parse_entries),
            None => Ok(Vec::new()),
            _ => Err(QueueError::Protocol(format!("XREADGROUP: {value:?}"))),
        },
        Value::Map(streams) => streams
            .first()
            .map_or(Ok(Vec::new()), |(_, entries)| parse_entries(entries)),
        _ => Err(QueueError::Protocol(format!("XREADGROUP: {value:?}"))),
    }
}
