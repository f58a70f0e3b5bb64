//! Slurm's compressed host lists (`gpu[001-004,010],login1`), as in
//! `SLURM_JOB_NODELIST`, expanded the way `scontrol show hostnames` does.

/// Expands a Slurm host list; errors name the part that is malformed.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in split_top(list) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        out.extend(expand_item(item).map_err(|e| format!("Slurm node list {list:?}: {e}"))?);
    }
    Ok(out)
}

/// Splits at commas outside brackets.
fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// One item: a prefix, then bracketed ranges and text, e.g. `rack[1-2]-n[01-03]`.
fn expand_item(item: &str) -> Result<Vec<String>, String> {
    let Some(open) = item.find('[') else { return Ok(vec![item.to_string()]) };
    let close = item[open..].find(']').map(|c| open + c).ok_or_else(|| format!("{item:?} has an unclosed '['"))?;
    let (prefix, ranges, rest) = (&item[..open], &item[open + 1..close], &item[close + 1..]);
    let tails = expand_item(rest)?;
    let mut out = Vec::new();
    for r in ranges.split(',') {
        let (a, b) = r.split_once('-').unwrap_or((r, r));
        let (lo, hi) = match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(lo), Ok(hi)) if lo <= hi && hi - lo < 100_000 => (lo, hi),
            _ => return Err(format!("{item:?} has the range {r:?}, not N or N-M with N <= M")),
        };
        let width = a.len();
        for n in lo..=hi {
            for t in &tails {
                out.push(format!("{prefix}{n:0width$}{t}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_scontrol() {
        assert_eq!(
            expand_nodelist("gpu[001-003,010],login1").unwrap(),
            ["gpu001", "gpu002", "gpu003", "gpu010", "login1"]
        );
        assert_eq!(expand_nodelist("r[1-2]-n[8-9]").unwrap(), ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]);
        assert_eq!(expand_nodelist("solo").unwrap(), ["solo"]);
        assert_eq!(expand_nodelist("n[7]").unwrap(), ["n7"]);
        let e = expand_nodelist("gpu[3-1]").unwrap_err();
        assert!(e.contains("\"3-1\""), "{e}");
        assert!(expand_nodelist("gpu[1-2").unwrap_err().contains("unclosed"));
    }
}
