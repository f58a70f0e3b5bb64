//! Shared output helpers: human-readable sizes and tables.

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
}
