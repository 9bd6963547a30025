//! Sign-in through an OpenID Connect identity provider: a stand-in provider served by the test
//! on loopback (discovery document and JWKS), tokens the test signs itself (RS256 with a fixed
//! test key, ES256 with keys made at run time), and a real server in-process that checks them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use drover_proto as pb;
use drover_server::auth::oidc::OidcConfig;
use drover_store::Store;
use drover_store::conformance::{job, task};
use ring::rand::SystemRandom;
use ring::signature::{self as sig, KeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tonic::Code;

/// The audience the server requires.
const AUDIENCE: &str = "drover";
/// How soon the server may fetch the keys again for an unknown key id (short for the test).
/// Long enough that two calls in a row fall within it even on a loaded machine.
const REFETCH: Duration = Duration::from_secs(1);

/// A signing key of the stand-in provider.
enum Signer {
    Rsa(sig::RsaKeyPair),
    Ec(sig::EcdsaKeyPair),
}

/// A key with its id.
struct TestKey {
    kid: String,
    signer: Signer,
}

impl TestKey {
    /// The fixed RSA test key (ring cannot make RSA keys).
    fn rsa(kid: &str) -> TestKey {
        let pem = include_bytes!("fixtures/oidc-rsa-test-key.pem");
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).expect("test key pem");
        let pair = sig::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("test rsa key");
        TestKey { kid: kid.into(), signer: Signer::Rsa(pair) }
    }

    /// A fresh P-256 key.
    fn ec(kid: &str) -> TestKey {
        let rng = SystemRandom::new();
        let alg = &sig::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = sig::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = sig::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        TestKey { kid: kid.into(), signer: Signer::Ec(pair) }
    }

    /// The public key as a JWK.
    fn jwk(&self) -> Value {
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        match &self.signer {
            Signer::Rsa(pair) => {
                let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                    "n": b64(&public.n), "e": b64(&public.e)})
            }
            Signer::Ec(pair) => {
                // An uncompressed point: 0x04, then x and y of 32 bytes each.
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
        }
    }

    /// A JWT of `claims` signed with this key.
    fn sign(&self, claims: &Value) -> String {
        let alg = match self.signer {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
        };
        sign_raw(&json!({"alg": alg, "typ": "JWT", "kid": self.kid}), claims, |message| match &self.signer {
            Signer::Rsa(pair) => {
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(&sig::RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut out).unwrap();
                out
            }
            Signer::Ec(pair) => pair.sign(&SystemRandom::new(), message).unwrap().as_ref().to_vec(),
        })
    }
}

