//! Client authentication: signed tokens (JWT) carrying a client id, an expiry and
//! capabilities.
//!
//! ```json
//! {"sub": "alice", "exp": 1795900000, "capability": {"chat:*": ["subscribe", "publish", "history"],
//!                                                    "scores:*": ["subscribe"]}}
//! ```
//! Tokens are signed with HS256 (a secret shared with the application's backend) or ES256
//! (the backend keeps the private key; nodes hold the public key). Any other algorithm —
//! `none` included — is refused, as are expired, not-yet-valid, wrongly signed and malformed
//! tokens. A capability pattern is a channel name, a prefix ending in `*` (`chat:*`,
//! `chat:room-*`), or `*` for every channel; operations are `subscribe`, `publish`,
//! `history` and `presence`.
//!
//! Modes: `dev` (the default) lets anonymous clients do anything and ignores tokens, with a
//! loud warning at start; `token` requires a valid token on every connection.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};

/// `[auth]` in the node's configuration. Its `Debug` form hides the secrets.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `dev`: anonymous clients may do anything (never on the internet); `token`: every
    /// connection presents a signed token.
    pub mode: AuthMode,
    /// HS256: the secret shared with the application's backend (at least 32 bytes).
    pub hs256_secret: Option<String>,
    /// HS256, during a rotation: the secret being retired, still accepted for tokens
    /// signed before the backends switched to `hs256_secret`. Remove it once the longest
    /// token lifetime has passed.
    pub hs256_previous_secret: Option<String>,
    /// ES256: PEM file with the public key whose private key signs tokens.
    pub es256_public_key: Option<PathBuf>,
    /// ES256, during a rotation: the public key of the signing key being retired.
    pub es256_previous_public_key: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// `[[auth.api_keys]]`: keys for backend services on the HTTP (and gRPC) server API,
    /// sent as HTTP Basic credentials (`id:secret`). Required there in token mode (a client
    /// token works too); accepted in dev mode.
    pub api_keys: Vec<ApiKeyConfig>,
}

/// `[[auth.api_keys]]`: one backend service's key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key's public id (appears in logs).
    pub id: String,
    /// The secret, at least 32 bytes (e.g. `openssl rand -hex 32`). Compared in constant
    /// time.
    pub secret: String,
    /// What the key may do: channel pattern → operations. Absent: everything.
    pub capability: Option<BTreeMap<String, Vec<Operation>>>,
}

impl std::fmt::Debug for ApiKeyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("id", &self.id)
            .field("secret", &"…")
            .field("capability", &self.capability)
            .finish()
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "…");
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("hs256_secret", &hidden(&self.hs256_secret))
            .field("hs256_previous_secret", &hidden(&self.hs256_previous_secret))
            .field("es256_public_key", &self.es256_public_key)
            .field("es256_previous_public_key", &self.es256_previous_public_key)
            .field("leeway", &self.leeway)
            .field("api_keys", &self.api_keys)
            .finish()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Dev,
            hs256_secret: None,
            hs256_previous_secret: None,
            es256_public_key: None,
            es256_previous_public_key: None,
            leeway: Duration::from_secs(5),
            api_keys: Vec::new(),
        }
    }
}

/// Who may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Anonymous clients allowed; tokens ignored.
    Dev,
    /// A valid token is required.
    Token,
}

/// Operations a capability grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Receive a channel's messages.
    Subscribe,
    /// Publish on a channel.
    Publish,
    /// Read a channel's history.
    History,
    /// Enter a channel's presence set (reserved).
    Presence,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 4] =
        [Operation::Subscribe, Operation::Publish, Operation::History, Operation::Presence];
}

/// A token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The client id.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Issued at, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Channel pattern → operations.
    #[serde(default)]
    pub capability: BTreeMap<String, Vec<Operation>>,
}

/// The longest a token keeps a connection open, whatever its `exp` says (a timer further
/// out than this is never needed, and `Instant` arithmetic on `exp = 2^64 − 1` would
/// overflow).
pub const LONGEST_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Claims {
    /// How long the token stays valid from now: until `exp` plus `leeway`, the one rule
    /// every surface applies (a token is accepted while `now <= exp + leeway`, and a
    /// connection it opened or renewed lasts that long); zero if that passed; at most
    /// [`LONGEST_LIFETIME`].
    pub fn remaining(&self, leeway: Duration) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let until = self.exp.saturating_add(leeway.as_secs());
        Duration::from_secs(until.saturating_sub(now)).min(LONGEST_LIFETIME)
    }

    /// Whether the token allows `op` on `channel`.
    pub fn allows(&self, op: Operation, channel: &str) -> bool {
        self.capability
            .iter()
            .any(|(pattern, ops)| ops.contains(&op) && pattern_matches(pattern, channel))
    }
}

