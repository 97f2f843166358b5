//! Who a connection is and what it may do: JWT verification and channel
//! grants.
//!
//! A token's claims: `sub` (the user), `exp` (required), optionally `nbf`,
//! `iat`, `iss`, `aud` (checked when configured), `role` (`"server"` marks a
//! backend service), and the grants `subscribe` and `publish`: lists of
//! channel patterns where `*` matches one segment and `>` one or more
//! trailing segments (`chat.123`, `user.42.*`, `news.>`). With
//! `personal_namespace`, `user.{sub}.>` is always the user's own, for both.
//!
//! Keys: HMAC secrets (HS256/384/512) and PEM public keys — RSA (RS*, PS*),
//! ECDSA (ES256, ES384) or Ed25519 (EdDSA). Several may be configured at
//! once so keys can be rotated: a token is accepted when any key of its
//! algorithm's family verifies it.
//!
//! Invariants: a refused token is described by what is wrong with it
//! (expired, bad signature…), never by anything about the key; with
//! `mode = "none"` (development) every token is accepted, is its own user
//! name, and may do everything.

use std::path::PathBuf;
use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use volna_proto::ChannelName;

/// How connections authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Development only: every token is accepted.
    #[default]
    None,
    /// Tokens are JWTs verified with the configured keys.
    Jwt,
}

/// The `[auth]` configuration section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none` (development) or `jwt`.
    pub mode: AuthMode,
    /// Files holding HMAC secrets (one per file, whole file, at least 32
    /// bytes). Several can be valid at once, so that keys can be rotated.
    pub hs256_secret_files: Vec<PathBuf>,
    /// PEM files holding RSA, ECDSA (P-256/P-384) or Ed25519 public keys;
    /// the key type is read from the file.
    pub public_key_files: Vec<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// If set, tokens must carry `iat` and be at most this many seconds old.
    pub max_token_age_secs: Option<u64>,
    /// `user.{sub}.>` is always the user's own.
    pub personal_namespace: bool,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// How long before its token expires a session is sent `TokenExpiring`.
    pub expiry_notice_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            hs256_secret_files: Vec::new(),
            public_key_files: Vec::new(),
            issuer: None,
            audience: None,
            max_token_age_secs: None,
            personal_namespace: true,
            leeway_secs: 5,
            expiry_notice_secs: 60,
        }
    }
}

/// Why a token was refused. The texts are safe to send to the client.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("a token is required")]
    Missing,
    /// `exp` is in the past.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// No configured key verifies the signature.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `iss` or `aud` is not the configured one.
    #[error("the token was issued for someone else")]
    WrongAudienceOrIssuer,
    /// `iat` is older than `max_token_age_secs` allows.
    #[error("the token is too old")]
    TooOld,
    /// A refreshed token names another user than the session's.
    #[error("the new token is for another user")]
    OtherUser,
    /// The token is not a well-formed JWT with the required claims.
    #[error("the token is malformed: {0}")]
    Malformed(String),
}

/// A problem with the authentication configuration.
#[derive(Debug, Error)]
pub enum AuthConfigError {
    /// A key file could not be read.
    #[error("cannot read auth key {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `mode = "jwt"` without any key.
    #[error(
        "auth.mode = \"jwt\" needs at least one key (auth.hs256_secret_files or auth.public_key_files)"
    )]
    NoKeys,
    /// A public key file holds no RSA, ECDSA or Ed25519 public key.
    #[error("{0} holds no RSA, ECDSA (P-256/P-384) or Ed25519 public key in PEM")]
    BadPublicKey(PathBuf),
    /// A key is too short to be a secret.
    #[error("the HS256 secret in {0} is shorter than 32 bytes")]
    WeakSecret(PathBuf),
}

/// One grant pattern, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `>`: one or more trailing segments.
    Rest,
}

