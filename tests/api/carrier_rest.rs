//! The carriers' REST clients against the fake carrier: listing with pagination, error
//! mapping, and exactly what auto-configuration sends.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use callgate::carriers::rest::{CarrierUrls, ListedNumber, ProviderApi, ProviderError, WebhookTargets, MAX_NUMBERS};
use callgate::domain::{Carrier, PhoneCredential, Secret, E164};

use crate::fake_carrier::{FakeCarrier, Mode, Recorded};

const GOOD: &str = "good-secret-token-0001";
const WRONG: &str = "wrong-secret-token-9999";
const PLIVO_ID: &str = "MAXXXXXXXXXXXXXXXXXX";
const VOBIZ_ID: &str = "MA_TESTACCT";
const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
const EXOTEL_KEY: &str = "exokey-1234";
const EXOTEL_SID: &str = "acme1";
const TELNYX_PUBLIC_KEY: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
const NUMBERS: [&str; 5] = ["+14155550100", "+14155550101", "+918035551234", "+442071838750", "+14155550104"];

fn credentials(carrier: Carrier, secret: &str) -> Value {
    match carrier {
        Carrier::Plivo => json!({"auth_id": PLIVO_ID, "auth_token": secret}),
        Carrier::Vobiz => json!({"auth_id": VOBIZ_ID, "auth_token": secret}),
        Carrier::Twilio => json!({"account_sid": TWILIO_SID, "auth_token": secret}),
        Carrier::Exotel => json!({"api_key": EXOTEL_KEY, "api_token": secret, "account_sid": EXOTEL_SID}),
        Carrier::Telnyx => json!({"api_key": secret, "public_key": TELNYX_PUBLIC_KEY}),
    }
}

fn cred(carrier: Carrier, secret: &str) -> PhoneCredential {
    PhoneCredential::parse(carrier, &credentials(carrier, secret)).expect("test credential parses")
}

fn api(fake: &FakeCarrier) -> ProviderApi {
    ProviderApi::new(fake.carrier_urls(), Duration::from_secs(5)).expect("client builds")
}

async fn fake_with(carrier: Carrier, numbers: &[&str]) -> FakeCarrier {
    let fake = FakeCarrier::start().await;
    fake.add_account(carrier, credentials(carrier, GOOD), numbers.iter().copied());
    fake
}

fn targets(carrier: Carrier) -> WebhookTargets {
    match carrier {
        Carrier::Telnyx => WebhookTargets {
            incoming: "https://gw.example.com/webhooks/telnyx/voice".to_owned(),
            status: "https://gw.example.com/webhooks/telnyx/voice".to_owned(),
        },
        c => WebhookTargets {
            incoming: format!("https://gw.example.com/webhooks/{c}/answer"),
            status: format!("https://gw.example.com/webhooks/{c}/status"),
        },
    }
}

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", B64.encode(format!("{user}:{secret}")))
}

/// The request carries the carrier's auth, exactly, and nothing else credential-like.
fn assert_auth(carrier: Carrier, req: &Recorded, secret: &str) {
    let authz = req.header("authorization");
    match carrier {
        Carrier::Plivo => assert_eq!(authz, Some(basic(PLIVO_ID, secret).as_str()), "{req:?}"),
        Carrier::Twilio => assert_eq!(authz, Some(basic(TWILIO_SID, secret).as_str()), "{req:?}"),
        Carrier::Exotel => assert_eq!(authz, Some(basic(EXOTEL_KEY, secret).as_str()), "{req:?}"),
        Carrier::Telnyx => assert_eq!(authz, Some(format!("Bearer {secret}").as_str()), "{req:?}"),
        Carrier::Vobiz => {
            assert_eq!(authz, None, "{req:?}");
            assert_eq!(req.header("x-auth-id"), Some(VOBIZ_ID), "{req:?}");
            assert_eq!(req.header("x-auth-token"), Some(secret), "{req:?}");
        }
    }
    if carrier != Carrier::Vobiz {
        assert_eq!(req.header("x-auth-token"), None);
    }
    assert!(!req.path.contains(secret) && !req.query.contains(secret), "secret in URL: {req:?}");
}

fn pairs(req: &Recorded) -> Vec<(String, String)> {
    req.query_pairs()
}

fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Lists five numbers two at a time and checks what every carrier has in common.
async fn list_across_pages(carrier: Carrier) -> (FakeCarrier, Vec<ListedNumber>, Vec<Recorded>) {
    let fake = fake_with(carrier, &NUMBERS).await;
    fake.set_page_size(2);
    let listed = api(&fake).list_numbers(&cred(carrier, GOOD)).await.expect("listing succeeds");
    let got: Vec<&str> = listed.iter().map(|n| n.number.as_str()).collect();
    assert_eq!(got, NUMBERS, "{carrier}");
    let ids: Vec<String> = fake.numbers(carrier).into_iter().map(|n| n.id).collect();
    let got_ids: Vec<String> = listed.iter().map(|n| n.provider_number_id.clone()).collect();
    assert_eq!(got_ids, ids, "{carrier}");
    let requests = fake.requests();
    assert_eq!(requests.len(), 3, "{carrier}: {requests:#?}");
    for req in &requests {
        assert_eq!(req.method, "GET");
        assert_auth(carrier, req, GOOD);
    }
    (fake, listed, requests)
}

#[tokio::test]
async fn plivo_lists_across_pages_and_adds_the_plus() {
    let (_fake, listed, requests) = list_across_pages(Carrier::Plivo).await;
    for req in &requests {
        assert_eq!(req.path, format!("/v1/Account/{PLIVO_ID}/Number/"));
    }
    assert_eq!(requests[0].query, "limit=20&offset=0");
    assert_eq!(requests[1].query, "limit=2&offset=2");
    assert_eq!(requests[2].query, "limit=2&offset=4");
    assert_eq!(listed[0].provider_number_id, "14155550100");
    assert_eq!(listed[0].friendly_name.as_deref(), Some("Line 1"));
    assert_eq!(listed[0].voice_url, None);
}

#[tokio::test]
async fn vobiz_lists_across_pages() {
    let (_fake, _listed, requests) = list_across_pages(Carrier::Vobiz).await;
    for (i, req) in requests.iter().enumerate() {
        assert_eq!(req.path, format!("/api/v1/Account/{VOBIZ_ID}/numbers"));
        assert_eq!(req.query, format!("page={}&per_page=100", i + 1));
    }
}

#[tokio::test]
async fn twilio_lists_across_pages() {
    let (fake, listed, requests) = list_across_pages(Carrier::Twilio).await;
    for req in &requests {
        assert_eq!(req.path, format!("/2010-04-01/Accounts/{TWILIO_SID}/IncomingPhoneNumbers.json"));
    }
    assert_eq!(requests[0].query, "PageSize=100");
    let third_id = &fake.numbers(Carrier::Twilio)[2].id;
    assert_eq!(requests[1].query, format!("PageSize=2&Page=1&PageToken=PA{third_id}"));
    assert!(listed[0].provider_number_id.starts_with("PN"));
    assert_eq!(listed[0].friendly_name.as_deref(), Some("Line 1"));
}

#[tokio::test]
async fn telnyx_lists_across_pages() {
    let (_fake, _listed, requests) = list_across_pages(Carrier::Telnyx).await;
    for (i, req) in requests.iter().enumerate() {
        assert_eq!(req.path, "/v2/phone_numbers");
        let page = (i + 1).to_string();
        assert_eq!(pairs(req), kv(&[("page[number]", &page), ("page[size]", "100")]));
    }
}

#[tokio::test]
async fn exotel_lists_across_pages() {
    let (_fake, listed, requests) = list_across_pages(Carrier::Exotel).await;
    for req in &requests {
        assert_eq!(req.path, format!("/v2_beta/Accounts/{EXOTEL_SID}/IncomingPhoneNumbers"));
    }
    assert_eq!(requests[0].query, "Page=0&PageSize=50");
    assert_eq!(requests[1].query, "Page=1&PageSize=2");
    assert_eq!(requests[2].query, "Page=2&PageSize=2");
    assert_eq!(listed[4].friendly_name.as_deref(), Some("Line 5"));
}

