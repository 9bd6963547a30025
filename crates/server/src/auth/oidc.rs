//! Sign-in for people through an OpenID Connect identity provider.
//!
//! A person signs in with `drover login --oidc` (the device flow, which the CLI runs against the
//! provider itself) and then sends the provider's signed token, a JWT, as the bearer of every
//! call. [`Oidc::verify`] checks it against the provider's published keys and turns it into a
//! [`Caller::Person`] whose grants come from one claim of the token (`groups` unless configured
//! otherwise) through the configured mapping: every mapped value adds its grant, and the
//! strongest role per project wins. A token that maps to nothing is refused rather than let in
//! with no rights, so a person learns at sign-in, not at the first call, that they lack a role.
//!
//! **Keys.** The provider's discovery document names its key set (JWKS). The keys are fetched on
//! first use and kept. A token naming a key id the cache lacks makes the verifier fetch the set
//! again, because providers rotate by publishing a new key before signing with it; such
//! refetches happen at most once per [`OidcConfig::refetch_interval`], so tokens with made-up
//! key ids cannot make the server hammer the provider. A set older than [`MAX_KEY_AGE`] is
//! fetched again on the next call, so a key the provider withdrew stops working within that
//! time. Fetches are serialised: one caller fetches, the others wait for its result.
//!
//! **Crypto.** jsonwebtoken parses tokens and checks `iss`, `aud`, `exp` and `nbf`; the signature
//! itself is checked with ring, the workspace's one crypto library, through a small
//! [`CryptoProvider`] (jsonwebtoken's own backends are aws-lc and RustCrypto). Only RS256 and
//! ES256 are accepted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use drover_core::Role;
use drover_core::access::valid_project_name;
use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Validation};
use serde_json::{Map, Value};
use tonic::Status;

use super::{Caller, Grants};

/// The claim whose values map to roles unless the configuration names another.
pub const DEFAULT_CLAIM: &str = "groups";
/// Default of [`OidcConfig::refetch_interval`].
pub const DEFAULT_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a fetched key set is trusted before it is fetched again.
pub const MAX_KEY_AGE: Duration = Duration::from_secs(3600);
/// Clock skew allowed on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 30;
/// How long one request to the identity provider may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a discovery document or key set.
const MAX_DOCUMENT: usize = 1 << 20;
/// Most bytes of a token in an `authorization` header. Provider tokens carrying many groups
/// are large, far beyond a Drover credential.
pub(crate) const MAX_TOKEN: usize = 16 << 10;

/// What one claim value grants: the operator role, or a role in one project.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RoleGrant {
    /// The cluster operator.
    Operator,
    /// A project role.
    Project {
        /// The project.
        project: String,
        /// The role in it (never `operator`).
        role: Role,
    },
}

impl FromStr for RoleGrant {
    type Err = OidcError;

    /// `operator`, or `PROJECT:ROLE` with a project role (`fx:submitter`).
    fn from_str(s: &str) -> Result<RoleGrant, OidcError> {
        if s == "operator" {
            return Ok(RoleGrant::Operator);
        }
        let bad = || OidcError::BadGrant(s.to_owned());
        let (project, role) = s.split_once(':').ok_or_else(bad)?;
        if !valid_project_name(project) {
            return Err(bad());
        }
        match role.parse::<Role>() {
            Ok(role) if role.is_project_role() => {
                Ok(RoleGrant::Project { project: project.to_owned(), role })
            }
            _ => Err(bad()),
        }
    }
}

impl TryFrom<String> for RoleGrant {
    type Error = OidcError;

    fn try_from(s: String) -> Result<RoleGrant, OidcError> {
        s.parse()
    }
}

impl From<RoleGrant> for String {
    fn from(g: RoleGrant) -> String {
        g.to_string()
    }
}

impl fmt::Display for RoleGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleGrant::Operator => f.write_str("operator"),
            RoleGrant::Project { project, role } => write!(f, "{project}:{role}"),
        }
    }
}

/// How the server trusts an OpenID Connect identity provider (`[oidc]` in the config file).
#[derive(Debug, Clone, PartialEq)]
pub struct OidcConfig {
    /// The provider's issuer URL, exactly as its tokens' `iss` claim writes it.
    pub issuer: String,
    /// The `aud` a token must carry (ID tokens carry the client id).
    pub audience: String,
    /// The claim whose values map to roles, like `groups`: a string or an array of strings.
    pub claim: String,
    /// Claim value → what it grants.
    pub roles: BTreeMap<String, RoleGrant>,
    /// The client id `drover login --oidc` uses; only shown in the server's log, so operators
    /// can hand the login command on.
    pub client_id: Option<String>,
    /// The shortest time between two fetches of the key set for tokens naming unknown keys.
    pub refetch_interval: Duration,
}

