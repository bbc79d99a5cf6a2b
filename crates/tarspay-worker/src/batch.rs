//! Batches of payouts (payroll files, `POST /v1/batches`): a CSV with a header row or a JSON
//! array. Every row is validated before anything is queued, and every bad row is reported
//! with its line number, so one upload either queues all its payouts or none.

use crate::ids::MchOrderNo;
use crate::payout::{FieldError, PayoutRequest, PayoutRules};
use serde::Serialize;
use std::collections::HashMap;

/// The columns of a batch's results CSV (`payroll`'s file, the console's download).
pub const RESULT_COLUMNS: [&str; 8] = [
    "mchOrderNo",
    "status",
    "amount",
    "currency",
    "payOrderId",
    "code",
    "msg",
    "attempts",
];

/// One row of a batch's results CSV: the payout as queued, and its record (`missing` if the
/// ledger holds none).
pub fn result_row(
    mch_order_no: &str,
    amount: &str,
    currency: &str,
    record: Option<&crate::ledger::OrderRecord>,
) -> [String; 8] {
    let (status, pay_order_id, code, msg, attempts) = match record {
        Some(r) => (
            r.phase.to_string(),
            r.pay_order_id.clone().unwrap_or_default(),
            r.last_code.map(|c| c.to_string()).unwrap_or_default(),
            r.last_msg.clone().unwrap_or_default(),
            r.attempts.to_string(),
        ),
        None => (
            "missing".into(),
            String::new(),
            String::new(),
            String::new(),
            "0".into(),
        ),
    };
    [
        mch_order_no.to_owned(),
        status,
        amount.to_owned(),
        currency.to_owned(),
        // The gateway's text too: its format is the gateway's to keep, not ours.
        inert_cell(&pay_order_id),
        code,
        inert_cell(&msg),
        attempts,
    ]
}

/// The gateway's free text as a spreadsheet shows it, never runs it: a cell starting with
/// `=`, `+`, `-`, `@`, a tab or a carriage return gets a leading `'` (OWASP's CSV injection
/// advice).
fn inert_cell(text: &str) -> String {
    if text.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{text}")
    } else {
        text.to_owned()
    }
}

/// Most rows accepted in one batch.
pub const MAX_ROWS: usize = 100_000;

/// One bad row: its line (CSV: the file line, header = 1; JSON: the array position, from 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RowError {
    pub line: u64,
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BatchError {
    #[error("the batch is unreadable: {reason}")]
    Unreadable { reason: String },
    #[error("the batch has no rows")]
    Empty,
    #[error("the batch has more than {max} rows")]
    TooLarge { max: usize },
    #[error("{} bad row(s), first on line {}", rows.len(), rows.first().map_or(0, |r| r.line))]
    BadRows { rows: Vec<RowError> },
}

/// Rows checked one by one as they are read (line, the row's payout or its errors): every
/// bad row is listed, and a number repeated within the batch is refused on each repeat. A
/// batch past [`MAX_ROWS`] is refused before its further rows are checked.
fn collect_rows(
    rows: impl IntoIterator<Item = (u64, Result<PayoutRequest, Vec<FieldError>>)>,
) -> Result<Vec<PayoutRequest>, BatchError> {
    let mut valid = Vec::new();
    let mut bad = Vec::new();
    let mut first_seen: HashMap<MchOrderNo, u64> = HashMap::new();
    for (line, fields) in rows {
        if valid.len() + bad.len() >= MAX_ROWS {
            return Err(BatchError::TooLarge { max: MAX_ROWS });
        }
        match fields {
            Ok(request) => match first_seen.get(&request.mch_order_no) {
                Some(first) => bad.push(RowError {
                    line,
                    errors: vec![FieldError::new(
                        "mchOrderNo",
                        format!("appears again in this batch (first on line {first})"),
                    )],
                }),
                None => {
                    first_seen.insert(request.mch_order_no.clone(), line);
                    valid.push(request);
                }
            },
            Err(errors) => bad.push(RowError { line, errors }),
        }
    }
    if !bad.is_empty() {
        return Err(BatchError::BadRows { rows: bad });
    }
    if valid.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(valid)
}

/// A CSV with a header row naming the fields (`mchOrderNo,amount,currency,wayCode,…`).
/// Empty cells are left out.
pub fn parse_csv(rules: &PayoutRules, bytes: &[u8]) -> Result<Vec<PayoutRequest>, BatchError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|err| BatchError::Unreadable {
            reason: err.to_string(),
        })?
        .clone();
    // A column named twice ("amount" twice) must not pay whichever copy comes last.
    // Unnamed columns (a spreadsheet's trailing commas) are no repeat: their empty cells are
    // dropped below, and a value under one is refused as a field without a name.
    let mut seen = std::collections::HashSet::new();
    let mut named = headers.iter().filter(|name| !name.is_empty());
    if let Some(repeated) = named.find(|name| !seen.insert(*name)) {
        return Err(BatchError::Unreadable {
            reason: format!("the header names the column \"{repeated}\" twice"),
        });
    }
    let rows = reader.records().map(|record| match record {
        Ok(record) => {
            let line = record.position().map_or(0, |p| p.line());
            let fields = headers
                .iter()
                .zip(record.iter())
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect();
            (line, rules.validate_fields(fields).map_err(|e| e.0))
        }
        Err(err) => {
            let line = err.position().map_or(0, |p| p.line());
            let unreadable = FieldError::new("(row)", format!("unreadable CSV: {err}"));
            (line, Err(vec![unreadable]))
        }
    });
    collect_rows(rows)
}

