//! Shared secrets and API tokens on the wire and on disk.
//!
//! Secrets are read from files (never argv, so they do not show in `ps`), taken from the
//! request's headers or URL, and compared through [`Secret`]; repeated failures from one address
//! are rate-limited here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::header::{HeaderMap, AUTHORIZATION};

use crate::secret::{AuthFailure, Secret};

/// Reads a secret file: surrounding whitespace and the trailing newline are not part of it.
pub fn read_secret_file(path: &Path, flag: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    warn_if_world_readable(path, flag);
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!(
            "{flag} {} is empty; put the secret in it",
            path.display()
        ));
    }
    Ok(secret.to_owned())
}

fn warn_if_world_readable(path: &Path, flag: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(
                "{flag} {} is readable by every user; restrict it with chmod 600",
                path.display()
            );
        }
    }
}

/// The credential a provider presented: `Authorization: Bearer <secret>`, HTTP Basic with the
/// secret as password, or `token=<secret>` in the query (for providers that only take a URL).
pub fn check_webhook_secret(
    secret: &Secret,
    headers: &HeaderMap,
    token_param: Option<&str>,
) -> Result<(), AuthFailure> {
    let mut presented = false;
    if let Some(candidate) = authorization_secret(headers) {
        presented = true;
        if secret.matches(&candidate) {
            return Ok(());
        }
    }
    if let Some(candidate) = token_param {
        presented = true;
        if secret.matches(candidate.as_bytes()) {
            return Ok(());
        }
    }
    Err(if presented {
        AuthFailure::Wrong
    } else {
        AuthFailure::Missing
    })
}

/// The secret carried by an Authorization header, as Bearer token or Basic password.
fn authorization_secret(headers: &HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = split_scheme(value)?;
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return Some(rest.to_vec());
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    // Any other scheme is still a credential, just one that cannot match.
    Some(Vec::new())
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = value.iter().position(|&b| b == b' ')?;
    let rest = &value[space + 1..];
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    Some((&value[..space], rest[start..].trim_ascii_end()))
}

/// The tokens that guard the local API, each with the name recorded as who made a change.
#[derive(Debug, Clone, Default)]
pub struct ApiTokens {
    tokens: Vec<(String, Secret)>,
}

/// Who made a change through the API when no token names them.
pub const DEFAULT_ACTOR: &str = "api";

impl ApiTokens {
    /// One token per line, optionally `name:token` (split at the first `:`); blank lines and
    /// `#` comments are skipped.
    pub fn parse(text: &str) -> ApiTokens {
        let tokens = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| match line.split_once(':') {
                Some((name, token)) if !name.trim().is_empty() => {
                    (name.trim().to_owned(), Secret::new(token.trim().as_bytes()))
                }
                _ => (DEFAULT_ACTOR.to_owned(), Secret::new(line.as_bytes())),
            })
            .collect();
        ApiTokens { tokens }
    }

    pub fn read(path: &Path) -> Result<ApiTokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --api-token-file {}: {e}", path.display()))?;
        warn_if_world_readable(path, "--api-token-file");
        let tokens = ApiTokens::parse(&text);
        if tokens.tokens.is_empty() {
            return Err(format!(
                "--api-token-file {} holds no token; put one token (or name:token) per line",
                path.display()
            ));
        }
        Ok(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The name of the token presented as `Authorization: Bearer <token>`.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&str, AuthFailure> {
        let value = headers.get(AUTHORIZATION).ok_or(AuthFailure::Missing)?;
        let (scheme, token) = split_scheme(value.as_bytes()).ok_or(AuthFailure::Wrong)?;
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return Err(AuthFailure::Wrong);
        }
        // Every token is compared, so timing does not reveal which one matched.
        let mut found = None;
        for (name, secret) in &self.tokens {
            if secret.matches(token) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found.ok_or(AuthFailure::Wrong)
    }
}

/// A per-address budget of failed authentications: after `max_failures` within `window`, an
/// address is answered 429 until its window ends, before its credential is even looked at, so
/// guessing a secret costs the guesser time and costs us almost nothing. Successful requests are
/// never limited by it.
pub struct FailureLimiter {
    windows: Mutex<HashMap<IpAddr, FailureWindow>>,
    max_failures: u32,
    window: Duration,
}

struct FailureWindow {
    started: Instant,
    failures: u32,
}

/// Addresses tracked at most; past this, expired windows are dropped first and, if that is not
/// enough, all of them (forgetting failures is safer than growing without bound).
const MAX_TRACKED_ADDRESSES: usize = 65_536;

impl FailureLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        FailureLimiter {
            windows: Mutex::new(HashMap::new()),
            max_failures,
            window,
        }
    }

    /// `Err(retry_after)` while `peer` has used up its failures.
    pub fn check(&self, peer: IpAddr) -> Result<(), Duration> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        match windows.get(&peer) {
            Some(w) if w.failures >= self.max_failures => {
                match self.window.checked_sub(w.started.elapsed()) {
                    Some(left) if !left.is_zero() => Err(left),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure; true when it used up the address's budget (it is blocked from now on).
    pub fn record_failure(&self, peer: IpAddr) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if windows.len() >= MAX_TRACKED_ADDRESSES && !windows.contains_key(&peer) {
            windows.retain(|_, w| now.duration_since(w.started) < self.window);
            if windows.len() >= MAX_TRACKED_ADDRESSES {
                windows.clear();
            }
        }
        let entry = windows.entry(peer).or_insert(FailureWindow {
            started: now,
            failures: 0,
        });
        if now.duration_since(entry.started) >= self.window {
            *entry = FailureWindow {
                started: now,
                failures: 0,
            };
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.failures == self.max_failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(auth).expect("ascii"));
        headers
    }

    #[test]
    fn webhook_secret_accepted_three_ways() {
        let secret = Secret::new(b"s3cret");
        let basic = base64::engine::general_purpose::STANDARD.encode("lox24:s3cret");
        assert_eq!(
            check_webhook_secret(&secret, &headers("Bearer s3cret"), None),
            Ok(())
        );
        assert_eq!(
            check_webhook_secret(&secret, &headers(&format!("Basic {basic}")), None),
            Ok(())
        );
        assert_eq!(
            check_webhook_secret(&secret, &HeaderMap::new(), Some("s3cret")),
            Ok(())
        );
        assert_eq!(
            check_webhook_secret(&secret, &HeaderMap::new(), None),
            Err(AuthFailure::Missing)
        );
        assert_eq!(
            check_webhook_secret(&secret, &headers("Bearer nope"), None),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(
            check_webhook_secret(&secret, &HeaderMap::new(), Some("")),
            Err(AuthFailure::Wrong)
        );
    }

    #[test]
    fn api_tokens_carry_names() {
        let tokens = ApiTokens::parse("alice:tok-a\n\n  bare-token \n# comment\n");
        assert_eq!(tokens.authenticate(&headers("Bearer tok-a")), Ok("alice"));
        assert_eq!(
            tokens.authenticate(&headers("Bearer bare-token")),
            Ok("api")
        );
        assert_eq!(
            tokens.authenticate(&headers("Bearer other")),
            Err(AuthFailure::Wrong)
        );
        assert_eq!(
            tokens.authenticate(&HeaderMap::new()),
            Err(AuthFailure::Missing)
        );
    }
}
