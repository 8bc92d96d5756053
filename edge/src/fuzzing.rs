//! The inputs an attacker controls, as plain functions: the fuzz targets under `fuzz/`
//! call them with whatever the fuzzer makes, and the corpus replay test
//! (`tests/fuzz_corpus.rs`) calls them with every checked-in input. Each must return
//! without panicking, whatever the bytes.

use std::sync::OnceLock;

use crate::auth::{AuthConfig, AuthMode, Claims, Operation, Verifier};

/// A client frame as a WebSocket text frame (JSON).
pub fn client_frame_json(data: &[u8]) {
    let _ = tern_proto::codec::decode_client(data, true);
}

/// A client frame as a WebSocket binary frame (protobuf).
pub fn client_frame_protobuf(data: &[u8]) {
    let _ = tern_proto::codec::decode_client(data, false);
}

/// A backbone frame body (after the length prefix), as a peer sends it; what decodes is
/// encoded again and must decode to the same frame.
pub fn backbone_frame(data: &[u8]) {
    if let Ok(frame) = tern_backbone::wire::decode(data) {
        let bytes = tern_backbone::wire::encode(&frame);
        let again = tern_backbone::wire::decode(&bytes[4..]).expect("re-encoded frame decodes");
        assert_eq!(format!("{frame:?}"), format!("{again:?}"), "round trip");
    }
}

/// A public key for the ES256 half of [`token`] (its private half was discarded: no input
/// can carry a valid ES256 signature, as in production).
const ES256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAELnolasqLCINthqYgEW2GOcnML/CQ
4VrABTvswtYvQ06m5KffzanvSORdgMpMtEWC4dNt7Ng+1pPZVfHIUTPDmQ==
-----END PUBLIC KEY-----
";

/// The HS256 secret of [`token`]'s verifier.
pub const FUZZ_HS256_SECRET: &str = "fuzzing-secret-fuzzing-secret-0123456789";

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let c = AuthConfig {
            mode: AuthMode::Token,
            hs256_secret: Some(FUZZ_HS256_SECRET.into()),
            ..AuthConfig::default()
        };
        Verifier::with_keys(&c, Some(ES256_PUBLIC.as_bytes())).expect("the fuzz keys are valid")
    })
}

/// A token as a client presents it (connect, `?token=`, renewal, HTTP bearer), checked by a
/// verifier holding both an HS256 secret and an ES256 key; and the same bytes as a claims
/// document and as a `tern token --capability` argument.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(claims) = verifier().verify(text) {
        let _ = claims.allows(Operation::Publish, "chat:room");
    }
    if let Ok(claims) = serde_json::from_slice::<Claims>(data) {
        for channel in ["chat:room", "a", "chat:room:x"] {
            let _ = claims.allows(Operation::Subscribe, channel);
        }
        let _ = claims.remaining();
    }
    let _ = crate::auth::parse_capability(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_token_reaches_the_claims() {
        // The verifier is real: a token signed with its secret is accepted (so inputs
        // derived from such a token explore the claims, not only the header).
        let claims = Claims {
            sub: "fuzz".into(),
            exp: u64::MAX / 4,
            iat: None,
            capability: [("chat:*".to_owned(), vec![Operation::Publish])].into(),
        };
        let t = crate::auth::mint_hs256(FUZZ_HS256_SECRET, &claims).unwrap();
        assert_eq!(verifier().verify(&t).unwrap().sub, "fuzz");
        let forged = crate::auth::mint_hs256("another-secret-another-secret-0123456789", &claims);
        assert!(verifier().verify(&forged.unwrap()).is_err());
        token(t.as_bytes());
    }
}
