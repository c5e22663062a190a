//! Secrets compared without leaking them, and the digest the providers' signatures use.
//!
//! A secret is kept only as its SHA-256 digest: comparing two equal-length digests in constant
//! time means a timing attacker learns neither the secret's bytes nor its length. This module has
//! no I/O and no HTTP so that the provider parsers, which need it, build without the service
//! (see the `service` feature).

use subtle::ConstantTimeEq;

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential at all: 401.
    Missing,
    /// A credential that matches nothing: 403.
    Wrong,
}

/// A secret, held as its digest.
#[derive(Clone)]
pub struct Secret([u8; 32]);

impl Secret {
    pub fn new(secret: &[u8]) -> Self {
        Secret(sha256(secret))
    }

    pub fn matches(&self, candidate: &[u8]) -> bool {
        self.0.ct_eq(&sha256(candidate)).into()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Lowercase hex of the SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    sha256(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
