//! Sign-in through an identity provider, as a person meets it: a `drover server` whose config
//! file has `[oidc]`, a stand-in provider on loopback (discovery, JWKS, the device flow's two
//! endpoints; its ES256 tokens signed by the test), `drover login --oidc`, then client commands
//! that carry the stored token.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use serde_json::{Value, json};

use crate::harness::Cluster;

const CLIENT_ID: &str = "drover-cli";
const DEVICE_CODE: &str = "device-code-1";
const USER_CODE: &str = "WDJB-MJHT";

/// The stand-in identity provider.
#[derive(Clone)]
struct Idp {
    url: String,
    key: Arc<sig::EcdsaKeyPair>,
    /// Token requests so far: the first is answered `authorization_pending`.
    polls: Arc<AtomicUsize>,
    /// The scopes the device request asked for.
    scope: Arc<Mutex<String>>,
}

impl Idp {
    /// Starts the provider on a loopback port, on a runtime of its own thread (the test
    /// itself drives processes synchronously).
    fn start() -> Idp {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("p-256 key");
        let key = Arc::new(sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("p-256 key"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the provider");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let url = format!("http://{}", listener.local_addr().expect("provider address"));
        let idp = Idp { url, key, polls: Arc::default(), scope: Arc::default() };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/device", post(device))
            .route("/token", post(token))
            .with_state(idp.clone());
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                axum::serve(listener, app).await.expect("provider serves");
            });
        });
        idp
    }

    /// An ID token for alice, a member of `fx-team`, valid for ten minutes.
    fn id_token(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
        let claims = json!({"iss": self.url, "aud": CLIENT_ID, "sub": "alice@example.com", "iat": now,
            "exp": now + 600, "groups": ["fx-team", "everyone"]});
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"));
        let message =
            format!("{}.{}", part(&json!({"alg": "ES256", "typ": "JWT", "kid": "k1"})), part(&claims));
        let signature = self.key.sign(&SystemRandom::new(), message.as_bytes()).expect("sign");
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

async fn discovery(State(idp): State<Idp>) -> Json<Value> {
    Json(json!({"issuer": idp.url, "jwks_uri": format!("{}/jwks", idp.url),
        "device_authorization_endpoint": format!("{}/device", idp.url),
        "token_endpoint": format!("{}/token", idp.url)}))
}

async fn jwks(State(idp): State<Idp>) -> Json<Value> {
    let point = idp.key.public_key().as_ref();
    Json(json!({"keys": [{"kty": "EC", "kid": "k1", "use": "sig", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..])}]}))
}

async fn device(State(idp): State<Idp>, Form(form): Form<Vec<(String, String)>>) -> impl IntoResponse {
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    if field("client_id") != CLIENT_ID {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_client"})));
    }
    *idp.scope.lock().expect("scope") = field("scope");
    (
        StatusCode::OK,
        Json(json!({"device_code": DEVICE_CODE, "user_code": USER_CODE,
            "verification_uri": format!("{}/activate", idp.url), "expires_in": 60, "interval": 1})),
    )
}

async fn token(State(idp): State<Idp>, Form(form): Form<Vec<(String, String)>>) -> impl IntoResponse {
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    if field("grant_type") != "urn:ietf:params:oauth:grant-type:device_code"
        || field("device_code") != DEVICE_CODE
        || field("client_id") != CLIENT_ID
    {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant"})));
    }
    if idp.polls.fetch_add(1, Ordering::SeqCst) == 0 {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "authorization_pending"})));
    }
    (
        StatusCode::OK,
        Json(json!({"id_token": idp.id_token(), "access_token": "opaque-access-token",
            "token_type": "Bearer", "expires_in": 600})),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn login_with_the_device_flow_then_use_the_stored_token() {
    let idp = Idp::start();
    let config_dir = tempfile::tempdir().expect("temp dir");
    let config = config_dir.path().join("drover.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[oidc]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n[oidc.roles]\nfx-team = \"fx:submitter\"\n",
            idp.url
        ),
    )
    .expect("write config");
    let c = Cluster::start_with(0, 1, &["--config", &config.display().to_string()], &[]);
    c.ok(&["projects", "create", "fx"]);

    // The login carries no key: DROVER_KEY (the harness's operator key) is removed.
    let out = c
        .command(&["login", "--oidc", "--issuer", &idp.url, "--client-id", CLIENT_ID])
        .env_remove("DROVER_KEY")
        .output()
        .expect("run drover login");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "login failed\nstdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains(&format!("{}/activate", idp.url)) && stderr.contains(USER_CODE), "{stderr}");
    assert!(stdout.contains("as alice@example.com (submitter of project fx"), "{stdout}");
    assert_eq!(idp.polls.load(Ordering::SeqCst), 2, "one pending answer, then the token");
    assert_eq!(*idp.scope.lock().expect("scope"), "openid");
    let stored = std::fs::read_to_string(c.path("credentials")).expect("credentials file");
    assert!(stored.contains("token = \"eyJ") && !stored.contains("key ="), "{stored}");

    // Client commands now carry the token: alice submits to fx and lists it, and is refused
    // elsewhere as for a missing project.
    let job = c.job_file(
        "fx.yaml",
        "version: 1\nname: shot\nproject: fx\ntasks:\n  - name: t\n    command: \"true\"\n",
    );
    let out = c.drover_as(None, &["submit", "-o", "json", &job.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let submitted: Value = serde_json::from_slice(&out.stdout).expect("submit json");
    let out = c.drover_as(None, &["ps", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("ps json");
    let ids: Vec<&Value> = listed.as_array().expect("ps list").iter().map(|j| &j["id"]).collect();
    assert_eq!(ids, [&submitted["id"]], "{listed}");
    let other = c.job_file(
        "default.yaml",
        "version: 1\nname: shot\nproject: default\ntasks:\n  - name: t\n    command: \"true\"\n",
    );
    let out = c.drover_as(None, &["submit", &other.display().to_string()]);
    assert!(!out.status.success() && text(&out.stderr).contains("not found"), "{}", text(&out.stderr));

    // A login at a provider that cannot be reached fails, and leaves the stored token alone.
    let out = c
        .command(&["login", "--oidc", "--issuer", "http://127.0.0.1:1", "--client-id", CLIENT_ID])
        .env_remove("DROVER_KEY")
        .output()
        .expect("run drover login");
    assert!(!out.status.success() && text(&out.stderr).contains("cannot reach the identity provider"));
    assert_eq!(std::fs::read_to_string(c.path("credentials")).expect("credentials"), stored);
}
