//! Node range expressions: `node[01-64]`, `n[1-3,7]`, `a,b,c`, `rack[1-2]-n[01-04]`.
//!
//! Zero padding follows the lower bound's width (`[01-10]` gives `01..10`). Results keep
//! the order written and drop duplicates. Expansion is bounded by [`MAX_NODES`].

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashSet;

/// Largest expansion accepted, to keep a typo from allocating without bound.
pub const MAX_NODES: usize = 100_000;

/// Expands a node expression into node names.
pub fn expand(expr: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for item in split_top(expr)? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        for name in expand_one(item).with_context(|| format!("in node expression {item:?}"))? {
            if seen.insert(name.clone()) {
                ensure!(out.len() < MAX_NODES, "more than {MAX_NODES} nodes");
                out.push(name);
            }
        }
    }
    ensure!(!out.is_empty(), "no nodes in {expr:?}");
    Ok(out)
}

/// Splits on commas that are outside brackets.
fn split_top(s: &str) -> Result<Vec<&str>> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => {
                depth += 1;
                ensure!(depth == 1, "nested brackets in {s:?}");
            }
            ']' => {
                depth -= 1;
                ensure!(depth == 0, "unbalanced ']' in {s:?}");
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    ensure!(depth == 0, "unclosed '[' in {s:?}");
    parts.push(&s[start..]);
    Ok(parts)
}

fn expand_one(item: &str) -> Result<Vec<String>> {
    let Some(open) = item.find('[') else {
        ensure!(!item.contains(']'), "unbalanced ']'");
        check_name(item)?;
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|i| i + open)
        .context("unclosed '['")?;
    let prefix = &item[..open];
    let suffix = &item[close + 1..];
    let rest = expand_one_or_empty(suffix)?;
    let mut out = Vec::new();
    for part in item[open + 1..close].split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        ensure!(
            !lo.is_empty() && lo.bytes().all(|b| b.is_ascii_digit()),
            "bad range start {lo:?}"
        );
        ensure!(
            !hi.is_empty() && hi.bytes().all(|b| b.is_ascii_digit()),
            "bad range end {hi:?}"
        );
        let width = if lo.len() > 1 && lo.starts_with('0') {
            lo.len()
        } else {
            0
        };
        let a: u64 = lo.parse().with_context(|| format!("range start {lo:?}"))?;
        let b: u64 = hi.parse().with_context(|| format!("range end {hi:?}"))?;
        ensure!(a <= b, "range {a}-{b} runs backwards");
        ensure!(b - a < MAX_NODES as u64, "range {a}-{b} too large");
        for n in a..=b {
            for r in &rest {
                ensure!(out.len() < MAX_NODES, "more than {MAX_NODES} nodes");
                let name = format!("{prefix}{n:0width$}{r}");
                check_name(&name)?;
                out.push(name);
            }
        }
    }
    Ok(out)
}

fn expand_one_or_empty(s: &str) -> Result<Vec<String>> {
    if s.is_empty() {
        Ok(vec![String::new()])
    } else if s.contains('[') {
        expand_one(s)
    } else {
        Ok(vec![s.to_string()])
    }
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!("invalid node name {name:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_range() {
        let v = expand("node[01-64]").unwrap();
        assert_eq!(v.len(), 64);
        assert_eq!(v[0], "node01");
        assert_eq!(v[63], "node64");
    }

    #[test]
    fn list_in_brackets_and_commas() {
        assert_eq!(expand("n[1-3,7]").unwrap(), ["n1", "n2", "n3", "n7"]);
        assert_eq!(expand("a, b,c,a").unwrap(), ["a", "b", "c"]);
        assert_eq!(
            expand("n[1-2],m[08-10]").unwrap(),
            ["n1", "n2", "m08", "m09", "m10"]
        );
        assert_eq!(expand("n[9-10]").unwrap(), ["n9", "n10"]);
        assert_eq!(expand("n[1]x").unwrap(), ["n1x"]);
    }

    #[test]
    fn cartesian_product() {
        assert_eq!(
            expand("r[1-2]n[1-2]").unwrap(),
            ["r1n1", "r1n2", "r2n1", "r2n2"]
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "n[3-1]",
            "n[1-",
            "n1]",
            "n[a-b]",
            "",
            ",",
            "n[[1]]",
            "n[1-99999999]",
            "bad name",
            "n[-2]",
        ] {
            assert!(expand(bad).is_err(), "{bad:?} accepted");
        }
    }
}