/// Why a configuration or the identity provider cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// A role mapping that is neither `operator` nor `PROJECT:ROLE`.
    #[error(
        "`{0}` is not a grant; write `operator` or PROJECT:ROLE with a project role, like `fx:submitter`"
    )]
    BadGrant(String),
    /// An issuer that is not an https URL (http is allowed on loopback only).
    #[error("`{0}` is not an https URL (http is allowed on loopback addresses only)")]
    BadIssuer(String),
    /// The provider could not be reached, or answered with an error.
    #[error("cannot fetch {what} from {url}: {detail}")]
    Fetch {
        /// What was fetched: the discovery document or the key set.
        what: &'static str,
        /// From where.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The provider answered with a document Drover cannot use.
    #[error("the {what} at {url} is not usable: {detail}")]
    Document {
        /// The discovery document or the key set.
        what: &'static str,
        /// Where it came from.
        url: String,
        /// What is wrong with it.
        detail: String,
    },
}

/// Checks that `url` may name an identity provider: https, or http on a loopback address
/// (for tests and local providers). Tokens and keys must not travel in plain text.
pub fn check_issuer(url: &str) -> Result<(), OidcError> {
    let bad = || OidcError::BadIssuer(url.to_owned());
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    let host = parsed.host_str().unwrap_or_default();
    let ip = host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>();
    let loopback = host == "localhost" || ip.is_ok_and(|ip| ip.is_loopback());
    let ok = !host.is_empty()
        && parsed.query().is_none()
        && parsed.fragment().is_none()
        && (parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback));
    if ok { Ok(()) } else { Err(bad()) }
}

/// The part of an `authorization` header that goes to the OIDC verifier: a bearer that looks
/// like a JWT (three base64url parts, a JSON header). Drover's own credentials never do.
pub(crate) fn bearer_jwt(header: Option<&str>) -> Option<&str> {
    let token = header?.strip_prefix("Bearer ").or_else(|| header?.strip_prefix("bearer "))?.trim();
    let parts: Vec<&str> = token.split('.').collect();
    let base64url =
        |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (token.len() <= MAX_TOKEN && token.starts_with("eyJ") && parts.len() == 3 && parts.iter().all(base64url))
        .then_some(token)
}

/// The grants a token's claims carry: every value of `claim` that `roles` maps adds its grant.
pub(crate) fn grants_of(
    claims: &Map<String, Value>,
    claim: &str,
    roles: &BTreeMap<String, RoleGrant>,
) -> Grants {
    // A claim named with dots (`realm_access.roles`) is looked up as a path when no top-level
    // claim has the whole name; some providers namespace claims with URLs that hold dots.
    let value = claims.get(claim).or_else(|| {
        let mut parts = claim.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    });
    let values: Vec<&str> = match value {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut grants = Grants::default();
    for grant in values.into_iter().filter_map(|v| roles.get(v)) {
        match grant {
            RoleGrant::Operator => grants.operator = true,
            RoleGrant::Project { project, role } => {
                let held = grants.projects.entry(project.clone()).or_insert(*role);
                *held = (*held).max(*role);
            }
        }
    }
    grants
}

/// The verifier of one identity provider's tokens, with its cached keys.
pub struct Oidc {
    config: OidcConfig,
    /// The keys in use. Replaced whole after a fetch, so a verification never sees half a set.
    keys: RwLock<Arc<KeySet>>,
    /// Held while fetching, so concurrent calls with an unknown key make one fetch. Holds when
    /// the last fetch was attempted (successful or not), which rate-limits refetches.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl fmt::Debug for Oidc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Oidc").field("issuer", &self.config.issuer).finish_non_exhaustive()
    }
}

/// The provider's keys by key id (`None` for a key published without one).
#[derive(Default)]
struct KeySet {
    keys: HashMap<Option<String>, Key>,
    /// When the set was fetched; `None` before the first fetch.
    fetched: Option<Instant>,
}

/// One usable key: its algorithm (from its type) and the key itself.
#[derive(Clone)]
struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

impl Oidc {
    /// A verifier for `config`. Nothing is fetched until the first token arrives, so a provider
    /// that is down does not keep the server from starting (API keys still work).
    pub fn new(config: OidcConfig) -> Oidc {
        install_crypto();
        match &config.client_id {
            Some(client) => tracing::info!(
                issuer = %config.issuer,
                "oidc sign-in on; people run: drover login --oidc --server URL --issuer {} --client-id {client}",
                config.issuer
            ),
            None => tracing::info!(issuer = %config.issuer, "oidc sign-in on"),
        }
        Oidc {
            config,
            keys: RwLock::new(Arc::new(KeySet::default())),
            fetching: tokio::sync::Mutex::new(None),
        }
    }