/// `*` matches everything, `prefix*` every name starting with `prefix`, anything else only
/// itself.
pub fn pattern_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

/// Checks a capability pattern as [`pattern_matches`] reads it: a channel name, or the start
/// of one followed by `*` (`*` alone: every channel). A pattern that can match no channel
/// (a space or another character channel names never hold) is refused, rather than
/// silently never matching.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let prefix = pattern.strip_suffix('*').unwrap_or(pattern);
    if prefix.is_empty() {
        return if pattern == "*" { Ok(()) } else { Err("an empty pattern".into()) };
    }
    // A prefix can match when some channel starts with it: one more character makes one.
    let name = if pattern.ends_with('*') { format!("{prefix}x") } else { prefix.to_owned() };
    tern_proto::types::ChannelName::validate(&name)
        .map_err(|e| format!("{pattern:?} can match no channel: {e}"))
}

/// Why a token was refused (sent to the client as the close reason).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// No token was presented.
    #[error("a token is required (this node runs in token mode)")]
    Missing,
    /// The token expired.
    #[error("the token expired")]
    Expired,
    /// Not valid yet (`nbf`).
    #[error("the token is not valid yet")]
    NotYetValid,
    /// An algorithm this node does not accept (including `none`).
    #[error("token algorithm not accepted: {0}")]
    Algorithm(String),
    /// Wrong signature, wrong key.
    #[error("the token's signature does not verify")]
    Signature,
    /// Not a JWT, or claims of the wrong shape.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// HTTP Basic credentials that name no configured API key, or the wrong secret.
    #[error("unknown API key or wrong secret")]
    ApiKey,
}

/// How the secrets of `deploy/edge.production.toml` begin: a node refuses to start with one.
pub const PLACEHOLDER: &str = "REPLACE-ME";

/// Verifies tokens with the configured keys.
#[derive(Clone)]
pub struct Verifier {
    mode: AuthMode,
    /// The current key first, then the one being retired.
    hs256: Vec<DecodingKey>,
    /// The current key first, then the one being retired.
    es256: Vec<DecodingKey>,
    leeway: u64,
    api_keys: Vec<ApiKey>,
}

/// A configured API key: its secret, and what it may do as claims.
#[derive(Clone)]
struct ApiKey {
    secret: Vec<u8>,
    claims: Claims,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .field("hs256", &self.hs256.len())
            .field("es256", &self.es256.len())
            .finish()
    }
}

/// Why the auth configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// Token mode without a key.
    #[error("auth.mode = \"token\" needs auth.hs256_secret or auth.es256_public_key")]
    NoKey,
    /// A secret too short to resist guessing.
    #[error("auth.hs256_secret and auth.hs256_previous_secret must be at least 32 bytes")]
    ShortSecret,
    /// A previous key without a current one.
    #[error("auth.{0} is only for a rotation: set the current key too")]
    PreviousOnly(&'static str),
    /// The public key file could not be read or parsed.
    #[error("auth: ES256 public key {0}: {1} (es256_public_key or es256_previous_public_key)")]
    PublicKey(PathBuf, String),
    /// A secret is still the production example's placeholder.
    #[error("a secret in [auth] is still the example's placeholder (REPLACE-ME…): set your own")]
    Placeholder,
    /// An `[[auth.api_keys]]` entry is invalid.
    #[error("auth.api_keys: {0}")]
    ApiKey(String),
    /// A leeway that token checks cannot apply as given.
    #[error("auth.leeway = {0:?}: must be whole seconds, at most 5 minutes")]
    Leeway(Duration),
}

/// Most clock skew `auth.leeway` may forgive.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

