//! Perfect's two ways in, and the access token's life.
//!
//! `rsa`: the console's "secret key" is an RSA public key (Base64 of an X.509
//! SubjectPublicKeyInfo DER). The client encrypts `client_id=<id>&timestamp=<Unix ms>`
//! with PKCS#1 v1.5 padding under it, sends the Base64 of that as `id_token` to
//! `POST /s2s/v1.0/client/auth`, and gets an access token valid for 2 hours.
//! `api_key`: newer consoles' keys go directly as the Bearer token.
//!
//! The access token lives only in this process's memory: never in the database,
//! logs or error texts.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::{Pkcs1v15Encrypt, RsaPublicKey};

/// "The access token valid for 2 hours."
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 3600);
/// Renewed this long before its end, so no request goes out with a token about to die.
pub const RENEW_BEFORE: Duration = Duration::from_secs(10 * 60);

/// Reads the console's secret key: Base64 DER (SPKI, or a bare PKCS#1 key), with or
/// without PEM armour and line breaks. The message never shows the key.
pub fn parse_public_key(secret: &str) -> Result<RsaPublicKey, String> {
    let body: String = secret
        .lines()
        .filter(|l| !l.trim_start().starts_with("-----"))
        .flat_map(|l| l.chars())
        .filter(|c| !c.is_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(body.as_bytes()))
        .map_err(|_| {
            "perfect: PERFECT_CLIENT_SECRET is not Base64 (it should be the console's secret key, a Base64 X.509 public key)".to_string()
        })?;
    RsaPublicKey::from_public_key_der(&der)
        .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
        .map_err(|_| {
            "perfect: PERFECT_CLIENT_SECRET is Base64 but not an RSA public key (X.509 SubjectPublicKeyInfo); copy the console's secret key whole".to_string()
        })
}

/// The plaintext the id token encrypts.
pub fn id_token_plaintext(client_id: &str, unix_ms: u64) -> String {
    format!("client_id={client_id}&timestamp={unix_ms}")
}

/// `id_token` for `client_id` at `unix_ms`: standard Base64 of the PKCS#1 v1.5
/// encryption of [`id_token_plaintext`].
pub fn id_token(key: &RsaPublicKey, client_id: &str, unix_ms: u64) -> Result<String, String> {
    let text = id_token_plaintext(client_id, unix_ms);
    let mut rng = rsa::rand_core::OsRng;
    let sealed = key
        .encrypt(&mut rng, Pkcs1v15Encrypt, text.as_bytes())
        .map_err(|e| {
            format!(
                "perfect: cannot build the id token ({e}); is the client id too long for the key?"
            )
        })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
}

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How the adapter proves who it is.
pub enum Mode {
    Rsa {
        client_id: String,
        key: RsaPublicKey,
    },
    ApiKey(String),
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Rsa { .. } => "rsa",
            Mode::ApiKey(_) => "api_key",
        }
    }

    /// The environment variables to check when the provider refuses the credentials.
    pub fn hint(&self) -> &'static str {
        match self {
            Mode::Rsa { .. } => "check PERFECT_CLIENT_ID and PERFECT_CLIENT_SECRET",
            Mode::ApiKey(_) => "check PERFECT_API_KEY",
        }
    }
}

/// An access token and when it was obtained. `generation` tells a stale 401 (the
/// token was renewed since) from a fresh one.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub obtained: Instant,
    pub generation: u64,
}

impl Token {
    pub fn fresh(&self, now: Instant) -> bool {
        now.duration_since(self.obtained) < TOKEN_LIFETIME - RENEW_BEFORE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rsa::pkcs8::EncodePublicKey;
    use rsa::RsaPrivateKey;

    fn key_pair() -> (RsaPrivateKey, String) {
        use rand_chacha::rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let private = RsaPrivateKey::new(&mut rng, 1024).unwrap();
        let der = private.to_public_key().to_public_key_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_bytes());
        (private, b64)
    }

    #[test]
    fn the_id_token_decrypts_to_the_documented_text() {
        let (private, secret) = key_pair();
        let key = parse_public_key(&secret).unwrap();
        let token = id_token(&key, "BMIL1PIJjCV96JlSl64RlVksHK1cD0PQ", 1_700_000_000_123).unwrap();
        assert!(!token.contains('\n'));
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&token)
            .unwrap();
        assert_eq!(sealed.len(), 128, "1024-bit key: 128-byte block");
        let plain = private.decrypt(Pkcs1v15Encrypt, &sealed).unwrap();
        assert_eq!(
            String::from_utf8(plain).unwrap(),
            "client_id=BMIL1PIJjCV96JlSl64RlVksHK1cD0PQ&timestamp=1700000000123"
        );
        // Randomised padding: the same text never encrypts the same way twice.
        assert_ne!(
            token,
            id_token(&key, "BMIL1PIJjCV96JlSl64RlVksHK1cD0PQ", 1_700_000_000_123).unwrap()
        );
    }

    #[test]
    fn secret_keys_in_pem_armour_and_with_line_breaks_are_read() {
        let (_, secret) = key_pair();
        let wrapped: String = secret
            .as_bytes()
            .chunks(64)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{wrapped}-----END PUBLIC KEY-----\n");
        assert_eq!(
            parse_public_key(&pem).unwrap(),
            parse_public_key(&secret).unwrap()
        );
    }

    #[test]
    fn bad_secrets_are_clear_errors_that_do_not_echo_the_secret() {
        let e = parse_public_key("not base64 at all!!").unwrap_err();
        assert!(e.contains("not Base64"), "{e}");
        assert!(!e.contains("at all"));
        let e = parse_public_key("aGVsbG8gd29ybGQ=").unwrap_err();
        assert!(e.contains("not an RSA public key"), "{e}");
    }

    #[test]
    fn tokens_are_renewed_before_their_two_hours_end() {
        let t = Token {
            value: "x".into(),
            obtained: Instant::now(),
            generation: 1,
        };
        assert!(t.fresh(Instant::now()));
        assert!(!t.fresh(t.obtained + TOKEN_LIFETIME - RENEW_BEFORE + Duration::from_secs(1)));
    }
}
