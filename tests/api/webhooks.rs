//! Webhooks end to end: every signed fixture under fixtures/ replayed against a server with
//! the fixture's clock, settings and phone; the carriers' official vectors (fixtures/vectors)
//! through the signature functions; and the edges of the webhook routes.
//!
//! The fixture files are written by `regenerate_fixtures` below (run it by hand with
//! `cargo test --test api webhooks::regenerate_fixtures -- --ignored`), and
//! `fixtures_on_disk_are_what_the_generator_writes` keeps the two in step.

use std::collections::BTreeMap;
use std::path::PathBuf;

use callgate::carriers::plivo::signature::{self as plivo, Method, PlivoKey};
use callgate::carriers::telnyx::signature as telnyx;
use callgate::carriers::twilio::signature::{self as twilio, TwilioKey};
use callgate::carriers::vobiz::signature::{self as vobiz, VobizKey};
use callgate::clock::{rfc3339, Clock};
use callgate::domain::{Carrier, OrgId, PhoneId, E164};
use callgate::fixtures::{self, Expect, Fixture, SignRequest, VobizForm};
use callgate::store::{PhoneRecord, PreviousCredential};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::helpers::*;

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn load(name: &str) -> Fixture {
    let path = fixtures_dir().join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A client that keeps no idle connections, so stopping a server never waits on one.
fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap()
}

/// A server as the fixture needs it: its clock, its public URL, its extra settings.
async fn serve(f: &Fixture) -> (TestApp, Org) {
    let mut opts =
        Options::default().clock(Clock::pinned(f.now * 1000)).env("CALLGATE_PUBLIC_URL", f.public_url.clone());
    for (k, v) in &f.env {
        opts = opts.env(k, v.clone());
    }
    let app = spawn_with(opts).await;
    let org = app.create_org("Fixtures").await;
    install_phone(&app, &org, f).await;
    (app, org)
}

/// Stores the fixture's phone under its exact id, with its credential (and previous one)
/// sealed by the server's vault.
async fn install_phone(app: &TestApp, org: &Org, f: &Fixture) -> PhoneRecord {
    let org_id = OrgId::parse(&org.id).unwrap();
    let carrier = f.phone.carrier_or(f.carrier);
    let now_ms = f.now * 1000;
    let seal = |cred: &Value| {
        let new = callgate::vault::validate(carrier.as_str(), cred).expect("a valid fixture credential");
        app.state.vault.seal(&org_id, &new, None, now_ms)
    };
    let secret = seal(&f.credential);
    let previous = f.phone.previous_credential.as_ref().map(seal);
    let phone = PhoneRecord {
        id: f.phone.id.clone(),
        org_id: org_id.clone(),
        provider: carrier,
        number: f.phone.number.clone(),
        provider_number_id: "fixture".into(),
        friendly_name: None,
        label: None,
        config: f.phone.config.to_stored(),
        credential: secret.id.clone(),
        previous_credential: previous.as_ref().map(|p| PreviousCredential {
            secret_id: p.id.clone(),
            valid_until_ms: f.phone.previous_valid_until.expect("previous_valid_until") * 1000,
        }),
        billing_status: "byok".into(),
        monthly_cost_cents: 0,
        provider_configuration: None,
        connection_id: None,
        created_at_ms: now_ms,
        updated_at_ms: now_ms,
    };
    app.state.store.phone_insert(&phone, Some(&secret)).unwrap().expect("the fixture's number is free");
    if let Some(prev) = &previous {
        assert!(app.state.store.phone_update(&phone, Some(prev)).unwrap());
    }
    app.state.commit.commit().await.unwrap();
    phone
}

async fn events(app: &TestApp, org: &Org) -> Vec<Value> {
    let res = client().get(app.url("/events")).bearer_auth(&org.key).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    v["events"].as_array().unwrap().clone()
}

/// What an event's `params` must show for a fixture, built the plain way: Telnyx's body as
/// JSON; otherwise the query's then the form's fields, a repeated key as an array, Exotel's
/// token left out; a non-form body as its JSON (or as text).
fn expected_params(f: &Fixture) -> Value {
    let is_form = f.method == "POST"
        && f.headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("application/x-www-form-urlencoded"));
    if f.carrier == Carrier::Telnyx || (!is_form && !f.body.is_empty()) {
        return serde_json::from_str(&f.body).unwrap_or_else(|_| Value::String(f.body.clone()));
    }
    let query = f.path.split_once('?').map_or("", |(_, q)| q);
    let body = if is_form { f.body.as_str() } else { "" };
    let mut map = serde_json::Map::new();
    for part in [query, body] {
        for (k, v) in url::form_urlencoded::parse(part.as_bytes()) {
            if f.carrier == Carrier::Exotel && k == "token" {
                continue;
            }
            match map.get_mut(k.as_ref()) {
                Some(Value::Array(a)) => a.push(Value::from(v.as_ref())),
                Some(one) => *one = json!([one.take(), v.as_ref()]),
                None => {
                    map.insert(k.into_owned(), Value::from(v.as_ref()));
                }
            }
        }
    }
    Value::Object(map)
}

async fn run_fixture(f: &Fixture) -> Result<(), String> {
    let (app, org) = serve(f).await;
    let result = async {
        let client = client();
        for i in 0..f.repeat.max(1) {
            let got = fixtures::send(&client, &app.base, f).await.map_err(|e| format!("no answer: {e:#}"))?;
            fixtures::check(&f.expect, &got)
                .map_err(|(want, have)| format!("send {} of {}: expected {want} got {have}", i + 1, f.repeat))?;
        }
        let recorded = events(&app, &org).await;
        if recorded.len() != f.expect.recorded {
            return Err(format!("expected {} recorded event(s), found {}", f.expect.recorded, recorded.len()));
        }
        if let Some(ev) = recorded.first() {
            let want = expected_params(f);
            if ev["params"] != want || ev.get("form").is_some() {
                return Err(format!("stored params {} are not what was sent: {want}", ev["params"]));
            }
        }
        if let Some(by) = &f.expect.verified_by {
            let got = &recorded[0]["verified_by"]["credential"];
            if got != by.as_str() {
                return Err(format!("expected verified_by {by}, got {got}"));
            }
        }
        Ok(())
    }
    .await;
    app.stop().await;
    result
}