impl Verifier {
    /// Builds the verifier; reads the public key file.
    pub fn new(c: &AuthConfig) -> Result<Self, AuthConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| AuthConfigError::PublicKey(path.clone(), e.to_string()))
        };
        let pem = c.es256_public_key.as_ref().map(read).transpose()?;
        let mut verifier =
            Self::with_keys(c, pem.as_deref()).map_err(|e| match (e, &c.es256_public_key) {
                (AuthConfigError::PublicKey(_, why), Some(path)) => {
                    AuthConfigError::PublicKey(path.clone(), why)
                }
                (e, _) => e,
            })?;
        if let Some(path) = &c.es256_previous_public_key {
            if verifier.es256.is_empty() {
                return Err(AuthConfigError::PreviousOnly("es256_previous_public_key"));
            }
            let key = DecodingKey::from_ec_pem(&read(path)?)
                .map_err(|e| AuthConfigError::PublicKey(path.clone(), e.to_string()))?;
            verifier.es256.push(key);
        }
        Ok(verifier)
    }

    /// Builds the verifier from `c` with the ES256 public key given as PEM text (instead of
    /// `c.es256_public_key`'s file).
    pub fn with_keys(c: &AuthConfig, es256_pem: Option<&[u8]>) -> Result<Self, AuthConfigError> {
        let placeholder = |s: &str| s.starts_with(PLACEHOLDER);
        if c.hs256_secret.as_deref().is_some_and(placeholder)
            || c.hs256_previous_secret.as_deref().is_some_and(placeholder)
            || c.api_keys.iter().any(|k| placeholder(&k.secret))
        {
            return Err(AuthConfigError::Placeholder);
        }
        if c.hs256_previous_secret.is_some() && c.hs256_secret.is_none() {
            return Err(AuthConfigError::PreviousOnly("hs256_previous_secret"));
        }
        let mut hs256 = Vec::new();
        for s in [&c.hs256_secret, &c.hs256_previous_secret].into_iter().flatten() {
            if s.len() < 32 {
                return Err(AuthConfigError::ShortSecret);
            }
            hs256.push(DecodingKey::from_secret(s.as_bytes()));
        }
        let es256 = match es256_pem {
            Some(pem) => vec![
                DecodingKey::from_ec_pem(pem)
                    .map_err(|e| AuthConfigError::PublicKey(PathBuf::new(), e.to_string()))?,
            ],
            None => Vec::new(),
        };
        if c.mode == AuthMode::Token && hs256.is_empty() && es256.is_empty() {
            return Err(AuthConfigError::NoKey);
        }
        let mut api_keys: Vec<ApiKey> = Vec::new();
        for k in &c.api_keys {
            if k.id.is_empty() || k.id.contains(':') || k.id.chars().any(char::is_control) {
                return Err(AuthConfigError::ApiKey(format!(
                    "{:?}: ids are non-empty, without ':'",
                    k.id
                )));
            }
            if k.secret.len() < 32 {
                return Err(AuthConfigError::ApiKey(format!(
                    "{}: the secret must be at least 32 bytes",
                    k.id
                )));
            }
            if api_keys.iter().any(|a| a.claims.sub == format!("{API_KEY_PREFIX}{}", k.id)) {
                return Err(AuthConfigError::ApiKey(format!("{}: listed twice", k.id)));
            }
            let capability = k
                .capability
                .clone()
                .unwrap_or_else(|| [("*".to_owned(), Operation::ALL.to_vec())].into());
            for pattern in capability.keys() {
                check_pattern(pattern)
                    .map_err(|e| AuthConfigError::ApiKey(format!("{}: capability {e}", k.id)))?;
            }
            api_keys.push(ApiKey {
                secret: k.secret.as_bytes().to_vec(),
                claims: Claims {
                    sub: format!("{API_KEY_PREFIX}{}", k.id),
                    exp: u64::MAX / 2,
                    iat: None,
                    capability,
                },
            });
        }
        if c.leeway.subsec_nanos() != 0 || c.leeway > MAX_LEEWAY {
            return Err(AuthConfigError::Leeway(c.leeway));
        }
        Ok(Self { mode: c.mode, hs256, es256, leeway: c.leeway.as_secs(), api_keys })
    }

    /// The mode.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Checks HTTP Basic credentials (`id`, `secret`) against the configured API keys, the
    /// secret in constant time; returns the key's claims (subject `key:ID`).
    pub fn verify_api_key(&self, id: &str, secret: &str) -> Result<Claims, TokenError> {
        use subtle::ConstantTimeEq;
        let want = format!("{API_KEY_PREFIX}{id}");
        let key = self.api_keys.iter().find(|k| k.claims.sub == want).ok_or(TokenError::ApiKey)?;
        if bool::from(key.secret.as_slice().ct_eq(secret.as_bytes())) {
            Ok(key.claims.clone())
        } else {
            Err(TokenError::ApiKey)
        }
    }

    /// The clock skew tolerated on `exp` and `nbf` (see [`Claims::remaining`]).
    pub fn leeway(&self) -> Duration {
        Duration::from_secs(self.leeway)
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => {
                TokenError::Algorithm("unknown or none".into())
            }
            _ => TokenError::Malformed(e.to_string()),
        })?;
        let keys: &[DecodingKey] = match header.alg {
            Algorithm::HS256 => &self.hs256,
            Algorithm::ES256 => &self.es256,
            _ => &[],
        };
        if keys.is_empty() {
            return Err(TokenError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        // The current key, then (during a rotation) the one being retired: the signature
        // is checked before the claims, so only a signature mismatch tries the next.
        let mut result = decode::<Claims>(token, &keys[0], &validation);
        for key in &keys[1..] {
            match &result {
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    result = decode::<Claims>(token, key, &validation);
                }
                _ => break,
            }
        }
        let data = result.map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidSignature => TokenError::Signature,
                K::InvalidAlgorithm => TokenError::Algorithm(format!("{:?}", header.alg)),
                _ => TokenError::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        // The claims as a whole: a token names its client, and one with no time left (the
        // second `exp + leeway` ends) opens nothing, on every surface.
        if let Err(reason) = tern_proto::types::check_message_id(&claims.sub) {
            return Err(TokenError::Malformed(format!("sub: {reason}")));
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Malformed("sub: empty; a token names its client".into()));
        }
        if claims.sub.starts_with(API_KEY_PREFIX) {
            // An API key's messages carry `key:ID` as their client id: no token may.
            return Err(TokenError::Malformed(format!(
                "sub: {API_KEY_PREFIX:?} starts the client id of an API key"
            )));
        }
        for pattern in claims.capability.keys() {
            check_pattern(pattern).map_err(|e| TokenError::Malformed(format!("capability {e}")))?;
        }
        if claims.remaining(self.leeway()).is_zero() {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }
}

