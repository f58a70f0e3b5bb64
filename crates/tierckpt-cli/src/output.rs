//! Shared output helpers: human-readable sizes, tables, and the escaping of
//! every string from a daemon or a file before it reaches a terminal.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

/// "1.50 GiB" style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// `s` safe to print on a terminal: control characters (escape sequences,
/// newlines, C1 controls) and bidirectional overrides are written escaped,
/// as `str::escape_debug` writes them (`\u{1b}`, `\n`); everything else is
/// left as it is. Use it for every string from a daemon or a file.
pub fn escape(s: &str) -> String {
    let unsafe_char = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    s.chars().fold(String::with_capacity(s.len() + 8), |mut out, c| {
        if unsafe_char(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
        out
    })
}

/// A table with a header row, ready for rows.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// Prints a value as one line of JSON.
pub fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string(v).expect("serializable"));
}

/// Prints a report as one JSON object with `json`, else with `print`.
pub fn emit<T: serde::Serialize>(report: &T, json: bool, print: fn(&T)) {
    if json {
        print_json(report);
    } else {
        print(report);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::human_bytes(10), "10 B");
        assert_eq!(super::human_bytes(3 << 29), "1.50 GiB");
    }

    #[test]
    fn escapes_control_characters_only() {
        assert_eq!(super::escape("layer.0 \"wé\""), "layer.0 \"wé\"");
        assert_eq!(super::escape("\u{1b}[31mred\n\u{9b}\u{202e}"), "\\u{1b}[31mred\\n\\u{9b}\\u{202e}");
    }
}
