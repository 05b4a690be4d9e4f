//! Secrets compared and made the same way everywhere.

/// A random token: 128 bits from the kernel, hex.
pub fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(std::io::Error::from)?;
    Ok(hex::encode(b))
}

/// Constant-time comparison of secrets.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