/// How the client id of an API key starts (`key:ID`); a token's `sub` may not.
pub const API_KEY_PREFIX: &str = "key:";

/// Mints a development token (HS256): `tern token`.
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, String> {
    let header = jsonwebtoken::Header::new(Algorithm::HS256);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| e.to_string())
}

/// Parses `PATTERN=op,op` (as given to `tern token --capability`).
pub fn parse_capability(s: &str) -> Result<(String, Vec<Operation>), String> {
    let (pattern, ops) =
        s.split_once('=').ok_or_else(|| format!("{s:?}: expected PATTERN=op[,op…]"))?;
    let ops = ops
        .split(',')
        .map(|o| match o.trim() {
            "subscribe" => Ok(Operation::Subscribe),
            "publish" => Ok(Operation::Publish),
            "history" => Ok(Operation::History),
            "presence" => Ok(Operation::Presence),
            other => {
                Err(format!("unknown operation {other:?} (subscribe, publish, history, presence)"))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((pattern.to_owned(), ops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("*", "chat:a"));
        assert!(pattern_matches("chat:*", "chat:a"));
        assert!(!pattern_matches("chat:*", "chatter:a"));
        assert!(pattern_matches("chat:room-*", "chat:room-1"));
        assert!(!pattern_matches("chat:room-1", "chat:room-10"));
        assert!(pattern_matches("lobby", "lobby"));
    }

    #[test]
    fn the_debug_form_of_the_auth_config_hides_its_secrets() {
        let c = AuthConfig {
            hs256_secret: Some("current-secret-0123456789abcdef0123".into()),
            hs256_previous_secret: Some("retired-secret-0123456789abcdef0123".into()),
            api_keys: vec![ApiKeyConfig {
                id: "backend".into(),
                secret: "api-secret-0123456789abcdef0123456789".into(),
                capability: None,
            }],
            ..AuthConfig::default()
        };
        let shown = format!("{c:?}");
        assert!(shown.contains("backend"), "{shown}");
        for secret in ["current-secret", "retired-secret", "api-secret"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
