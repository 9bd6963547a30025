//! The OAuth 2.0 device authorization grant (RFC 8628) against an OpenID Connect provider,
//! which `drover login --oidc` runs: the person opens a URL on any device, enters a short code
//! and signs in there, while this process polls the provider until it hands out the tokens.
//! Two HTTP calls and a poll loop, so no OAuth library.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The grant type of the token requests (RFC 8628 §3.4).
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// How long one request to the provider may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of one answer from the provider.
const MAX_ANSWER: usize = 1 << 20;
/// How much longer to wait between polls when the provider says `slow_down` (RFC 8628 §3.5).
const SLOW_DOWN: Duration = Duration::from_secs(5);

/// What the provider handed out.
#[derive(Debug, Default)]
pub struct Tokens {
    /// The ID token: a JWT about the person, meant for this client.
    pub id_token: Option<String>,
    /// The access token, which some providers issue as a JWT meant for an API audience.
    pub access_token: Option<String>,
}

impl Tokens {
    /// The tokens the server may take as a bearer, the ID token first: it always is a JWT and
    /// carries the client id as its audience, which is what servers configure by default.
    pub fn candidates(&self) -> Vec<String> {
        let jwt = |t: &&String| t.split('.').count() == 3;
        let mut out: Vec<String> = self.id_token.iter().filter(jwt).cloned().collect();
        out.extend(
            self.access_token.iter().filter(jwt).filter(|t| Some(*t) != self.id_token.as_ref()).cloned(),
        );
        out
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    device_authorization_endpoint: Option<String>,
    token_endpoint: String,
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    // Some providers (Google) spell it `verification_url`.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    interval: Option<u64>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// Signs the person in at `issuer` as client `client_id`, asking for `scope`: prints where to go
/// and which code to enter (on stderr), then waits until they did.
pub async fn device_flow(issuer: &str, client_id: &str, scope: &str) -> Result<Tokens> {
    drover_server::auth::oidc::check_issuer(issuer).map_err(|e| anyhow!("--issuer: {e}"))?;
    let http =
        reqwest::Client::builder().timeout(REQUEST_TIMEOUT).build().context("cannot make an http client")?;
    let issuer = issuer.trim_end_matches('/');
    let discovery_url = format!("{issuer}/.well-known/openid-configuration");
    let (status, body) = read(http.get(&discovery_url)).await?;
    if !status.is_success() {
        bail!("the identity provider answered {status} for {discovery_url}; is --issuer right?");
    }
    let doc: Discovery = parse(&body, &discovery_url)?;
    if doc.issuer.trim_end_matches('/') != issuer {
        bail!("the identity provider calls itself {}; pass exactly that as --issuer", doc.issuer);
    }
    let device_endpoint = doc.device_authorization_endpoint.ok_or_else(|| {
        anyhow!("the identity provider at {issuer} does not offer the device flow (no device_authorization_endpoint)")
    })?;
    for endpoint in [&device_endpoint, &doc.token_endpoint] {
        drover_server::auth::oidc::check_issuer(endpoint)
            .map_err(|e| anyhow!("the identity provider's endpoint {endpoint} cannot be used: {e}"))?;
    }

    let form = [("client_id", client_id), ("scope", scope)];
    let (status, body) = read(http.post(&device_endpoint).form(&form)).await?;
    if !status.is_success() {
        let refusal: TokenAnswer = parse(&body, &device_endpoint)?;
        bail!("the identity provider refused to start the sign-in: {}", describe(&refusal, status));
    }
    let auth: DeviceAuthorization = parse(&body, &device_endpoint)?;
    eprintln!("to sign in, open {} and enter the code {}", auth.verification_uri, auth.user_code);
    if let Some(complete) = &auth.verification_uri_complete {
        eprintln!("  (or open {complete})");
    }
    eprintln!("waiting for you to sign in...");

    let deadline = Instant::now() + Duration::from_secs(auth.expires_in);
    let mut interval = Duration::from_secs(auth.interval.unwrap_or(5).max(1));
    let form =
        [("grant_type", DEVICE_GRANT), ("device_code", auth.device_code.as_str()), ("client_id", client_id)];
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() >= deadline {
            bail!("the code expired before the sign-in finished; run `drover login --oidc` again");
        }
        let (status, body) = match read(http.post(&doc.token_endpoint).form(&form)).await {
            Ok(answer) => answer,
            Err(e) => {
                // A network hiccup is not the end of the sign-in; the code is good until the
                // deadline. Back off as for `slow_down`.
                eprintln!("{e:#}; trying again");
                interval += SLOW_DOWN;
                continue;
            }
        };
        let answer: TokenAnswer = parse(&body, &doc.token_endpoint)?;
        match answer.error.as_deref() {
            None if status.is_success() => {
                return Ok(Tokens { id_token: answer.id_token, access_token: answer.access_token });
            }
            Some("authorization_pending") => {}
            Some("slow_down") => interval += SLOW_DOWN,
            Some("expired_token") => {
                bail!("the code expired before the sign-in finished; run `drover login --oidc` again")
            }
            Some("access_denied") => bail!("the sign-in was declined at the identity provider"),
            _ => bail!("the identity provider refused the sign-in: {}", describe(&answer, status)),
        }
    }
}

/// When a JWT expires (ms since the epoch), from its `exp` claim; `None` when it does not say.
/// Read without checking the signature: it only tells the person how long the login lasts.
pub fn expiry_ms(token: &str) -> Option<i64> {
    let claims = token.split('.').nth(1)?;
    let claims =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    claims.get("exp")?.as_i64()?.checked_mul(1000)
}

/// An OAuth error answer as one line.
fn describe(answer: &TokenAnswer, status: reqwest::StatusCode) -> String {
    match (&answer.error, &answer.error_description) {
        (Some(e), Some(d)) => format!("{e} ({d})"),
        (Some(e), None) => e.clone(),
        _ => format!("it answered {status}"),
    }
}

/// Sends a request and reads at most [`MAX_ANSWER`] bytes of the answer.
async fn read(request: reqwest::RequestBuilder) -> Result<(reqwest::StatusCode, Vec<u8>)> {
    let mut response = request.send().await.context("cannot reach the identity provider")?;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.context("the identity provider's answer broke off")? {
        if body.len() + chunk.len() > MAX_ANSWER {
            bail!("the identity provider's answer is larger than 1 MiB");
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// Parses an answer from `url` as JSON.
fn parse<T: DeserializeOwned>(body: &[u8], url: &str) -> Result<T> {
    serde_json::from_slice(body)
        .with_context(|| format!("the identity provider's answer from {url} is not what OIDC says"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_expiry_and_candidates() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", b64(r#"{"alg":"ES256"}"#), b64(r#"{"exp":1700000000}"#));
        assert_eq!(expiry_ms(&token), Some(1_700_000_000_000));
        assert_eq!(expiry_ms("opaque"), None);
        let tokens = Tokens { id_token: Some(token.clone()), access_token: Some("opaque".into()) };
        assert_eq!(tokens.candidates(), std::slice::from_ref(&token));
        let tokens = Tokens { id_token: None, access_token: Some(token.clone()) };
        assert_eq!(tokens.candidates(), [token]);
    }
}