#[test]
fn default_urls_are_the_carriers_real_origins() {
    let urls = CarrierUrls::default();
    assert_eq!(urls.plivo, "https://api.plivo.com");
    assert_eq!(urls.vobiz, "https://api.vobiz.ai");
    assert_eq!(urls.twilio, "https://api.twilio.com");
    assert_eq!(urls.telnyx, "https://api.telnyx.com");
    // Exotel's origin comes from each credential's regional subdomain.
    assert_eq!(urls.exotel, None);
}

#[tokio::test]
async fn numbers_that_are_not_e164_are_skipped() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &["+14155550100", "12", "not a number", "+0123456789", "+14155550101"]).await;
        let listed = api(&fake).list_numbers(&cred(carrier, GOOD)).await.expect("listing succeeds");
        let got: Vec<&str> = listed.iter().map(|n| n.number.as_str()).collect();
        assert_eq!(got, ["+14155550100", "+14155550101"], "{carrier}");
    }
}

#[tokio::test]
async fn an_empty_account_lists_nothing() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &[]).await;
        let listed = api(&fake).list_numbers(&cred(carrier, GOOD)).await.expect("listing succeeds");
        assert!(listed.is_empty(), "{carrier}");
        assert_eq!(fake.requests().len(), 1, "{carrier}");
    }
}

#[tokio::test]
async fn listing_stops_at_max_numbers() {
    let many: Vec<String> = (0..MAX_NUMBERS + 50).map(|i| format!("+1415{i:07}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let fake = fake_with(Carrier::Vobiz, &refs).await;
    let listed = api(&fake).list_numbers(&cred(Carrier::Vobiz, GOOD)).await.expect("listing succeeds");
    assert_eq!(listed.len(), MAX_NUMBERS);
    assert_eq!(fake.requests().len(), MAX_NUMBERS / 100);
}

fn assert_no_secret(err: &ProviderError, secrets: &[&str]) {
    let text = format!("{err} {err:?}");
    for s in secrets {
        assert!(!text.contains(s), "secret leaked: {text}");
    }
}

#[tokio::test]
async fn wrong_credentials_are_invalid_credentials_with_the_carriers_message() {
    for (carrier, expected) in [
        (Carrier::Plivo, "Authentication failed"),
        (Carrier::Vobiz, "Invalid X-Auth-ID or X-Auth-Token"),
        (Carrier::Twilio, "Authenticate"),
        (Carrier::Telnyx, "The API key looks malformed. Check that you copied it correctly."),
        (Carrier::Exotel, "Authentication is required to view this page."),
    ] {
        let fake = fake_with(carrier, &NUMBERS).await;
        let api = api(&fake);
        let err = api.list_numbers(&cred(carrier, WRONG)).await.unwrap_err();
        match &err {
            ProviderError::InvalidCredentials { message } => {
                assert_eq!(message.as_deref(), Some(expected), "{carrier}")
            }
            other => panic!("{carrier}: {other:?}"),
        }
        assert_no_secret(&err, &[WRONG, GOOD]);
        assert_auth(carrier, &fake.requests()[0], WRONG);
    }
}

#[tokio::test]
async fn configure_with_wrong_credentials_is_invalid_credentials() {
    for carrier in [Carrier::Plivo, Carrier::Vobiz, Carrier::Twilio, Carrier::Telnyx] {
        let fake = fake_with(carrier, &NUMBERS).await;
        let api = api(&fake);
        let listed = api.list_numbers(&cred(carrier, GOOD)).await.unwrap();
        let err = api.configure_number(&cred(carrier, WRONG), &listed[0], &targets(carrier)).await.unwrap_err().error;
        assert!(matches!(err, ProviderError::InvalidCredentials { message: Some(_) }), "{carrier}: {err:?}");
        assert_no_secret(&err, &[WRONG, GOOD]);
    }
}

#[tokio::test]
async fn a_carrier_message_that_echoes_the_secret_is_dropped() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &NUMBERS).await;
        fake.set_mode(Mode::UnauthorizedEcho);
        let err = api(&fake).list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
        assert!(matches!(err, ProviderError::InvalidCredentials { message: None }), "{carrier}: {err:?}");
        assert_no_secret(&err, &[GOOD]);
    }
}