#[tokio::test]
async fn every_fixture_replays_as_expected() {
    let all = fixtures::load_dir(&fixtures_dir()).unwrap();
    let mut per_carrier: BTreeMap<Carrier, usize> = BTreeMap::new();
    for (_, f) in &all {
        *per_carrier.entry(f.carrier).or_default() += 1;
    }
    for c in Carrier::ALL {
        assert!(per_carrier.get(&c).copied().unwrap_or(0) >= 10, "too few {c} fixtures: {per_carrier:?}");
    }
    let mut failures = Vec::new();
    for (name, f) in &all {
        if let Err(e) = run_fixture(f).await {
            failures.push(format!("FAIL {name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[tokio::test]
async fn replay_reports_pass_and_fail_per_fixture() {
    let good = load("plivo/status_form");
    let (app, _org) = serve(&good).await;
    let mut wrong = good.clone();
    wrong.expect = Expect::rejected(403, "invalid_signature");
    let set = vec![("plivo/status_form".to_owned(), good), ("expects_a_rejection".to_owned(), wrong)];
    let verdicts = fixtures::replay(&set, &app.base, fixtures::ReplayOptions::default()).await;
    let lines: Vec<String> = verdicts.iter().map(ToString::to_string).collect();
    assert_eq!(lines, ["PASS plivo/status_form", "FAIL expects_a_rejection expected 403 invalid_signature got 200"]);
    app.stop().await;
}

#[tokio::test]
async fn telnyx_fixtures_replay_with_fresh_timestamps() {
    // The server's clock is "now"; the fixtures were signed for a day in 2024.
    let now = 1_800_000_000;
    for name in ["telnyx/call_answered", "telnyx/stale_future_301", "telnyx/boundary_past_300", "telnyx/tampered_body"]
    {
        let f = load(name);
        let fresh = fixtures::with_fresh_timestamp(&f, now).unwrap();
        let (app, _org) = serve(&fresh).await;
        // Sent as is, the old timestamp is stale; refreshed, it means what it meant.
        let stale = fixtures::send(&client(), &app.base, &f).await.unwrap();
        assert_eq!(stale.error_code.as_deref(), Some("stale_timestamp"), "{name}");
        let v = fixtures::replay(
            &[(name.to_owned(), f.clone())],
            &app.base,
            fixtures::ReplayOptions { fresh_timestamps: true, now: Some(now) },
        )
        .await;
        assert!(v[0].passed, "{}", v[0]);
        app.stop().await;
    }
}

#[tokio::test]
async fn telnyx_events_arriving_together_are_each_judged_by_their_own_signature() {
    // Signatures that reach the check in the same turn are verified as a batch; one bad
    // signature among them must refuse only its own request.
    let base = load("telnyx/call_answered");
    let (app, org) = serve(&base).await;
    let good_seed = "11".repeat(32);
    let wrong_seed = "33".repeat(32);
    let request = |i: usize, seed: &str, credential: Value| {
        let body = telnyx_event(
            "call.answered",
            &format!("b1a2c3d4-0000-4000-8000-{i:012}"),
            Some("incoming"),
            "+13125550100",
            base.phone.number.as_str(),
        );
        let f = sign(SignRequest {
            carrier: Some(Carrier::Telnyx),
            credential,
            method: "POST".into(),
            url: format!("{}{}", base.public_url, base.path),
            body,
            seed: Some(seed.to_owned()),
            timestamp: Some(base.now),
            now: Some(base.now),
            number: Some(base.phone.number.to_string()),
            phone_id: Some(base.phone.id.clone()),
            ..SignRequest::default()
        });
        assert_eq!(f.path, base.path);
        f
    };
    let bad = |i: usize| i % 5 == 3;
    let wrong_key = json!({"api_key": "KEYwrong", "public_key": fixtures::public_key_base64(&wrong_seed).unwrap()});
    let sent: Vec<Fixture> = (0..60)
        .map(|i| {
            let mut f = request(i, &good_seed, base.credential.clone());
            if bad(i) {
                // Well formed, fresh, for this very message, by another key.
                let other = request(i, &wrong_seed, wrong_key.clone());
                assert_eq!(other.body, f.body);
                f.headers.insert("telnyx-signature-ed25519".into(), other.headers["telnyx-signature-ed25519"].clone());
            }
            f
        })
        .collect();
    let http = client();
    let outcomes = futures_util::future::join_all(sent.iter().map(|f| fixtures::send(&http, &app.base, f))).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let outcome = outcome.unwrap();
        if bad(i) {
            assert_eq!(
                (outcome.status, outcome.error_code.as_deref()),
                (403, Some("invalid_signature")),
                "request {i}"
            );
        } else {
            assert_eq!(outcome.status, 200, "request {i}: {}", outcome.body);
        }
    }
    let stored = events(&app, &org).await;
    assert_eq!(stored.len(), 48);
    let mut ids: Vec<String> = stored.iter().map(|e| e["params"]["data"]["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    let expected: Vec<String> =
        (0..60).filter(|i| !bad(*i)).map(|i| format!("b1a2c3d4-0000-4000-8000-{i:012}")).collect();
    assert_eq!(ids, expected);
    let text = http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("callgate_telnyx_signatures_batched_total 60\n"), "{text}");
    let batches = metric_value(&text, "callgate_telnyx_signature_batches_total");
    assert!((1..=60).contains(&batches), "{batches} batches");
    app.stop().await;
}

#[tokio::test]
async fn a_telnyx_event_is_refused_alike_whether_or_not_its_number_is_imported() {
    // Telnyx names the number in the unverified body: a refusal that told an imported number
    // from another would let anyone ask which numbers are here.
    let base = load("telnyx/call_answered");
    let (app, org) = serve(&base).await;
    let wrong_seed = "33".repeat(32);
    let wrong_key = json!({"api_key": "KEYwrong", "public_key": fixtures::public_key_base64(&wrong_seed).unwrap()});
    let unknown = "+13125550111";
    let request = |to: &str, timestamp: i64| {
        let body =
            telnyx_event("call.answered", "b1a2c3d4-0000-4000-8000-00000000f001", Some("incoming"), "+13125550100", to);
        sign(SignRequest {
            carrier: Some(Carrier::Telnyx),
            credential: wrong_key.clone(),
            method: "POST".into(),
            url: format!("{}{}", base.public_url, base.path),
            body,
            seed: Some(wrong_seed.clone()),
            timestamp: Some(timestamp),
            now: Some(base.now),
            number: Some(base.phone.number.to_string()),
            phone_id: Some(base.phone.id.clone()),
            ..SignRequest::default()
        })
    };
    type Spoil = fn(&mut Fixture);
    let cases: [(&str, i64, Spoil, &str); 4] = [
        ("another key's signature", base.now, |_| {}, "invalid_signature"),
        ("a stale timestamp", base.now - 301, |_| {}, "stale_timestamp"),
        (
            "a signature that is not base64",
            base.now,
            |f| drop(f.headers.insert("telnyx-signature-ed25519".into(), "abc".into())),
            "invalid_signature",
        ),
        ("no timestamp", base.now, |f| drop(f.headers.remove("telnyx-timestamp")), "missing_signature"),
    ];
    let http = client();
    for (case, timestamp, spoil, code) in cases {
        let mut answers = Vec::new();
        for to in [base.phone.number.as_str(), unknown] {
            let mut f = request(to, timestamp);
            spoil(&mut f);
            let got = fixtures::send(&http, &app.base, &f).await.unwrap();
            answers.push((got.status, got.error_code, got.body));
        }
        assert_eq!((answers[0].0, answers[0].1.as_deref()), (403, Some(code)), "{case}");
        assert_eq!(answers[0], answers[1], "{case}: imported, then unknown");
    }
    assert!(events(&app, &org).await.is_empty());
    let text = http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    // Only the well-formed, fresh event reaches the lookup; the others stop before it.
    let unknown_seen = metric(&text, "callgate_webhooks_rejected_total", "carrier=\"telnyx\",reason=\"unknown_phone\"");
    assert_eq!(unknown_seen, 1);
    app.stop().await;
}

/// Vobiz's documented signature covers the URL (without its query) and the nonce, not the
/// fields: an event verified that way says so, for whoever acts on its fields.
#[tokio::test]
async fn a_vobiz_event_says_whether_its_signature_covered_its_fields() {
    for (name, scheme) in [("vobiz/status_form_sdk", "vobiz-v3"), ("vobiz/status_form_docs", "vobiz-v3-url-only")] {
        let f = load(name);
        let (app, org) = serve(&f).await;
        let got = fixtures::send(&client(), &app.base, &f).await.unwrap();
        assert_eq!(got.status, 200, "{name}: {}", got.body);
        let stored = events(&app, &org).await;
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0]["verified_by"]["scheme"], scheme, "{name}");
        app.stop().await;
    }
}

fn run_cli(args: Vec<String>) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(args)
        .env("CALLGATE_LOG", "warn")
        .output()
        .expect("run callgate")
}

#[tokio::test]
async fn the_cli_signs_a_fixture_and_replays_it() {
    let f = load("plivo/status_form");
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("credential.json");
    std::fs::write(&cred, f.credential.to_string()).unwrap();
    let args: Vec<String> = [
        "fixtures",
        "sign",
        "--carrier",
        "plivo",
        "--credential",
        cred.to_str().unwrap(),
        "--method",
        "POST",
        "--url",
        &format!("{}{}", f.public_url, f.path),
        "--body",
        &f.body,
        "--nonce",
        &f.headers["X-Plivo-Signature-V3-Nonce"],
        "--now",
        &f.now.to_string(),
    ]
    .map(str::to_owned)
    .into();
    let out = tokio::task::spawn_blocking(move || run_cli(args)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let signed: Fixture = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(Fixture { description: f.description.clone(), ..signed.clone() }, f);

    let cases = dir.path().join("cases");
    std::fs::create_dir(&cases).unwrap();
    std::fs::write(cases.join("a_signed.json"), serde_json::to_string_pretty(&signed).unwrap()).unwrap();
    let mut wrong = signed.clone();
    wrong.expect = Expect::rejected(403, "invalid_signature");
    std::fs::write(cases.join("b_wrong.json"), serde_json::to_string_pretty(&wrong).unwrap()).unwrap();

    let (app, org) = serve(&signed).await;
    let args = vec!["replay".to_owned(), cases.display().to_string(), "--target".to_owned(), app.base.clone()];
    let out = tokio::task::spawn_blocking(move || run_cli(args)).await.unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout, "PASS a_signed\nFAIL b_wrong expected 403 invalid_signature got 200\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 2 fixtures failed"));
    // The same signed request twice: the second is a replay, still 200, still one event.
    assert_eq!(events(&app, &org).await.len(), 1);
    let base = app.base.clone();
    app.stop().await;

    // Nothing listens there any more: said once, after the first fixture, not once a fixture.
    let replay =
        |target: &str| vec!["replay".to_owned(), cases.display().to_string(), "--target".into(), target.into()];
    let out = run_cli(replay(&base));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("FAIL a_signed expected 200 got no answer: ") && stdout.lines().count() == 1,
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("nothing answers at {base}")), "{stderr}");
    assert_eq!(out.status.code(), Some(1));
    // A target that is no base URL is a usage error, before anything is sent.
    for target in ["garbage", "ftp://127.0.0.1:1", "http:///x", "http://127.0.0.1:1/?a=b"] {
        let out = run_cli(replay(target));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("invalid value '{target}' for '--target")), "{stderr}");
        assert_eq!((out.status.code(), out.stdout.len()), (Some(2), 0), "{target}");
    }

    let out = run_cli(vec!["fixtures".into(), "sign".into(), "--carrier".into(), "plivo".into()]);
    assert!(!out.status.success());
}

// ---- official vectors -------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    carrier: Carrier,
    #[allow(dead_code)]
    source: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Vector {
    name: String,
    scheme: String,
    method: Option<String>,
    url: Option<String>,
    /// The URL variant that was signed, when it differs from the one called (Twilio ports).
    signed_url: Option<String>,
    #[serde(default)]
    params: Vec<(String, String)>,
    token: Option<String>,
    nonce: Option<String>,
    body: Option<String>,
    body_sha256: Option<String>,
    seed: Option<String>,
    public_key: Option<String>,
    timestamp: Option<String>,
    signature: String,
    signed_string: Option<String>,
}

