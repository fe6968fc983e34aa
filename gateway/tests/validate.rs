//! Request checks: ids, API version header, basic auth.

use base64::Engine;
use svcbroker_gateway::validate::{
    check_api_version, check_basic_auth, constant_time_eq, parse_api_version, validate_id,
};

#[test]
fn ids_accept_unreserved_characters() {
    for id in [
        "a",
        "A-b_c.d",
        "0",
        "x.y",
        "...",
        "a~b",
        "~",
        &"a".repeat(255),
    ] {
        assert!(validate_id("instance_id", id).is_ok(), "{id:?}");
    }
}

#[test]
fn ids_refuse_what_could_escape_or_confuse() {
    for id in [
        "",
        ".",
        "..",
        "a/b",
        "../etc",
        "a b",
        "tab\t",
        "nl\n",
        "nul\0",
        "é",
        "ｆｕｌｌ",
        "a%2Fb",
        &"a".repeat(256),
    ] {
        let err = validate_id("instance_id", id).unwrap_err();
        assert_eq!(err.status().as_u16(), 400, "{id:?}");
        assert!(err.to_string().contains("instance_id"), "{err}");
    }
}

#[test]
fn api_version_parsing() {
    assert_eq!(parse_api_version("2.17"), Some((2, 17)));
    assert_eq!(parse_api_version(" 2.13 "), Some((2, 13)));
    for bad in [
        "", "2", "2.", ".17", "v2.17", "2.17.1", "2.x", "-2.17", "2.+1",
    ] {
        assert_eq!(parse_api_version(bad), None, "{bad:?}");
    }
}

#[test]
fn api_version_policy() {
    assert!(check_api_version(Some("2.17")).is_ok());
    assert!(check_api_version(Some("2.13")).is_ok());
    assert!(check_api_version(Some("2.99")).is_ok());
    for v in [None, Some("2.12"), Some("1.0"), Some("3.0"), Some("junk")] {
        let err = check_api_version(v).unwrap_err();
        assert_eq!(err.status().as_u16(), 412, "{v:?}");
        assert!(err.to_string().contains("2.13"), "names the minimum: {err}");
    }
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[test]
fn basic_auth() {
    assert!(check_basic_auth(Some(&basic("u", "p:w")), "u", "p:w"));
    assert!(check_basic_auth(
        Some(&basic("u", "pw").replace("Basic", "basic")),
        "u",
        "pw"
    ));
    assert!(!check_basic_auth(None, "u", "pw"));
    assert!(!check_basic_auth(Some(&basic("u", "pW")), "u", "pw"));
    assert!(!check_basic_auth(Some(&basic("U", "pw")), "u", "pw"));
    assert!(!check_basic_auth(Some(&basic("u", "pw2")), "u", "pw"));
    assert!(!check_basic_auth(Some("Bearer abc"), "u", "pw"));
    assert!(!check_basic_auth(Some("Basic !!!"), "u", "pw"));
    assert!(!check_basic_auth(Some("Basic dXB3"), "u", "pw"), "no colon");
}

#[test]
fn constant_time_comparison() {
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(constant_time_eq(b"", b""));
}
