//! Node range expressions as cluster admins write them: `node[001-128]`, `n[1-3,7]`,
//! `login1,login2`, `rack[1-2]-node[01-04]`.
//!
//! Commas outside brackets separate items; inside brackets they separate numbers or `a-b` spans.
//! A span keeps the zero padding of its start (`[001-128]` gives `001`..`128`). Expansion is
//! bounded by [`MAX_EXPANSION`] so that a typo cannot allocate without limit.

use anyhow::{bail, Context, Result};
use std::cmp::Ordering;

/// The largest number of names one expression may expand to.
pub const MAX_EXPANSION: usize = 100_000;

/// Expands a range expression into node names, in the order written, without duplicates.
pub fn expand(expr: &str) -> Result<Vec<String>> {
    let expr = expr.trim();
    if expr.is_empty() {
        bail!("empty node range");
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in split_top_level(expr).with_context(|| format!("parsing node range {expr:?}"))? {
        let item = item.trim();
        if item.is_empty() {
            bail!("empty item in node range {expr:?}");
        }
        for name in expand_item(item).with_context(|| format!("expanding {item:?}"))? {
            if seen.insert(name.clone()) {
                out.push(name);
                if out.len() > MAX_EXPANSION {
                    bail!("node range {expr:?} expands to more than {MAX_EXPANSION} names");
                }
            }
        }
    }
    Ok(out)
}

fn split_top_level(s: &str) -> Result<Vec<&str>> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '[' => {
                if depth > 0 {
                    bail!("nested '[' at offset {i}");
                }
                depth += 1;
            }
            ']' => {
                if depth == 0 {
                    bail!("unbalanced ']' at offset {i}");
                }
                depth -= 1;
            }
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("missing ']'");
    }
    items.push(&s[start..]);
    Ok(items)
}

fn expand_item(item: &str) -> Result<Vec<String>> {
    let Some(open) = item.find('[') else {
        check_name(item)?;
        return Ok(vec![item.to_string()]);
    };
    let close = item[open..]
        .find(']')
        .map(|c| c + open)
        .context("missing ']'")?;
    let prefix = &item[..open];
    let body = &item[open + 1..close];
    let rest = &item[close + 1..];
    let numbers = expand_body(body)?;
    let tails = if rest.is_empty() {
        vec![String::new()]
    } else {
        expand_item_tail(rest)?
    };
    let mut out = Vec::new();
    for n in &numbers {
        for t in &tails {
            if out.len() >= MAX_EXPANSION {
                bail!("expands to more than {MAX_EXPANSION} names");
            }
            let name = format!("{prefix}{n}{t}");
            check_name(&name)?;
            out.push(name);
        }
    }
    Ok(out)
}

/// Like `expand_item` but the piece may be only a suffix (no name check on partial strings).
fn expand_item_tail(rest: &str) -> Result<Vec<String>> {
    if !rest.contains('[') {
        return Ok(vec![rest.to_string()]);
    }
    expand_item(rest)
}

fn expand_body(body: &str) -> Result<Vec<String>> {
    if body.is_empty() {
        bail!("empty brackets");
    }
    let mut out = Vec::new();
    for part in body.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let lo: u64 = parse_num(a)?;
        let hi: u64 = parse_num(b)?;
        if hi < lo {
            bail!("span {part:?} runs backwards");
        }
        if hi - lo >= MAX_EXPANSION as u64 {
            bail!("span {part:?} is longer than {MAX_EXPANSION}");
        }
        let width = if a.len() > 1 && a.starts_with('0') {
            a.len()
        } else {
            0
        };
        for n in lo..=hi {
            out.push(format!("{n:0width$}"));
        }
    }
    Ok(out)
}

fn parse_num(s: &str) -> Result<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 9 {
        bail!("{s:?} is not a number of at most 9 digits");
    }
    s.parse().with_context(|| format!("parsing number {s:?}"))
}

/// Node and group names: letters, digits, `-`, `_`, `.`; at most 63 characters.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 {
        bail!("name {name:?} must have 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        bail!("name {name:?} may contain only letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

/// Orders names the way people expect: `n2` before `n10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) if p.is_ascii_digit() && q.is_ascii_digit() => {
                let lx = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let ly = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let nx = trim_zeros(&x[..lx]);
                let ny = trim_zeros(&y[..ly]);
                let o = nx.len().cmp(&ny.len()).then_with(|| nx.cmp(ny));
                if o != Ordering::Equal {
                    return o;
                }
                x = &x[lx..];
                y = &y[ly..];
            }
            (Some(p), Some(q)) => {
                if p != q {
                    return p.cmp(q);
                }
                x = &x[1..];
                y = &y[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let i = d.iter().take_while(|&&c| c == b'0').count();
    &d[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_span() {
        let v = expand("node[001-128]").unwrap();
        assert_eq!(v.len(), 128);
        assert_eq!(v[0], "node001");
        assert_eq!(v[127], "node128");
    }

    #[test]
    fn list_and_span() {
        assert_eq!(expand("n[1-3,7]").unwrap(), ["n1", "n2", "n3", "n7"]);
    }

    #[test]
    fn comma_items_and_plain_names() {
        assert_eq!(
            expand("login1,io[1-2],n[01-02]").unwrap(),
            ["login1", "io1", "io2", "n01", "n02"]
        );
    }

    #[test]
    fn two_groups_and_suffix() {
        assert_eq!(
            expand("r[1-2]n[1-2]-ib").unwrap(),
            ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]
        );
    }

    #[test]
    fn duplicates_removed() {
        assert_eq!(expand("n[1-2],n2,n[2-3]").unwrap(), ["n1", "n2", "n3"]);
    }

    #[test]
    fn errors() {
        for bad in [
            "",
            "n[",
            "n]",
            "n[3-1]",
            "n[]",
            "n[a-b]",
            "n[[1]]",
            "a b",
            "n[1-9999999999]",
            "n,,m",
        ] {
            assert!(expand(bad).is_err(), "{bad:?} should fail");
        }
        assert!(expand("n[0-200000]").is_err());
        assert!(expand("a[0-999]b[0-999]").is_err());
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["n10", "n2", "n1", "m3", "n02"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["m3", "n1", "n02", "n2", "n10"]);
    }
}
