//! Stateless signed-cookie sessions, as in SillyTavern: the cookie carries
//! only the handle, a per-login id and the issue time, signed with
//! HMAC-SHA256. The server keeps no session table; every request re-reads the
//! user record, so disabling or deleting a user takes effect at once.
//!
//! CSRF protection is double-submit: the client echoes a token derived from
//! the session id, which a cross-site page can neither read nor compute.
//!
//! Nothing here reads the clock or draws randomness; callers pass in the
//! secret, the session id and the current time, keeping simulations
//! deterministic.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use super::users::validate_handle;

/// Name of the session cookie.
pub const COOKIE_NAME: &str = "tavernsim_session";
/// Longest cookie value `verify` will look at; browsers cap cookies near
/// 4 KiB, so anything longer is garbage and not worth hashing.
pub const COOKIE_BYTES_MAX: usize = 4096;
/// Longest CSRF token `verify_csrf` will look at (a real one is 43 bytes).
pub const CSRF_TOKEN_BYTES_MAX: usize = 128;
/// How far in the future a cookie's issue time may lie and still be accepted,
/// to tolerate small clock steps between proxy instances.
pub const CLOCK_SKEW_S_MAX: u64 = 60;
/// Size of the session secret (the HMAC-SHA256 output size).
pub const SECRET_BYTES: usize = 32;
/// HMAC-SHA256 block size; the secret is zero-padded to it, which is exactly
/// what HMAC does with a shorter key anyway.
const HMAC_BLOCK_BYTES: usize = 64;
/// First field of the payload, so the format can change without old cookies
/// being misread.
const PAYLOAD_VERSION: &str = "v1";
/// Domain-separation prefixes: a session tag can never double as a CSRF token
/// or vice versa, although both use the same secret.
const SESSION_CONTEXT: &[u8] = b"tavernsim session cookie v1\0";
const CSRF_CONTEXT: &[u8] = b"tavernsim csrf token v1\0";

type HmacSha256 = Hmac<Sha256>;

/// Why a session cookie was refused. Every variant means "log in again".
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("session cookie is malformed; log in again")]
    Malformed,
    #[error(
        "session cookie signature is invalid (the server secret may have changed); log in again"
    )]
    BadSignature,
    #[error("session has expired or is not yet valid; log in again")]
    Expired,
}

/// Key for signing cookies and CSRF tokens. Rotating it logs everyone out.
#[derive(Clone)]
pub struct SessionSecret([u8; SECRET_BYTES]);

impl SessionSecret {
    /// Wraps 32 bytes the caller drew from a CSPRNG (or a seeded RNG in
    /// simulation).
    pub const fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Self {
        Self(bytes)
    }

    /// An HMAC already fed the domain-separation `context`. Uses the
    /// infallible fixed-size constructor so there is no error path to handle.
    fn mac(&self, context: &[u8]) -> HmacSha256 {
        let mut block = [0u8; HMAC_BLOCK_BYTES];
        block[..SECRET_BYTES].copy_from_slice(&self.0);
        let mut mac = <HmacSha256 as KeyInit>::new(&Key::<HmacSha256>::from(block));
        mac.update(context);
        mac
    }
}

/// Never prints the key, so a stray `{:?}` cannot leak it.
impl std::fmt::Debug for SessionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionSecret(..)")
    }
}

/// What a session cookie says. Two tabs of one login share the cookie and
/// hence the `session_id`; a new login gets a new id from the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub handle: String,
    pub session_id: u64,
    pub issued_at_s: u64,
}

/// Cookie value for `s`: `base64url(payload) "." base64url(tag)`, both
/// unpadded, so it is safe in a cookie and a URL. The payload is
/// `v1.<session_id>.<issued_at_s>.<handle>`; the handle is last so it takes
/// the rest of the string and no escaping is needed. `verify` rejects a
/// handle that fails [`validate_handle`], so only sign valid handles.
pub fn sign(secret: &SessionSecret, s: &Session) -> String {
    let payload = format!(
        "{PAYLOAD_VERSION}.{}.{}.{}",
        s.session_id, s.issued_at_s, s.handle
    );
    seal(secret, payload.as_bytes())
}