    /// The caller a token stands for, or why it is refused (`unauthenticated`; `unavailable`
    /// when the provider's keys cannot be fetched). Messages never quote the token.
    pub(crate) async fn verify(&self, token: &str) -> Result<Caller, Status> {
        let refused = |why: &str| Status::unauthenticated(format!("the sign-in token was refused: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| refused("it is not a valid JWT"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(refused("it is not signed with RS256 or ES256"));
        }
        let key = self.key(header.kid.as_deref()).await?.ok_or_else(|| {
            refused("it is signed by a key the identity provider does not publish (unknown key id)")
        })?;
        if key.alg != header.alg {
            return Err(refused("its algorithm does not match its key"));
        }
        let mut validation = Validation::new(key.alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation).map_err(|e| {
            // Only the reason is logged: jsonwebtoken's errors can quote claim values.
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "it expired; run `drover login --oidc` again",
                ErrorKind::InvalidAudience => "it is meant for another audience than this server",
                ErrorKind::InvalidIssuer => {
                    "it was issued by another identity provider than this server trusts"
                }
                ErrorKind::ImmatureSignature => "it is not valid yet (are the clocks right?)",
                ErrorKind::InvalidSignature => "its signature does not verify",
                ErrorKind::MissingRequiredClaim(_) => "it lacks one of the claims exp, iss, aud, sub",
                _ => "it is not a valid JWT",
            };
            tracing::debug!(why, "oidc token refused");
            refused(why)
        })?;
        let subject = data.claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty());
        let subject = subject.ok_or_else(|| refused("its subject (sub) is not a string"))?;
        let grants = grants_of(&data.claims, &self.config.claim, &self.config.roles);
        if !grants.operator && grants.projects.is_empty() {
            return Err(Status::unauthenticated(format!(
                "your identity maps to no project: none of your `{}` values has a role on this server; \
                 ask an operator to map one in [oidc.roles]",
                self.config.claim
            )));
        }
        Ok(Caller::Person { id: format!("oidc {subject}"), grants })
    }

    /// The key set in use.
    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The key with id `kid`, fetching the key set when the cache lacks it or is old. `None`
    /// when the provider does not publish it.
    async fn key(&self, kid: Option<&str>) -> Result<Option<Key>, Status> {
        let usable = |set: &KeySet| {
            let fresh = set.fetched.is_some_and(|t| t.elapsed() < MAX_KEY_AGE);
            fresh.then(|| find(set, kid).cloned()).flatten()
        };
        if let Some(key) = usable(&self.current()) {
            return Ok(Some(key));
        }
        let mut last_fetch = self.fetching.lock().await;
        // Another call may have fetched while this one waited for the lock.
        let current = self.current();
        if let Some(key) = usable(&current) {
            return Ok(Some(key));
        }
        let unavailable = || {
            Status::unavailable(
                "cannot check the sign-in token: the identity provider's keys cannot be fetched",
            )
        };
        if last_fetch.is_some_and(|t| t.elapsed() < self.config.refetch_interval) {
            // Fetched a moment ago: answer from what is there rather than fetch again.
            return match current.fetched {
                Some(_) => Ok(find(&current, kid).cloned()),
                None => Err(unavailable()),
            };
        }
        *last_fetch = Some(Instant::now());
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(issuer = %self.config.issuer, keys = set.keys.len(), "fetched the identity provider's keys");
                let set = Arc::new(set);
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = set.clone();
                Ok(find(&set, kid).cloned())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the identity provider's keys");
                // An old set still serves the keys it has until the provider is back.
                match find(&current, kid) {
                    Some(key) => Ok(Some(key.clone())),
                    None => Err(unavailable()),
                }
            }
        }
    }

    /// Fetches the discovery document, then the key set it names.
    async fn fetch(&self) -> Result<KeySet, OidcError> {
        let issuer = self.config.issuer.trim_end_matches('/');
        let discovery = format!("{issuer}/.well-known/openid-configuration");
        let what = "discovery document";
        let document = |detail: String| OidcError::Document { what, url: discovery.clone(), detail };
        let client = reqwest::Client::builder().timeout(FETCH_TIMEOUT).build().map_err(|e| {
            OidcError::Fetch { what, url: discovery.clone(), detail: format!("no http client: {e}") }
        })?;
        let doc = get_json(&client, what, &discovery).await?;
        let named = doc.get("issuer").and_then(Value::as_str).unwrap_or_default();
        if named.trim_end_matches('/') != issuer {
            return Err(document(format!(
                "it names the issuer `{named}`; set oidc.issuer to exactly what the provider names"
            )));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| document("it has no jwks_uri".into()))?;
        check_issuer(jwks_uri).map_err(|_| document(format!("its jwks_uri `{jwks_uri}` is not https")))?;
        let what = "key set";
        let jwks = get_json(&client, what, jwks_uri).await?;
        let keys = parse_jwks(&jwks);
        if keys.is_empty() {
            return Err(OidcError::Document {
                what,
                url: jwks_uri.to_owned(),
                detail: "it holds no RS256 or ES256 signing key".into(),
            });
        }
        Ok(KeySet { keys, fetched: Some(Instant::now()) })
    }
}