#[tokio::test]
async fn forced_unauthorized_is_invalid_credentials() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &NUMBERS).await;
        fake.set_mode(Mode::Unauthorized);
        let err = api(&fake).list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
        assert!(matches!(err, ProviderError::InvalidCredentials { message: Some(_) }), "{carrier}: {err:?}");
    }
}

fn assert_unavailable(carrier: Carrier, err: &ProviderError) {
    match err {
        ProviderError::Unavailable { reason } => {
            assert!(reason.starts_with(carrier.as_str()), "{reason}");
            assert!(!reason.contains("http://") && !reason.contains("https://"), "URL in reason: {reason}");
        }
        other => panic!("{carrier}: expected Unavailable, got {other:?}"),
    }
    assert_no_secret(err, &[GOOD]);
}

#[tokio::test]
async fn server_errors_garbage_and_wrong_shapes_are_unavailable() {
    for mode in [Mode::ServerError, Mode::Garbage, Mode::WrongShape] {
        for carrier in Carrier::ALL {
            let fake = fake_with(carrier, &NUMBERS).await;
            let api = api(&fake);
            let listed = api.list_numbers(&cred(carrier, GOOD)).await.unwrap();
            fake.set_mode(mode);
            let err = api.list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
            assert_unavailable(carrier, &err);
            if carrier != Carrier::Exotel {
                let err =
                    api.configure_number(&cred(carrier, GOOD), &listed[0], &targets(carrier)).await.unwrap_err().error;
                assert_unavailable(carrier, &err);
            }
        }
    }
}

#[tokio::test]
async fn a_failure_on_a_later_page_fails_the_whole_listing() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &NUMBERS).await;
        fake.set_page_size(2);
        fake.set_mode_after(1, Mode::ServerError);
        let err = api(&fake).list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
        assert_unavailable(carrier, &err);
        assert_eq!(fake.requests().len(), 2, "{carrier}");
    }
}