/// `header.claims.signature`, base64url without padding.
fn sign_raw(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let part = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let message = format!("{}.{}", part(header), part(claims));
    let signature = sign(message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// The stand-in provider: what it publishes and how often its keys were fetched.
#[derive(Clone)]
struct Idp {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
}

impl Idp {
    /// Serves the discovery document and the JWKS on a loopback port.
    async fn start(keys: Vec<Value>) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let idp = Idp { url, keys: Arc::new(Mutex::new(keys)), fetches: Arc::default() };
        let app = axum::Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(|State(idp): State<Idp>| async move {
                    Json(json!({"issuer": idp.url, "jwks_uri": format!("{}/jwks", idp.url),
                        "device_authorization_endpoint": format!("{}/device", idp.url),
                        "token_endpoint": format!("{}/token", idp.url)}))
                }),
            )
            .route(
                "/jwks",
                get(|State(idp): State<Idp>| async move {
                    idp.fetches.fetch_add(1, Ordering::SeqCst);
                    Json(json!({"keys": *idp.keys.lock().unwrap()}))
                }),
            )
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Claims of a good token for `sub` with `groups`, valid for five minutes.
    fn claims(&self, sub: &str, groups: &[&str]) -> Value {
        let now = now();
        json!({"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300, "groups": groups})
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The server's `[oidc]`: three groups mapped to roles.
fn config(idp: &Idp) -> OidcConfig {
    let roles = [("fx-team", "fx:submitter"), ("fx-viewers", "fx:viewer"), ("ops", "operator")];
    OidcConfig {
        issuer: idp.url.clone(),
        audience: AUDIENCE.into(),
        claim: "groups".into(),
        roles: roles.iter().map(|(g, r)| (g.to_string(), r.parse().unwrap())).collect::<BTreeMap<_, _>>(),
        client_id: Some("drover-cli".into()),
        refetch_interval: REFETCH,
    }
}

/// A job plan for `project` that no node runs.
fn plan(project: &str) -> String {
    let mut plan = job(vec![task("t", &[])]);
    plan.project = project.into();
    plan.tasks[0].constraints.insert("never".into(), "matches".into());
    serde_json::to_string(&plan).unwrap()
}

/// `WhoAmI` with `token`.
async fn who(server: &common::Server, token: &str) -> Result<pb::WhoAmIResponse, tonic::Status> {
    Ok(server.client(Some(token)).await.who_am_i(pb::WhoAmIRequest {}).await?.into_inner())
}

/// Asserts that `token` is refused as unauthenticated with a message holding `why`, and that
/// the message quotes nothing of the token.
async fn refused(server: &common::Server, token: &str, why: &str) {
    let err = who(server, token).await.expect_err(why);
    assert_eq!(err.code(), Code::Unauthenticated, "{why}: {err:?}");
    assert!(err.message().contains(why), "expected {why:?} in {:?}", err.message());
    for secret in ["alice", "ghost", token.split('.').next().unwrap_or_default()] {
        assert!(!err.message().contains(secret), "the message leaks {secret:?}: {}", err.message());
    }
}

#[tokio::test]
async fn provider_tokens_are_checked_and_their_groups_become_roles() {
    let rsa = TestKey::rsa("rsa-1");
    let ec = TestKey::ec("ec-1");
    let idp = Idp::start(vec![rsa.jwk(), ec.jwk()]).await;
    let server = common::Server::start_with(|c| c.oidc = Some(config(&idp))).await;
    let mut op = server.operator().await;
    for p in ["fx", "qa"] {
        op.create_project(pb::CreateProjectRequest { name: p.into() }).await.unwrap();
    }
    let mut qa_plan = job(vec![task("t", &[])]);
    qa_plan.project = "qa".into();
    qa_plan.tasks[0].constraints.insert("never".into(), "matches".into());
    let qa_job = server.store.submit(&qa_plan, "", "qa.yaml", 1).await.unwrap();
    assert_eq!(idp.fetches(), 0, "nothing is fetched before the first token");

    // Good tokens, RS256 and ES256: the keys are fetched once and kept.
    let alice = rsa.sign(&idp.claims("alice", &["fx-team", "unmapped"]));
    assert!(alice.len() > 512, "provider tokens are longer than drover keys");
    let me = who(&server, &alice).await.unwrap();
    assert_eq!(
        (me.kind.as_str(), me.id.as_str(), me.role.as_str(), me.project.as_str()),
        ("oidc", "alice", "submitter", "fx")
    );
    let bob = ec.sign(&idp.claims("bob", &["fx-viewers"]));
    assert_eq!(who(&server, &bob).await.unwrap().role, "viewer");
    assert_eq!(idp.fetches(), 1);

    // Groups decide what each may do: alice submits to fx, bob only reads it, and qa's job
    // answers both as a missing one.
    let mut alice_client = server.client(Some(&alice)).await;
    let submit = |project: &str| pb::SubmitRequest {
        plan_json: plan(project),
        filename: "m.yaml".into(),
        ..Default::default()
    };
    let fx_job = alice_client.submit(submit("fx")).await.unwrap().into_inner().job_id;
    let err = alice_client.submit(submit("qa")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut bob_client = server.client(Some(&bob)).await;
    let got = bob_client.get_job(pb::GetJobRequest { job_id: fx_job }).await.unwrap().into_inner();
    assert_eq!(got.project, "fx");
    let err = bob_client.submit(submit("fx")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for client in [&mut alice_client, &mut bob_client] {
        let err = client.get_job(pb::GetJobRequest { job_id: qa_job }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    // The strongest role of several groups wins; a mapped operator group is the operator.
    let both = ec.sign(&idp.claims("carol", &["fx-viewers", "fx-team"]));
    assert_eq!(who(&server, &both).await.unwrap().role, "submitter");
    let ops = rsa.sign(&idp.claims("dave", &["ops"]));
    let mut ops_client = server.client(Some(&ops)).await;
    ops_client.get_job(pb::GetJobRequest { job_id: qa_job }).await.unwrap();

    // The HTTP API takes the same tokens.
    let http = reqwest::Client::new();
    let url = format!("{}/v1/jobs/{fx_job}", server.http);
    let answer = http.get(&url).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer =
        http.get(format!("{}/v1/jobs/{qa_job}", server.http)).bearer_auth(&bob).send().await.unwrap();
    assert_eq!(answer.status(), 404);

    // Refused tokens, each with its reason.
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims["exp"] = json!(now() - 3600);
    refused(&server, &rsa.sign(&claims), "it expired").await;
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims["aud"] = json!("another-service");
    refused(&server, &ec.sign(&claims), "another audience").await;
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims["iss"] = json!("https://idp.example.com");
    refused(&server, &rsa.sign(&claims), "another identity provider").await;
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims["nbf"] = json!(now() + 3600);
    refused(&server, &rsa.sign(&claims), "not valid yet").await;
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims.as_object_mut().unwrap().remove("exp");
    refused(&server, &rsa.sign(&claims), "lacks one of the claims").await;
    refused(&server, &rsa.sign(&idp.claims("ghost", &["unmapped"])), "maps to no project").await;
    refused(&server, &rsa.sign(&idp.claims("ghost", &[])), "maps to no project").await;
    // A signature that does not verify: alice's token with bob's signature.
    let forged = format!("{}.{}", alice.rsplit_once('.').unwrap().0, bob.rsplit_once('.').unwrap().1);
    refused(&server, &forged, "signature does not verify").await;
    // An HMAC token "signed" with the public key, and an unsigned one, are not accepted.
    let hs =
        sign_raw(&json!({"alg": "HS256", "kid": "rsa-1"}), &idp.claims("alice", &["ops"]), |_| vec![1; 32]);
    refused(&server, &hs, "not signed with RS256 or ES256").await;
    let none = sign_raw(&json!({"alg": "none"}), &idp.claims("alice", &["ops"]), |_| vec![0]);
    refused(&server, &none, "not a valid JWT").await;
    assert_eq!(idp.fetches(), 1, "no refused token made the server fetch keys");

    // An unknown key id makes the server fetch the set again (it may have rotated), but at most
    // once per interval, so made-up key ids cannot make it hammer the provider. The interval
    // since the first fetch is let run out first, so that the count does not depend on how fast
    // the calls above went.
    tokio::time::sleep(REFETCH + Duration::from_millis(100)).await;
    let rotated = TestKey::ec("ec-2");
    let early = rotated.sign(&idp.claims("alice", &["fx-team"]));
    refused(&server, &early, "unknown key id").await;
    assert_eq!(idp.fetches(), 2, "an unknown key id fetches the set again");
    refused(&server, &early, "unknown key id").await;
    assert_eq!(idp.fetches(), 2, "not again within the interval");
    // Once the provider publishes the new key (and withdraws the RSA one), a token naming it
    // makes the server fetch the set again, and it is accepted.
    *idp.keys.lock().unwrap() = vec![ec.jwk(), rotated.jwk()];
    tokio::time::sleep(REFETCH + Duration::from_millis(100)).await;
    assert_eq!(who(&server, &early).await.unwrap().id, "alice");
    assert_eq!(idp.fetches(), 3);
    // The withdrawn key's tokens stop working.
    tokio::time::sleep(REFETCH + Duration::from_millis(100)).await;
    refused(&server, &alice, "unknown key id").await;
    assert_eq!(idp.fetches(), 4);

    // API keys keep working beside sign-in.
    assert_eq!(who(&server, &server.operator).await.unwrap().kind, "key");
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_makes_calls_unavailable_not_open() {
    let ec = TestKey::ec("ec-1");
    let idp = Idp::start(vec![ec.jwk()]).await;
    // The server trusts an issuer on a port where nothing listens.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut config = config(&idp);
    config.issuer = issuer.clone();
    let server = common::Server::start_with(|c| c.oidc = Some(config)).await;
    let mut claims = idp.claims("alice", &["fx-team"]);
    claims["iss"] = json!(issuer);
    let err = who(&server, &ec.sign(&claims)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("cannot be fetched"), "{}", err.message());
    // API keys do not depend on the provider.
    assert_eq!(who(&server, &server.operator).await.unwrap().kind, "key");
}