fn check_vector(v: &Vector) -> Result<(), String> {
    let s = |o: &Option<String>, what: &str| o.clone().ok_or_else(|| format!("{what} missing"));
    let fail = |what: &str| Err(what.to_owned());
    match v.scheme.as_str() {
        "plivo-v3" | "plivo-v2" | "vobiz-v3-docs" | "vobiz-v3-sdk" | "vobiz-v2" => {
            let url = s(&v.url, "url")?;
            let token = s(&v.token, "token")?;
            let nonce = s(&v.nonce, "nonce")?;
            let method = match s(&v.method, "method")?.as_str() {
                "GET" => Method::Get,
                _ => Method::Post,
            };
            let pk = PlivoKey::new(token.as_bytes());
            let vk = VobizKey::new(token.as_bytes());
            let wrong = format!("{token}x");
            let (signed, sig, ok, ok_wrong) = match v.scheme.as_str() {
                "plivo-v3" => (
                    plivo::v3_signed_string(method, &url, &v.params, &nonce).unwrap(),
                    plivo::sign_v3(&pk, method, &url, &v.params, &nonce).unwrap(),
                    plivo::verify_v3(&pk, method, &url, &v.params, &nonce, &v.signature),
                    plivo::verify_v3(&PlivoKey::new(wrong.as_bytes()), method, &url, &v.params, &nonce, &v.signature),
                ),
                "plivo-v2" => (
                    plivo::v2_signed_string(&url, &nonce),
                    plivo::sign_v2(&pk, &url, &nonce),
                    plivo::verify_v2(&pk, &url, &nonce, &v.signature),
                    plivo::verify_v2(&PlivoKey::new(wrong.as_bytes()), &url, &nonce, &v.signature),
                ),
                "vobiz-v3-docs" | "vobiz-v3-sdk" => (
                    if v.scheme == "vobiz-v3-docs" {
                        vobiz::v3_docs_signed_string(&url, &nonce)
                    } else {
                        vobiz::v3_sdk_signed_string(method, &url, &v.params, &nonce).unwrap()
                    },
                    if v.scheme == "vobiz-v3-docs" {
                        vobiz::sign_v3_docs(&vk, &url, &nonce)
                    } else {
                        vobiz::sign_v3_sdk(&vk, method, &url, &v.params, &nonce).unwrap()
                    },
                    vobiz::verify_v3(&vk, method, &url, &v.params, &nonce, &v.signature),
                    vobiz::verify_v3(&VobizKey::new(wrong.as_bytes()), method, &url, &v.params, &nonce, &v.signature),
                ),
                _ => (
                    vobiz::v2_signed_string(&url, &nonce),
                    vobiz::sign_v2(&vk, &url, &nonce),
                    vobiz::verify_v2(&vk, &url, &nonce, &v.signature),
                    vobiz::verify_v2(&VobizKey::new(wrong.as_bytes()), &url, &nonce, &v.signature),
                ),
            };
            if v.signed_string.as_ref().is_some_and(|want| *want != signed) {
                return Err(format!("signed string differs: {signed}"));
            }
            if sig != v.signature {
                return Err(format!("signed {sig}"));
            }
            if !ok {
                return fail("does not verify");
            }
            if ok_wrong {
                return fail("verifies with the wrong token");
            }
        }
        "twilio-form" | "twilio-get" | "twilio-body" => {
            let url = s(&v.url, "url")?;
            let signing_url = v.signed_url.clone().unwrap_or_else(|| url.clone());
            let key = TwilioKey::new(s(&v.token, "token")?.as_bytes());
            let wrong = TwilioKey::new(format!("{}x", s(&v.token, "token")?).as_bytes());
            let (sig, ok, ok_wrong) = match v.scheme.as_str() {
                "twilio-form" => {
                    if let Some(want) = &v.signed_string {
                        let got = twilio::signed_string(&signing_url, &v.params);
                        if *want != got {
                            return Err(format!("signed string differs: {got}"));
                        }
                    }
                    (
                        twilio::sign(&key, &signing_url, &v.params),
                        twilio::verify_form(&key, &url, &v.params, &v.signature),
                        twilio::verify_form(&wrong, &url, &v.params, &v.signature),
                    )
                }
                "twilio-get" => (
                    twilio::sign_url(&key, &signing_url),
                    twilio::verify_get(&key, &url, &v.signature),
                    twilio::verify_get(&wrong, &url, &v.signature),
                ),
                _ => {
                    let body = s(&v.body, "body")?;
                    if twilio::body_sha256_hex(body.as_bytes()) != s(&v.body_sha256, "body_sha256")? {
                        return fail("body hash differs");
                    }
                    let (base, _) = url.split_once("&bodySHA256=").or_else(|| url.split_once("?bodySHA256=")).unwrap();
                    if twilio::url_with_body_hash(base, body.as_bytes()) != url {
                        return fail("bodySHA256 is not appended as Twilio does");
                    }
                    let tampered = format!("{body} ");
                    if twilio::verify_raw_body(&key, &url, tampered.as_bytes(), &v.signature) {
                        return fail("verifies a changed body");
                    }
                    (
                        twilio::sign_url(&key, &signing_url),
                        twilio::verify_raw_body(&key, &url, body.as_bytes(), &v.signature),
                        twilio::verify_raw_body(&wrong, &url, body.as_bytes(), &v.signature),
                    )
                }
            };
            if sig != v.signature {
                return Err(format!("signed {sig}"));
            }
            if !ok {
                return fail("does not verify");
            }
            if ok_wrong {
                return fail("verifies with the wrong token");
            }
        }
        "telnyx-ed25519" => {
            let seed = s(&v.seed, "seed")?;
            let ts = s(&v.timestamp, "timestamp")?;
            let body = s(&v.body, "body")?;
            if twilio::body_sha256_hex(body.as_bytes()) != s(&v.body_sha256, "body_sha256")? {
                return fail("body hash differs");
            }
            if fixtures::public_key_base64(&seed).unwrap() != s(&v.public_key, "public_key")? {
                return fail("the seed's public key differs");
            }
            let sig = telnyx::sign(&fixtures::signing_key(&seed).unwrap(), &ts, body.as_bytes());
            if sig != v.signature {
                return Err(format!("signed {sig}"));
            }
            let key = telnyx::TelnyxKey::from_base64(&s(&v.public_key, "public_key")?).unwrap();
            let at: i64 = ts.parse().unwrap();
            if telnyx::verify(&key, Some(&v.signature), Some(&ts), body.as_bytes(), at + 10).is_err() {
                return fail("does not verify");
            }
            if telnyx::verify(&key, Some(&v.signature), Some(&ts), format!("{body} ").as_bytes(), at).is_ok() {
                return fail("verifies a changed body");
            }
        }
        other => return Err(format!("unknown scheme {other}")),
    }
    Ok(())
}