/// A JSON array of payout objects.
pub fn parse_json(rules: &PayoutRules, bytes: &[u8]) -> Result<Vec<PayoutRequest>, BatchError> {
    // Strict: a row repeating a key ("amount" twice) must not pay whichever copy came last.
    let value = crate::strict_json::parse(bytes).map_err(|err| BatchError::Unreadable {
        reason: err.to_string(),
    })?;
    let serde_json::Value::Array(items) = value else {
        return Err(BatchError::Unreadable {
            reason: "expected a JSON array of payouts".into(),
        });
    };
    let rows = items.iter().enumerate().map(|(index, item)| {
        let line = index as u64 + 1;
        // Checked as `POST /v1/payouts` checks one payout: every field's errors at once.
        let checked = match item {
            serde_json::Value::Object(map) => rules.validate_object(map).map_err(|e| e.0),
            _ => Err(vec![FieldError::new("(row)", "must be a JSON object")]),
        };
        (line, checked)
    });
    collect_rows(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn gateway_text_never_starts_a_spreadsheet_formula() {
        for (text, shown) in [
            ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
            ("+1", "'+1"),
            ("-1 system error", "'-1 system error"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("insufficient balance", "insufficient balance"),
            ("", ""),
        ] {
            assert_eq!(inert_cell(text), shown);
        }
    }

    fn rules() -> std::sync::Arc<PayoutRules> {
        Settings::load_with_env(None, [("", ""); 0])
            .unwrap()
            .payout_rules
    }

    #[test]
    fn a_clean_csv_parses_with_empty_cells_dropped() {
        let csv = "mchOrderNo,amount,currency,wayCode,walletId,customerName\nB-1,500,BDT,EWALLET_BKASH,01712345678,\nB-2,600,BDT,EWALLET_NAGAD,01712345679,Rahim\n";
        let rows = parse_csv(&rules(), csv.as_bytes()).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(!rows[0].fields.contains_key("customerName"));
        assert_eq!(rows[1].fields["customerName"], "Rahim");
    }

    #[test]
    fn every_bad_row_is_reported_with_its_line() {
        let csv = "mchOrderNo,amount,currency,wayCode,walletId\nB-1,500,BDT,EWALLET_BKASH,01712345678\nB-2,-5,BDT,EWALLET_BKASH,01712345678\nB-3,500,XXX,EWALLET_BKASH,01712345678\nB-1,500,BDT,EWALLET_BKASH,01712345678\nB-5,500,BDT,EWALLET_BKASH,123\n";
        let Err(BatchError::BadRows { rows }) = parse_csv(&rules(), csv.as_bytes()) else {
            panic!("expected bad rows");
        };
        let lines: Vec<u64> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![3, 4, 5, 6]);
        assert_eq!(rows[0].errors[0].field, "amount");
        assert_eq!(rows[1].errors[0].field, "currency");
        assert!(rows[2].errors[0].rule.contains("first on line 2"));
        assert_eq!(rows[3].errors[0].field, "walletId");
    }

    #[test]
    fn json_arrays_and_unreadable_input() {
        let json = r#"[{"mchOrderNo":"J-1","amount":"75.20","currency":"MYR","wayCode":"CIMB"}, {"mchOrderNo":"J-2","amount":75}, 7]"#;
        let Err(BatchError::BadRows { rows }) = parse_json(&rules(), json.as_bytes()) else {
            panic!("expected bad rows");
        };
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![2, 3]);
        // A JSON row is checked as one payout is: the amount's own message, and every other
        // field's error with it.
        let fields: Vec<(&str, &str)> = rows[0]
            .errors
            .iter()
            .map(|e| (e.field.as_str(), e.rule.as_str()))
            .collect();
        assert_eq!(
            fields.iter().map(|(f, _)| *f).collect::<Vec<_>>(),
            vec!["amount", "currency", "wayCode"],
            "{fields:?}"
        );
        assert!(fields[0].1.contains("not a number"), "{fields:?}");
        assert!(matches!(
            parse_json(&rules(), b"{}"),
            Err(BatchError::Unreadable { .. })
        ));
        assert!(matches!(
            parse_json(&rules(), b"[1,"),
            Err(BatchError::Unreadable { .. })
        ));
        assert_eq!(parse_json(&rules(), b"[]"), Err(BatchError::Empty));
        let repeated = br#"[{"mchOrderNo":"J-1","amount":"100","amount":"45000","currency":"MYR","wayCode":"CIMB"}]"#;
        let Err(BatchError::Unreadable { reason }) = parse_json(&rules(), repeated) else {
            panic!("a repeated key must make the batch unreadable");
        };
        assert!(reason.contains(r#"duplicate key "amount""#), "{reason}");
        assert_eq!(
            parse_csv(&rules(), b"mchOrderNo,amount\n"),
            Err(BatchError::Empty)
        );
    }

    #[test]
    fn a_csv_header_naming_a_column_twice_is_unreadable() {
        // Unnamed trailing columns are no repeat.
        let trailing = "mchOrderNo,amount,currency,wayCode,,\nP-1,100,MYR,CIMB,,\n";
        assert_eq!(parse_csv(&rules(), trailing.as_bytes()).unwrap().len(), 1);
        let csv = "mchOrderNo,amount,currency,wayCode, amount\nP-1,100,MYR,CIMB,45000\n";
        let Err(BatchError::Unreadable { reason }) = parse_csv(&rules(), csv.as_bytes()) else {
            panic!("a repeated column must make the batch unreadable");
        };
        assert!(reason.contains(r#""amount" twice"#), "{reason}");
    }
}