/// Signs raw payload bytes; split out so tests can sign malformed payloads.
fn seal(secret: &SessionSecret, payload: &[u8]) -> String {
    let payload_b64 = URL_SAFE_NO_PAD.encode(payload);
    let mut mac = secret.mac(SESSION_CONTEXT);
    mac.update(payload_b64.as_bytes());
    let tag_b64 = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{payload_b64}.{tag_b64}")
}

/// Reads back a cookie made by [`sign`]. The tag is checked (in constant
/// time) over the still-encoded payload before anything is decoded, so
/// untrusted bytes are only parsed once they are known to be ours. A cookie
/// is valid while `now_s - issued_at_s <= max_age_s`; one issued more than
/// [`CLOCK_SKEW_S_MAX`] in the future is refused as well.
pub fn verify(
    secret: &SessionSecret,
    value: &str,
    now_s: u64,
    max_age_s: u64,
) -> Result<Session, SessionError> {
    if value.len() > COOKIE_BYTES_MAX {
        return Err(SessionError::Malformed);
    }
    let (payload_b64, tag_b64) = value.split_once('.').ok_or(SessionError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag_b64)
        .map_err(|_| SessionError::Malformed)?;
    let mut mac = secret.mac(SESSION_CONTEXT);
    mac.update(payload_b64.as_bytes());
    mac.verify_slice(&tag)
        .map_err(|_| SessionError::BadSignature)?;
    let session = parse_payload(payload_b64).ok_or(SessionError::Malformed)?;
    check_age(&session, now_s, max_age_s)?;
    Ok(session)
}

/// Decodes `v1.<id>.<issued>.<handle>`; `None` on any deviation.
fn parse_payload(payload_b64: &str) -> Option<Session> {
    let bytes = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let mut fields = text.splitn(4, '.');
    if fields.next()? != PAYLOAD_VERSION {
        return None;
    }
    let session_id = parse_decimal(fields.next()?)?;
    let issued_at_s = parse_decimal(fields.next()?)?;
    let handle = fields.next()?;
    validate_handle(handle).ok()?;
    Some(Session {
        handle: handle.to_owned(),
        session_id,
        issued_at_s,
    })
}

/// Plain ASCII digits only: `u64::from_str` would also accept a leading `+`.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Enforces `max_age_s` and the future-skew allowance.
fn check_age(session: &Session, now_s: u64, max_age_s: u64) -> Result<(), SessionError> {
    let fresh = match now_s.checked_sub(session.issued_at_s) {
        Some(age_s) => age_s <= max_age_s,
        None => session.issued_at_s - now_s <= CLOCK_SKEW_S_MAX,
    };
    if fresh {
        Ok(())
    } else {
        Err(SessionError::Expired)
    }
}

/// The value of our cookie from the request's `Cookie` headers. Handles
/// several headers and `;`-separated pairs, strips optional quotes, and skips
/// headers that are not UTF-8 (without giving up on the others). If the
/// cookie appears more than once the first wins, matching browsers' order of
/// most specific path first.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(name, _)| name.trim() == COOKIE_NAME)
        .map(|(_, value)| strip_quotes(value.trim()))
}