impl Grant {
    /// Parses `chat.123`, `user.42.*`, `news.>`; `None` for a malformed
    /// pattern (`>` not last, empty segments).
    pub fn parse(pattern: &str) -> Option<Self> {
        let parts: Vec<&str> = pattern.split('.').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            segments.push(match *part {
                "" => return None,
                "*" => Segment::One,
                ">" if i + 1 == parts.len() => Segment::Rest,
                ">" => return None,
                literal => Segment::Literal(literal.to_owned()),
            });
        }
        Some(Self(segments))
    }

    /// Whether `channel` falls under this grant.
    pub fn matches(&self, channel: &ChannelName) -> bool {
        let mut names = channel.as_str().split('.');
        for segment in &self.0 {
            match segment {
                Segment::Rest => return names.next().is_some(),
                Segment::One => {
                    if names.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if names.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        names.next().is_none()
    }
}

/// An authenticated connection's identity and rights.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user (`sub`).
    pub user: String,
    /// `user`, shared: the owner of the identity's producer windows.
    owner: Arc<str>,
    /// When the token expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
    /// A backend service (token `role = "server"`, or a client
    /// certificate) rather than an end user's device: may publish to
    /// server-only namespaces, and per-user limits do not apply.
    pub server: bool,
    /// The device the token is for (claim `device`), if it names one: a
    /// session of this token must say the same device in `Hello`.
    pub device: Option<String>,
    subscribe: Rights,
    publish: Rights,
}

#[derive(Debug, Clone)]
enum Rights {
    All,
    Only(Vec<Grant>),
}

impl Rights {
    fn allows(&self, channel: &ChannelName) -> bool {
        match self {
            Rights::All => true,
            Rights::Only(grants) => grants.iter().any(|g| g.matches(channel)),
        }
    }
}

impl Identity {
    /// A backend service authenticated by its client certificate (or,
    /// with `mode = "none"`, anyone): may do everything, never expires.
    pub fn service(name: String) -> Self {
        Self {
            owner: name.as_str().into(),
            user: name,
            expires_at: None,
            server: true,
            device: None,
            subscribe: Rights::All,
            publish: Rights::All,
        }
    }

    /// Who owns this identity's producer windows (idempotent publish): the
    /// user, so one user can never touch another's.
    pub fn owner(&self) -> Arc<str> {
        self.owner.clone()
    }

    /// Whether this identity may subscribe to `channel`.
    pub fn may_subscribe(&self, channel: &ChannelName) -> bool {
        self.subscribe.allows(channel)
    }

    /// Whether this identity may publish to `channel`.
    pub fn may_publish(&self, channel: &ChannelName) -> bool {
        self.publish.allows(channel)
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    device: Option<String>,
}

/// Verifies tokens as configured.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    /// Each key with the validation for its algorithm family, built once.
    keys: Vec<(DecodingKey, Validation)>,
    leeway_secs: u64,
    max_token_age_secs: Option<u64>,
    personal_namespace: bool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads the keys the configuration names.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| AuthConfigError::Read {
                path: path.clone(),
                source,
            })
        };
        let mut keys = Vec::new();
        for path in &config.hs256_secret_files {
            let secret = read(path)?;
            let secret = secret.trim_ascii();
            if secret.len() < 32 {
                return Err(AuthConfigError::WeakSecret(path.clone()));
            }
            keys.push(DecodingKey::from_secret(secret));
        }
        for path in &config.public_key_files {
            let pem = read(path)?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .or_else(|_| DecodingKey::from_ec_pem(&pem))
                .or_else(|_| DecodingKey::from_ed_pem(&pem))
                .map_err(|_| AuthConfigError::BadPublicKey(path.clone()))?;
            keys.push(key);
        }
        if config.mode == AuthMode::Jwt && keys.is_empty() {
            return Err(AuthConfigError::NoKeys);
        }
        let mut base = Validation {
            leeway: config.leeway_secs,
            validate_nbf: true,
            ..Validation::default()
        };
        base.set_required_spec_claims(&["exp", "sub"]);
        if let Some(aud) = &config.audience {
            base.set_audience(&[aud]);
        } else {
            base.validate_aud = false;
        }
        if let Some(iss) = &config.issuer {
            base.set_issuer(&[iss]);
        }
        let keys = keys
            .into_iter()
            .map(|key| {
                let mut validation = base.clone();
                validation.algorithms = key.family().algorithms().to_vec();
                (key, validation)
            })
            .collect();
        Ok(Self {
            mode: config.mode,
            keys,
            leeway_secs: config.leeway_secs,
            max_token_age_secs: config.max_token_age_secs,
            personal_namespace: config.personal_namespace,
        })
    }

    /// Whether tokens are verified at all.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Verifies `token`.
    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        if self.mode == AuthMode::None {
            return Ok(Identity::service(token.to_owned()));
        }
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Malformed("not a valid JWT".into()))?;
        let family = header.alg.family();
        let mut last = AuthError::Malformed("the algorithm is not accepted".into());
        for (key, validation) in self.keys.iter().filter(|(k, _)| k.family() == family) {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return self.identity(data.claims),
                Err(e) => {
                    last = refusal(e.kind());
                    // Only a signature mismatch is worth trying the next key.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// Verifies the token a session presents to replace its current one:
    /// it must be valid and name the same user.
    pub fn refresh(&self, current: &Identity, token: &str) -> Result<Identity, AuthError> {
        let identity = self.authenticate(token)?;
        if identity.user != current.user {
            return Err(AuthError::OtherUser);
        }
        Ok(identity)
    }

    fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        if let Some(max_age) = self.max_token_age_secs {
            let iat = claims
                .iat
                .ok_or_else(|| AuthError::Malformed("the iat claim is missing".into()))?;
            let now = jsonwebtoken::get_current_timestamp();
            if now.saturating_sub(iat) > max_age.saturating_add(self.leeway_secs) {
                return Err(AuthError::TooOld);
            }
        }
        let parse = |patterns: &[String]| -> Vec<Grant> {
            patterns.iter().filter_map(|p| Grant::parse(p)).collect()
        };
        let mut subscribe = parse(&claims.subscribe);
        let mut publish = parse(&claims.publish);
        if self.personal_namespace
            && let Some(own) = Grant::parse(&format!("user.{}.>", claims.sub))
        {
            subscribe.push(own.clone());
            publish.push(own);
        }
        Ok(Identity {
            owner: claims.sub.as_str().into(),
            user: claims.sub,
            expires_at: Some(claims.exp),
            server: claims.role.as_deref() == Some("server"),
            device: claims.device,
            subscribe: Rights::Only(subscribe),
            publish: Rights::Only(publish),
        })
    }
}

