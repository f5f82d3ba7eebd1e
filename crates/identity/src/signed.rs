//! Requests the API server makes to agents (log reads), signed with the
//! cluster's join token, which both hold: HMAC-SHA256 over the method, the
//! path with its query, and the time, so the token never crosses the wire
//! and a captured request stops working after [`MAX_SKEW`].

use ring::hmac;

/// How far a signed request's time may be from the receiver's clock.
pub const MAX_SKEW_SECS: u64 = 30;
pub const SIGNATURE_HEADER: &str = "x-skiff-signature";
pub const TIME_HEADER: &str = "x-skiff-time";

fn tag(token: &str, method: &str, path: &str, unix_secs: u64) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    hmac::sign(&key, format!("{method} {path} {unix_secs}").as_bytes())
}

/// The signature header's value for a request.
pub fn sign(token: &str, method: &str, path: &str, unix_secs: u64) -> String {
    tag(token, method, path, unix_secs)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `signature` signs this request, made at `unix_secs`, received at `now_secs`.
pub fn verify(
    token: &str,
    method: &str,
    path: &str,
    unix_secs: u64,
    now_secs: u64,
    signature: &str,
) -> bool {
    if unix_secs.abs_diff(now_secs) > MAX_SKEW_SECS {
        return false;
    }
    let Some(bytes) = (0..signature.len())
        .step_by(2)
        .map(|i| {
            signature
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    hmac::verify(
        &key,
        format!("{method} {path} {unix_secs}").as_bytes(),
        &bytes,
    )
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_token_request_and_time() {
        let sig = sign("tok", "GET", "/logs/a/b?tail=5", 1000);
        assert!(verify("tok", "GET", "/logs/a/b?tail=5", 1000, 1010, &sig));
        assert!(
            !verify("other", "GET", "/logs/a/b?tail=5", 1000, 1010, &sig),
            "another token"
        );
        assert!(
            !verify("tok", "GET", "/logs/a/c?tail=5", 1000, 1010, &sig),
            "another path"
        );
        assert!(
            !verify("tok", "GET", "/logs/a/b?tail=5", 1001, 1010, &sig),
            "another time"
        );
        assert!(
            !verify(
                "tok",
                "GET",
                "/logs/a/b?tail=5",
                1000,
                1000 + MAX_SKEW_SECS + 1,
                &sig
            ),
            "too old"
        );
        assert!(
            !verify("tok", "GET", "/logs/a/b?tail=5", 1000, 1000, "zz"),
            "not hex"
        );
    }
}
