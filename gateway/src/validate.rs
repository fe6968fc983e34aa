//! Checks applied to every request before anything is looked up or stored.

use crate::error::Error;

/// Longest accepted instance or binding id.
pub const MAX_ID_LEN: usize = 255;

/// Oldest `X-Broker-API-Version` the gateway accepts: 2.13 brought the
/// `context` object and `maintenance_info` as used here.
pub const MIN_API_VERSION: (u32, u32) = (2, 13);

/// Checks an instance or binding id taken from the URL path.
///
/// Accepted ids are 1 to 255 characters of `[A-Za-z0-9._~-]` (RFC 3986
/// unreserved characters) and neither `.` nor `..`. The OSB spec
/// places no restriction on ids, but they become file names on nodes
/// (`<data_dir>/<instance_id>`), owner names in the allocator and log
/// fields, so anything that could escape a directory (`/`, `..`), confuse a
/// terminal (control characters) or compare differently after Unicode
/// normalisation is refused with 400 before anything is stored.
pub fn validate_id(kind: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid {kind}: use 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_', '-' and '~' \
             (not '.' or '..')"
        )))
    }
}

/// Parses an `X-Broker-API-Version` value (`MAJOR.MINOR`).
pub fn parse_api_version(value: &str) -> Option<(u32, u32)> {
    let (major, minor) = value.trim().split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Checks the `X-Broker-API-Version` header (412 when missing, malformed or
/// not a 2.x version of at least [`MIN_API_VERSION`]).
pub fn check_api_version(value: Option<&str>) -> Result<(), Error> {
    let (min_major, min_minor) = MIN_API_VERSION;
    let need =
        format!("this broker requires X-Broker-API-Version {min_major}.{min_minor} or later (2.x)");
    let Some(value) = value else {
        return Err(Error::ApiVersion(format!(
            "missing X-Broker-API-Version header: {need}"
        )));
    };
    match parse_api_version(value) {
        Some((major, minor)) if major == min_major && minor >= min_minor => Ok(()),
        Some((major, minor)) => Err(Error::ApiVersion(format!(
            "unsupported X-Broker-API-Version {major}.{minor}: {need}"
        ))),
        None => Err(Error::ApiVersion(format!(
            "malformed X-Broker-API-Version header: {need}"
        ))),
    }
}

/// Compares two byte strings in time independent of where they differ, so
/// that response timing does not reveal how much of a guessed password was
/// right. (The length may leak; it is not secret enough to matter.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Checks an `Authorization: Basic ...` header against the configured
/// credentials.
pub fn check_basic_auth(header: Option<&str>, username: &str, password: &str) -> bool {
    use base64::Engine;
    let Some(value) = header else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (user, pass) = (&decoded[..colon], &decoded[colon + 1..]);
    // Both comparisons always run, so the timing does not tell whether the
    // user name alone was right.
    let user_ok = constant_time_eq(user, username.as_bytes());
    let pass_ok = constant_time_eq(pass, password.as_bytes());
    user_ok & pass_ok
}