/// What a verification failure tells the client: the kind of problem,
/// nothing about the keys.
fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => AuthError::WrongAudienceOrIssuer,
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Malformed(format!("the {claim} claim is missing"))
        }
        ErrorKind::InvalidAlgorithm => AuthError::Malformed("the algorithm is not accepted".into()),
        _ => AuthError::Malformed("not a valid JWT".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> ChannelName {
        ChannelName::new(name).expect("name")
    }

    #[test]
    fn grants_match_like_subjects() {
        let exact = Grant::parse("chat.123").expect("parses");
        assert!(exact.matches(&ch("chat.123")));
        assert!(!exact.matches(&ch("chat.1234")));
        assert!(!exact.matches(&ch("chat.123.x")));
        let one = Grant::parse("user.42.*").expect("parses");
        assert!(one.matches(&ch("user.42.inbox")));
        assert!(!one.matches(&ch("user.42")));
        assert!(!one.matches(&ch("user.42.inbox.x")));
        let rest = Grant::parse("news.>").expect("parses");
        assert!(rest.matches(&ch("news.sport")));
        assert!(rest.matches(&ch("news.sport.football")));
        assert!(!rest.matches(&ch("news")));
        assert!(Grant::parse("news.>.x").is_none());
        assert!(Grant::parse("a..b").is_none());
    }

    #[test]
    fn jwt_mode_needs_a_long_enough_key() {
        let config = AuthConfig {
            mode: AuthMode::Jwt,
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authenticator::from_config(&config),
            Err(AuthConfigError::NoKeys)
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short");
        std::fs::write(&short, "too short").expect("write");
        let config = AuthConfig {
            mode: AuthMode::Jwt,
            hs256_secret_files: vec![short],
            ..AuthConfig::default()
        };
        assert!(matches!(
            Authenticator::from_config(&config),
            Err(AuthConfigError::WeakSecret(_))
        ));
    }
}