#[test]
fn official_vectors_check_through_the_signature_functions() {
    let dir = fixtures_dir().join(fixtures::VECTORS_DIR);
    let mut seen = BTreeMap::new();
    let mut failures = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files {
        let file: VectorFile = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        *seen.entry(file.carrier).or_insert(0) += file.vectors.len();
        for v in &file.vectors {
            if let Err(e) = check_vector(v) {
                failures.push(format!("{} {}: {e}", file.carrier, v.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(seen.get(&Carrier::Plivo), Some(&10));
    assert_eq!(seen.get(&Carrier::Vobiz), Some(&3));
    assert_eq!(seen.get(&Carrier::Twilio), Some(&8));
    assert_eq!(seen.get(&Carrier::Telnyx), Some(&2));
}

// ---- the routes' edges --------------------------------------------------------------------

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let f = load("plivo/status_form");
    let (app, org) = serve(&f).await;
    let url = app.url(&f.path);
    let send = |len: usize| {
        client()
            .post(url.clone())
            .header("content-type", fixtures::FORM)
            .header("x-plivo-signature-v3", &f.headers["X-Plivo-Signature-V3"])
            .header("x-plivo-signature-v3-nonce", &f.headers["X-Plivo-Signature-V3-Nonce"])
            .body(format!("a={}", "b".repeat(len - 2)))
            .send()
    };
    let res = send(64 * 1024 + 1).await.unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(error_code(res).await, "payload_too_large");
    // At the limit the body is read and judged on its signature.
    let res = send(64 * 1024).await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(error_code(res).await, "invalid_signature");
    assert!(events(&app, &org).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    // No Content-Length to refuse up front: the limit holds while the body streams in.
    let f = load("plivo/status_form");
    let (app, org) = serve(&f).await;
    let (port, path) = (app.port, f.path.clone());
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: gw.example.com\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            fixtures::FORM
        );
        s.write_all(head.as_bytes()).unwrap();
        let chunk = [b'a'; 8192];
        // 72 KiB; the server may answer and close before all of it is written.
        for _ in 0..9 {
            let _ = s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
            let _ = s.write_all(&chunk);
            let _ = s.write_all(b"\r\n");
        }
        let _ = s.write_all(b"0\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"));
    assert!(events(&app, &org).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_method_a_route_does_not_take_is_405_json() {
    let f = load("plivo/status_form");
    let (app, _org) = serve(&f).await;
    let c = client();
    for (method, path) in [
        (reqwest::Method::PUT, f.path.clone()),
        (reqwest::Method::DELETE, f.path.replace("/status/", "/incoming/")),
        (reqwest::Method::PATCH, "/twilio/status/ph_0190c000000070008000000000000003".to_owned()),
        (reqwest::Method::GET, "/webhooks/telnyx/voice".to_owned()),
        (reqwest::Method::PUT, "/webhooks/telnyx/voice".to_owned()),
    ] {
        let res = c.request(method.clone(), app.url(&path)).body(f.body.clone()).send().await.unwrap();
        assert_eq!(res.status(), 405, "{method} {path}");
        assert!(res.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
        let allow = if path.starts_with("/webhooks/telnyx") { "POST" } else { "GET, POST" };
        assert_eq!(res.headers()["allow"], allow, "{method} {path}");
        assert_eq!(error_code(res).await, "method_not_allowed", "{method} {path}");
    }
    app.stop().await;
}

#[tokio::test]
async fn malformed_phone_ids_and_other_carriers_phones_are_404() {
    let f = load("plivo/status_form");
    let (app, org) = serve(&f).await;
    let c = client();
    let id = f.phone.id.as_str();
    let paths = [
        "/plivo/status/nope".to_owned(),
        "/plivo/status/ph_".to_owned(),
        format!("/plivo/status/{}", id.to_uppercase()),
        format!("/plivo/status/{id}0"),
        "/plivo/status/ph_..%2F..%2Fdb".to_owned(),
        "/plivo/status/%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_owned(),
        "/plivo/status/..%2f..%2fadmin%2forgs".to_owned(),
        format!("/plivo/status/{id}/extra"),
        format!("/plivo/status/{}", OrgId::parse(&org.id).unwrap()),
        // The phone exists, but it is a Plivo number.
        format!("/twilio/status/{id}"),
        format!("/vobiz/incoming/{id}"),
        format!("/exotel/status/{id}"),
    ];
    for path in &paths {
        let res = c
            .post(app.url(path))
            .header("content-type", fixtures::FORM)
            .header("x-plivo-signature-v3", &f.headers["X-Plivo-Signature-V3"])
            .header("x-plivo-signature-v3-nonce", &f.headers["X-Plivo-Signature-V3-Nonce"])
            .body(f.body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
        assert_eq!(error_code(res).await, "not_found", "{path}");
    }
    assert!(events(&app, &org).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_events_api_shows_the_normalized_event_to_its_org_only() {
    let f = load("plivo/status_form");
    let (app, org) = serve(&f).await;
    let got = fixtures::send(&client(), &app.base, &f).await.unwrap();
    assert_eq!(got.status, 200);
    let list = events(&app, &org).await;
    assert_eq!(list.len(), 1);
    let ev = &list[0];
    let id = ev["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("evt_"));
    assert_eq!(ev["org_id"], org.id.as_str());
    assert_eq!(ev["phone_id"], f.phone.id.as_str());
    assert_eq!(ev["provider"], "plivo");
    assert_eq!(ev["kind"], "call.hangup");
    assert_eq!(ev["call_id"], "2a4e6f3c-1111-4a2b-9c3d-0123456789ab");
    // Plivo sends numbers without `+`; events carry E.164.
    assert_eq!(ev["from"], "+14155550100");
    assert_eq!(ev["to"], "+918035551234");
    assert_eq!(ev["direction"], "inbound");
    assert_eq!(ev["status"], "completed");
    assert_eq!(ev["received_at"], rfc3339(f.now * 1000).as_str());
    assert_eq!(ev["verified_by"]["scheme"], "plivo-v3");
    assert_eq!(ev["verified_by"]["credential"], "current");
    assert_eq!(ev["params"]["CallUUID"], "2a4e6f3c-1111-4a2b-9c3d-0123456789ab");
    assert_eq!(ev["params"]["EndTime"], "2024-05-01 10:00:12");
    assert_eq!(ev["delivery"]["state"], "pending");
    assert!(ev.get("received_at_ms").is_none());
    // The fields are kept as the form arrived; what is read out is their JSON alone.
    assert!(ev.get("form").is_none());
    // Nothing the carrier signed with reaches the event.
    let text = ev.to_string();
    assert!(!text.contains(&f.headers["X-Plivo-Signature-V3"]));
    assert!(!text.contains(f.credential["auth_token"].as_str().unwrap()));

    let c = client();
    let one: Value =
        c.get(app.url(&format!("/events/{id}"))).bearer_auth(&org.key).send().await.unwrap().json().await.unwrap();
    // The delivery state moves on its own (the outbox); the event itself does not.
    let strip = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("delivery");
        v
    };
    assert_eq!(strip(&one), strip(ev));
    let other = app.create_org("Other").await;
    let res = c.get(app.url(&format!("/events/{id}"))).bearer_auth(&other.key).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(error_code(res).await, "not_found");
    assert!(events(&app, &other).await.is_empty());
    let res = c.get(app.url(&format!("/events/{id}"))).send().await.unwrap();
    assert_eq!(res.status(), 401);
    app.stop().await;
}

fn metric(text: &str, name: &str, labels: &str) -> u64 {
    metric_value(text, &format!("{name}{{{labels}}}"))
}

#[tokio::test]
async fn metrics_count_rejections_per_carrier_and_reason() {
    let base = load("plivo/status_form");
    let opts = Options::default()
        .clock(Clock::pinned(base.now * 1000))
        .env("CALLGATE_PUBLIC_URL", base.public_url.clone())
        .env("EXOTEL_ALLOWED_IPS", "203.0.113.0/24");
    let app = spawn_with(opts).await;
    let org = app.create_org("Metrics").await;
    for name in ["plivo/status_form", "twilio/status_form", "exotel/status_post_form", "telnyx/call_answered"] {
        install_phone(&app, &org, &load(name)).await;
    }
    let c = client();
    let sends = [
        ("plivo/status_form", 200),
        ("plivo/wrong_key", 403),
        ("plivo/wrong_key", 403),
        ("plivo/missing_signature", 403),
        ("plivo/unknown_phone", 404),
        ("twilio/tampered_body", 403),
        ("exotel/status_post_form", 403),
        ("telnyx/stale_future_301", 403),
        ("telnyx/missing_timestamp_header", 403),
    ];
    for (name, status) in sends {
        let got = fixtures::send(&c, &app.base, &load(name)).await.unwrap();
        assert_eq!(got.status, status, "{name}: {}", got.body);
    }
    // Bodies that cannot be read at all: a form that does not decode (to a number that is not
    // even looked up), and a Telnyx event that is not JSON under headers that pass.
    let unreadable = [
        c.post(app.url("/plivo/status/ph_0190e000000070008000000000000099"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("CallUUID=%FF%FE"),
        c.post(app.url("/webhooks/telnyx/voice"))
            .header("content-type", "application/json")
            .header(
                "telnyx-signature-ed25519",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 64]),
            )
            .header("telnyx-timestamp", base.now.to_string())
            .body("not json"),
    ];
    for req in unreadable {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 400);
        assert_eq!(res.json::<serde_json::Value>().await.unwrap()["error"]["code"], "malformed_body");
    }
    let text = c.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let rejected = |carrier: &str, reason: &str| {
        metric(&text, "callgate_webhooks_rejected_total", &format!("carrier=\"{carrier}\",reason=\"{reason}\""))
    };
    assert_eq!(rejected("plivo", "invalid_signature"), 2);
    assert_eq!(rejected("plivo", "missing_signature"), 1);
    assert_eq!(rejected("plivo", "unknown_phone"), 1);
    assert_eq!(rejected("plivo", "stale_timestamp"), 0);
    assert_eq!(rejected("twilio", "invalid_signature"), 1);
    assert_eq!(rejected("exotel", "ip_not_allowed"), 1);
    assert_eq!(rejected("telnyx", "stale_timestamp"), 1);
    assert_eq!(rejected("telnyx", "missing_signature"), 1);
    assert_eq!(rejected("vobiz", "invalid_signature"), 0);
    assert_eq!((rejected("plivo", "malformed_body"), rejected("telnyx", "malformed_body")), (1, 1));
    assert_eq!(metric(&text, "callgate_webhooks_accepted_total", "carrier=\"plivo\""), 1);
    assert_eq!(metric(&text, "callgate_webhooks_accepted_total", "carrier=\"twilio\""), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_resent_twilio_request_with_another_idempotency_token_is_one_event() {
    // The token is not signed: whoever holds one signed request can change it at will.
    let f = load("twilio/replay_idempotency_token");
    let (app, org) = serve(&f).await;
    let c = client();
    for token in ["idem-0123456789abcdef", "idem-forged-1", "idem-forged-2"] {
        let resent = with_header(f.clone(), "I-Twilio-Idempotency-Token", token);
        assert_eq!(fixtures::send(&c, &app.base, &resent).await.unwrap().status, 200);
    }
    let without_token = without(f.clone(), &["I-Twilio-Idempotency-Token"]);
    assert_eq!(fixtures::send(&c, &app.base, &without_token).await.unwrap().status, 200);
    assert_eq!(events(&app, &org).await.len(), 1);
    app.stop().await;
}

// ---- the generator ------------------------------------------------------------------------

const NOW: i64 = 1_714_557_600;
const PUBLIC: &str = "https://gw.example.com";
const STREAM: &str = "wss://agent.example.com/stream?tenant=acme";
const UNKNOWN_PHONE: &str = "ph_0190f00000007000800000000000dead";

fn phone_id(s: &str) -> PhoneId {
    PhoneId::parse(s).unwrap()
}

fn e164(s: &str) -> E164 {
    E164::parse(s).unwrap()
}

fn accepted() -> Expect {
    Expect::accepted()
}

fn answered(needle: &str) -> Expect {
    Expect { answer_contains: Some(needle.to_owned()), ..Expect::accepted() }
}

fn by_previous() -> Expect {
    Expect { verified_by: Some("previous".into()), ..Expect::accepted() }
}

fn by_current() -> Expect {
    Expect { verified_by: Some("current".into()), ..Expect::accepted() }
}

fn rejected(code: &str) -> Expect {
    Expect::rejected(403, code)
}

fn not_found() -> Expect {
    Expect::rejected(404, "not_found")
}

#[derive(Default)]
struct Generated(Vec<(String, Fixture)>);

impl Generated {
    fn add(&mut self, carrier: Carrier, case: &str, description: &str, mut f: Fixture, expect: Expect) {
        f.description = Some(description.to_owned());
        f.expect = expect;
        let name = format!("{carrier}/{case}");
        assert!(self.0.iter().all(|(n, _)| *n != name), "{name} twice");
        self.0.push((name, f));
    }
}

fn sign(r: SignRequest) -> Fixture {
    fixtures::sign(&r).unwrap_or_else(|e| panic!("{}: {e:#}", r.url))
}

/// The same request signed for the proxy's public URL (`https://voice.example.net/{path}`),
/// sent through a trusted proxy (accepted) and from a peer that is not one (refused).
fn add_proxy_cases(g: &mut Generated, c: Carrier, signed_for: impl Fn(&str) -> Fixture, path: &str) {
    let proxied = |trusted: bool| {
        let mut f = signed_for(&format!("https://voice.example.net/{path}"));
        f.public_url = PUBLIC.into();
        let f = with_header(with_header(f, "X-Forwarded-Host", "voice.example.net"), "X-Forwarded-Proto", "https");
        if trusted {
            with_env(f, &[("CALLGATE_TRUSTED_PROXIES", "127.0.0.1/32")])
        } else {
            f
        }
    };
    g.add(
        c,
        "forwarded_host_from_trusted_proxy",
        "Behind a trusted proxy, the signed URL is rebuilt from X-Forwarded-Proto/Host",
        proxied(true),
        accepted(),
    );
    g.add(
        c,
        "forwarded_host_from_untrusted_peer",
        "X-Forwarded-Host from a peer that is not a trusted proxy is ignored: the URL is CALLGATE_PUBLIC_URL's",
        proxied(false),
        rejected("invalid_signature"),
    );
}

fn tamper_body(mut f: Fixture, from: &str, to: &str) -> Fixture {
    let before = f.body.clone();
    f.body = f.body.replacen(from, to, 1);
    assert_ne!(f.body, before, "nothing to tamper");
    f
}

fn without(mut f: Fixture, headers: &[&str]) -> Fixture {
    for h in headers {
        assert!(f.headers.remove(*h).is_some(), "no {h}");
    }
    f
}

fn with_header(mut f: Fixture, name: &str, value: &str) -> Fixture {
    f.headers.insert(name.to_owned(), value.to_owned());
    f
}

fn with_env(mut f: Fixture, pairs: &[(&str, &str)]) -> Fixture {
    f.env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    f
}

/// The phone belongs to another carrier, with that carrier's credential.
fn phone_of(mut f: Fixture, carrier: Carrier, credential: Value, number: &str) -> Fixture {
    f.phone.carrier = Some(carrier);
    f.phone.number = e164(number);
    f.credential = credential;
    f
}

fn rotated(mut f: Fixture, current: &Value, previous: &Value, valid_until: i64) -> Fixture {
    f.credential = current.clone();
    f.phone.previous_credential = Some(previous.clone());
    f.phone.previous_valid_until = Some(valid_until);
    f
}

fn twilio_cred() -> Value {
    json!({"account_sid": "AC00000000000000000000000000000001", "auth_token": "twTestAuthToken0123456789abcdef0"})
}

fn plivo_cred() -> Value {
    json!({"auth_id": "MAPLIVOFIXTURE000001", "auth_token": "plivoFixtureAuthToken0123456789"})
}

/// Plivo and its clone Vobiz.
struct Family {
    carrier: Carrier,
    phone: &'static str,
    number: &'static str,
    caller: &'static str,
    auth_id: &'static str,
    token: &'static str,
    old_token: &'static str,
    wrong_token: &'static str,
    v3: &'static str,
    ma_v3: &'static str,
    nonce: &'static str,
    v2: &'static str,
    v2_nonce: &'static str,
    /// Vobiz's two V3 canonical strings; Plivo has one.
    forms: &'static [(VobizForm, &'static str)],
}

const PLIVO: Family = Family {
    carrier: Carrier::Plivo,
    phone: "ph_0190a000000070008000000000000001",
    number: "918035551234",
    caller: "14155550100",
    auth_id: "MAPLIVOFIXTURE000001",
    token: "plivoFixtureAuthToken0123456789",
    old_token: "plivoRetiredAuthToken0123456789",
    wrong_token: "plivoSomeoneElsesToken012345678",
    v3: "X-Plivo-Signature-V3",
    ma_v3: "X-Plivo-Signature-Ma-V3",
    nonce: "X-Plivo-Signature-V3-Nonce",
    v2: "X-Plivo-Signature-V2",
    v2_nonce: "X-Plivo-Signature-V2-Nonce",
    forms: &[(VobizForm::Sdk, "")],
};

const VOBIZ: Family = Family {
    carrier: Carrier::Vobiz,
    phone: "ph_0190b000000070008000000000000002",
    number: "918065550001",
    caller: "919800000001",
    auth_id: "MA_VOBIZFIXTURE01",
    token: "vobizFixtureAuthToken0123456789",
    old_token: "vobizRetiredAuthToken0123456789",
    wrong_token: "vobizSomeoneElsesToken012345678",
    v3: "X-Vobiz-Signature-V3",
    ma_v3: "X-Vobiz-Signature-MA-V3",
    nonce: "X-Vobiz-Signature-V3-Nonce",
    v2: "X-Vobiz-Signature-V2",
    v2_nonce: "X-Vobiz-Signature-V2-Nonce",
    forms: &[(VobizForm::Docs, "_docs"), (VobizForm::Sdk, "_sdk")],
};

fn family(g: &mut Generated, fam: &Family) {
    let c = fam.carrier;
    let cred = |token: &str| json!({"auth_id": fam.auth_id, "auth_token": token});
    let inc = format!("{PUBLIC}/{c}/incoming/{}", fam.phone);
    let st = format!("{PUBLIC}/{c}/status/{}", fam.phone);
    let (num, caller) = (fam.number, fam.caller);
    let ring = format!(
        "CallUUID=2a4e6f3c-1111-4a2b-9c3d-0123456789ab&From={caller}&To={num}&Direction=inbound&CallStatus=ringing&Event=StartApp&CallerName=%2B{caller}&BillRate=0.0085"
    );
    let hangup = format!(
        "CallUUID=2a4e6f3c-1111-4a2b-9c3d-0123456789ab&From={caller}&To={num}&Direction=inbound&CallStatus=completed&Event=Hangup&HangupCause=NORMAL_CLEARING&Duration=12&EndTime=2024-05-01+10%3A00%3A12"
    );
    let nonce = "05429567804466091622";
    let signed = |form: VobizForm, token: &str, method: &str, url: &str, body: &str| {
        let mut f = sign(SignRequest {
            carrier: Some(c),
            credential: cred(token),
            method: method.into(),
            url: url.into(),
            body: body.into(),
            nonce: Some(nonce.into()),
            vobiz_form: form,
            now: Some(NOW),
            number: Some(format!("+{num}")),
            ..SignRequest::default()
        });
        f.credential = cred(fam.token);
        f
    };
    let xml_stream = "<Stream bidirectional=\"true\" keepCallAlive=\"true\"";
    let xml_hangup = "Please try again later. Goodbye.</Speak><Hangup/>";

    for &(form, sfx) in fam.forms {
        let form_name = match (c, form) {
            (Carrier::Plivo, _) => "Plivo V3",
            (_, VobizForm::Docs) => "Vobiz V3, docs form (URL without query + nonce)",
            (_, VobizForm::Sdk) => "Vobiz V3, SDK form (Plivo's rule, parameters included)",
        };
        let mut f = signed(form, fam.token, "POST", &inc, &ring);
        f.phone.config.stream_url = Some(STREAM.into());
        g.add(
            c,
            &format!("incoming_stream{sfx}"),
            &format!(
                "{form_name}: incoming call on a number with a stream URL, answered with a bidirectional <Stream>"
            ),
            f,
            answered(xml_stream),
        );
        g.add(
            c,
            &format!("status_form{sfx}"),
            &format!("{form_name}: hangup callback, form body"),
            signed(form, fam.token, "POST", &st, &hangup),
            accepted(),
        );
        g.add(
            c,
            &format!("status_get{sfx}"),
            &format!("{form_name}: hangup callback by GET, parameters in the query string"),
            signed(form, fam.token, "GET", &format!("{st}?{hangup}"), ""),
            accepted(),
        );
        g.add(
            c,
            &format!("status_with_query{sfx}"),
            &format!("{form_name}: callback URL with its own query string and a form body"),
            signed(form, fam.token, "POST", &format!("{st}?tenant=acme&Z=1"), &hangup),
            accepted(),
        );
        let body_tampered = tamper_body(signed(form, fam.token, "POST", &st, &hangup), "Duration=12", "Duration=999");
        let query_tampered = {
            let mut f = signed(form, fam.token, "POST", &format!("{st}?tenant=acme"), &hangup);
            f.path = f.path.replace("tenant=acme", "tenant=evil");
            f
        };
        if form == VobizForm::Docs && c == Carrier::Vobiz {
            g.add(
                c,
                "docs_form_ignores_body",
                "Vobiz's documented V3 string covers only the query-less URL and the nonce (protocols.md §2.4), so a body changed after signing still verifies under the docs form. Accepted until a live Vobiz request shows which form Vobiz sends; the SDK form covers the body (tampered_body_sdk).",
                body_tampered,
                accepted(),
            );
            g.add(
                c,
                "docs_form_ignores_query",
                "Vobiz's documented V3 string strips the query, so a changed query still verifies under the docs form (the SDK form covers it: tampered_query_sdk).",
                query_tampered,
                accepted(),
            );
        } else {
            g.add(
                c,
                &format!("tampered_body{sfx}"),
                &format!("{form_name}: a form field changed after signing"),
                body_tampered,
                rejected("invalid_signature"),
            );
            g.add(
                c,
                &format!("tampered_query{sfx}"),
                &format!("{form_name}: the URL's query changed after signing"),
                query_tampered,
                rejected("invalid_signature"),
            );
        }
        let mut f = signed(form, fam.token, "POST", &st, &hangup);
        f.path = f.path.replace("/status/", "/incoming/");
        f.hook = fixtures::FixtureHook::Incoming;
        g.add(
            c,
            &format!("hook_swapped{sfx}"),
            &format!("{form_name}: signed for the status URL, sent to the number's incoming URL"),
            f,
            rejected("invalid_signature"),
        );
        g.add(
            c,
            &format!("wrong_key{sfx}"),
            &format!("{form_name}: signed with another account's auth token"),
            signed(form, fam.wrong_token, "POST", &st, &hangup),
            rejected("invalid_signature"),
        );
        let good = signed(form, fam.token, "POST", &st, &hangup);
        let bad = signed(form, fam.wrong_token, "POST", &st, &hangup);
        let several = format!("{},{}", bad.headers[fam.v3], good.headers[fam.v3]);
        g.add(
            c,
            &format!("several_signatures{sfx}"),
            &format!("{form_name}: the header lists several comma-separated signatures, the second one valid"),
            with_header(good.clone(), fam.v3, &several),
            accepted(),
        );
        let mut ma = without(good, &[fam.v3]);
        let sig = signed(form, fam.token, "POST", &st, &hangup).headers[fam.v3].clone();
        ma.headers.insert(fam.ma_v3.to_owned(), sig);
        g.add(
            c,
            &format!("main_account_header{sfx}"),
            &format!("{form_name}: only the main-account header ({}) is sent, signed with the token held", fam.ma_v3),
            ma,
            accepted(),
        );
    }

    let form = fam.forms.last().unwrap().0;
    g.add(
        c,
        "incoming_hangup",
        "Incoming call on a number without a stream URL: spoken apology, then hang up",
        signed(form, fam.token, "POST", &inc, &ring),
        answered(xml_hangup),
    );
    g.add(
        c,
        "missing_signature",
        "No signature headers at all",
        without(signed(form, fam.token, "POST", &st, &hangup), &[fam.v3, fam.nonce]),
        rejected("missing_signature"),
    );
    g.add(
        c,
        "missing_nonce",
        "The V3 signature without its nonce header",
        without(signed(form, fam.token, "POST", &st, &hangup), &[fam.nonce]),
        rejected("missing_signature"),
    );
    let v2_sig = if c == Carrier::Plivo {
        plivo::sign_v2(&PlivoKey::new(fam.token.as_bytes()), &st, nonce)
    } else {
        vobiz::sign_v2(&VobizKey::new(fam.token.as_bytes()), &st, nonce)
    };
    let mut v2 = without(signed(form, fam.token, "POST", &st, &hangup), &[fam.v3, fam.nonce]);
    v2.headers.insert(fam.v2.to_owned(), v2_sig);
    v2.headers.insert(fam.v2_nonce.to_owned(), nonce.to_owned());
    g.add(
        c,
        "v2_headers_only",
        "Only a valid V2 signature: V2 covers neither the query nor the parameters, so it counts as unsigned",
        v2,
        rejected("missing_signature"),
    );
    let mut json_body = signed(form, fam.token, "POST", &st, "");
    json_body.body = format!(r#"{{"CallUUID":"2a4e6f3c-1111-4a2b-9c3d-0123456789ab","To":"{num}"}}"#);
    json_body.headers.insert("Content-Type".into(), fixtures::JSON.into());
    g.add(
        c,
        "json_body",
        "A JSON body under a signature that matches the URL with no parameters: no sender documents a signature over JSON, so it cannot be verified",
        json_body,
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "rotation_previous_in_grace",
        "The number's credential was replaced; a callback signed with the previous token inside its grace is accepted and attributed to it",
        rotated(signed(form, fam.old_token, "POST", &st, &hangup), &cred(fam.token), &cred(fam.old_token), NOW + 3600),
        by_previous(),
    );
    g.add(
        c,
        "rotation_previous_after_grace",
        "Signed with the previous token after its grace ended",
        rotated(signed(form, fam.old_token, "POST", &st, &hangup), &cred(fam.token), &cred(fam.old_token), NOW - 1),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "rotation_current_in_grace",
        "Signed with the new token while the previous one is still in its grace",
        rotated(signed(form, fam.token, "POST", &st, &hangup), &cred(fam.token), &cred(fam.old_token), NOW + 3600),
        by_current(),
    );
    let mut replay = signed(form, fam.token, "POST", &st, &hangup);
    replay.repeat = 2;
    g.add(
        c,
        "replay_same_nonce",
        "The same signed callback delivered twice (same nonce): both acknowledged, one event",
        replay,
        accepted(),
    );
    add_proxy_cases(g, c, |url| signed(form, fam.token, "POST", url, &hangup), &format!("{c}/status/{}", fam.phone));
    let mut unknown = signed(form, fam.token, "POST", &format!("{PUBLIC}/{c}/status/{UNKNOWN_PHONE}"), &hangup);
    unknown.phone.id = phone_id(fam.phone);
    g.add(c, "unknown_phone", "A validly signed callback for a phone id that does not exist", unknown, not_found());
    g.add(
        c,
        "other_carrier_phone",
        "The phone id in the path belongs to a Twilio number",
        phone_of(signed(form, fam.token, "POST", &st, &hangup), Carrier::Twilio, twilio_cred(), "+14155550199"),
        not_found(),
    );
}

fn twilio_cases(g: &mut Generated) {
    let c = Carrier::Twilio;
    let phone = "ph_0190c000000070008000000000000003";
    let cred = |token: &str| json!({"account_sid": "AC00000000000000000000000000000001", "auth_token": token});
    let token = "twTestAuthToken0123456789abcdef0";
    let old = "twRetiredAuthToken0123456789abcd";
    let wrong = "twSomeoneElsesToken0123456789abc";
    let inc = format!("{PUBLIC}/twilio/incoming/{phone}");
    let st = format!("{PUBLIC}/twilio/status/{phone}");
    let ring = "AccountSid=AC00000000000000000000000000000001&ApiVersion=2010-04-01&CallSid=CA00000000000000000000000000000002&CallStatus=ringing&Called=%2B14155550199&Caller=%2B14155550100&Direction=inbound&From=%2B14155550100&To=%2B14155550199";
    let done = "AccountSid=AC00000000000000000000000000000001&ApiVersion=2010-04-01&CallDuration=12&CallSid=CA00000000000000000000000000000002&CallStatus=completed&Called=%2B14155550199&Caller=%2B14155550100&Direction=inbound&From=%2B14155550100&To=%2B14155550199";
    let stream_json = r#"{"CallSid":"CA00000000000000000000000000000002","StreamSid":"MZ00000000000000000000000000000003","Status":"stream-started","To":"+14155550199"}"#;
    let signed = |signing_token: &str, method: &str, url: &str, body: &str| {
        let mut f = sign(SignRequest {
            carrier: Some(c),
            credential: cred(signing_token),
            method: method.into(),
            url: url.into(),
            body: body.into(),
            now: Some(NOW),
            number: Some("+14155550199".into()),
            ..SignRequest::default()
        });
        f.credential = cred(token);
        f
    };
    let mut f = signed(token, "POST", &inc, ring);
    f.phone.config.stream_url = Some(STREAM.into());
    g.add(
        c,
        "incoming_stream",
        "Incoming call on a number with a stream URL: <Connect><Stream>, the URL's query passed as <Parameter>s",
        f,
        answered("<Connect><Stream url=\"wss://agent.example.com/stream\"><Parameter name=\"phone_id\""),
    );
    g.add(
        c,
        "incoming_hangup",
        "Incoming call on a number without a stream URL: spoken apology, then hang up",
        signed(token, "POST", &inc, ring),
        answered("Please try again later. Goodbye.</Say><Hangup/>"),
    );
    g.add(c, "status_form", "Status callback, form body", signed(token, "POST", &st, done), accepted());
    g.add(
        c,
        "status_get",
        "Status callback by GET: the signature covers the full URL",
        signed(
            token,
            "GET",
            &format!("{st}?CallSid=CA00000000000000000000000000000002&CallStatus=completed&To=%2B14155550199"),
            "",
        ),
        accepted(),
    );
    g.add(
        c,
        "status_json",
        "JSON body: bodySHA256 in the URL, the signature over the URL alone",
        signed(token, "POST", &st, stream_json),
        accepted(),
    );
    let mut port = signed(token, "POST", &format!("https://gw.example.com:443/twilio/status/{phone}"), done);
    port.public_url = PUBLIC.into();
    g.add(
        c,
        "port_443_variant",
        "Signed over the URL with :443 added (Twilio's port quirk); the number's URL has no port",
        port,
        accepted(),
    );
    g.add(
        c,
        "tampered_body",
        "A form field changed after signing",
        tamper_body(signed(token, "POST", &st, done), "CallDuration=12", "CallDuration=999"),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "tampered_json_body",
        "A JSON body changed after signing (bodySHA256 in the URL no longer matches)",
        tamper_body(signed(token, "POST", &st, stream_json), "stream-started", "stream-stopped"),
        rejected("invalid_signature"),
    );
    let mut f = signed(token, "POST", &st, stream_json);
    f.path = f.path.split('?').next().unwrap().to_owned();
    g.add(
        c,
        "json_without_body_hash",
        "A JSON body whose URL lost its bodySHA256: the body would be unsigned",
        f,
        rejected("invalid_signature"),
    );
    let mut f = signed(token, "POST", &format!("{st}?tenant=acme"), done);
    f.path = f.path.replace("tenant=acme", "tenant=evil");
    g.add(c, "tampered_query", "The URL's query changed after signing", f, rejected("invalid_signature"));
    let mut f = signed(token, "POST", &st, done);
    f.path = f.path.replace("/status/", "/incoming/");
    f.hook = fixtures::FixtureHook::Incoming;
    g.add(
        c,
        "hook_swapped",
        "Signed for the status URL, sent to the number's incoming URL",
        f,
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "wrong_key",
        "Signed with another account's auth token",
        signed(wrong, "POST", &st, done),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "missing_signature",
        "No X-Twilio-Signature",
        without(signed(token, "POST", &st, done), &["X-Twilio-Signature"]),
        rejected("missing_signature"),
    );
    g.add(
        c,
        "rotation_previous_in_grace",
        "Signed with the previous auth token inside its grace",
        rotated(signed(old, "POST", &st, done), &cred(token), &cred(old), NOW + 3600),
        by_previous(),
    );
    g.add(
        c,
        "rotation_previous_after_grace",
        "Signed with the previous auth token after its grace ended",
        rotated(signed(old, "POST", &st, done), &cred(token), &cred(old), NOW - 1),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "rotation_current_in_grace",
        "Signed with the new auth token while the previous one is in its grace",
        rotated(signed(token, "POST", &st, done), &cred(token), &cred(old), NOW + 3600),
        by_current(),
    );
    let mut f = with_header(signed(token, "POST", &st, done), "I-Twilio-Idempotency-Token", "idem-0123456789abcdef");
    f.repeat = 2;
    g.add(
        c,
        "replay_idempotency_token",
        "The same callback retried with the same I-Twilio-Idempotency-Token: both acknowledged, one event",
        f,
        accepted(),
    );
    add_proxy_cases(g, c, |url| signed(token, "POST", url, done), &format!("twilio/status/{phone}"));
    let mut f = signed(token, "POST", &format!("{PUBLIC}/twilio/status/{UNKNOWN_PHONE}"), done);
    f.phone.id = phone_id(phone);
    g.add(c, "unknown_phone", "A validly signed callback for a phone id that does not exist", f, not_found());
    g.add(
        c,
        "other_carrier_phone",
        "The phone id in the path belongs to a Plivo number",
        phone_of(signed(token, "POST", &st, done), Carrier::Plivo, plivo_cred(), "+918035551234"),
        not_found(),
    );
}

fn exotel_cases(g: &mut Generated) {
    let c = Carrier::Exotel;
    let phone = "ph_0190d000000070008000000000000004";
    let cred = json!({"api_key": "exoFixtureKey", "api_token": "exoFixtureApiToken000", "account_sid": "acmefixture1", "subdomain": "api.in.exotel.com"});
    let token = "exoFixtureWebhookToken0001";
    let inc = format!("{PUBLIC}/exotel/incoming/{phone}");
    let st = format!("{PUBLIC}/exotel/status/{phone}");
    let passthru = "CallSid=b6cf7c0e2a3d4f5a6b7c8d9e0f1a2b3c&CallFrom=09876543210&CallTo=08047110000&Direction=incoming&Created=Wed%2C+01+May+2024+15%3A30%3A00&CallType=call-attempt&CurrentTime=2024-05-01+15%3A30%3A00";
    let ended = "CallSid=b6cf7c0e2a3d4f5a6b7c8d9e0f1a2b3c&CallFrom=09876543210&CallTo=08047110000&Direction=incoming&DialCallDuration=12&CallType=completed&CurrentTime=2024-05-01+15%3A30%3A12";
    let status_form =
        "CallSid=b6cf7c0e2a3d4f5a6b7c8d9e0f1a2b3c&Status=completed&RecordingUrl=&DateUpdated=2024-05-01+15%3A30%3A12";
    let make = |method: &str, url: &str, body: &str| {
        sign(SignRequest {
            carrier: Some(c),
            credential: cred.clone(),
            method: method.into(),
            url: url.into(),
            body: body.into(),
            now: Some(NOW),
            number: Some("+918047110000".into()),
            ..SignRequest::default()
        })
    };
    let mut f = make("GET", &format!("{inc}?{passthru}"), "");
    f.phone.config.stream_url = Some(STREAM.into());
    g.add(
        c,
        "incoming_stream",
        "Voicebot dynamic URL from an allowed address: answered with the stream URL as JSON",
        f,
        answered("{\"url\":\"wss://agent.example.com/stream?tenant=acme\"}"),
    );
    g.add(
        c,
        "incoming_hangup",
        "Incoming call on a number without a stream URL: hang up with the apology",
        make("GET", &format!("{inc}?{passthru}"), ""),
        answered("\"action\":\"hangup\",\"message\":\"Sorry, we cannot take your call right now."),
    );
    g.add(
        c,
        "status_get_passthru",
        "Passthru applet GET at the end of the call, from an allowed address",
        make("GET", &format!("{st}?{ended}"), ""),
        accepted(),
    );
    g.add(
        c,
        "status_post_form",
        "StatusCallback POST (form), from an allowed address",
        make("POST", &st, status_form),
        accepted(),
    );
    g.add(
        c,
        "ip_not_in_allowlist",
        "The client address is not in EXOTEL_ALLOWED_IPS",
        with_env(make("GET", &format!("{st}?{ended}"), ""), &[("EXOTEL_ALLOWED_IPS", "203.0.113.0/24")]),
        rejected("ip_not_allowed"),
    );
    g.add(
        c,
        "no_allowlist",
        "EXOTEL_ALLOWED_IPS unset: the shipped list is empty, so every Exotel callback is refused",
        with_env(make("GET", &format!("{st}?{ended}"), ""), &[]),
        rejected("ip_not_allowed"),
    );
    g.add(
        c,
        "spoofed_forwarded_for",
        "X-Forwarded-For names an allowed address, but the peer is not a trusted proxy: the header is ignored",
        with_header(
            with_env(make("GET", &format!("{st}?{ended}"), ""), &[("EXOTEL_ALLOWED_IPS", "203.0.113.7")]),
            "X-Forwarded-For",
            "203.0.113.7",
        ),
        rejected("ip_not_allowed"),
    );
    g.add(
        c,
        "trusted_proxy_forwarded_for",
        "Behind a trusted proxy, the X-Forwarded-For client is in the allow-list",
        with_header(
            with_env(
                make("GET", &format!("{st}?{ended}"), ""),
                &[("EXOTEL_ALLOWED_IPS", "203.0.113.7"), ("CALLGATE_TRUSTED_PROXIES", "127.0.0.1/32")],
            ),
            "X-Forwarded-For",
            "203.0.113.7",
        ),
        accepted(),
    );
    g.add(
        c,
        "trusted_proxy_forwarded_for_denied",
        "Behind a trusted proxy, the X-Forwarded-For client is not in the allow-list",
        with_header(
            with_env(
                make("GET", &format!("{st}?{ended}"), ""),
                &[("EXOTEL_ALLOWED_IPS", "203.0.113.7"), ("CALLGATE_TRUSTED_PROXIES", "127.0.0.1/32")],
            ),
            "X-Forwarded-For",
            "198.51.100.9",
        ),
        rejected("ip_not_allowed"),
    );
    g.add(
        c,
        "trusted_proxy_spoofed_first_hop",
        "Behind a trusted proxy, the caller put an allowed address first in X-Forwarded-For; the proxy appended the real one, which is what counts",
        with_header(
            with_env(
                make("GET", &format!("{st}?{ended}"), ""),
                &[("EXOTEL_ALLOWED_IPS", "203.0.113.7"), ("CALLGATE_TRUSTED_PROXIES", "127.0.0.1/32")],
            ),
            "X-Forwarded-For",
            "203.0.113.7, 198.51.100.9",
        ),
        rejected("ip_not_allowed"),
    );
    let with_token = format!("{st}?token={token}&{ended}");
    g.add(
        c,
        "token_valid",
        "The number has a webhook token and the URL carries it",
        make("GET", &with_token, ""),
        accepted(),
    );
    let mut f = make("GET", &with_token, "");
    f.path = f.path.replace(token, "exoFixtureWebhookToken0002");
    g.add(c, "token_wrong", "The URL carries a token that is not the number's", f, rejected("invalid_token"));
    let mut f = make("GET", &format!("{st}?{ended}"), "");
    f.phone.config.exotel_webhook_token = Some(token.into());
    g.add(c, "token_missing", "The number has a webhook token; the URL has none", f, rejected("invalid_token"));
    g.add(
        c,
        "token_valid_from_denied_address",
        "The right token from an address outside the allow-list",
        with_env(make("GET", &with_token, ""), &[("EXOTEL_ALLOWED_IPS", "203.0.113.0/24")]),
        rejected("ip_not_allowed"),
    );
    let mut f = make("GET", &format!("{st}?{ended}"), "");
    f.repeat = 2;
    g.add(
        c,
        "replay_same_callback",
        "The same call, status and parameters delivered twice: both acknowledged, one event",
        f,
        accepted(),
    );
    let mut f = make("GET", &format!("{PUBLIC}/exotel/status/{UNKNOWN_PHONE}?{ended}"), "");
    f.phone.id = phone_id(phone);
    g.add(c, "unknown_phone", "A callback for a phone id that does not exist", f, not_found());
    g.add(
        c,
        "other_carrier_phone",
        "The phone id in the path belongs to a Plivo number",
        phone_of(make("GET", &format!("{st}?{ended}"), ""), Carrier::Plivo, plivo_cred(), "+918035551234"),
        not_found(),
    );
}

fn telnyx_event(event_type: &str, id: &str, direction: Option<&str>, from: &str, to: &str) -> String {
    let mut payload = json!({
        "call_control_id": "v3:fixture-call-0001",
        "call_leg_id": "5f0c8e5e-0000-4000-8000-000000000001",
        "call_session_id": "5f0c8e5e-0000-4000-8000-000000000002",
        "connection_id": "2000000000000000001",
        "from": from,
        "to": to,
        "state": "answered",
    });
    if let Some(d) = direction {
        payload["direction"] = json!(d);
    }
    json!({
        "data": {"event_type": event_type, "id": id, "occurred_at": "2024-05-01T10:00:00.000000Z", "payload": payload, "record_type": "event"},
        "meta": {"attempt": 1, "delivered_to": "https://gw.example.com/webhooks/telnyx/voice"},
    })
    .to_string()
}

fn telnyx_cases(g: &mut Generated) {
    let c = Carrier::Telnyx;
    let phone = "ph_0190e000000070008000000000000005";
    let number = "+13125550199";
    let url = format!("{PUBLIC}/webhooks/telnyx/voice");
    let seed = "11".repeat(32);
    let old_seed = "22".repeat(32);
    let wrong_seed = "33".repeat(32);
    let cred = |seed: &str| json!({"api_key": "KEYfixtureTelnyx0001", "public_key": fixtures::public_key_base64(seed).unwrap()});
    let signed = |signing_seed: &str, body: &str, ts: i64| {
        let mut f = sign(SignRequest {
            carrier: Some(c),
            credential: cred(signing_seed),
            method: "POST".into(),
            url: url.clone(),
            body: body.into(),
            seed: Some(signing_seed.into()),
            timestamp: Some(ts),
            now: Some(NOW),
            number: Some(number.into()),
            phone_id: Some(phone_id(phone)),
            ..SignRequest::default()
        });
        f.credential = cred(&seed);
        f
    };
    let answered_ev =
        telnyx_event("call.answered", "b1a2c3d4-0000-4000-8000-00000000a001", Some("incoming"), "+13125550100", number);

    // The official vectors, replayed: the phone's key is the vector's public key.
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("vectors/telnyx.json")).unwrap()).unwrap();
    for (v, case, what) in [
        (
            &file["vectors"][0],
            "tx1_official_call_initiated",
            "TX-1 (protocols.md §6.5): call.initiated, number from payload.to",
        ),
        (
            &file["vectors"][1],
            "tx2_official_call_hangup",
            "TX-2 (protocols.md §6.5): call.hangup without direction, number from payload.to",
        ),
    ] {
        let s = |k: &str| v[k].as_str().unwrap().to_owned();
        let ts: i64 = s("timestamp").parse().unwrap();
        let f = sign(SignRequest {
            carrier: Some(c),
            credential: json!({"api_key": "KEYtelnyxVector0001", "public_key": s("public_key")}),
            method: "POST".into(),
            url: url.clone(),
            body: s("body"),
            seed: Some(s("seed")),
            timestamp: Some(ts),
            now: Some(ts + 10),
            phone_id: Some(phone_id(phone)),
            ..SignRequest::default()
        });
        assert_eq!(f.headers["telnyx-signature-ed25519"], s("signature"), "{case}");
        assert_eq!(f.phone.number.as_str(), number);
        g.add(c, case, &format!("{what}; signed at the vector's timestamp, received 10 s later"), f, accepted());
    }

    g.add(
        c,
        "call_answered",
        "call.answered signed with the account's key",
        signed(&seed, &answered_ev, NOW),
        accepted(),
    );
    let outgoing = telnyx_event(
        "call.initiated",
        "b1a2c3d4-0000-4000-8000-00000000a002",
        Some("outgoing"),
        number,
        "+14155550100",
    );
    g.add(
        c,
        "outgoing_number_from_from",
        "An outgoing call's event names the number in payload.from",
        signed(&seed, &outgoing, NOW),
        accepted(),
    );
    g.add(
        c,
        "tampered_body",
        "The body changed after signing",
        tamper_body(signed(&seed, &answered_ev, NOW), "call.answered", "call.bridged"),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "wrong_key",
        "Signed with another account's key",
        signed(&wrong_seed, &answered_ev, NOW),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "missing_signature_header",
        "No telnyx-signature-ed25519",
        without(signed(&seed, &answered_ev, NOW), &["telnyx-signature-ed25519"]),
        rejected("missing_signature"),
    );
    g.add(
        c,
        "missing_timestamp_header",
        "No telnyx-timestamp",
        without(signed(&seed, &answered_ev, NOW), &["telnyx-timestamp"]),
        rejected("missing_signature"),
    );
    let mut f = signed(&seed, &answered_ev, NOW);
    let odd = format!("+{NOW}");
    f.headers.insert("telnyx-timestamp".into(), odd.clone());
    f.headers.insert(
        "telnyx-signature-ed25519".into(),
        telnyx::sign(&fixtures::signing_key(&seed).unwrap(), &odd, answered_ev.as_bytes()),
    );
    g.add(
        c,
        "malformed_timestamp",
        "A signed timestamp that is not plain digits (+1714557600) is refused rather than parsed leniently",
        f,
        rejected("invalid_signature"),
    );
    for (case, offset, expect) in [
        ("stale_future_301", 301, rejected("stale_timestamp")),
        ("stale_past_301", -301, rejected("stale_timestamp")),
        ("boundary_future_300", 300, accepted()),
        ("boundary_past_300", -300, accepted()),
    ] {
        g.add(
            c,
            case,
            &format!("Timestamp {offset:+} s from the server's clock (window ±300 s)"),
            signed(&seed, &answered_ev, NOW + offset),
            expect,
        );
    }
    g.add(
        c,
        "rotation_previous_in_grace",
        "Signed with the previous public key's private half inside its grace",
        rotated(signed(&old_seed, &answered_ev, NOW), &cred(&seed), &cred(&old_seed), NOW + 3600),
        by_previous(),
    );
    g.add(
        c,
        "rotation_previous_after_grace",
        "Signed with the previous key after its grace ended",
        rotated(signed(&old_seed, &answered_ev, NOW), &cred(&seed), &cred(&old_seed), NOW - 1),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "rotation_current_in_grace",
        "Signed with the new key while the previous one is in its grace",
        rotated(signed(&seed, &answered_ev, NOW), &cred(&seed), &cred(&old_seed), NOW + 3600),
        by_current(),
    );
    let mut f = signed(&seed, &answered_ev, NOW);
    f.repeat = 2;
    g.add(c, "replay_same_event_id", "The same event delivered twice: both acknowledged, one event", f, accepted());
    let stranger = telnyx_event(
        "call.answered",
        "b1a2c3d4-0000-4000-8000-00000000a003",
        Some("incoming"),
        "+13125550100",
        "+13125550111",
    );
    g.add(
        c,
        "unknown_phone",
        "A signed event for a number that is not imported (and no matching connection_id): refused as a bad signature is",
        signed(&seed, &stranger, NOW),
        rejected("invalid_signature"),
    );
    g.add(
        c,
        "other_carrier_phone",
        "The event's number is imported, but as a Plivo number: refused as a bad signature is",
        phone_of(signed(&seed, &answered_ev, NOW), Carrier::Plivo, plivo_cred(), number),
        rejected("invalid_signature"),
    );
}

fn generate() -> Vec<(String, Fixture)> {
    let mut g = Generated::default();
    family(&mut g, &PLIVO);
    family(&mut g, &VOBIZ);
    twilio_cases(&mut g);
    exotel_cases(&mut g);
    telnyx_cases(&mut g);
    g.0
}

fn render(f: &Fixture) -> String {
    let mut s = serde_json::to_string_pretty(f).unwrap();
    s.push('\n');
    s
}

#[test]
#[ignore = "writes fixtures/; run by hand after changing the generator"]
fn regenerate_fixtures() {
    let dir = fixtures_dir();
    for c in Carrier::ALL {
        let sub = dir.join(c.as_str());
        if sub.exists() {
            for e in std::fs::read_dir(&sub).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_some_and(|x| x == "json") {
                    std::fs::remove_file(p).unwrap();
                }
            }
        }
        std::fs::create_dir_all(&sub).unwrap();
    }
    for (name, f) in generate() {
        std::fs::write(dir.join(format!("{name}.json")), render(&f)).unwrap();
    }
}

#[test]
fn fixtures_on_disk_are_what_the_generator_writes() {
    let dir = fixtures_dir();
    let generated = generate();
    let mut stale = Vec::new();
    for (name, f) in &generated {
        let path = dir.join(format!("{name}.json"));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(render(f).as_str()) {
            stale.push(name.clone());
        }
    }
    assert!(stale.is_empty(), "out of date (run regenerate_fixtures): {stale:?}");
    let on_disk = fixtures::load_dir(&dir).unwrap();
    assert_eq!(on_disk.len(), generated.len(), "fixture files the generator does not write");
}