/// GETs a JSON document of at most [`MAX_DOCUMENT`] bytes.
async fn get_json(client: &reqwest::Client, what: &'static str, url: &str) -> Result<Value, OidcError> {
    let fetch = |detail: String| OidcError::Fetch { what, url: url.to_owned(), detail };
    let mut response = client.get(url).send().await.map_err(|e| fetch(e.to_string()))?;
    if !response.status().is_success() {
        return Err(fetch(format!("it answered {}", response.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| fetch(e.to_string()))? {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(OidcError::Document {
                what,
                url: url.to_owned(),
                detail: "it is larger than 1 MiB".into(),
            });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| OidcError::Document {
        what,
        url: url.to_owned(),
        detail: format!("it is not JSON: {e}"),
    })
}

/// The RS256 and ES256 signing keys of a JWKS document. Keys of other types, curves or
/// algorithms, and encryption keys, are skipped: one odd key must not make the set unusable.
fn parse_jwks(doc: &Value) -> HashMap<Option<String>, Key> {
    let mut keys = HashMap::new();
    for jwk in doc.get("keys").and_then(Value::as_array).into_iter().flatten() {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        if field("use").is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match (field("kty"), field("crv")) {
            (Some("RSA"), _) => field("n")
                .zip(field("e"))
                .and_then(|(n, e)| DecodingKey::from_rsa_components(n, e).ok())
                .map(|key| Key { alg: Algorithm::RS256, key }),
            (Some("EC"), Some("P-256")) => field("x")
                .zip(field("y"))
                .and_then(|(x, y)| DecodingKey::from_ec_components(x, y).ok())
                .map(|key| Key { alg: Algorithm::ES256, key }),
            _ => None,
        };
        let Some(key) = key else { continue };
        let alg_name = if key.alg == Algorithm::RS256 { "RS256" } else { "ES256" };
        if field("alg").is_some_and(|a| a != alg_name) {
            continue;
        }
        keys.insert(field("kid").map(str::to_owned), key);
    }
    keys
}

/// Looks `kid` up in `set`; a token without a key id uses the set's only key.
fn find<'a>(set: &'a KeySet, kid: Option<&str>) -> Option<&'a Key> {
    match kid {
        Some(kid) => set.keys.get(&Some(kid.to_owned())),
        None if set.keys.len() == 1 => set.keys.values().next(),
        None => set.keys.get(&None),
    }
}

/// jsonwebtoken's crypto, backed by ring: verification of RS256 and ES256 only.
static RING: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: ring_verifier,
    // Only JWK thumbprints and key conversions use these; the verifier needs none of them.
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes [`RING`] jsonwebtoken's provider for this process.
fn install_crypto() {
    // An error means a provider is installed already: this one, by an earlier verifier.
    let _ = RING.install_default();
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Err(ErrorKind::Provider("the server signs no tokens".into()).into())
}

fn ring_verifier(alg: &Algorithm, key: &DecodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtVerifier>> {
    match alg {
        Algorithm::RS256 | Algorithm::ES256 => Ok(Box::new(RingVerifier { alg: *alg, key: key.clone() })),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

/// Checks one signature with ring.
struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl jsonwebtoken::signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), jsonwebtoken::signature::Error> {
        use ring::signature as sig;
        let verified = match (self.alg, self.key.kind()) {
            (Algorithm::RS256, DecodingKeyKind::RsaModulusExponent { n, e }) => {
                sig::RsaPublicKeyComponents { n, e }.verify(
                    &sig::RSA_PKCS1_2048_8192_SHA256,
                    message,
                    signature,
                )
            }
            (Algorithm::ES256, DecodingKeyKind::SecretOrDer(point)) => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point).verify(message, signature)
            }
            _ => return Err(jsonwebtoken::signature::Error::new()),
        };
        verified.map_err(|_| jsonwebtoken::signature::Error::new())
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(pairs: &[(&str, &str)]) -> BTreeMap<String, RoleGrant> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect()
    }

    #[test]
    fn role_strings() {
        assert_eq!("operator".parse::<RoleGrant>(), Ok(RoleGrant::Operator));
        assert_eq!(
            "fx:submitter".parse::<RoleGrant>(),
            Ok(RoleGrant::Project { project: "fx".into(), role: Role::Submitter })
        );
        for bad in ["", "fx", "fx:", ":admin", "fx:operator", "fx:boss", "Fx:admin", "fx:admin:x", "admin"] {
            let err = bad.parse::<RoleGrant>().unwrap_err();
            assert!(err.to_string().contains("PROJECT:ROLE"), "{bad}: {err}");
        }
        let grant: RoleGrant = serde_json::from_value(Value::String("fx:admin".into())).unwrap();
        assert_eq!(String::from(grant.clone()), "fx:admin");
        assert!(serde_json::from_value::<RoleGrant>(Value::String("fx".into())).is_err());
    }

    #[test]
    fn claims_map_to_grants() {
        let map = roles(&[
            ("fx-team", "fx:submitter"),
            ("fx-leads", "fx:admin"),
            ("viewers", "fx:viewer"),
            ("ops", "operator"),
            ("qa", "qa:viewer"),
        ]);
        let claims = |v: Value| match serde_json::json!({ "sub": "u", "groups": v }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        // The strongest role per project wins, whatever the order.
        let g = grants_of(
            &claims(serde_json::json!(["viewers", "fx-leads", "fx-team", "qa", "other"])),
            "groups",
            &map,
        );
        assert!(!g.operator);
        assert_eq!(g.projects, BTreeMap::from([("fx".into(), Role::Admin), ("qa".into(), Role::Viewer)]));
        // A single string counts as one value.
        let g = grants_of(&claims(Value::String("fx-team".into())), "groups", &map);
        assert_eq!(g.projects, BTreeMap::from([("fx".into(), Role::Submitter)]));
        assert!(grants_of(&claims(serde_json::json!(["ops"])), "groups", &map).operator);
        // Nothing mapped, a missing claim, or a claim of another shape grant nothing.
        for v in [serde_json::json!(["other"]), serde_json::json!(7), serde_json::json!([1, 2])] {
            assert_eq!(grants_of(&claims(v), "groups", &map), Grants::default());
        }
        assert_eq!(grants_of(&claims(serde_json::json!(["ops"])), "roles", &map), Grants::default());
        // Dotted names reach into nested claims.
        let nested = match serde_json::json!({ "realm_access": { "roles": ["fx-team"] } }) {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(grants_of(&nested, "realm_access.roles", &map).projects.get("fx"), Some(&Role::Submitter));
    }

    #[test]
    fn issuers_must_be_https_off_loopback() {
        for good in [
            "https://idp.example.com",
            "https://idp.example.com/realms/x",
            "http://127.0.0.1:8080",
            "http://localhost:1/x",
            "http://[::1]:9",
        ] {
            assert!(check_issuer(good).is_ok(), "{good}");
        }
        for bad in [
            "http://idp.example.com",
            "idp.example.com",
            "https://idp.example.com/?a=b",
            "ftp://127.0.0.1",
            "http://10.0.0.1",
        ] {
            assert!(check_issuer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_jwt_shaped_bearers_go_to_the_verifier() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln";
        assert_eq!(bearer_jwt(Some(&format!("Bearer {jwt}"))), Some(jwt));
        let key = format!("Bearer drv_{}_{}", "0".repeat(16), "a".repeat(64));
        for other in [
            None,
            Some(key.as_str()),
            Some("Basic eyJ.a.b"),
            Some("Bearer eyJa.b"),
            Some("Bearer eyJa.b.c d"),
            Some("Bearer eyJa..c"),
        ] {
            assert_eq!(bearer_jwt(other), None, "{other:?}");
        }
        let huge = format!("Bearer eyJ{}.a.b", "a".repeat(MAX_TOKEN));
        assert_eq!(bearer_jwt(Some(&huge)), None);
    }

    #[test]
    fn jwks_keeps_signing_keys_it_can_use() {
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "pss", "alg": "PS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "e", "crv": "P-256", "x": "AQAB", "y": "AQAB"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AQAB", "y": "AQAB"},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": "AQAB"},
            {"kty": "RSA", "kid": "broken"}
        ]});
        let keys = parse_jwks(&doc);
        let mut kids: Vec<_> = keys.keys().flatten().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["e", "r"]);
        assert_eq!(keys[&Some("e".into())].alg, Algorithm::ES256);
    }
}