/// RFC 6265 allows a cookie value wrapped in double quotes.
fn strip_quotes(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// `Set-Cookie` value for a fresh session. HttpOnly keeps scripts from
/// reading it; SameSite=Strict keeps other sites from sending it. `value`
/// must come from [`sign`], which only emits cookie-safe characters. No
/// `Secure` flag, since the proxy may be served over plain HTTP on localhost;
/// a TLS-terminating front end can add it.
pub fn set_cookie_header(value: &str, max_age_s: u64) -> String {
    format!("{COOKIE_NAME}={value}; Max-Age={max_age_s}; Path=/; HttpOnly; SameSite=Strict")
}

/// `Set-Cookie` value that makes the browser drop the session (logout). The
/// past `Expires` covers clients that ignore `Max-Age`.
pub fn clear_cookie_header() -> String {
    format!(
        "{COOKIE_NAME}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/; HttpOnly; SameSite=Strict"
    )
}

/// CSRF token for one login: base64url HMAC of the session id. Bound to the
/// session id, so it stops working when the user logs in again, and a token
/// from one login is useless for another.
pub fn csrf_token(secret: &SessionSecret, session_id: u64) -> String {
    URL_SAFE_NO_PAD.encode(csrf_mac(secret, session_id).finalize().into_bytes())
}

/// Whether `presented` is the CSRF token for `session_id`; the tag comparison
/// is constant time.
pub fn verify_csrf(secret: &SessionSecret, session_id: u64, presented: &str) -> bool {
    if presented.len() > CSRF_TOKEN_BYTES_MAX {
        return false;
    }
    let Ok(tag) = URL_SAFE_NO_PAD.decode(presented) else {
        return false;
    };
    csrf_mac(secret, session_id).verify_slice(&tag).is_ok()
}

/// HMAC over the CSRF context and the big-endian session id.
fn csrf_mac(secret: &SessionSecret, session_id: u64) -> HmacSha256 {
    let mut mac = secret.mac(CSRF_CONTEXT);
    mac.update(&session_id.to_be_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::super::users::HANDLE_BYTES_MAX;
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const NOW_S: u64 = 1_700_000_000;
    const MAX_AGE_S: u64 = 3_600;

    fn secret() -> SessionSecret {
        SessionSecret::from_bytes([42; SECRET_BYTES])
    }

    fn session() -> Session {
        Session {
            handle: "alice-2".to_owned(),
            session_id: 0xDEAD_BEEF_0123_4567,
            issued_at_s: NOW_S,
        }
    }

    #[test]
    fn round_trip() {
        let cookie = sign(&secret(), &session());
        assert_eq!(verify(&secret(), &cookie, NOW_S, MAX_AGE_S), Ok(session()));
        let extreme = Session {
            handle: "a".repeat(HANDLE_BYTES_MAX),
            session_id: u64::MAX,
            issued_at_s: 0,
        };
        let cookie = sign(&secret(), &extreme);
        assert_eq!(verify(&secret(), &cookie, 0, 0), Ok(extreme));
    }

    #[test]
    fn cookie_is_cookie_and_url_safe() {
        let cookie = sign(&secret(), &session());
        assert!(
            cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{cookie}"
        );
        assert_eq!(cookie.matches('.').count(), 1);
    }

    #[test]
    fn signing_is_deterministic_and_key_dependent() {
        assert_eq!(sign(&secret(), &session()), sign(&secret(), &session()));
        let other = SessionSecret::from_bytes([43; SECRET_BYTES]);
        let cookie = sign(&other, &session());
        assert_eq!(
            verify(&secret(), &cookie, NOW_S, MAX_AGE_S),
            Err(SessionError::BadSignature)
        );
    }

    #[test]
    fn padded_key_matches_plain_hmac() {
        let mut plain = <HmacSha256 as Mac>::new_from_slice(&[42; SECRET_BYTES]).unwrap();
        plain.update(CSRF_CONTEXT);
        plain.update(&7u64.to_be_bytes());
        let expected = URL_SAFE_NO_PAD.encode(plain.finalize().into_bytes());
        assert_eq!(csrf_token(&secret(), 7), expected);
    }

    #[test]
    fn any_changed_byte_is_rejected() {
        let cookie = sign(&secret(), &session());
        for i in 0..cookie.len() {
            for replacement in ['A', 'g', '0', '-', '_', '.', '=', '~'] {
                let mut bytes = cookie.clone().into_bytes();
                if bytes[i] == replacement as u8 {
                    continue;
                }
                bytes[i] = replacement as u8;
                let tampered = String::from_utf8(bytes).unwrap();
                let result = verify(&secret(), &tampered, NOW_S, MAX_AGE_S);
                assert!(result.is_err(), "accepted {tampered} (byte {i})");
            }
        }
    }

    #[test]
    fn truncation_and_extension_are_rejected() {
        let cookie = sign(&secret(), &session());
        for end in 0..cookie.len() {
            assert!(verify(&secret(), &cookie[..end], NOW_S, MAX_AGE_S).is_err());
        }
        for suffix in ["A", ".", "=", ".x"] {
            let longer = format!("{cookie}{suffix}");
            assert!(
                verify(&secret(), &longer, NOW_S, MAX_AGE_S).is_err(),
                "{longer}"
            );
        }
    }

    #[test]
    fn expiry_boundaries() {
        let cookie = sign(&secret(), &session());
        let check = |now_s| verify(&secret(), &cookie, now_s, MAX_AGE_S);
        assert!(check(NOW_S + MAX_AGE_S).is_ok());
        assert_eq!(check(NOW_S + MAX_AGE_S + 1), Err(SessionError::Expired));
        assert_eq!(check(u64::MAX), Err(SessionError::Expired));
        assert!(check(NOW_S - CLOCK_SKEW_S_MAX).is_ok());
        assert_eq!(
            check(NOW_S - CLOCK_SKEW_S_MAX - 1),
            Err(SessionError::Expired)
        );
        assert_eq!(check(0), Err(SessionError::Expired));
    }

    #[test]
    fn signed_but_malformed_payloads_are_rejected() {
        let cases: &[&[u8]] = &[
            b"",
            b"v1",
            b"v1.1.2",
            b"v2.1.2.alice",
            b"v1.+1.2.alice",
            b"v1.1.-2.alice",
            b"v1.1.2.",
            b"v1.1.2.Alice",
            b"v1.1.2.../x",
            b"v1.18446744073709551616.2.alice",
            b"v1.1.2.al\xffice",
        ];
        for payload in cases {
            let cookie = seal(&secret(), payload);
            assert_eq!(
                verify(&secret(), &cookie, NOW_S, u64::MAX),
                Err(SessionError::Malformed),
                "{payload:?}"
            );
        }
    }

    #[test]
    fn oversized_value_is_rejected() {
        let cookie = sign(&secret(), &session());
        let padded = format!("{cookie}{}", "A".repeat(COOKIE_BYTES_MAX));
        assert_eq!(
            verify(&secret(), &padded, NOW_S, MAX_AGE_S),
            Err(SessionError::Malformed)
        );
    }

    /// Random garbage, truncations, mutations and signed junk: `verify` must
    /// never panic and must accept nothing but the genuine cookie.
    #[test]
    fn fuzz_never_panics() {
        let mut rng = ChaCha8Rng::seed_from_u64(0x7a7e_5e55);
        let cookie = sign(&secret(), &session());
        let alphabet: Vec<char> = "AZaz09-_.=+/% \"\0\u{e9}\u{1F600}v1".chars().collect();
        for round in 0..20_000 {
            let candidate = match round % 4 {
                0 => random_string(&mut rng, &alphabet, 200),
                1 => cookie[..rng.random_range(0..=cookie.len())].to_owned(),
                2 => mutate(&mut rng, &cookie, &alphabet),
                _ => seal(&secret(), random_string(&mut rng, &alphabet, 60).as_bytes()),
            };
            let now_s = rng.random::<u64>();
            let result = verify(&secret(), &candidate, now_s, rng.random());
            if result.is_ok() && round % 4 != 3 {
                assert_eq!(candidate, cookie, "accepted a forgery");
            }
        }
    }

    fn random_string(rng: &mut ChaCha8Rng, alphabet: &[char], len_max: usize) -> String {
        let len = rng.random_range(0..=len_max);
        (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect()
    }

    /// Replaces, inserts or deletes one char.
    fn mutate(rng: &mut ChaCha8Rng, s: &str, alphabet: &[char]) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        let i = rng.random_range(0..chars.len());
        let c = alphabet[rng.random_range(0..alphabet.len())];
        match rng.random_range(0..3) {
            0 => chars[i] = c,
            1 => chars.insert(i, c),
            _ => {
                chars.remove(i);
            }
        }
        chars.into_iter().collect()
    }

    #[test]
    fn cookie_value_finds_our_cookie() {
        use http::header::{COOKIE, HeaderMap, HeaderValue};
        let mut headers = HeaderMap::new();
        assert_eq!(cookie_value(&headers), None);
        headers.append(COOKIE, HeaderValue::from_static("theme=dark; lang=en"));
        assert_eq!(cookie_value(&headers), None);
        headers.append(COOKIE, HeaderValue::from_bytes(b"junk=\xff\xfe").unwrap());
        headers.append(
            COOKIE,
            HeaderValue::from_static("x=1;tavernsim_session=abc.def ; y=2"),
        );
        headers.append(COOKIE, HeaderValue::from_static("tavernsim_session=second"));
        assert_eq!(cookie_value(&headers), Some("abc.def"));

        let mut quoted = HeaderMap::new();
        quoted.append(
            COOKIE,
            HeaderValue::from_static("tavernsim_session=\"q.v\""),
        );
        assert_eq!(cookie_value(&quoted), Some("q.v"));

        let mut prefixed = HeaderMap::new();
        prefixed.append(
            COOKIE,
            HeaderValue::from_static("xtavernsim_session=no; tavernsim_session_old=no"),
        );
        assert_eq!(cookie_value(&prefixed), None);

        // A UTF-8 (non-ASCII) neighbour must not hide our cookie.
        let mut utf8 = HeaderMap::new();
        let line = "name=caf\u{e9}; tavernsim_session=ok";
        utf8.append(COOKIE, HeaderValue::from_bytes(line.as_bytes()).unwrap());
        assert_eq!(cookie_value(&utf8), Some("ok"));
    }

    #[test]
    fn set_and_clear_cookie_headers() {
        let set = set_cookie_header("v.t", 600);
        assert!(set.starts_with("tavernsim_session=v.t;"), "{set}");
        for attr in ["Max-Age=600", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attr), "{set} lacks {attr}");
        }
        let clear = clear_cookie_header();
        assert!(clear.starts_with("tavernsim_session=;"), "{clear}");
        assert!(clear.contains("Max-Age=0"), "{clear}");
        assert!(clear.contains("Path=/"), "{clear}");
        // Both must be valid header values.
        assert!(http::HeaderValue::from_str(&set).is_ok());
        assert!(http::HeaderValue::from_str(&clear).is_ok());
    }

    #[test]
    fn csrf_is_bound_to_session_id_and_secret() {
        let token = csrf_token(&secret(), 1);
        assert!(verify_csrf(&secret(), 1, &token));
        assert!(!verify_csrf(&secret(), 2, &token));
        assert_ne!(csrf_token(&secret(), 1), csrf_token(&secret(), 2));
        let other = SessionSecret::from_bytes([43; SECRET_BYTES]);
        assert!(!verify_csrf(&other, 1, &token));
        assert!(!verify_csrf(&secret(), 1, ""));
        assert!(!verify_csrf(&secret(), 1, &token[..token.len() - 1]));
        assert!(!verify_csrf(&secret(), 1, &format!("{token}A")));
        assert!(!verify_csrf(
            &secret(),
            1,
            &"A".repeat(CSRF_TOKEN_BYTES_MAX + 1)
        ));
        assert!(!verify_csrf(&secret(), 1, "not base64!"));
    }

    #[test]
    fn csrf_token_is_not_a_session_tag() {
        // Domain separation: the CSRF token for id N must not verify as the
        // tag of any cookie, and the cookie tag must not pass as a CSRF token.
        let cookie = sign(&secret(), &session());
        let (payload, tag) = cookie.split_once('.').unwrap();
        assert!(!verify_csrf(&secret(), session().session_id, tag));
        let forged = format!("{payload}.{}", csrf_token(&secret(), session().session_id));
        assert_eq!(
            verify(&secret(), &forged, NOW_S, MAX_AGE_S),
            Err(SessionError::BadSignature)
        );
    }

    #[test]
    fn secret_debug_hides_bytes() {
        assert_eq!(format!("{:?}", secret()), "SessionSecret(..)");
    }
}
