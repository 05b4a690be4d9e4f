//! Relative paths as manifests carry them.
//!
//! A manifest path is a byte string (file names need not be UTF-8) of `/`-separated components,
//! relative to the image root. The root itself is the empty path. Every path that comes from a
//! manifest or the network goes through [`validate`] before it is used: no leading `/`, no empty,
//! `.` or `..` component, no NUL byte, bounded length. Resolving it beneath a target root (so
//! that symlinks inside the target cannot lead outside) is the applier's job.

use thiserror::Error;

/// Longest path accepted, as Linux's PATH_MAX.
pub const MAX_PATH: usize = 4096;
/// Longest single component, as Linux's NAME_MAX.
pub const MAX_NAME: usize = 255;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is absolute: {0}")]
    Absolute(String),
    #[error("path has an empty, '.' or '..' component: {0}")]
    BadComponent(String),
    #[error("path contains a NUL byte: {0}")]
    Nul(String),
    #[error("path is too long ({0} bytes)")]
    TooLong(usize),
    #[error("path component is too long: {0}")]
    NameTooLong(String),
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.len().min(200)]).into_owned()
}

/// Checks that `p` is a clean relative path (or the empty root path).
pub fn validate(p: &[u8]) -> Result<(), PathError> {
    if p.is_empty() {
        return Ok(());
    }
    if p.len() > MAX_PATH {
        return Err(PathError::TooLong(p.len()));
    }
    if p[0] == b'/' {
        return Err(PathError::Absolute(show(p)));
    }
    if p.contains(&0) {
        return Err(PathError::Nul(show(p)));
    }
    for comp in p.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(PathError::BadComponent(show(p)));
        }
        if comp.len() > MAX_NAME {
            return Err(PathError::NameTooLong(show(p)));
        }
    }
    Ok(())
}

/// The parent of a valid path (`None` for the root).
pub fn parent(p: &[u8]) -> Option<&[u8]> {
    if p.is_empty() {
        return None;
    }
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => Some(&p[..i]),
        None => Some(b""),
    }
}

/// The last component of a valid path.
pub fn file_name(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[i + 1..],
        None => p,
    }
}

/// Joins a valid parent and a component.
pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + 1 + name.len());
    v.extend_from_slice(parent);
    if !parent.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_clean_paths() {
        for p in [
            &b""[..],
            b"etc",
            b"etc/passwd",
            b"a/b/c",
            b"\xff\xfe/x",
            b"..a",
            b"a..",
            b".hidden",
        ] {
            validate(p).unwrap();
        }
    }

    #[test]
    fn rejects_hostile_paths() {
        for p in [
            &b"/etc/passwd"[..],
            b"..",
            b"../x",
            b"a/../../x",
            b"a/./b",
            b"a//b",
            b"a/",
            b"a\0b",
            b".",
        ] {
            assert!(
                validate(p).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(p)
            );
        }
        assert_eq!(validate(&vec![b'a'; 5000]), Err(PathError::TooLong(5000)));
        assert!(matches!(
            validate(&vec![b'a'; 300]),
            Err(PathError::NameTooLong(_))
        ));
    }

    #[test]
    fn parent_and_name() {
        assert_eq!(parent(b"a/b/c"), Some(&b"a/b"[..]));
        assert_eq!(parent(b"a"), Some(&b""[..]));
        assert_eq!(parent(b""), None);
        assert_eq!(file_name(b"a/b/c"), b"c");
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"a", b"x"), b"a/x");
    }
}

/// An image name that is not one: see [`image_name`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid image name {0:?}: use letters, digits, '.', '_' and '-' (not first '.'), at most 64"
)]
pub struct BadImageName(pub String);

/// Image names: letters, digits, `.`, `_`, `-`; not starting with `.`; at most 64 bytes. The
/// one rule the store (which makes directories of them) and the inventory (which names them
/// for nodes) both apply.
pub fn image_name(name: &str) -> Result<(), BadImageName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(BadImageName(name.to_string()))
    }
}

#[cfg(test)]
mod image_name_tests {
    #[test]
    fn image_names() {
        for good in ["debian-12", "a", "web_v1.2", &"x".repeat(64)] {
            assert_eq!(super::image_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "/etc",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(super::image_name(bad).is_err(), "{bad:?}");
        }
    }
}