#[tokio::test]
async fn a_hanging_carrier_times_out() {
    for carrier in Carrier::ALL {
        let fake = fake_with(carrier, &NUMBERS).await;
        fake.set_mode(Mode::Hang);
        let api = ProviderApi::new(fake.carrier_urls(), Duration::from_millis(300)).unwrap();
        let started = Instant::now();
        let err = api.list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
        assert!(matches!(err, ProviderError::Timeout), "{carrier}: {err:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{carrier}: {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn an_unreachable_carrier_is_unavailable() {
    // Bind then drop a listener so the port is known to be closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let origin = format!("http://127.0.0.1:{port}");
    let urls = CarrierUrls {
        plivo: origin.clone(),
        vobiz: origin.clone(),
        twilio: origin.clone(),
        telnyx: origin.clone(),
        exotel: Some(origin),
    };
    let api = ProviderApi::new(urls, Duration::from_secs(5)).unwrap();
    for carrier in Carrier::ALL {
        let err = api.list_numbers(&cred(carrier, GOOD)).await.unwrap_err();
        assert_unavailable(carrier, &err);
    }
}

// --- configure ---------------------------------------------------------------------------

/// Lists the account, then forgets those requests so a test sees only configuration's.
async fn listed(fake: &FakeCarrier, api: &ProviderApi, carrier: Carrier) -> Vec<ListedNumber> {
    let listed = api.list_numbers(&cred(carrier, GOOD)).await.unwrap();
    fake.clear_requests();
    listed
}

fn assert_json_request(carrier: Carrier, req: &Recorded, method: &str, path: &str, body: Value) {
    assert_eq!((req.method.as_str(), req.path.as_str()), (method, path), "{req:#?}");
    assert!(req.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{req:#?}");
    assert_eq!(req.json(), body, "{method} {path}");
    assert_auth(carrier, req, GOOD);
}

fn assert_get(carrier: Carrier, req: &Recorded, path: &str, query: &str) {
    assert_eq!((req.method.as_str(), req.path.as_str(), req.query.as_str()), ("GET", path, query), "{req:#?}");
    assert_eq!(req.body, "");
    assert_auth(carrier, req, GOOD);
}

/// Per-phone URLs, as the gateway gives Plivo and Vobiz numbers.
fn phone_targets(carrier: Carrier, number: &ListedNumber) -> WebhookTargets {
    WebhookTargets {
        incoming: format!("https://gw.example.com/{carrier}/incoming/ph_{}", number.number.digits()),
        status: format!("https://gw.example.com/{carrier}/status/ph_{}", number.number.digits()),
    }
}

/// Plivo and Vobiz share the application API and differ in the base path and the link call.
async fn plivo_like_configure(carrier: Carrier) {
    let base = match carrier {
        Carrier::Plivo => format!("/v1/Account/{PLIVO_ID}/"),
        _ => format!("/api/v1/Account/{VOBIZ_ID}/"),
    };
    let link_path = |n: &str| match carrier {
        Carrier::Plivo => format!("{base}Number/{}/", n.trim_start_matches('+')),
        _ => format!("{base}numbers/%2B{}/application", n.trim_start_matches('+')),
    };
    let link_body = |app: &str| match carrier {
        Carrier::Plivo => json!({"app_id": app}),
        _ => json!({"application_id": app}),
    };
    let apps = format!("{base}Application/");
    let fake = fake_with(carrier, &NUMBERS).await;
    let api = api(&fake);
    let numbers = listed(&fake, &api, carrier).await;
    let t0 = phone_targets(carrier, &numbers[0]);
    let create_body = |name: &str, t: &WebhookTargets| json!({"app_name": name, "answer_url": t.incoming, "answer_method": "POST", "hangup_url": t.status, "hangup_method": "POST"});
    let app_named =
        |name: &str| fake.applications(carrier).into_iter().find(|a| a.name == name).expect("application exists");

    // First configuration of a number: its application is created, then linked.
    let out = api.configure_number(&cred(carrier, GOOD), &numbers[0], &t0).await.unwrap();
    let app0 = app_named("callgate-14155550100");
    let r = fake.requests();
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_get(carrier, &r[0], &apps, "limit=20&offset=0");
    assert_json_request(carrier, &r[1], "POST", &apps, create_body("callgate-14155550100", &t0));
    assert_json_request(carrier, &r[2], "POST", &link_path(NUMBERS[0]), link_body(&app0.id));
    assert_eq!(out["changed"], json!(true));
    assert_eq!(out["application_id"], json!(app0.id));
    assert_eq!(out["application_name"], json!("callgate-14155550100"));
    assert_eq!(out["actions"], json!(["created application", "linked number"]));
    assert_eq!(fake.number(carrier, NUMBERS[0]).app_id.as_deref(), Some(app0.id.as_str()));

    // Again: the application is found and already right.
    fake.clear_requests();
    let out = api.configure_number(&cred(carrier, GOOD), &numbers[0], &t0).await.unwrap();
    let r = fake.requests();
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_get(carrier, &r[0], &apps, "limit=20&offset=0");
    assert_json_request(carrier, &r[1], "POST", &link_path(NUMBERS[0]), link_body(&app0.id));
    assert_eq!(out["actions"], json!(["reused application", "linked number"]));

    // Another number gets its own application, leaving the first one's URLs alone.
    fake.clear_requests();
    let t2 = phone_targets(carrier, &numbers[2]);
    let out = api.configure_number(&cred(carrier, GOOD), &numbers[2], &t2).await.unwrap();
    let app2 = app_named("callgate-918035551234");
    let r = fake.requests();
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_json_request(carrier, &r[1], "POST", &apps, create_body("callgate-918035551234", &t2));
    assert_json_request(carrier, &r[2], "POST", &link_path(NUMBERS[2]), link_body(&app2.id));
    assert_eq!(out["actions"], json!(["created application", "linked number"]));
    assert_eq!(app_named("callgate-14155550100"), app0);
    assert_ne!(app0.id, app2.id);

    // New gateway URLs for the first number: its application is updated in place.
    fake.clear_requests();
    let moved = WebhookTargets {
        incoming: "https://gw2.example.com/answer".to_owned(),
        status: "https://gw2.example.com/status".to_owned(),
    };
    let out = api.configure_number(&cred(carrier, GOOD), &numbers[0], &moved).await.unwrap();
    let r = fake.requests();
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_json_request(
        carrier,
        &r[1],
        "POST",
        &format!("{apps}{}/", app0.id),
        json!({"answer_url": moved.incoming, "answer_method": "POST", "hangup_url": moved.status, "hangup_method": "POST"}),
    );
    assert_eq!(out["actions"], json!(["updated application", "linked number"]));
    let updated = app_named("callgate-14155550100");
    assert_eq!(
        (updated.answer_url.as_str(), updated.hangup_url.as_str()),
        (moved.incoming.as_str(), moved.status.as_str())
    );
    assert_eq!(app_named("callgate-918035551234"), app2);
    assert_eq!(fake.applications(carrier).len(), 2);
}

#[tokio::test]
async fn plivo_configure_creates_reuses_and_updates_the_application() {
    plivo_like_configure(Carrier::Plivo).await;
}

#[tokio::test]
async fn vobiz_configure_creates_reuses_and_updates_the_application() {
    plivo_like_configure(Carrier::Vobiz).await;
}

#[tokio::test]
async fn plivo_finds_its_application_on_a_later_page() {
    let fake = fake_with(Carrier::Plivo, &NUMBERS).await;
    for name in ["ivr", "callgate", "callgate-14155550100"] {
        fake.add_application(Carrier::Plivo, name, "https://elsewhere.example/a", "https://elsewhere.example/h");
    }
    fake.set_page_size(2);
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Plivo).await;
    let t = phone_targets(Carrier::Plivo, &numbers[1]);
    let ours = fake.add_application(Carrier::Plivo, "callgate-14155550101", &t.incoming, &t.status);
    let out = api.configure_number(&cred(Carrier::Plivo, GOOD), &numbers[1], &t).await.unwrap();
    assert_eq!(out["application_id"], json!(ours));
    let r = fake.requests();
    let apps = format!("/v1/Account/{PLIVO_ID}/Application/");
    assert_get(Carrier::Plivo, &r[0], &apps, "limit=20&offset=0");
    assert_get(Carrier::Plivo, &r[1], &apps, "limit=2&offset=2");
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_eq!(fake.applications(Carrier::Plivo).len(), 4);
}

#[tokio::test]
async fn twilio_configure_sets_the_urls_and_detaches_a_twiml_app() {
    let fake = fake_with(Carrier::Twilio, &NUMBERS).await;
    fake.update_number(Carrier::Twilio, NUMBERS[1], |n| {
        n.voice_application_sid = Some("AP0123456789abcdef0123456789abcdef".to_owned());
        n.voice_url = Some("https://old.example/voice".to_owned());
    });
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Twilio).await;
    let t = targets(Carrier::Twilio);
    let out = api.configure_number(&cred(Carrier::Twilio, GOOD), &numbers[1], &t).await.unwrap();

    let path = format!("/2010-04-01/Accounts/{TWILIO_SID}/IncomingPhoneNumbers/{}.json", numbers[1].provider_number_id);
    let r = fake.requests();
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_get(Carrier::Twilio, &r[0], &path, "");
    assert_eq!((r[1].method.as_str(), r[1].path.as_str()), ("POST", path.as_str()));
    assert_eq!(r[1].header("content-type"), Some("application/x-www-form-urlencoded"));
    assert_eq!(
        r[1].form(),
        kv(&[
            ("VoiceUrl", &t.incoming),
            ("VoiceMethod", "POST"),
            ("StatusCallback", &t.status),
            ("StatusCallbackMethod", "POST"),
            ("VoiceApplicationSid", ""),
        ])
    );
    assert_auth(Carrier::Twilio, &r[1], GOOD);

    let n = fake.number(Carrier::Twilio, NUMBERS[1]);
    assert_eq!(n.voice_url.as_deref(), Some(t.incoming.as_str()));
    assert_eq!(n.status_callback.as_deref(), Some(t.status.as_str()));
    assert_eq!(n.voice_application_sid, None);
    assert_eq!(out["changed"], json!(true));
    assert_eq!(out["previous_voice_url"], json!("https://old.example/voice"));
    assert_eq!(out["previous_voice_application_sid"], json!("AP0123456789abcdef0123456789abcdef"));
    assert_eq!(out["actions"], json!(["detached TwiML application", "set voice URL and status callback"]));
}

#[tokio::test]
async fn twilio_refuses_a_number_on_a_trunk() {
    let fake = fake_with(Carrier::Twilio, &NUMBERS).await;
    fake.update_number(Carrier::Twilio, NUMBERS[0], |n| {
        n.trunk_sid = Some("TK0123456789abcdef0123456789abcdef".to_owned())
    });
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Twilio).await;
    let err = api
        .configure_number(&cred(Carrier::Twilio, GOOD), &numbers[0], &targets(Carrier::Twilio))
        .await
        .unwrap_err()
        .error;
    match err {
        ProviderError::Refused { message } => {
            assert!(message.contains("TK0123456789abcdef0123456789abcdef"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let r = fake.requests();
    assert_eq!(r.len(), 1, "nothing may be written: {r:#?}");
    assert_eq!(fake.number(Carrier::Twilio, NUMBERS[0]).voice_url, None);
}

#[tokio::test]
async fn twilio_configure_of_an_unknown_or_mismatched_sid_fails() {
    let fake = fake_with(Carrier::Twilio, &NUMBERS).await;
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Twilio).await;
    let unknown = ListedNumber { provider_number_id: "PNdeadbeef".to_owned(), ..numbers[0].clone() };
    let err = api
        .configure_number(&cred(Carrier::Twilio, GOOD), &unknown, &targets(Carrier::Twilio))
        .await
        .unwrap_err()
        .error;
    assert!(matches!(err, ProviderError::NotFound), "{err:?}");
    let swapped = ListedNumber { provider_number_id: numbers[1].provider_number_id.clone(), ..numbers[0].clone() };
    let err = api
        .configure_number(&cred(Carrier::Twilio, GOOD), &swapped, &targets(Carrier::Twilio))
        .await
        .unwrap_err()
        .error;
    assert!(matches!(err, ProviderError::Refused { .. }), "{err:?}");
    assert!(fake.requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn telnyx_configure_creates_reuses_and_updates_the_application() {
    let fake = fake_with(Carrier::Telnyx, &NUMBERS).await;
    // Contains the name but is not it: must not be taken for ours.
    fake.add_application(Carrier::Telnyx, "callgate-staging", "https://staging.example/voice", "");
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Telnyx).await;
    let t = targets(Carrier::Telnyx);
    let search =
        kv(&[("filter[application_name][contains]", "callgate"), ("page[number]", "1"), ("page[size]", "100")]);
    let app_body = json!({"application_name": "callgate", "webhook_event_url": t.incoming, "webhook_api_version": "2"});

    let out = api.configure_number(&cred(Carrier::Telnyx, GOOD), &numbers[0], &t).await.unwrap();
    let app_id = fake.applications(Carrier::Telnyx).into_iter().find(|a| a.name == "callgate").unwrap().id;
    let r = fake.requests();
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_eq!((r[0].method.as_str(), r[0].path.as_str()), ("GET", "/v2/call_control_applications"));
    assert_eq!(pairs(&r[0]), search);
    assert_auth(Carrier::Telnyx, &r[0], GOOD);
    assert_json_request(Carrier::Telnyx, &r[1], "POST", "/v2/call_control_applications", app_body.clone());
    let number_path = format!("/v2/phone_numbers/{}", numbers[0].provider_number_id);
    assert_json_request(Carrier::Telnyx, &r[2], "PATCH", &number_path, json!({"connection_id": app_id}));
    assert_eq!(out["application_id"], json!(app_id));
    assert_eq!(out["actions"], json!(["created application", "linked number"]));
    assert_eq!(fake.number(Carrier::Telnyx, NUMBERS[0]).connection_id.as_deref(), Some(app_id.as_str()));

    fake.clear_requests();
    let out = api.configure_number(&cred(Carrier::Telnyx, GOOD), &numbers[1], &t).await.unwrap();
    let r = fake.requests();
    assert_eq!(r.len(), 2, "{r:#?}");
    let number_path = format!("/v2/phone_numbers/{}", numbers[1].provider_number_id);
    assert_json_request(Carrier::Telnyx, &r[1], "PATCH", &number_path, json!({"connection_id": app_id}));
    assert_eq!(out["actions"], json!(["reused application", "linked number"]));

    fake.clear_requests();
    let moved = WebhookTargets {
        incoming: "https://gw2.example.com/webhooks/telnyx/voice".to_owned(),
        status: "https://gw2.example.com/webhooks/telnyx/voice".to_owned(),
    };
    let out = api.configure_number(&cred(Carrier::Telnyx, GOOD), &numbers[1], &moved).await.unwrap();
    let r = fake.requests();
    assert_eq!(r.len(), 3, "{r:#?}");
    assert_json_request(
        Carrier::Telnyx,
        &r[1],
        "PATCH",
        &format!("/v2/call_control_applications/{app_id}"),
        json!({"application_name": "callgate", "webhook_event_url": moved.incoming, "webhook_api_version": "2"}),
    );
    assert_eq!(out["actions"], json!(["updated application", "linked number"]));
    assert_eq!(fake.applications(Carrier::Telnyx).len(), 2);
}

#[tokio::test]
async fn exotel_configure_changes_nothing_and_explains() {
    let fake = fake_with(Carrier::Exotel, &NUMBERS).await;
    let api = api(&fake);
    let numbers = listed(&fake, &api, Carrier::Exotel).await;
    let t = targets(Carrier::Exotel);
    let out = api.configure_number(&cred(Carrier::Exotel, GOOD), &numbers[0], &t).await.unwrap();
    assert!(fake.requests().is_empty());
    assert_eq!(out["changed"], json!(false));
    assert_eq!(out["incoming_url"], json!(t.incoming));
    assert_eq!(out["status_url"], json!(t.status));
    let steps = out["manual_steps"].as_str().unwrap();
    assert!(steps.contains("Passthru") && steps.contains("Voicebot"), "{steps}");
}

#[tokio::test]
async fn configure_of_a_number_the_carrier_does_not_have_is_not_found() {
    let ghost = ListedNumber {
        number: E164::parse("+14155559999").unwrap(),
        provider_number_id: "1293384261075799999".to_owned(),
        friendly_name: None,
        voice_url: None,
        routed_to: None,
    };
    for carrier in [Carrier::Plivo, Carrier::Vobiz, Carrier::Telnyx] {
        let fake = fake_with(carrier, &NUMBERS).await;
        let err = api(&fake).configure_number(&cred(carrier, GOOD), &ghost, &targets(carrier)).await.unwrap_err().error;
        assert!(matches!(err, ProviderError::NotFound), "{carrier}: {err:?}");
    }
}

#[tokio::test]
async fn telnyx_answer_posts_the_body_with_an_encoded_call_control_id() {
    let fake = fake_with(Carrier::Telnyx, &[]).await;
    let api = api(&fake);
    let body = json!({
        "stream_url": "wss://gw.example.com/ws/telnyx",
        "stream_track": "inbound_track",
        "stream_bidirectional_mode": "rtp",
        "stream_bidirectional_codec": "PCMU",
        "client_state": "eyJvcmciOiJ4In0=",
        "command_id": "0191b6a8-7c1e-7000-8000-000000000001",
    });
    let key = Secret::new(GOOD.to_owned());
    api.telnyx_answer(&key, "v3:abc/def?x#y", &body).await.unwrap();
    let r = fake.requests();
    assert_eq!(r.len(), 1);
    assert_json_request(Carrier::Telnyx, &r[0], "POST", "/v2/calls/v3:abc%2Fdef%3Fx%23y/actions/answer", body.clone());

    let wrong = Secret::new(WRONG.to_owned());
    let err = api.telnyx_answer(&wrong, "v3:abc", &body).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidCredentials { .. }), "{err:?}");
    assert_no_secret(&err, &[WRONG]);
    assert!(matches!(api.telnyx_answer(&key, "..", &body).await, Err(ProviderError::NotFound)));

    fake.set_mode(Mode::Hang);
    let quick = ProviderApi::new(fake.carrier_urls(), Duration::from_millis(300)).unwrap();
    assert!(matches!(quick.telnyx_answer(&key, "v3:abc", &body).await, Err(ProviderError::Timeout)));
}

#[tokio::test]
async fn provider_api_is_cheap_to_clone_and_shareable() {
    let fake = fake_with(Carrier::Telnyx, &NUMBERS).await;
    let api = api(&fake);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.list_numbers(&cred(Carrier::Telnyx, GOOD)).await.map(|l| l.len()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), NUMBERS.len());
    }
}
