//! Phone numbers end to end against the fake carrier: validating an account, importing its
//! numbers (with and without auto-configuration), managing what was imported, organization
//! scoping, and the credential-rotation grace as the webhook path sees it.
//!
//! Every carrier runs through the same table; each assertion names its carrier. Apps run on a
//! pinned clock so timestamps and grace deadlines are exact.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use callgate::carriers::twilio::signature::{sign, TwilioKey};
use callgate::clock::{rfc3339, Clock};
use callgate::domain::Carrier;

use crate::fake_carrier::{FakeCarrier, FakeNumber, Mode, Recorded, SLOW};
use crate::helpers::*;

/// The test server's CALLGATE_PUBLIC_URL.
const PUBLIC: &str = "https://gw.example.com";
/// 2024-05-01T10:00:00.000Z.
const T0: i64 = 1_714_557_600_000;
const GRACE_SECS: i64 = 3600;
const GRACE_MS: i64 = GRACE_SECS * 1000;

const PLIVO_ID: &str = "MAPHONESPLIVO0000001";
const VOBIZ_ID: &str = "MA_PHONESVOBIZ";
const TWILIO_SID: &str = "AC00112233445566778899aabbccddeeff";
const EXOTEL_KEY: &str = "exokey-phones";
const EXOTEL_SID: &str = "acmephones";
const TELNYX_PUBLIC_KEY: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
const WRONG: &str = "wrongSECRETtoken000999";
/// A second Twilio auth token for the same account: the rotation target.
const TWILIO_ROTATED: &str = "twilioSECRETrotated000777";
const EXOTEL_TOKEN: &str = "exotel-webhook-TOKEN-0123456789";

/// One account on the fake per carrier. Three numbers and a page size of 2 make two pages;
/// numbers differ across carriers because a number can be imported only once.
struct Account {
    carrier: Carrier,
    secret: &'static str,
    numbers: [&'static str; 3],
}

const ACCOUNTS: [Account; 5] = [
    Account {
        carrier: Carrier::Plivo,
        secret: "plivoSECRETinline000111",
        numbers: ["+14155550101", "+14155550102", "+14155550103"],
    },
    Account {
        carrier: Carrier::Vobiz,
        secret: "vobizSECRETinline000222",
        numbers: ["+918035550101", "+918035550102", "+918035550103"],
    },
    Account {
        carrier: Carrier::Twilio,
        secret: "twilioSECRETinline000333",
        numbers: ["+14155550201", "+14155550202", "+14155550203"],
    },
    Account {
        carrier: Carrier::Exotel,
        secret: "exotelSECRETinline000444",
        numbers: ["+918045550101", "+918045550102", "+918045550103"],
    },
    Account {
        carrier: Carrier::Telnyx,
        secret: "telnyxSECRETinline000555",
        numbers: ["+13125550101", "+13125550102", "+13125550103"],
    },
];

fn account(carrier: Carrier) -> &'static Account {
    ACCOUNTS.iter().find(|a| a.carrier == carrier).expect("every carrier has an account")
}

fn credentials(carrier: Carrier, secret: &str) -> Value {
    match carrier {
        Carrier::Plivo => json!({"auth_id": PLIVO_ID, "auth_token": secret}),
        Carrier::Vobiz => json!({"auth_id": VOBIZ_ID, "auth_token": secret}),
        Carrier::Twilio => json!({"account_sid": TWILIO_SID, "auth_token": secret}),
        Carrier::Exotel => json!({"api_key": EXOTEL_KEY, "api_token": secret, "account_sid": EXOTEL_SID}),
        Carrier::Telnyx => json!({"api_key": secret, "public_key": TELNYX_PUBLIC_KEY}),
    }
}

async fn fake() -> FakeCarrier {
    let fake = FakeCarrier::start().await;
    for a in &ACCOUNTS {
        fake.add_account(a.carrier, credentials(a.carrier, a.secret), a.numbers);
    }
    // The Twilio account's token after a rotation on Twilio's side.
    fake.accept_also(Carrier::Twilio, TWILIO_ROTATED);
    fake.set_page_size(2);
    fake
}

/// Every carrier pointed at the fake, a pinned clock, a one-hour grace. The clock never
/// leaves the first minute, so the tests that call the carrier many times lift its rate limit
/// (its own test sets one).
fn options(fake: &FakeCarrier) -> Options {
    let mut o = Options::default()
        .clock(Clock::pinned(T0))
        .env("CALLGATE_CREDENTIAL_GRACE_SECS", GRACE_SECS.to_string())
        .env("CALLGATE_CARRIER_RATE_LIMIT_PER_MINUTE", "1000");
    for k in ["PLIVO", "VOBIZ", "TWILIO", "TELNYX", "EXOTEL"] {
        o = o.env(&format!("CALLGATE_{k}_API_URL"), fake.base_url());
    }
    o
}

async fn setup() -> (FakeCarrier, TestApp, Org) {
    let fake = fake().await;
    let app = spawn_with(options(&fake)).await;
    let org = app.create_org("Acme").await;
    (fake, app, org)
}

struct Reply {
    status: u16,
    text: String,
    retry_after: Option<String>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("not JSON ({}): {:?}", self.status, self.text))
    }
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let res = req.send().await.expect("the server answers");
    let retry_after = res.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    Reply { status: res.status().as_u16(), retry_after, text: res.text().await.expect("a readable body") }
}

/// The API's error shape, exactly.
fn assert_error(r: &Reply, status: u16, code: &str, message: &str, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text);
    assert_eq!(r.json(), json!({"error": {"code": code, "message": message}}), "{what}");
}

async fn validate(app: &TestApp, org: &Org, carrier: Carrier, body: Value) -> Reply {
    send(app.post(org, &format!("/voice/{carrier}/byok/validate")).json(&body)).await
}

async fn import(app: &TestApp, org: &Org, carrier: Carrier, body: Value) -> Reply {
    send(app.post(org, &format!("/voice/{carrier}/byok/import")).json(&body)).await
}

async fn get_phone(app: &TestApp, org: &Org, id: &str) -> Reply {
    send(app.get(org, &format!("/phone-numbers/{id}"))).await
}

async fn patch_phone(app: &TestApp, org: &Org, id: &str, body: Value) -> Reply {
    send(app.patch(org, &format!("/phone-numbers/{id}")).json(&body)).await
}

async fn list(app: &TestApp, org: &Org, query: &str) -> Value {
    let r = send(app.get(org, &format!("/phone-numbers{query}"))).await;
    assert_eq!(r.status, 200, "list {query}: {}", r.text);
    r.json()
}

fn ids(listing: &Value) -> Vec<String> {
    listing["phone_numbers"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_owned()).collect()
}

/// Sets the organization's saved credential for `carrier`; its secret id.
async fn save_byok(app: &TestApp, org: &Org, carrier: Carrier, secret: &str) -> String {
    let body = json!({"provider": carrier.as_str(), "api_key": credentials(carrier, secret)});
    let r = send(app.post(org, "/byok").json(&body)).await;
    assert_eq!(r.status, 200, "{carrier}: {}", r.text);
    assert!(!r.text.contains(secret), "{carrier}");
    r.json()["credential"]["secret_id"].as_str().unwrap().to_owned()
}

/// Carriers that give a number a name the listing carries.
fn named(carrier: Carrier) -> bool {
    matches!(carrier, Carrier::Plivo | Carrier::Twilio | Carrier::Exotel)
}

fn listed_numbers(fake: &FakeCarrier, a: &Account) -> Value {
    let on_fake = fake.numbers(a.carrier);
    assert_eq!(on_fake.len(), 3, "{}", a.carrier);
    on_fake
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "number": a.numbers[i],
                "provider_number_id": n.id,
                "friendly_name": named(a.carrier).then(|| format!("Line {}", i + 1)),
                "voice_url": null,
            })
        })
        .collect()
}

fn webhook_urls(carrier: Carrier, id: &str) -> Value {
    match carrier {
        Carrier::Telnyx => json!({
            "incoming": format!("{PUBLIC}/webhooks/telnyx/voice"),
            "status": format!("{PUBLIC}/webhooks/telnyx/voice"),
        }),
        c => json!({
            "incoming": format!("{PUBLIC}/{c}/incoming/{id}"),
            "status": format!("{PUBLIC}/{c}/status/{id}"),
        }),
    }
}

/// A freshly imported number of `a` (its `index`th), as the API shows it: no label, empty
/// config, nothing configured on the carrier, created at T0.
fn phone_json(fake: &FakeCarrier, a: &Account, index: usize, id: &str, secret_id: &str) -> Value {
    let on_fake = &fake.numbers(a.carrier)[index];
    json!({
        "id": id,
        "number": a.numbers[index],
        "provider": a.carrier.as_str(),
        "provider_number_id": on_fake.id,
        "friendly_name": named(a.carrier).then(|| format!("Line {}", index + 1)),
        "label": null,
        "billing_status": "byok",
        "monthly_cost_cents": 0,
        "config": {"stream_url": null, "assistant_url": null, "upstream_url": null, "exotel_webhook_token_set": false},
        "credential_secret_id": secret_id,
        "previous_credential": null,
        "webhook_urls": webhook_urls(a.carrier, id),
        "provider_configuration": null,
        "created_at": rfc3339(T0),
        "updated_at": rfc3339(T0),
    })
}

/// Imports `a`'s `index`th number with its inline credential; the response body.
async fn import_inline(app: &TestApp, org: &Org, a: &Account, index: usize) -> Value {
    let body = json!({"number": a.numbers[index], "credentials": credentials(a.carrier, a.secret)});
    let r = import(app, org, a.carrier, body).await;
    assert_eq!(r.status, 201, "{}: {}", a.carrier, r.text);
    assert!(!r.text.contains(a.secret), "{}", a.carrier);
    r.json()
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key} is not a string in {v}"))
}

fn secret_ids(app: &TestApp) -> Vec<String> {
    let mut ids: Vec<String> =
        app.state.store.secrets_all().unwrap().into_iter().map(|s| s.id.as_str().to_owned()).collect();
    ids.sort();
    ids
}

// --- validate ----------------------------------------------------------------------------

#[tokio::test]
async fn validate_lists_every_number_across_pages_and_stores_nothing() {
    let (fake, app, org) = setup().await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        let expected = json!({"valid": true, "provider": c.as_str(), "numbers": listed_numbers(&fake, a)});
        // Wrapped in "credentials", and the credential object on its own.
        for body in [json!({"credentials": credentials(c, a.secret)}), credentials(c, a.secret)] {
            fake.clear_requests();
            let r = validate(&app, &org, c, body).await;
            assert_eq!(r.status, 200, "{c}: {}", r.text);
            assert_eq!(r.json(), expected, "{c}");
            assert!(!r.text.contains(a.secret), "{c}");
            let sent = fake.requests();
            assert_eq!(sent.len(), 2, "{c}: one request per page: {sent:#?}");
            for req in &sent {
                assert_eq!(req.method, "GET", "{c}");
                assert_auth(a, req, a.secret);
            }
        }
    }
    // Plivo lists digits without `+`; they come back in E.164 and stay the number's id.
    let plivo = fake.numbers(Carrier::Plivo);
    assert_eq!(plivo[0].id, "14155550101");

    assert_eq!(list(&app, &org, "").await, json!({"phone_numbers": [], "next_after": null}));
    assert!(secret_ids(&app).is_empty());
    for a in &ACCOUNTS {
        app.assert_not_in_data_dir(a.secret);
    }
}

/// Beside `credentials`, a field validate does not know is refused, as in every other body,
/// before the carrier is asked.
#[tokio::test]
async fn validate_refuses_a_field_it_does_not_know_beside_the_credentials() {
    let (fake, app, org) = setup().await;
    let a = account(Carrier::Twilio);
    fake.clear_requests();
    let body = json!({"credentials": credentials(Carrier::Twilio, a.secret), "dry_run": true});
    let r = validate(&app, &org, Carrier::Twilio, body).await;
    assert_error(&r, 422, "invalid_field", "dry_run: unknown field", "extra field");
    assert!(fake.requests().is_empty(), "the carrier was asked");
}

/// A carrier whose last page names itself as the next one: each number is listed once, and
/// the listing ends at the first page that brings nothing new.
#[tokio::test]
async fn a_listing_whose_pages_go_round_in_circles_ends_with_each_number_once() {
    let (fake, app, org) = setup().await;
    let a = ACCOUNTS.iter().find(|a| a.carrier == Carrier::Twilio).unwrap();
    fake.set_circling_pages();
    fake.clear_requests();
    let r = validate(&app, &org, Carrier::Twilio, credentials(Carrier::Twilio, a.secret)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let expected = json!({"valid": true, "provider": "twilio", "numbers": listed_numbers(&fake, a)});
    assert_eq!(r.json(), expected);
    let pages: Vec<String> = fake.requests().iter().map(|r| format!("{}?{}", r.path, r.query)).collect();
    assert_eq!(pages.len(), 3, "two pages, then the last one again: {pages:#?}");
    assert_eq!(pages[1], pages[2]);

    // An item that is no phone number (a short code) repeats too, and ends it as well.
    let sid = "AC0123456789abcdef0123456789abcd99";
    let cred = json!({"account_sid": sid, "auth_token": "circlingShortCodeToken0001"});
    fake.add_account(Carrier::Twilio, cred.clone(), ["+14155550990", "12345"]);
    fake.clear_requests();
    let r = validate(&app, &org, Carrier::Twilio, cred).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let numbers = r.json()["numbers"].clone();
    let listed: Vec<&str> = numbers.as_array().unwrap().iter().map(|n| n["number"].as_str().unwrap()).collect();
    assert_eq!(listed, ["+14155550990"]);
    assert_eq!(fake.requests().len(), 2, "the one page, then it again");
}

#[tokio::test]
async fn validate_and_import_fall_back_to_the_saved_byok_credential() {
    let (fake, app, org) = setup().await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        fake.clear_requests();
        let none = format!("no saved {c} credentials; set them with POST /byok or pass credentials");
        let r = validate(&app, &org, c, json!({})).await;
        assert_error(&r, 422, "no_saved_credentials", &none, &format!("{c} validate"));
        let r = validate(&app, &org, c, json!({"credentials": null})).await;
        assert_error(&r, 422, "no_saved_credentials", &none, &format!("{c} validate null"));
        let r = import(&app, &org, c, json!({"number": a.numbers[0]})).await;
        assert_error(&r, 422, "no_saved_credentials", &none, &format!("{c} import"));
        assert!(fake.requests().is_empty(), "{c}: nothing to ask the carrier with");

        let saved = save_byok(&app, &org, c, a.secret).await;
        let r = validate(&app, &org, c, json!({})).await;
        assert_eq!(r.status, 200, "{c}: {}", r.text);
        assert_eq!(r.json(), json!({"valid": true, "provider": c.as_str(), "numbers": listed_numbers(&fake, a)}));

        let r = import(&app, &org, c, json!({"number": a.numbers[0]})).await;
        assert_eq!(r.status, 201, "{c}: {}", r.text);
        let v = r.json();
        assert_eq!(v, phone_json(&fake, a, 0, str_of(&v, "id"), &saved), "{c}");
    }
    // Importing with the saved credential seals nothing new.
    assert_eq!(secret_ids(&app).len(), ACCOUNTS.len());
    for a in &ACCOUNTS {
        app.assert_not_in_data_dir(a.secret);
    }
}

/// Each validate, import or PATCH with new credentials is a request on the customer's carrier
/// account. Past the limit the organization gets 429 before the carrier is asked, nothing is
/// stored, and other organizations and other operations go on.
#[tokio::test]
async fn calls_to_the_carrier_are_rate_limited_per_organization() {
    let fake = fake().await;
    let app = spawn_with(options(&fake).env("CALLGATE_CARRIER_RATE_LIMIT_PER_MINUTE", "3")).await;
    let org = app.create_org("Acme").await;
    let other = app.create_org("Other").await;
    let a = &ACCOUNTS[0];
    let c = a.carrier;
    let body = json!({"credentials": credentials(c, a.secret)});
    assert_eq!(validate(&app, &org, c, body.clone()).await.status, 200);
    // Refused before the carrier is asked, so they take nothing from the budget.
    let r = validate(&app, &org, c, json!({})).await;
    assert_eq!(r.status, 422, "{}", r.text);
    let r = import(&app, &org, c, json!({"number": "not a number"})).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(validate(&app, &org, c, body.clone()).await.status, 200);
    let phone = import_inline(&app, &org, a, 0).await;
    let id = str_of(&phone, "id");

    fake.clear_requests();
    let limited = "too many requests; retry later";
    let r = validate(&app, &org, c, body.clone()).await;
    assert_error(&r, 429, "rate_limited", limited, "validate");
    assert_eq!(r.retry_after.as_deref(), Some("60"));
    let r = import(&app, &org, c, json!({"number": a.numbers[1], "credentials": credentials(c, a.secret)})).await;
    assert_error(&r, 429, "rate_limited", limited, "import");
    let r = patch_phone(&app, &org, id, json!({"credentials": credentials(c, a.secret)})).await;
    assert_error(&r, 429, "rate_limited", limited, "patch with credentials");
    assert!(fake.requests().is_empty(), "the carrier was asked: {:#?}", fake.requests());
    let listed = list(&app, &org, "").await;
    let numbers: Vec<&str> = listed["phone_numbers"].as_array().unwrap().iter().map(|p| str_of(p, "number")).collect();
    assert_eq!(numbers, [a.numbers[0]], "the refused import stored nothing");
    assert_eq!(secret_ids(&app).len(), 1, "the refused import and PATCH sealed nothing");

    // What does not reach the carrier is not limited; nor is another organization.
    let r = patch_phone(&app, &org, id, json!({"label": "front desk"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(validate(&app, &other, c, body.clone()).await.status, 200);

    // A minute later the organization's budget is back.
    app.clock.set_ms(T0 + 60_000);
    assert_eq!(validate(&app, &org, c, body).await.status, 200);
}

fn carrier_auth_message(carrier: Carrier) -> &'static str {
    match carrier {
        Carrier::Plivo => "Authentication failed",
        Carrier::Vobiz => "Invalid X-Auth-ID or X-Auth-Token",
        Carrier::Twilio => "Authenticate",
        Carrier::Telnyx => "The API key looks malformed. Check that you copied it correctly.",
        Carrier::Exotel => "Authentication is required to view this page.",
    }
}

#[tokio::test]
async fn carrier_failures_map_to_stable_errors_and_store_nothing() {
    let (fake, app, org) = setup().await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        let good = json!({"credentials": credentials(c, a.secret)});
        let wrong = json!({"credentials": credentials(c, WRONG)});
        let rejected = format!("{c} rejected the credentials: {}", carrier_auth_message(c));

        let r = validate(&app, &org, c, wrong.clone()).await;
        assert_error(&r, 422, "invalid_provider_credentials", &rejected, &format!("{c} wrong"));
        let r = import(&app, &org, c, json!({"number": a.numbers[0], "credentials": credentials(c, WRONG)})).await;
        assert_error(&r, 422, "invalid_provider_credentials", &rejected, &format!("{c} import wrong"));

        // A carrier error text that quotes the presented secret is dropped.
        fake.set_mode(Mode::UnauthorizedEcho);
        let r = validate(&app, &org, c, good.clone()).await;
        let bare = format!("{c} rejected the credentials");
        assert_error(&r, 422, "invalid_provider_credentials", &bare, &format!("{c} echo"));
        assert!(!r.text.contains(a.secret), "{c}");

        let unavailable = format!("{c}'s API is unavailable or gave an answer callgate cannot read");
        for mode in [Mode::ServerError, Mode::Garbage, Mode::WrongShape] {
            fake.set_mode(mode);
            let r = validate(&app, &org, c, good.clone()).await;
            assert_error(&r, 502, "provider_unavailable", &unavailable, &format!("{c} {mode:?}"));
            let body = json!({"number": a.numbers[0], "credentials": credentials(c, a.secret)});
            let r = import(&app, &org, c, body).await;
            assert_error(&r, 502, "provider_unavailable", &unavailable, &format!("{c} import {mode:?}"));
        }
        // The carrier's 429 is passed on as such, with its Retry-After, not as an outage.
        fake.set_mode(Mode::RateLimited);
        let limited = format!("{c} is rate-limiting this account's API requests; try again later");
        let r = validate(&app, &org, c, good.clone()).await;
        assert_error(&r, 429, "provider_rate_limited", &limited, &format!("{c} rate limited"));
        assert_eq!(r.retry_after.as_deref(), Some("17"), "{c}");
        fake.set_mode(Mode::Ok);
    }
    assert_eq!(list(&app, &org, "").await, json!({"phone_numbers": [], "next_after": null}));
    assert!(secret_ids(&app).is_empty());
}

#[tokio::test]
async fn a_hanging_carrier_gives_504_within_twice_the_timeout() {
    const TIMEOUT_MS: u64 = 500;
    let fake = fake().await;
    let app = spawn_with(options(&fake).env("CALLGATE_PROVIDER_TIMEOUT_MS", TIMEOUT_MS.to_string())).await;
    let org = app.create_org("Acme").await;
    fake.set_mode(Mode::Hang);
    for a in &ACCOUNTS {
        let c = a.carrier;
        let late = format!("{c}'s API did not answer in time");
        let started = Instant::now();
        let r = validate(&app, &org, c, json!({"credentials": credentials(c, a.secret)})).await;
        let took = started.elapsed();
        assert_error(&r, 504, "provider_timeout", &late, &format!("{c} validate"));
        assert!(took < Duration::from_millis(2 * TIMEOUT_MS), "{c}: answered after {took:?}");

        let started = Instant::now();
        let r = import(&app, &org, c, json!({"number": a.numbers[0], "credentials": credentials(c, a.secret)})).await;
        let took = started.elapsed();
        assert_error(&r, 504, "provider_timeout", &late, &format!("{c} import"));
        assert!(took < Duration::from_millis(2 * TIMEOUT_MS), "{c}: answered after {took:?}");
    }
    assert_eq!(list(&app, &org, "").await, json!({"phone_numbers": [], "next_after": null}));
    assert!(secret_ids(&app).is_empty());
}

// --- import ------------------------------------------------------------------------------

#[tokio::test]
async fn import_stores_the_number_with_byok_billing_and_never_shows_the_secret() {
    let (fake, app, org) = setup().await;
    let other = app.create_org("Other").await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        // The last number, on the listing's second page.
        let mut config = json!({"stream_url": "wss://agent.example.com/stream?x=1"});
        if c == Carrier::Exotel {
            config["exotel_webhook_token"] = json!(EXOTEL_TOKEN);
        }
        let body = json!({
            "number": a.numbers[2],
            "credentials": credentials(c, a.secret),
            "label": "Front desk",
            "config": config,
        });
        let r = import(&app, &org, c, body).await;
        assert_eq!(r.status, 201, "{c}: {}", r.text);
        assert!(!r.text.contains(a.secret), "{c}");
        let v = r.json();
        let id = str_of(&v, "id");
        assert!(id.starts_with("ph_"), "{c}: {id}");
        let secret_id = str_of(&v, "credential_secret_id");
        assert!(secret_id.starts_with("sec_"), "{c}: {secret_id}");
        let mut expected = phone_json(&fake, a, 2, id, secret_id);
        expected["label"] = json!("Front desk");
        expected["config"]["stream_url"] = json!("wss://agent.example.com/stream?x=1");
        expected["config"]["exotel_webhook_token_set"] = json!(c == Carrier::Exotel);
        assert_eq!(v, expected, "{c}");

        let r = get_phone(&app, &org, id).await;
        assert_eq!(r.status, 200, "{c}: {}", r.text);
        assert!(!r.text.contains(a.secret), "{c}");
        assert_eq!(r.json(), expected, "{c}");

        // Again, from this organization or another one.
        let again = json!({"number": a.numbers[2], "credentials": credentials(c, a.secret)});
        let taken = format!("{} is already imported", a.numbers[2]);
        // The same organization is refused before the carrier is asked; another one only once
        // the carrier has shown the number on the account it gave, so that nobody learns which
        // numbers are imported here without holding them.
        for (who, o, asks) in [("same org", &org, false), ("other org", &other, true)] {
            fake.clear_requests();
            let r = import(&app, o, c, again.clone()).await;
            assert_error(&r, 409, "number_already_imported", &taken, &format!("{c} {who}"));
            assert_eq!(!fake.requests().is_empty(), asks, "{c} {who}");
        }
        let guess = json!({"number": a.numbers[2], "credentials": credentials(c, WRONG)});
        let r = import(&app, &other, c, guess).await;
        assert_eq!((r.status, r.json()["error"]["code"].as_str()), (422, Some("invalid_provider_credentials")), "{c}");

        let absent = "+15005550199";
        let r = import(&app, &org, c, json!({"number": absent, "credentials": credentials(c, a.secret)})).await;
        let msg = format!("{absent} is not on this {c} account");
        assert_error(&r, 422, "number_not_on_account", &msg, &format!("{c} absent"));

        let e164 = "number: not an E.164 phone number (expected + followed by 8 to 15 digits)";
        let fresh = a.numbers[0];
        let digits = fresh.trim_start_matches('+');
        let long_token = "0123456789abcdef0123";
        let mut cases = vec![
            (json!({"number": digits}), e164.to_owned()),
            (json!({"number": "+1234"}), e164.to_owned()),
            (json!({"number": "+1 415 555 0101"}), e164.to_owned()),
            (
                json!({"number": fresh, "config": {"stream_url": "https://agent.example.com/stream"}}),
                "config.stream_url: must be a wss or ws URL".to_owned(),
            ),
            (
                json!({"number": fresh, "config": {"stream_url": "wss://"}}),
                "config.stream_url: must be a wss or ws URL".to_owned(),
            ),
            (json!({"number": fresh, "config": {"stream_url": 7}}), "config.stream_url: must be a string".to_owned()),
            (json!({"number": fresh, "config": {"voice": "alloy"}}), "config.voice: unknown setting".to_owned()),
            (
                json!({"number": fresh, "label": "top", "config": {"label": "inner"}}),
                "label: give label or config.label, not both".to_owned(),
            ),
        ];
        // URLs the gateway calls itself, aimed where cloud metadata lives or nowhere.
        for (name, url) in [
            ("upstream_url", "http://169.254.169.254/latest/meta-data"),
            ("assistant_url", "http://[fe80::1]/decide"),
            ("upstream_url", "http://0.0.0.0:80/"),
            ("assistant_url", "http://[::ffff:169.254.169.254]/"),
            ("upstream_url", "http://[fd00:ec2::254]/latest/meta-data"),
            ("upstream_url", "http://255.255.255.255/"),
            ("upstream_url", "http://100.100.100.200/latest/meta-data"),
            ("assistant_url", "http://[64:ff9b::a9fe:a9fe]/"),
            ("upstream_url", "http://[::169.254.169.254]/"),
        ] {
            cases.push((
                json!({"number": fresh, "config": { name: url }}),
                format!("config.{name}: must not be a link-local, unspecified, broadcast or metadata address"),
            ));
        }
        if c == Carrier::Exotel {
            let shape = "config.exotel_webhook_token: must be 16 to 256 characters from A-Z, a-z, 0-9 and - . _ ~ (it goes into a URL as is)";
            // Each of the last four would arrive changed in the query, or not at all.
            for token in
                ["short-token", "abcdefgh+ijklmnop", "abcdefgh%41ijklmnop", "abcdefgh&ijklmnop", "abcdefgh#ijklmnop"]
            {
                cases.push((json!({"number": fresh, "config": {"exotel_webhook_token": token}}), shape.to_owned()));
            }
        } else {
            cases.push((
                json!({"number": fresh, "config": {"exotel_webhook_token": long_token}}),
                "config.exotel_webhook_token: only Exotel numbers take a webhook token".to_owned(),
            ));
        }
        for (mut body, message) in cases {
            body["credentials"] = credentials(c, a.secret);
            fake.clear_requests();
            let r = import(&app, &org, c, body.clone()).await;
            assert_error(&r, 422, "invalid_field", &message, &format!("{c} {body}"));
            assert!(fake.requests().is_empty(), "{c} {body}: refused before asking the carrier");
        }
        // An unknown top-level field is refused by the body's shape.
        let r =
            import(&app, &org, c, json!({"number": fresh, "credentials": credentials(c, a.secret), "numbr": 1})).await;
        assert_eq!(r.status, 422, "{c}: {}", r.text);
        assert_eq!(r.json()["error"]["code"], "invalid_field", "{c}");
        assert!(str_of(&r.json()["error"], "message").contains("unknown field `numbr`"), "{c}: {}", r.text);
    }

    let all = list(&app, &org, "").await;
    assert_eq!(all["phone_numbers"].as_array().unwrap().len(), ACCOUNTS.len());
    assert_eq!(list(&app, &other, "").await, json!({"phone_numbers": [], "next_after": null}));
    let text = all.to_string();
    // One inline credential sealed per imported number, and nothing readable anywhere.
    assert_eq!(secret_ids(&app).len(), ACCOUNTS.len());
    for a in &ACCOUNTS {
        assert!(!text.contains(a.secret), "{}", a.carrier);
        app.assert_not_in_data_dir(a.secret);
    }
    app.assert_not_in_data_dir(EXOTEL_TOKEN);
}

// --- release_provider --------------------------------------------------------------------

const OLD_VOICE: &str = "https://ivr.example.com/voice";
const OLD_STATUS: &str = "https://ivr.example.com/status";
const OLD_TWIML_APP: &str = "AP00112233445566778899aabbccddeeff";

async fn delete_phone(app: &TestApp, org: &Org, id: &str, query: &str) -> Reply {
    send(app.delete(org, &format!("/phone-numbers/{id}{query}"))).await
}

/// Deletes the number with `release_provider`, which must answer 200: its `provider_release`.
async fn release(app: &TestApp, org: &Org, id: &str) -> Value {
    let r = delete_phone(app, org, id, "?release_provider=true").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["provider_release"].clone()
}

/// Routes `a`'s `index`th number, on the carrier's side, to something of the customer's own
/// before callgate configures it: what a release is to put back. Its application or
/// connection id (Twilio: the TwiML application).
fn route_elsewhere(fake: &FakeCarrier, a: &Account, index: usize) -> Option<String> {
    let c = a.carrier;
    match c {
        Carrier::Plivo | Carrier::Vobiz | Carrier::Telnyx => {
            let own = fake.add_application(c, "customer-ivr", OLD_VOICE, OLD_STATUS);
            fake.update_number(c, a.numbers[index], |n| match c {
                Carrier::Telnyx => n.connection_id = Some(own.clone()),
                _ => n.app_id = Some(own.clone()),
            });
            Some(own)
        }
        Carrier::Twilio => {
            let own = fake.add_application(c, "customer-twiml", OLD_VOICE, OLD_STATUS);
            fake.update_number(c, a.numbers[index], |n| {
                n.voice_url = Some(OLD_VOICE.to_owned());
                n.voice_method = "GET".to_owned();
                n.status_callback = Some(OLD_STATUS.to_owned());
                n.voice_application_sid = Some(own.clone());
            });
            Some(own)
        }
        Carrier::Exotel => None,
    }
}

fn plivo_family_base(c: Carrier) -> String {
    match c {
        Carrier::Plivo => format!("/v1/Account/{PLIVO_ID}/"),
        _ => format!("/api/v1/Account/{VOBIZ_ID}/"),
    }
}

#[tokio::test]
async fn release_provider_puts_each_carrier_back_as_it_was_and_takes_callgates_application_away() {
    let (fake, app, org) = setup().await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        // Index 0 had a route of the customer's own before; index 1 had none.
        for (index, previous) in [(0, route_elsewhere(&fake, a, 0)), (1, None)] {
            let what = format!("{c} #{index}");
            let (v, _) = import_configured(&fake, &app, &org, a, index).await;
            let id = str_of(&v, "id").to_owned();
            let configured = &v["provider_configuration"];
            let ours = configured["application_id"].as_str().map(str::to_owned);
            match c {
                Carrier::Plivo | Carrier::Vobiz => {
                    assert_eq!(configured["previous_application_id"], json!(previous), "{what}")
                }
                Carrier::Telnyx => assert_eq!(configured["previous_connection_id"], json!(previous), "{what}"),
                Carrier::Twilio => {
                    assert_eq!(configured["previous_voice_application_sid"], json!(previous), "{what}");
                    let old = |s: &str| previous.as_ref().map(|_| s.to_owned());
                    assert_eq!(configured["previous_voice_url"], json!(old(OLD_VOICE)), "{what}");
                    assert_eq!(configured["previous_status_callback"], json!(old(OLD_STATUS)), "{what}");
                }
                Carrier::Exotel => {}
            }

            fake.clear_requests();
            let r = delete_phone(&app, &org, &id, "?release_provider=true").await;
            assert_eq!(r.status, 200, "{what}: {}", r.text);
            assert!(!r.text.contains(a.secret), "{what}");
            let sent = fake.requests();
            for req in &sent {
                assert_auth(a, req, a.secret);
            }
            let on_fake = fake.number(c, a.numbers[index]);
            let digits = a.numbers[index].trim_start_matches('+');
            let report = match c {
                Carrier::Plivo | Carrier::Vobiz => {
                    let ours = ours.clone().expect("callgate's application");
                    let base = plivo_family_base(c);
                    // The read of where the number points, then (with one) of the application
                    // to go back to, the link, and the delete of callgate's application.
                    let mut sent = sent.clone();
                    if let Some(p) = &previous {
                        assert_get(a, &sent.remove(1), &format!("{base}Application/{p}/"), "");
                    }
                    assert_eq!(sent.len(), 3, "{what}: {sent:#?}");
                    match (c, &previous) {
                        (Carrier::Plivo, p) => {
                            assert_get(a, &sent[0], &format!("{base}Number/{digits}/"), "");
                            let body = p.as_ref().map_or_else(|| json!({}), |p| json!({"app_id": p}));
                            assert_json_request(a, &sent[1], "POST", &format!("{base}Number/{digits}/"), body);
                        }
                        (_, p) => {
                            let query = format!("page=1&per_page=100&search=%2B{digits}");
                            assert_get(a, &sent[0], &format!("{base}numbers"), &query);
                            let path = format!("{base}numbers/%2B{digits}/application");
                            match p {
                                Some(p) => {
                                    assert_json_request(a, &sent[1], "POST", &path, json!({"application_id": p}))
                                }
                                None => assert_eq!(
                                    (sent[1].method.as_str(), sent[1].path.as_str()),
                                    ("DELETE", path.as_str()),
                                    "{what}"
                                ),
                            }
                        }
                    }
                    let app_path = format!("{base}Application/{ours}/");
                    assert_eq!((sent[2].method.as_str(), sent[2].path.as_str()), ("DELETE", app_path.as_str()));
                    assert_eq!(on_fake.app_id, previous, "{what}: linked back");
                    assert!(
                        fake.applications(c).iter().all(|x| x.id != ours),
                        "{what}: callgate's application is gone"
                    );
                    json!({
                        "changed": true,
                        "application_id": ours,
                        "linked_application_id": previous,
                        "actions": [
                            if previous.is_some() { "linked number to its previous application" } else { "unlinked number from callgate's application" },
                            "deleted application",
                        ],
                    })
                }
                Carrier::Twilio => {
                    let path = format!("/2010-04-01/Accounts/{TWILIO_SID}/IncomingPhoneNumbers/{}.json", on_fake.id);
                    // With a TwiML application before, it is looked up before it is reattached.
                    let mut sent = sent.clone();
                    if let Some(p) = &previous {
                        assert_get(
                            a,
                            &sent.remove(1),
                            &format!("/2010-04-01/Accounts/{TWILIO_SID}/Applications/{p}.json"),
                            "",
                        );
                    }
                    assert_eq!(sent.len(), 2, "{what}: {sent:#?}");
                    assert_get(a, &sent[0], &path, "");
                    assert_eq!((sent[1].method.as_str(), sent[1].path.as_str()), ("POST", path.as_str()), "{what}");
                    let old = |s: &str| previous.as_ref().map(|_| s.to_owned());
                    // The number's own methods: GET for its old voice URL, POST before callgate's.
                    let voice_method = if previous.is_some() { "GET" } else { "POST" };
                    let form: Vec<(String, String)> = [
                        ("VoiceUrl", old(OLD_VOICE).unwrap_or_default()),
                        ("VoiceMethod", voice_method.to_owned()),
                        ("VoiceApplicationSid", previous.clone().unwrap_or_default()),
                        ("StatusCallback", old(OLD_STATUS).unwrap_or_default()),
                        ("StatusCallbackMethod", "POST".to_owned()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                    assert_eq!(sent[1].form(), form, "{what}");
                    assert_eq!(
                        (
                            on_fake.voice_url.clone(),
                            on_fake.voice_method.as_str(),
                            on_fake.status_callback.clone(),
                            on_fake.voice_application_sid.clone()
                        ),
                        (old(OLD_VOICE), voice_method, old(OLD_STATUS), previous.clone()),
                        "{what}"
                    );
                    let mut actions = vec!["restored voice URL"];
                    if previous.is_some() {
                        actions.push("reattached TwiML application");
                    }
                    actions.push("restored status callback");
                    json!({
                        "changed": true,
                        "voice_url": old(OLD_VOICE),
                        "voice_method": voice_method,
                        "voice_application_sid": previous,
                        "status_callback": old(OLD_STATUS),
                        "status_callback_method": "POST",
                        "actions": actions,
                    })
                }
                Carrier::Telnyx => {
                    let path = format!("/v2/phone_numbers/{}", on_fake.id);
                    assert_get(a, &sent[0], &path, "");
                    let ours = ours.clone().expect("callgate's application");
                    assert!(fake.applications(c).iter().any(|x| x.id == ours), "{what}: the shared application stays");
                    match &previous {
                        Some(p) => {
                            assert_eq!(sent.len(), 2, "{what}: {sent:#?}");
                            assert_json_request(a, &sent[1], "PATCH", &path, json!({"connection_id": p}));
                            assert_eq!(on_fake.connection_id.as_ref(), Some(p), "{what}");
                            json!({
                                "changed": true,
                                "connection_id": p,
                                "actions": ["linked number to its previous connection"],
                            })
                        }
                        // Telnyx documents no way to take a connection away: the answer says
                        // what to do instead.
                        None => {
                            assert_eq!(sent.len(), 1, "{what}: {sent:#?}");
                            assert_eq!(on_fake.connection_id, Some(ours), "{what}");
                            let steps = str_of(&r.json()["provider_release"], "manual_steps").to_owned();
                            assert!(steps.contains(a.numbers[index]) && steps.contains("Telnyx portal"), "{steps}");
                            json!({"changed": false, "manual_steps": steps})
                        }
                    }
                }
                Carrier::Exotel => {
                    assert!(sent.is_empty(), "{what}: Exotel is configured by hand: {sent:#?}");
                    let steps = str_of(&r.json()["provider_release"], "manual_steps").to_owned();
                    for needle in [a.numbers[index], "Passthru", "Voicebot", "status callback"] {
                        assert!(steps.contains(needle), "{what}: {needle:?} missing from {steps:?}");
                    }
                    json!({"changed": false, "manual_steps": steps})
                }
            };
            assert_eq!(r.json(), json!({"id": id, "deleted": true, "provider_release": report}), "{what}");
            assert_eq!(get_phone(&app, &org, &id).await.status, 404, "{what}: deleted");
        }
    }
}

#[tokio::test]
async fn release_provider_keeps_the_number_when_the_carrier_fails_and_leaves_a_repointed_number_as_found() {
    let (fake, app, org) = setup().await;
    let plivo = account(Carrier::Plivo);
    let (v, _) = import_configured(&fake, &app, &org, plivo, 0).await;
    let id = str_of(&v, "id").to_owned();
    let ours = str_of(&v["provider_configuration"], "application_id").to_owned();

    // The carrier fails: nothing is deleted, and the answer says so; asking again works.
    let kept = "; the number was not deleted (without release_provider it would be, the carrier left as it is)";
    for (mode, status, code, message) in [
        (
            Mode::ServerError,
            502,
            "provider_unavailable",
            "plivo's API is unavailable or gave an answer callgate cannot read".to_owned(),
        ),
        (
            Mode::WrongShape,
            502,
            "provider_unavailable",
            "plivo's API is unavailable or gave an answer callgate cannot read".to_owned(),
        ),
        (
            Mode::Unauthorized,
            422,
            "invalid_provider_credentials",
            format!("plivo rejected the credentials: {}", carrier_auth_message(Carrier::Plivo)),
        ),
    ] {
        fake.set_mode(mode);
        let r = delete_phone(&app, &org, &id, "?release_provider=true").await;
        assert_error(&r, status, code, &format!("{message}{kept}"), &format!("{mode:?}"));
        assert_eq!(get_phone(&app, &org, &id).await.json(), v, "{mode:?}: the number is kept as it was");
        assert!(fake.applications(Carrier::Plivo).iter().any(|x| x.id == ours), "{mode:?}");
    }
    fake.set_mode(Mode::Ok);

    // Repointed at the carrier since: the number is left as found, callgate's application goes.
    let own = fake.add_application(Carrier::Plivo, "customer-ivr", OLD_VOICE, OLD_STATUS);
    fake.update_number(Carrier::Plivo, plivo.numbers[0], |n| n.app_id = Some(own.clone()));
    fake.clear_requests();
    assert_eq!(
        release(&app, &org, &id).await,
        json!({
            "changed": true,
            "application_id": ours,
            "linked_application_id": null,
            "actions": ["left number as found: it no longer uses callgate's application", "deleted application"],
        })
    );
    let sent = fake.requests();
    assert_eq!(sent.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), ["GET", "DELETE"], "{sent:#?}");
    assert_eq!(fake.number(Carrier::Plivo, plivo.numbers[0]).app_id, Some(own), "left as found");

    // Twilio repointed since: only read, nothing written.
    let twilio = account(Carrier::Twilio);
    let (v, _) = import_configured(&fake, &app, &org, twilio, 0).await;
    fake.update_number(Carrier::Twilio, twilio.numbers[0], |n| n.voice_url = Some(OLD_VOICE.to_owned()));
    fake.clear_requests();
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({"changed": true, "status_callback": null, "status_callback_method": "POST", "actions": [
            "left voice routing as found: no longer callgate's",
            "restored status callback",
        ]})
    );
    let sent = fake.requests();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    let form = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    assert_eq!(sent[1].form(), form(&[("StatusCallback", ""), ("StatusCallbackMethod", "POST")]));
    let now = fake.number(Carrier::Twilio, twilio.numbers[0]);
    assert_eq!((now.voice_url.as_deref(), now.status_callback), (Some(OLD_VOICE), None));

    // Twilio with a TwiML application attached since (it wins over the voice URL, still
    // callgate's) and its status callback moved: nothing of callgate's is left to undo.
    let (v, _) = import_configured(&fake, &app, &org, twilio, 1).await;
    fake.update_number(Carrier::Twilio, twilio.numbers[1], |n| {
        n.voice_application_sid = Some(OLD_TWIML_APP.to_owned());
        n.status_callback = Some(OLD_STATUS.to_owned());
    });
    fake.clear_requests();
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({"changed": false, "actions": ["left number as found: neither its voice URL nor its status callback is callgate's"]})
    );
    assert_eq!(fake.requests().len(), 1, "only read");
    assert_eq!(fake.number(Carrier::Twilio, twilio.numbers[1]).voice_application_sid.as_deref(), Some(OLD_TWIML_APP));

    // Plivo: the number is linked back, then deleting callgate's application fails. The
    // routing is put back, so the release stands and names what is left.
    let (v, _) = import_configured(&fake, &app, &org, plivo, 1).await;
    let ours = str_of(&v["provider_configuration"], "application_id").to_owned();
    fake.clear_requests();
    fake.set_mode_after(2, Mode::ServerError);
    let released = release(&app, &org, str_of(&v, "id")).await;
    fake.set_mode(Mode::Ok);
    assert_eq!(
        released,
        json!({
            "changed": true,
            "application_id": ours,
            "linked_application_id": null,
            "actions": ["unlinked number from callgate's application", "application left in place: the carrier failed to delete it"],
        })
    );
    assert_eq!(fake.number(Carrier::Plivo, plivo.numbers[1]).app_id, None);
    assert_eq!(get_phone(&app, &org, str_of(&v, "id")).await.status, 404);

    // Plivo: the application the number had before is gone from the account since (the
    // customer deleted it). There is nothing to go back to, so the account's default applies.
    let own = route_elsewhere(&fake, plivo, 2).unwrap();
    let (v, _) = import_configured(&fake, &app, &org, plivo, 2).await;
    assert_eq!(v["provider_configuration"]["previous_application_id"], json!(own));
    let ours = str_of(&v["provider_configuration"], "application_id").to_owned();
    fake.remove_application(Carrier::Plivo, &own);
    fake.clear_requests();
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({
            "changed": true,
            "application_id": ours,
            "linked_application_id": null,
            "actions": [
                "unlinked number from callgate's application: its previous application no longer exists",
                "deleted application",
            ],
        })
    );
    let sent = fake.requests();
    assert_eq!(sent[2].json(), json!({}), "linked to the account's default: {sent:#?}");
    assert_eq!(fake.number(Carrier::Plivo, plivo.numbers[2]).app_id, None);

    // Twilio: the TwiML application the number had before is gone since; the voice URL and
    // the rest come back without it.
    let own = route_elsewhere(&fake, twilio, 2).unwrap();
    let (v, _) = import_configured(&fake, &app, &org, twilio, 2).await;
    fake.remove_application(Carrier::Twilio, &own);
    let released = release(&app, &org, str_of(&v, "id")).await;
    assert_eq!(
        (&released["voice_url"], &released["voice_application_sid"], &released["actions"]),
        (
            &json!(OLD_VOICE),
            &json!(null),
            &json!([
                "left TwiML application off: it no longer exists",
                "restored voice URL",
                "restored status callback"
            ])
        )
    );
    let now = fake.number(Carrier::Twilio, twilio.numbers[2]);
    assert_eq!((now.voice_url.as_deref(), now.voice_application_sid), (Some(OLD_VOICE), None));

    // Telnyx: the connection the number had before is gone since. Telnyx refuses the link,
    // and a connection cannot be taken away, so the number stays on callgate's application
    // and the answer says what to do.
    let telnyx = account(Carrier::Telnyx);
    let own = route_elsewhere(&fake, telnyx, 2).unwrap();
    let (v, _) = import_configured(&fake, &app, &org, telnyx, 2).await;
    let ours = str_of(&v["provider_configuration"], "application_id").to_owned();
    fake.remove_application(Carrier::Telnyx, &own);
    fake.clear_requests();
    let released = release(&app, &org, str_of(&v, "id")).await;
    let steps = str_of(&released, "manual_steps").to_owned();
    assert_eq!(released, json!({"changed": false, "manual_steps": steps}));
    for needle in [telnyx.numbers[2], own.as_str(), "no longer has it", "Telnyx portal"] {
        assert!(steps.contains(needle), "{needle:?} missing from {steps:?}");
    }
    let sent = fake.requests();
    let kinds: Vec<String> = sent[2..].iter().map(|r| format!("{} {}", r.method, r.path)).collect();
    assert_eq!(
        kinds,
        ["connections", "call_control_applications", "texml_applications"].map(|k| format!("GET /v2/{k}/{own}")),
        "the refused link is followed by a look for the connection under every kind: {sent:#?}"
    );
    assert_eq!(fake.number(Carrier::Telnyx, telnyx.numbers[2]).connection_id.as_deref(), Some(ours.as_str()));
    assert_eq!(get_phone(&app, &org, str_of(&v, "id")).await.status, 404);

    // Vobiz: the search does not find the number. Unseen is not known to be gone, so
    // callgate's application, which it may still use, stays.
    let vobiz = account(Carrier::Vobiz);
    let (v, _) = import_configured(&fake, &app, &org, vobiz, 1).await;
    let ours = str_of(&v["provider_configuration"], "application_id").to_owned();
    fake.update_number(Carrier::Vobiz, vobiz.numbers[1], |n| n.number = "+918035559999".to_owned());
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({
            "changed": false,
            "application_id": ours,
            "actions": ["none: the account's search did not find the number; callgate's application left in place"],
        })
    );
    assert!(fake.applications(Carrier::Vobiz).iter().any(|x| x.id == ours));

    // Twilio configured before the voice method was recorded: put back as POST, and said so.
    let (v, _) = import_configured(&fake, &app, &org, twilio, 2).await;
    let id = str_of(&v, "id").to_owned();
    let org_id = callgate::domain::OrgId::parse(&org.id).unwrap();
    let phone_id = callgate::domain::PhoneId::parse(&id).unwrap();
    let forget = |p: &mut callgate::store::PhoneRecord| {
        let report = p.provider_configuration.as_mut().unwrap().as_object_mut().unwrap();
        report.remove("previous_voice_method");
        report.insert("previous_voice_url".into(), json!(OLD_VOICE));
    };
    app.state.store.phone_modify(&org_id, &phone_id, None, &mut |p| forget(p)).unwrap();
    let released = release(&app, &org, &id).await;
    assert_eq!(released["voice_url"], OLD_VOICE);
    assert_eq!(released["voice_method"], json!(null));
    let steps = str_of(&released, "manual_steps");
    assert!(steps.contains("it is POST now") && steps.contains("GET"), "{steps}");
    let now = fake.number(Carrier::Twilio, twilio.numbers[2]);
    assert_eq!((now.voice_url.as_deref(), now.voice_method.as_str()), (Some(OLD_VOICE), "POST"));

    // Telnyx configured by a version that did not record the connection it replaced: the
    // number is still on callgate's application, and what to put back is not known.
    let telnyx = account(Carrier::Telnyx);
    let own = route_elsewhere(&fake, telnyx, 1).unwrap();
    let (v, _) = import_configured(&fake, &app, &org, telnyx, 1).await;
    let id = str_of(&v, "id").to_owned();
    let phone_id = callgate::domain::PhoneId::parse(&id).unwrap();
    let old_shape = |p: &mut callgate::store::PhoneRecord| {
        p.provider_configuration.as_mut().unwrap().as_object_mut().unwrap().remove("previous_connection_id");
    };
    assert!(matches!(
        app.state.store.phone_modify(&org_id, &phone_id, None, &mut |p| old_shape(p)).unwrap(),
        callgate::store::Modified::Written(_)
    ));
    let before = get_phone(&app, &org, &id).await.json();
    fake.clear_requests();
    let r = delete_phone(&app, &org, &id, "?release_provider=true").await;
    let msg = format!(
        "{} was configured by a version of callgate that did not record what it replaced, so it cannot be put back: \
         route the number at the carrier by hand{kept}",
        telnyx.numbers[1]
    );
    assert_error(&r, 409, "previous_route_unknown", &msg, "old record");
    assert_eq!(fake.requests().len(), 1, "only read: {:#?}", fake.requests());
    assert_eq!(get_phone(&app, &org, &id).await.json(), before, "kept");
    let ours = str_of(&v["provider_configuration"], "application_id");
    assert_eq!(fake.number(Carrier::Telnyx, telnyx.numbers[1]).connection_id.as_deref(), Some(ours));
    assert_ne!(ours, own);

    // Telnyx: the number is gone from the account.
    let (v, _) = import_configured(&fake, &app, &org, telnyx, 0).await;
    fake.update_number(Carrier::Telnyx, telnyx.numbers[0], |n| n.id = "gone".to_owned());
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({"changed": false, "actions": ["none: the number is no longer on the account"]})
    );

    // Imported without configure_provider: nothing to undo, nothing asked of the carrier.
    let vobiz = account(Carrier::Vobiz);
    let v = import_inline(&app, &org, vobiz, 0).await;
    fake.clear_requests();
    assert_eq!(
        release(&app, &org, str_of(&v, "id")).await,
        json!({"changed": false, "reason": "the number was imported without configure_provider: callgate changed nothing at the carrier"})
    );
    assert!(fake.requests().is_empty());
}

/// The id of the number `number` once an import running alongside has stored it.
async fn stored_id(app: &TestApp, org: &Org, number: &str) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let listed = list(app, org, "").await;
        if let Some(p) = listed["phone_numbers"].as_array().unwrap().iter().find(|p| p["number"] == number) {
            return str_of(p, "id").to_owned();
        }
        assert!(Instant::now() < until, "the import never stored {number}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// While an import configures its number at the carrier, a release cannot know what to undo;
/// a plain delete then has the import set the carrier back itself.
#[tokio::test]
async fn a_number_deleted_while_its_import_configures_it_is_set_back_at_the_carrier() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let body = |i: usize| json!({"number": twilio.numbers[i], "credentials": credentials(Carrier::Twilio, twilio.secret), "configure_provider": true});

    fake.set_mode(Mode::Slow);
    let importing = import(&app, &org, Carrier::Twilio, body(0));
    let releasing = async {
        let id = stored_id(&app, &org, twilio.numbers[0]).await;
        let shown = get_phone(&app, &org, &id).await.json()["provider_configuration"].clone();
        (delete_phone(&app, &org, &id, "?release_provider=true").await, shown)
    };
    let (imported, (released, shown)) = tokio::join!(importing, releasing);
    assert_eq!(shown, json!({"changed": false, "configuring": true, "since": rfc3339(T0)}));
    let msg = "the import of this number is still configuring it at the carrier: ask again once it has answered";
    assert_error(&released, 409, "number_configuring", msg, "release while configuring");
    assert_eq!(imported.status, 201, "{}", imported.text);
    assert_eq!(imported.json()["provider_configuration"]["changed"], true);

    fake.clear_requests();
    let importing = import(&app, &org, Carrier::Twilio, body(1));
    let deleting = async {
        let id = stored_id(&app, &org, twilio.numbers[1]).await;
        delete_phone(&app, &org, &id, "").await
    };
    let (imported, deleted) = tokio::join!(importing, deleting);
    fake.set_mode(Mode::Ok);
    assert_eq!((deleted.status, deleted.text.as_str()), (204, ""));
    let msg = format!(
        "{} was deleted while it was being configured; callgate set the number back at the carrier",
        twilio.numbers[1]
    );
    assert_error(&imported, 409, "number_deleted", &msg, "deleted while configuring");
    let now = fake.number(Carrier::Twilio, twilio.numbers[1]);
    assert_eq!((now.voice_url, now.status_callback), (None, None), "set back as it was");
    let sent = fake.requests();
    assert_eq!(sent.iter().filter(|r| r.method == "POST").count(), 2, "configured, then set back: {sent:#?}");

    // A Telnyx number with no connection before cannot be set back by API: the answer says what to do.
    let telnyx = account(Carrier::Telnyx);
    fake.set_mode(Mode::Slow);
    let body = json!({"number": telnyx.numbers[0], "credentials": credentials(Carrier::Telnyx, telnyx.secret), "configure_provider": true});
    let importing = import(&app, &org, Carrier::Telnyx, body);
    let deleting = async {
        let id = stored_id(&app, &org, telnyx.numbers[0]).await;
        delete_phone(&app, &org, &id, "").await
    };
    let (imported, deleted) = tokio::join!(importing, deleting);
    fake.set_mode(Mode::Ok);
    assert_eq!(deleted.status, 204);
    let message = str_of(&imported.json()["error"], "message").to_owned();
    let start = format!(
        "{} was deleted while it was being configured; setting it back at the carrier needs a hand: ",
        telnyx.numbers[0]
    );
    assert!(message.starts_with(&start) && message.contains("Telnyx portal"), "{message}");
}

/// An import stopped while it configured its number (killed, say) leaves its marker; once it is
/// old, a release says what it cannot know rather than waiting for an answer that never comes.
#[tokio::test]
async fn a_release_after_an_import_stopped_midway_says_the_route_is_unknown() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let (v, _) = import_configured(&fake, &app, &org, twilio, 0).await;
    let id = str_of(&v, "id").to_owned();
    let (org_id, phone_id) =
        (callgate::domain::OrgId::parse(&org.id).unwrap(), callgate::domain::PhoneId::parse(&id).unwrap());
    let marker = json!({"changed": false, "configuring": true, "since": rfc3339(T0)});
    app.state
        .store
        .phone_modify(&org_id, &phone_id, None, &mut |p| p.provider_configuration = Some(marker.clone()))
        .unwrap();
    fake.clear_requests();

    app.clock.set_ms(T0 + 29 * 60 * 1000);
    let r = delete_phone(&app, &org, &id, "?release_provider=true").await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (409, json!("number_configuring")), "{}", r.text);
    app.clock.set_ms(T0 + 31 * 60 * 1000);
    let r = delete_phone(&app, &org, &id, "?release_provider=true").await;
    let msg = format!(
        "the import of {} stopped before it had recorded what it changed at the carrier, so it cannot be put back: \
         route the number at the carrier by hand, then delete it without release_provider",
        twilio.numbers[0]
    );
    assert_error(&r, 409, "previous_route_unknown", &msg, "stale marker");
    assert!(fake.requests().is_empty());
    assert_eq!(get_phone(&app, &org, &id).await.json()["provider_configuration"], marker, "kept");
}

#[tokio::test]
async fn delete_without_release_provider_leaves_the_carrier_alone_and_bad_queries_are_refused() {
    let (fake, app, org) = setup().await;
    let plivo = account(Carrier::Plivo);
    let (v, _) = import_configured(&fake, &app, &org, plivo, 0).await;
    let id = str_of(&v, "id").to_owned();
    fake.clear_requests();
    for (query, message) in [
        (
            "?release_provider=yes",
            "invalid query string: Query deserialize error: provided string was not `true` or `false`",
        ),
        (
            "?release=true",
            "invalid query string: Query deserialize error: unknown field `release`, expected `release_provider`",
        ),
    ] {
        let r = delete_phone(&app, &org, &id, query).await;
        assert_error(&r, 400, "invalid_query", message, query);
    }
    let r = delete_phone(&app, &org, "ph_00000000000000000000000000000000", "?release_provider=true").await;
    assert_error(&r, 404, "not_found", "phone number not found", "unknown number");
    assert!(fake.requests().is_empty(), "{:#?}", fake.requests());
    assert_eq!(get_phone(&app, &org, &id).await.status, 200);

    let r = delete_phone(&app, &org, &id, "?release_provider=false").await;
    assert_eq!((r.status, r.text.as_str()), (204, ""));
    assert!(fake.requests().is_empty(), "a plain delete asks nothing of the carrier");
    let ours = str_of(&v["provider_configuration"], "application_id");
    assert_eq!(fake.number(Carrier::Plivo, plivo.numbers[0]).app_id.as_deref(), Some(ours));

    // Imported again, still on callgate's application: that is not a route to put back.
    let (again, _) = import_configured(&fake, &app, &org, plivo, 0).await;
    assert_eq!(again["provider_configuration"]["application_id"], json!(ours));
    assert_eq!(again["provider_configuration"]["previous_application_id"], json!(null));
    // Nor, for Twilio, are the URLs an earlier import of the number left.
    let twilio = account(Carrier::Twilio);
    let (first, _) = import_configured(&fake, &app, &org, twilio, 0).await;
    assert_eq!(delete_phone(&app, &org, str_of(&first, "id"), "").await.status, 204);
    let (again, _) = import_configured(&fake, &app, &org, twilio, 0).await;
    let report = &again["provider_configuration"];
    assert_eq!((&report["previous_voice_url"], &report["previous_status_callback"]), (&json!(null), &json!(null)));
    assert_ne!(str_of(report, "voice_url"), str_of(&first["provider_configuration"], "voice_url"));
}

// --- configure_provider ------------------------------------------------------------------

fn basic(user: &str, secret: &str) -> String {
    format!("Basic {}", B64.encode(format!("{user}:{secret}")))
}

/// The request carries the carrier's own auth with `secret`, and the secret is not in its URL.
fn assert_auth(a: &Account, req: &Recorded, secret: &str) {
    let c = a.carrier;
    let authz = req.header("authorization");
    match c {
        Carrier::Plivo => assert_eq!(authz, Some(basic(PLIVO_ID, secret).as_str()), "{c}: {req:?}"),
        Carrier::Twilio => assert_eq!(authz, Some(basic(TWILIO_SID, secret).as_str()), "{c}: {req:?}"),
        Carrier::Exotel => assert_eq!(authz, Some(basic(EXOTEL_KEY, secret).as_str()), "{c}: {req:?}"),
        Carrier::Telnyx => assert_eq!(authz, Some(format!("Bearer {secret}").as_str()), "{c}: {req:?}"),
        Carrier::Vobiz => {
            assert_eq!(authz, None, "{c}: {req:?}");
            assert_eq!(req.header("x-auth-id"), Some(VOBIZ_ID), "{c}: {req:?}");
            assert_eq!(req.header("x-auth-token"), Some(secret), "{c}: {req:?}");
        }
    }
    assert!(!req.path.contains(secret) && !req.query.contains(secret), "{c}: secret in URL: {req:?}");
}

fn assert_json_request(a: &Account, req: &Recorded, method: &str, path: &str, body: Value) {
    let c = a.carrier;
    assert_eq!((req.method.as_str(), req.path.as_str()), (method, path), "{c}: {req:#?}");
    assert_eq!(req.header("content-type"), Some("application/json"), "{c}: {req:?}");
    assert_eq!(req.json(), body, "{c}: {method} {path}");
    assert_auth(a, req, a.secret);
}

fn assert_get(a: &Account, req: &Recorded, path: &str, query: &str) {
    let c = a.carrier;
    assert_eq!((req.method.as_str(), req.path.as_str(), req.query.as_str()), ("GET", path, query), "{c}: {req:#?}");
    assert_eq!(req.body, "", "{c}");
    assert_auth(a, req, a.secret);
}

/// An import whose last step, linking the number, failed: what it set up before stays on
/// record, so a release deletes callgate's application, and links the number back if the link
/// went through after all (an answer lost on the way, a timeout).
#[tokio::test]
async fn an_import_whose_link_failed_keeps_what_it_set_up_for_a_release_to_undo() {
    let (fake, app, org) = setup().await;
    for a in [account(Carrier::Plivo), account(Carrier::Vobiz), account(Carrier::Telnyx)] {
        let c = a.carrier;
        for index in [0, 1] {
            let what = format!("{c} #{index}");
            let own = route_elsewhere(&fake, a, index).unwrap();
            fake.clear_requests();
            // Two listing reads, the application search, its creation (Telnyx's shared one
            // exists from #0 on: an update of nothing, so only the search); then the link.
            let before_link = if c == Carrier::Telnyx && index == 1 { 3 } else { 4 };
            fake.set_mode_after(before_link, Mode::ServerError);
            let body = json!({"number": a.numbers[index], "credentials": credentials(c, a.secret), "configure_provider": true});
            let r = import(&app, &org, c, body).await;
            fake.set_mode(Mode::Ok);
            assert_eq!(r.status, 201, "{what}: {}", r.text);
            let sent = fake.requests();
            let link = sent.last().unwrap();
            assert_eq!(sent.len(), before_link + 1, "{what}: {sent:#?}");
            assert!(matches!(link.method.as_str(), "POST" | "PATCH"), "{what}: the link failed: {link:?}");
            assert!(link.path.to_lowercase().contains("number"), "{what}: the link failed: {link:?}");
            let v = r.json();
            let id = str_of(&v, "id").to_owned();
            let report = &v["provider_configuration"];
            let ours = str_of(report, "application_id").to_owned();
            let error = json!({
                "code": "provider_unavailable",
                "message": format!("{c}'s API is unavailable or gave an answer callgate cannot read"),
            });
            let created = if c == Carrier::Telnyx && index == 1 { "reused application" } else { "created application" };
            let expected = match c {
                Carrier::Telnyx => json!({
                    "changed": true,
                    "complete": false,
                    "application_id": ours,
                    "application_name": "callgate",
                    "previous_connection_id": own,
                    "webhook_event_url": format!("{PUBLIC}/webhooks/telnyx/voice"),
                    "actions": [created],
                    "error": error,
                }),
                _ => json!({
                    "changed": true,
                    "complete": false,
                    "application_id": ours,
                    "application_name": format!("callgate-{}", &a.numbers[index][1..]),
                    "previous_application_id": own,
                    "answer_url": report["answer_url"],
                    "hangup_url": report["hangup_url"],
                    "actions": [created],
                    "error": error,
                }),
            };
            assert_eq!(report, &expected, "{what}");
            assert_eq!(get_phone(&app, &org, &id).await.json()["provider_configuration"], expected, "{what}: stored");
            let route = |n: &FakeNumber| if c == Carrier::Telnyx { n.connection_id.clone() } else { n.app_id.clone() };
            assert_eq!(route(&fake.number(c, a.numbers[index])), Some(own.clone()), "{what}: not linked");

            // #1: the link went through after all.
            if index == 1 {
                fake.update_number(c, a.numbers[index], |n| match c {
                    Carrier::Telnyx => n.connection_id = Some(ours.clone()),
                    _ => n.app_id = Some(ours.clone()),
                });
            }
            let released = release(&app, &org, &id).await;
            let expected = match (c, index) {
                (Carrier::Telnyx, 0) => json!({
                    "changed": false,
                    "actions": ["left number as found: it no longer uses callgate's application"],
                }),
                (Carrier::Telnyx, _) => json!({
                    "changed": true,
                    "connection_id": own,
                    "actions": ["linked number to its previous connection"],
                }),
                (_, 0) => json!({
                    "changed": true,
                    "application_id": ours,
                    "linked_application_id": null,
                    "actions": ["left number as found: it no longer uses callgate's application", "deleted application"],
                }),
                _ => json!({
                    "changed": true,
                    "application_id": ours,
                    "linked_application_id": own,
                    "actions": ["linked number to its previous application", "deleted application"],
                }),
            };
            assert_eq!(released, expected, "{what}");
            assert_eq!(route(&fake.number(c, a.numbers[index])), Some(own.clone()), "{what}: routed as before");
            let apps = fake.applications(c);
            // Telnyx's application is shared by every number callgate configures: it stays.
            assert_eq!(apps.iter().any(|x| x.id == ours), c == Carrier::Telnyx, "{what}: {apps:#?}");
            assert_eq!(get_phone(&app, &org, &id).await.status, 404, "{what}");
        }
    }

    // Twilio's one update: its answer lost after Twilio made it. What it replaced is on record,
    // and the release puts it back.
    let twilio = account(Carrier::Twilio);
    let own = route_elsewhere(&fake, twilio, 0).unwrap();
    fake.clear_requests();
    fake.set_mode_after(3, Mode::ServerError);
    let body = json!({"number": twilio.numbers[0], "credentials": credentials(Carrier::Twilio, twilio.secret), "configure_provider": true});
    let r = import(&app, &org, Carrier::Twilio, body).await;
    fake.set_mode(Mode::Ok);
    assert_eq!(r.status, 201, "{}", r.text);
    let sent = fake.requests();
    assert_eq!((sent.len(), sent[3].method.as_str()), (4, "POST"), "the update failed: {sent:#?}");
    let v = r.json();
    let report = &v["provider_configuration"];
    let (voice, status) = (str_of(report, "voice_url").to_owned(), str_of(report, "status_callback").to_owned());
    assert_eq!(
        report,
        &json!({
            "changed": true,
            "complete": false,
            "number_sid": fake.number(Carrier::Twilio, twilio.numbers[0]).id,
            "voice_url": voice,
            "status_callback": status,
            "previous_voice_url": OLD_VOICE,
            "previous_voice_method": "GET",
            "previous_status_callback": OLD_STATUS,
            "previous_status_callback_method": "POST",
            "previous_voice_application_sid": own,
            "actions": [],
            "error": {
                "code": "provider_unavailable",
                "message": "twilio's API is unavailable or gave an answer callgate cannot read",
            },
        })
    );
    fake.update_number(Carrier::Twilio, twilio.numbers[0], |n| {
        n.voice_url = Some(voice.clone());
        n.voice_method = "POST".to_owned();
        n.status_callback = Some(status.clone());
        n.voice_application_sid = None;
    });
    let released = release(&app, &org, str_of(&v, "id")).await;
    assert_eq!(released["changed"], json!(true), "{released}");
    let now = fake.number(Carrier::Twilio, twilio.numbers[0]);
    assert_eq!(
        (
            now.voice_url.as_deref(),
            now.voice_method.as_str(),
            now.status_callback.as_deref(),
            now.voice_application_sid
        ),
        (Some(OLD_VOICE), "GET", Some(OLD_STATUS), Some(own))
    );
}

/// Imports `a`'s `index`th number with `configure_provider`; the response body and the
/// requests the import sent after listing the account's two pages.
async fn import_configured(
    fake: &FakeCarrier,
    app: &TestApp,
    org: &Org,
    a: &Account,
    index: usize,
) -> (Value, Vec<Recorded>) {
    fake.clear_requests();
    let body = json!({"number": a.numbers[index], "credentials": credentials(a.carrier, a.secret), "configure_provider": true});
    let r = import(app, org, a.carrier, body).await;
    assert_eq!(r.status, 201, "{}: {}", a.carrier, r.text);
    assert!(!r.text.contains(a.secret), "{}", a.carrier);
    let mut sent = fake.requests();
    assert!(sent.len() >= 2, "{}: {sent:#?}", a.carrier);
    for listing in sent.drain(..2) {
        assert_eq!(listing.method, "GET", "{}", a.carrier);
        assert_auth(a, &listing, a.secret);
    }
    (r.json(), sent)
}

#[tokio::test]
async fn configure_provider_sends_exactly_what_each_carrier_expects() {
    let (fake, app, org) = setup().await;
    for a in &ACCOUNTS {
        let c = a.carrier;
        let (v, sent) = import_configured(&fake, &app, &org, a, 0).await;
        let id = str_of(&v, "id").to_owned();
        let urls = webhook_urls(c, &id);
        let incoming = urls["incoming"].as_str().unwrap();
        let status = urls["status"].as_str().unwrap();
        let on_fake = fake.number(c, a.numbers[0]);
        let digits = a.numbers[0].trim_start_matches('+');

        let configuration = match c {
            Carrier::Twilio => {
                let path = format!("/2010-04-01/Accounts/{TWILIO_SID}/IncomingPhoneNumbers/{}.json", on_fake.id);
                assert_eq!(sent.len(), 2, "{c}: {sent:#?}");
                assert_get(a, &sent[0], &path, "");
                assert_eq!((sent[1].method.as_str(), sent[1].path.as_str()), ("POST", path.as_str()), "{c}");
                assert_eq!(sent[1].header("content-type"), Some("application/x-www-form-urlencoded"), "{c}");
                let form: Vec<(String, String)> = [
                    ("VoiceUrl", incoming),
                    ("VoiceMethod", "POST"),
                    ("StatusCallback", status),
                    ("StatusCallbackMethod", "POST"),
                    ("VoiceApplicationSid", ""),
                ]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
                assert_eq!(sent[1].form(), form, "{c}");
                assert_auth(a, &sent[1], a.secret);
                assert_eq!(on_fake.voice_url.as_deref(), Some(incoming), "{c}");
                assert_eq!(on_fake.status_callback.as_deref(), Some(status), "{c}");
                json!({
                    "changed": true,
                    "number_sid": on_fake.id,
                    "voice_url": incoming,
                    "status_callback": status,
                    "previous_voice_url": null,
                    "previous_voice_method": "POST",
                    "previous_status_callback": null,
                    "previous_status_callback_method": "POST",
                    "previous_voice_application_sid": null,
                    "actions": ["set voice URL and status callback"],
                })
            }
            Carrier::Plivo | Carrier::Vobiz => {
                let base = match c {
                    Carrier::Plivo => format!("/v1/Account/{PLIVO_ID}/"),
                    _ => format!("/api/v1/Account/{VOBIZ_ID}/"),
                };
                let apps = format!("{base}Application/");
                let name = format!("callgate-{digits}");
                let app_id = fake.applications(c).into_iter().find(|x| x.name == name).expect("application created").id;
                assert_eq!(sent.len(), 3, "{c}: {sent:#?}");
                assert_get(a, &sent[0], &apps, "limit=20&offset=0");
                let create = json!({
                    "app_name": name, "answer_url": incoming, "answer_method": "POST",
                    "hangup_url": status, "hangup_method": "POST",
                });
                assert_json_request(a, &sent[1], "POST", &apps, create);
                match c {
                    Carrier::Plivo => {
                        let link = format!("{base}Number/{digits}/");
                        assert_json_request(a, &sent[2], "POST", &link, json!({"app_id": app_id}));
                    }
                    _ => {
                        let link = format!("{base}numbers/%2B{digits}/application");
                        assert_json_request(a, &sent[2], "POST", &link, json!({"application_id": app_id}));
                    }
                }
                assert_eq!(on_fake.app_id.as_deref(), Some(app_id.as_str()), "{c}");
                json!({
                    "changed": true,
                    "application_id": app_id,
                    "application_name": name,
                    "previous_application_id": null,
                    "answer_url": incoming,
                    "hangup_url": status,
                    "actions": ["created application", "linked number"],
                })
            }
            Carrier::Telnyx => {
                let app_id = fake.applications(c).into_iter().find(|x| x.name == "callgate").expect("created").id;
                assert_eq!(sent.len(), 3, "{c}: {sent:#?}");
                assert_get(
                    a,
                    &sent[0],
                    "/v2/call_control_applications",
                    "filter%5Bapplication_name%5D%5Bcontains%5D=callgate&page%5Bnumber%5D=1&page%5Bsize%5D=100",
                );
                let create =
                    json!({"application_name": "callgate", "webhook_event_url": incoming, "webhook_api_version": "2"});
                assert_json_request(a, &sent[1], "POST", "/v2/call_control_applications", create);
                let number_path = format!("/v2/phone_numbers/{}", on_fake.id);
                assert_json_request(a, &sent[2], "PATCH", &number_path, json!({"connection_id": app_id}));
                assert_eq!(on_fake.connection_id.as_deref(), Some(app_id.as_str()), "{c}");
                json!({
                    "changed": true,
                    "application_id": app_id,
                    "application_name": "callgate",
                    "previous_connection_id": null,
                    "webhook_event_url": incoming,
                    "actions": ["created application", "linked number"],
                })
            }
            Carrier::Exotel => {
                assert!(sent.is_empty(), "{c}: Exotel is configured by hand: {sent:#?}");
                let steps = str_of(&v["provider_configuration"], "manual_steps");
                for needle in [a.numbers[0], "App Bazaar", "Passthru", "Voicebot", "incoming_url", "status_url"] {
                    assert!(steps.contains(needle), "{c}: {needle:?} missing from {steps:?}");
                }
                json!({
                    "changed": false,
                    "number": a.numbers[0],
                    "exophone_sid": on_fake.id,
                    "manual_steps": steps,
                    "incoming_url": incoming,
                    "status_url": status,
                })
            }
        };
        let mut expected = phone_json(&fake, a, 0, &id, str_of(&v, "credential_secret_id"));
        expected["provider_configuration"] = configuration;
        assert_eq!(v, expected, "{c}");
        let r = get_phone(&app, &org, &id).await;
        assert_eq!(r.json(), expected, "{c}: the report is kept");
    }

    // A second Telnyx number reuses the Call Control application.
    let telnyx = account(Carrier::Telnyx);
    let app_id = fake.applications(Carrier::Telnyx)[0].id.clone();
    let (v, sent) = import_configured(&fake, &app, &org, telnyx, 1).await;
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert_eq!((sent[0].method.as_str(), sent[0].path.as_str()), ("GET", "/v2/call_control_applications"));
    let number_path = format!("/v2/phone_numbers/{}", fake.number(Carrier::Telnyx, telnyx.numbers[1]).id);
    assert_json_request(telnyx, &sent[1], "PATCH", &number_path, json!({"connection_id": app_id}));
    assert_eq!(
        v["provider_configuration"],
        json!({
            "changed": true,
            "application_id": app_id,
            "application_name": "callgate",
            "previous_connection_id": null,
            "webhook_event_url": format!("{PUBLIC}/webhooks/telnyx/voice"),
            "actions": ["reused application", "linked number"],
        })
    );
    assert_eq!(fake.applications(Carrier::Telnyx).len(), 1);

    // A Twilio number on a SIP trunk is imported but left alone, and the answer says why.
    let twilio = account(Carrier::Twilio);
    let trunk = "TK0123456789abcdef0123456789abcdef";
    fake.update_number(Carrier::Twilio, twilio.numbers[1], |n| n.trunk_sid = Some(trunk.to_owned()));
    let (v, sent) = import_configured(&fake, &app, &org, twilio, 1).await;
    assert_eq!(sent.len(), 1, "only the number is fetched: {sent:#?}");
    assert_eq!(sent[0].method, "GET");
    let message = format!(
        "{} is routed to the Elastic SIP Trunk {trunk}; remove it from the trunk in the Twilio console first",
        twilio.numbers[1]
    );
    assert_eq!(
        v["provider_configuration"],
        json!({"changed": false, "error": {"code": "provider_refused", "message": message}})
    );
    assert_eq!(v["billing_status"], "byok");
    assert_eq!(fake.number(Carrier::Twilio, twilio.numbers[1]).voice_url, None);
    for a in &ACCOUNTS {
        app.assert_not_in_data_dir(a.secret);
    }
}

// --- manage ------------------------------------------------------------------------------

/// An unsigned callback to the number's status URL (Telnyx: its one URL, naming the number).
async fn unsigned_callback(app: &TestApp, carrier: Carrier, id: &str, number: &str) -> Reply {
    match carrier {
        Carrier::Telnyx => {
            let body = json!({"data": {"event_type": "call.hangup", "id": "0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",
                "payload": {"call_control_id": "v3:abc", "direction": "incoming", "to": number, "from": "+14155559876"}}});
            let req = app
                .client
                .post(app.url("/webhooks/telnyx/voice"))
                .header("telnyx-signature-ed25519", "bm90LWEtc2lnbmF0dXJl")
                .header("telnyx-timestamp", (T0 / 1000).to_string())
                .json(&body);
            send(req).await
        }
        c => {
            let req = app
                .client
                .post(app.url(&format!("/{c}/status/{id}")))
                .form(&[("CallSid", "CA-unsigned"), ("CallStatus", "completed")]);
            send(req).await
        }
    }
}

/// How the number's webhook URL refuses an unsigned callback while the number exists.
fn unsigned_refusal(carrier: Carrier) -> (&'static str, &'static str) {
    match carrier {
        Carrier::Exotel => ("ip_not_allowed", "the request comes from an address that is not allowed"),
        Carrier::Telnyx => ("invalid_signature", "the request signature is not valid"),
        _ => ("missing_signature", "the request carries no signature"),
    }
}

#[tokio::test]
async fn list_paginates_and_filters_and_get_patch_delete_manage_one_number() {
    let (_fake, app, org) = setup().await;
    let mut created = Vec::new();
    let mut phones = Vec::new();
    for a in &ACCOUNTS {
        let v = import_inline(&app, &org, a, 0).await;
        created.push(str_of(&v, "id").to_owned());
        phones.push(v);
    }
    let twilio = account(Carrier::Twilio);
    let second = import_inline(&app, &org, twilio, 1).await;
    created.push(str_of(&second, "id").to_owned());
    phones.push(second);

    // Pages in creation order, `next_after` naming the last of a full page.
    let page = list(&app, &org, "?limit=4").await;
    assert_eq!(page["phone_numbers"], json!(phones[..4]));
    assert_eq!(page["next_after"], json!(created[3]));
    let page = list(&app, &org, &format!("?limit=4&after={}", created[3])).await;
    assert_eq!(page, json!({"phone_numbers": phones[4..], "next_after": null}));
    let page = list(&app, &org, "").await;
    assert_eq!(page, json!({"phone_numbers": phones, "next_after": null}));
    let page = list(&app, &org, "?provider=twilio").await;
    assert_eq!(page, json!({"phone_numbers": [phones[2], phones[5]], "next_after": null}));
    let page = list(&app, &org, "?provider=twilio&limit=1").await;
    assert_eq!(page, json!({"phone_numbers": [phones[2]], "next_after": created[2]}));
    let page = list(&app, &org, &format!("?provider=twilio&limit=1&after={}", created[2])).await;
    assert_eq!(page, json!({"phone_numbers": [phones[5]], "next_after": created[5]}));
    let page = list(&app, &org, &format!("?provider=twilio&limit=1&after={}", created[5])).await;
    assert_eq!(page, json!({"phone_numbers": [], "next_after": null}));
    let r = send(app.get(&org, "/phone-numbers?provider=nope")).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_query")), "{}", r.text);
    let r = send(app.get(&org, "/phone-numbers?after=ph_nope")).await;
    assert_error(&r, 400, "invalid_query", "after: not a phone number id", "bad after");
    // A page of none is refused; more than the most a page holds is served as that most.
    let r = send(app.get(&org, "/phone-numbers?limit=0")).await;
    assert_error(&r, 400, "invalid_query", "limit: must be at least 1 (at most 500 are taken at once)", "limit=0");
    let page = list(&app, &org, "?limit=100000").await;
    assert_eq!(page, json!({"phone_numbers": phones, "next_after": null}));
    // A parameter the list does not take is refused, not ignored.
    let r = send(app.get(&org, "/phone-numbers?bogus=1")).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_query")), "{}", r.text);

    for (v, id) in phones.iter().zip(&created) {
        let r = get_phone(&app, &org, id).await;
        assert_eq!((r.status, r.json()), (200, v.clone()), "{id}");
    }

    // PATCH on the first Twilio number.
    let id = created[2].clone();
    let mut expected = phones[2].clone();
    let first_secret = str_of(&expected, "credential_secret_id").to_owned();
    let mut at = T0;
    let step = |at: &mut i64, expected: &mut Value| {
        *at += 60_000;
        app.clock.set_ms(*at);
        expected["updated_at"] = json!(rfc3339(*at));
    };

    step(&mut at, &mut expected);
    let r = patch_phone(&app, &org, &id, json!({"label": "Support line"})).await;
    expected["label"] = json!("Support line");
    assert_eq!((r.status, r.json()), (200, expected.clone()));

    step(&mut at, &mut expected);
    let config =
        json!({"stream_url": "wss://agent.example.com/s", "assistant_url": "https://assistant.example.com/hook"});
    let r = patch_phone(&app, &org, &id, json!({"config": config})).await;
    expected["config"]["stream_url"] = json!("wss://agent.example.com/s");
    expected["config"]["assistant_url"] = json!("https://assistant.example.com/hook");
    assert_eq!((r.status, r.json()), (200, expected.clone()));

    step(&mut at, &mut expected);
    let r = patch_phone(&app, &org, &id, json!({"config": {"stream_url": null}, "label": null})).await;
    expected["config"]["stream_url"] = Value::Null;
    expected["label"] = Value::Null;
    assert_eq!((r.status, r.json()), (200, expected.clone()));

    // Refusals change nothing.
    let stored = get_phone(&app, &org, &id).await.json();
    assert_eq!(stored, expected);
    let none = "no saved twilio credentials";
    let cases = [
        (
            json!({"config": {"stream_url": "http://agent.example.com/s"}}),
            "invalid_field",
            "config.stream_url: must be a wss or ws URL",
        ),
        (
            json!({"config": {"exotel_webhook_token": "0123456789abcdef0123"}}),
            "invalid_field",
            "config.exotel_webhook_token: only Exotel numbers take a webhook token",
        ),
        (json!({"config": {"voice": "alloy"}}), "invalid_field", "config.voice: unknown setting"),
        (
            json!({"config": {"sk-proj-PASTEDsecret0001": 1}}),
            "invalid_field",
            "config.(a field whose name is not shown): unknown setting",
        ),
        (
            json!({"label": "top", "config": {"label": "inner"}}),
            "invalid_field",
            "label: give label or config.label, not both",
        ),
        (
            json!({"label": "top", "config": {"label": null}}),
            "invalid_field",
            "label: give label or config.label, not both",
        ),
        (json!({"credential": "saved"}), "invalid_field", "credential: the only accepted value is \"byok\""),
        (
            json!({"credential": "byok", "credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)}),
            "invalid_field",
            "give either credentials or credential, not both",
        ),
        (
            json!({"credentials": {"account_sid": "AC1", "auth_token": "t"}}),
            "invalid_credentials",
            "account_sid: must be AC followed by 32 hex digits",
        ),
    ];
    for (body, code, message) in cases {
        let r = patch_phone(&app, &org, &id, body.clone()).await;
        assert_error(&r, 422, code, message, &body.to_string());
    }
    let r = patch_phone(&app, &org, &id, json!({"credential": "byok"})).await;
    assert_error(&r, 422, "no_saved_credentials", none, "byok before any is saved");
    let r = patch_phone(&app, &org, &id, json!({"colour": "red"})).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (422, json!("invalid_field")), "{}", r.text);
    assert_eq!(get_phone(&app, &org, &id).await.json(), stored);
    assert_eq!(secret_ids(&app).len(), 6, "a refused PATCH seals nothing");

    // New inline credentials: the old one stays valid for the grace.
    step(&mut at, &mut expected);
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(TWILIO_ROTATED));
    let v = r.json();
    let rotated = str_of(&v, "credential_secret_id").to_owned();
    assert!(rotated.starts_with("sec_") && rotated != first_secret, "{rotated}");
    let first_until = at + GRACE_MS;
    expected["credential_secret_id"] = json!(rotated);
    expected["previous_credential"] = json!({"secret_id": first_secret, "valid_until": rfc3339(first_until)});
    assert_eq!(v, expected);
    app.assert_not_in_data_dir(TWILIO_ROTATED);

    // Back to the organization's saved credential.
    let saved = save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    step(&mut at, &mut expected);
    let r = patch_phone(&app, &org, &id, json!({"credential": "byok"})).await;
    expected["credential_secret_id"] = json!(saved);
    expected["previous_credential"] = json!({"secret_id": rotated, "valid_until": rfc3339(at + GRACE_MS)});
    assert_eq!((r.status, r.json()), (200, expected.clone()));
    // Already on it: nothing rotates.
    let r = patch_phone(&app, &org, &id, json!({"credential": "byok"})).await;
    assert_eq!((r.status, r.json()), (200, expected.clone()));

    let text = send(app.get(&org, "/phone-numbers")).await.text;
    for secret in [twilio.secret, TWILIO_ROTATED] {
        assert!(!text.contains(secret));
        app.assert_not_in_data_dir(secret);
    }

    // DELETE: one number of each carrier.
    for (a, id) in ACCOUNTS.iter().zip(&created) {
        let c = a.carrier;
        let (code, message) = unsigned_refusal(c);
        let r = unsigned_callback(&app, c, id, a.numbers[0]).await;
        assert_error(&r, 403, code, message, &format!("{c} before delete"));

        let r = send(app.delete(&org, &format!("/phone-numbers/{id}"))).await;
        assert_eq!((r.status, r.text.as_str()), (204, ""), "{c}");

        let gone = |what: &str| format!("{c} {what} after delete");
        assert_error(&get_phone(&app, &org, id).await, 404, "not_found", "phone number not found", &gone("GET"));
        let r = patch_phone(&app, &org, id, json!({"label": "x"})).await;
        assert_error(&r, 404, "not_found", "phone number not found", &gone("PATCH"));
        let r = send(app.delete(&org, &format!("/phone-numbers/{id}"))).await;
        assert_error(&r, 404, "not_found", "phone number not found", &gone("DELETE"));
        let r = unsigned_callback(&app, c, id, a.numbers[0]).await;
        if c == Carrier::Telnyx {
            // The number is named in the unverified body: its refusal must not tell it is gone.
            assert_error(&r, 403, code, message, &gone("webhook"));
        } else {
            assert_error(&r, 404, "not_found", "phone number not found", &gone("webhook"));
        }
        assert!(!ids(&list(&app, &org, "").await).contains(id), "{c}");
    }
    assert_eq!(ids(&list(&app, &org, "").await), [created[5].clone()]);
    // What is left: the saved credential, the remaining number's own, and the Twilio number's
    // first credential, retired when it was rotated away: nothing names it any more, and the
    // sweeper removes it once its grace is over.
    let retired: Vec<(String, Option<i64>)> = {
        let mut v: Vec<_> = app
            .state
            .store
            .secrets_all()
            .unwrap()
            .into_iter()
            .map(|s| (s.id.as_str().to_owned(), s.retired_until_ms))
            .collect();
        v.sort();
        v
    };
    let mut left = vec![
        (saved.clone(), None),
        (str_of(&phones[5], "credential_secret_id").to_owned(), None),
        (first_secret.clone(), Some(first_until)),
    ];
    left.sort();
    assert_eq!(retired, left, "a deleted number's credentials go with it");
    app.state.store.sweep(first_until).unwrap();
    assert!(secret_ids(&app).contains(&first_secret), "kept until its grace is over");
    app.state.store.sweep(first_until + 1).unwrap();
    let mut left = vec![saved, str_of(&phones[5], "credential_secret_id").to_owned()];
    left.sort();
    assert_eq!(secret_ids(&app), left);
}

#[tokio::test]
async fn another_organization_cannot_see_or_touch_the_numbers() {
    let (_fake, app, org) = setup().await;
    let intruder = app.create_org("Intruder").await;
    let mut phones = Vec::new();
    for a in &ACCOUNTS {
        phones.push(import_inline(&app, &org, a, 0).await);
    }
    let secrets_before = secret_ids(&app);
    for (a, v) in ACCOUNTS.iter().zip(&phones) {
        let c = a.carrier;
        let id = str_of(v, "id");
        let what = |op: &str| format!("{c} {op} by another org");
        let nf = "phone number not found";
        assert_error(&get_phone(&app, &intruder, id).await, 404, "not_found", nf, &what("GET"));
        for body in [
            json!({"label": "mine now"}),
            json!({"config": {"stream_url": "wss://evil.example.com/s"}}),
            json!({"credentials": credentials(c, WRONG)}),
        ] {
            let r = patch_phone(&app, &intruder, id, body).await;
            assert_error(&r, 404, "not_found", nf, &what("PATCH"));
        }
        let r = send(app.delete(&intruder, &format!("/phone-numbers/{id}"))).await;
        assert_error(&r, 404, "not_found", nf, &what("DELETE"));
        assert_eq!(
            list(&app, &intruder, &format!("?provider={c}")).await,
            json!({"phone_numbers": [], "next_after": null}),
            "{c}"
        );
    }
    assert_eq!(list(&app, &intruder, "").await, json!({"phone_numbers": [], "next_after": null}));
    // Nothing changed for the owner.
    assert_eq!(list(&app, &org, "").await, json!({"phone_numbers": phones, "next_after": null}));
    for (a, v) in ACCOUNTS.iter().zip(&phones) {
        let r = get_phone(&app, &org, str_of(v, "id")).await;
        assert_eq!((r.status, r.json()), (200, v.clone()), "{}", a.carrier);
    }
    assert_eq!(secret_ids(&app), secrets_before);
    app.assert_not_in_data_dir(WRONG);
}

// --- rotation grace through the webhook path -----------------------------------------------

/// A Twilio status callback for `phone_id`, signed with `auth_token` as Twilio would.
async fn twilio_status(app: &TestApp, phone_id: &str, auth_token: &str, call_sid: &str) -> Reply {
    let params = [
        ("AccountSid", TWILIO_SID),
        ("CallSid", call_sid),
        ("CallStatus", "completed"),
        ("From", "+14155559876"),
        ("To", account(Carrier::Twilio).numbers[0]),
    ];
    let url = format!("{PUBLIC}/twilio/status/{phone_id}");
    let signature = sign(&TwilioKey::new(auth_token.as_bytes()), &url, &params);
    let req = app
        .client
        .post(app.url(&format!("/twilio/status/{phone_id}")))
        .header("X-Twilio-Signature", signature)
        .form(&params);
    send(req).await
}

/// How each recorded event of the number was verified, by call sid, in arrival order.
async fn verified_by(app: &TestApp, org: &Org, phone_id: &str) -> Vec<(String, Value)> {
    let r = send(app.get(org, &format!("/events?phone_id={phone_id}"))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (str_of(e, "call_id").to_owned(), e["verified_by"].clone()))
        .collect()
}

fn by(credential: &str, secret_id: &str) -> Value {
    json!({"scheme": "twilio-hmac-sha1", "credential": credential, "secret_id": secret_id})
}

/// The number now verifies with `new` and, until `valid_until`, with `old`: a callback signed
/// with either passes inside the grace (its last millisecond included), and only `new` after.
/// The sweeper keeps `old` sealed for as long as it verifies, and removes it after. `before`
/// are the number's events recorded before the rotation.
async fn assert_grace(
    app: &TestApp,
    org: &Org,
    id: &str,
    (old_token, old_id): (&str, &str),
    (new_token, new_id): (&str, &str),
    valid_until: i64,
    before: Vec<(String, Value)>,
) {
    let r = twilio_status(app, id, old_token, "CA01").await;
    assert_eq!((r.status, r.text.as_str()), (200, ""), "old credential inside the grace");
    let r = twilio_status(app, id, new_token, "CA02").await;
    assert_eq!((r.status, r.text.as_str()), (200, ""), "new credential");
    app.clock.set_ms(valid_until);
    app.state.store.sweep(valid_until).unwrap();
    assert!(secret_ids(app).contains(&old_id.to_owned()), "swept while it still verifies");
    let r = twilio_status(app, id, old_token, "CA03").await;
    assert_eq!((r.status, r.text.as_str()), (200, ""), "old credential at the last moment of the grace");
    app.clock.set_ms(valid_until + 1);
    let r = twilio_status(app, id, old_token, "CA04").await;
    let invalid = "the request signature is not valid";
    assert_error(&r, 403, "invalid_signature", invalid, "old credential after the grace");
    app.state.store.sweep(valid_until + 1).unwrap();
    assert!(!secret_ids(app).contains(&old_id.to_owned()), "kept after its grace");
    assert!(secret_ids(app).contains(&new_id.to_owned()));
    let r = twilio_status(app, id, old_token, "CA04b").await;
    assert_error(&r, 403, "invalid_signature", invalid, "old credential after the sweep");
    let r = twilio_status(app, id, new_token, "CA05").await;
    assert_eq!((r.status, r.text.as_str()), (200, ""), "new credential after the grace");
    let r = twilio_status(app, id, WRONG, "CA06").await;
    assert_error(&r, 403, "invalid_signature", invalid, "never valid");

    let mut expected = before;
    expected.extend([
        ("CA01".to_owned(), by("previous", old_id)),
        ("CA02".to_owned(), by("current", new_id)),
        ("CA03".to_owned(), by("previous", old_id)),
        ("CA05".to_owned(), by("current", new_id)),
    ]);
    assert_eq!(verified_by(app, org, id).await, expected);
}

#[tokio::test]
async fn rotated_inline_credentials_verify_webhooks_until_the_grace_ends() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let v = import_inline(&app, &org, twilio, 0).await;
    let id = str_of(&v, "id").to_owned();
    let old_id = str_of(&v, "credential_secret_id").to_owned();
    // Before any rotation the one credential is current.
    let r = twilio_status(&app, &id, twilio.secret, "CA00").await;
    assert_eq!((r.status, r.text.as_str()), (200, ""));
    let r = twilio_status(&app, &id, TWILIO_ROTATED, "CA00b").await;
    assert_error(&r, 403, "invalid_signature", "the request signature is not valid", "not yet rotated");

    let rotated_at = T0 + 1_000;
    app.clock.set_ms(rotated_at);
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let new_id = str_of(&v, "credential_secret_id").to_owned();
    let valid_until = rotated_at + GRACE_MS;
    assert_eq!(v["previous_credential"], json!({"secret_id": old_id, "valid_until": rfc3339(valid_until)}));

    let before = vec![("CA00".to_owned(), by("current", &old_id))];
    assert_eq!(verified_by(&app, &org, &id).await, before);
    let (old, new) = ((twilio.secret, old_id.as_str()), (TWILIO_ROTATED, new_id.as_str()));
    assert_grace(&app, &org, &id, old, new, valid_until, before).await;
    for secret in [twilio.secret, TWILIO_ROTATED] {
        app.assert_not_in_data_dir(secret);
    }
}

#[tokio::test]
async fn a_replaced_byok_credential_verifies_webhooks_until_the_grace_ends() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let old_id = save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    let r = import(&app, &org, Carrier::Twilio, json!({"number": twilio.numbers[0]})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    let id = str_of(&v, "id").to_owned();
    assert_eq!(v["credential_secret_id"], json!(old_id));

    let replaced_at = T0 + 1_000;
    app.clock.set_ms(replaced_at);
    let new_id = save_byok(&app, &org, Carrier::Twilio, TWILIO_ROTATED).await;
    assert_ne!(new_id, old_id);
    let valid_until = replaced_at + GRACE_MS;
    let v = get_phone(&app, &org, &id).await.json();
    assert_eq!(v["credential_secret_id"], json!(new_id));
    assert_eq!(v["previous_credential"], json!({"secret_id": old_id, "valid_until": rfc3339(valid_until)}));
    assert_eq!(v["updated_at"], json!(rfc3339(replaced_at)));

    let (old, new) = ((twilio.secret, old_id.as_str()), (TWILIO_ROTATED, new_id.as_str()));
    assert_grace(&app, &org, &id, old, new, valid_until, Vec::new()).await;
    for secret in [twilio.secret, TWILIO_ROTATED] {
        app.assert_not_in_data_dir(secret);
    }
}

/// The saved Twilio credential's id, and the ids of two numbers imported with it.
async fn two_numbers_on_saved_twilio(app: &TestApp, org: &Org) -> (String, Vec<String>) {
    let twilio = account(Carrier::Twilio);
    let saved = save_byok(app, org, Carrier::Twilio, twilio.secret).await;
    let mut ids = Vec::new();
    for number in &twilio.numbers[..2] {
        let r = import(app, org, Carrier::Twilio, json!({"number": number})).await;
        assert_eq!(r.status, 201, "{number}: {}", r.text);
        ids.push(str_of(&r.json(), "id").to_owned());
    }
    (saved, ids)
}

#[tokio::test]
async fn deleting_one_number_keeps_a_replaced_byok_credential_for_the_others() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let (old_id, ids) = two_numbers_on_saved_twilio(&app, &org).await;
    let replaced_at = T0 + 1_000;
    app.clock.set_ms(replaced_at);
    let new_id = save_byok(&app, &org, Carrier::Twilio, TWILIO_ROTATED).await;
    let valid_until = replaced_at + GRACE_MS;
    for id in &ids {
        let v = get_phone(&app, &org, id).await.json();
        assert_eq!(v["previous_credential"], json!({"secret_id": old_id, "valid_until": rfc3339(valid_until)}));
    }

    // The first number goes; the second still needs the replaced credential for its grace.
    let r = send(app.delete(&org, &format!("/phone-numbers/{}", ids[0]))).await;
    assert_eq!((r.status, r.text.as_str()), (204, ""));
    assert!(secret_ids(&app).contains(&old_id), "the other number's previous credential was dropped");
    let (old, new) = ((twilio.secret, old_id.as_str()), (TWILIO_ROTATED, new_id.as_str()));
    assert_grace(&app, &org, &ids[1], old, new, valid_until, Vec::new()).await;
}

/// Replacing the saved credential moves every number on it to the new one, keeping only the
/// replaced one as previous: a token mistyped twice would leave the numbers none their carrier
/// signs with. So the carrier must list every such number on the new credential's account
/// first, as for a number's own new credential; refused, nothing changes.
#[tokio::test]
async fn a_saved_credential_numbers_use_is_replaced_only_by_one_whose_account_lists_them() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let (old_id, ids) = two_numbers_on_saved_twilio(&app, &org).await;
    let mut before = Vec::new();
    for id in &ids {
        before.push(get_phone(&app, &org, id).await.json());
    }
    // Another account that has only the first number (it moved there), and one with neither.
    let moved = json!({"account_sid": "AC99887766554433221100ffeeddccbbaa", "auth_token": "twilioSECRETmoved000888"});
    fake.add_account(Carrier::Twilio, moved.clone(), [twilio.numbers[0]]);
    let stranger =
        json!({"account_sid": "ACaabbccddeeff00112233445566778899", "auth_token": "twilioSECRETother000999"});
    fake.add_account(Carrier::Twilio, stranger.clone(), ["+14155550299"]);

    let rejected = format!("twilio rejected the credentials: {}", carrier_auth_message(Carrier::Twilio));
    for _ in 0..2 {
        let body = json!({"provider": "twilio", "api_key": credentials(Carrier::Twilio, WRONG)});
        let r = send(app.post(&org, "/byok").json(&body)).await;
        assert_error(&r, 422, "invalid_provider_credentials", &rejected, "a mistyped token");
    }
    let r = send(app.post(&org, "/byok").json(&json!({"provider": "twilio", "api_key": moved}))).await;
    let missing = format!(
        "1 number(s) verifying their webhooks with the saved twilio credential are not on this account: {}",
        twilio.numbers[1]
    );
    assert_error(&r, 422, "number_not_on_account", &missing, "one number is not there");
    let r = send(app.post(&org, "/byok").json(&json!({"provider": "twilio", "api_key": stranger}))).await;
    let missing = format!(
        "2 number(s) verifying their webhooks with the saved twilio credential are not on this account: {}, {}",
        twilio.numbers[0], twilio.numbers[1]
    );
    assert_error(&r, 422, "number_not_on_account", &missing, "neither is there");
    fake.set_mode(Mode::ServerError);
    let body = json!({"provider": "twilio", "api_key": credentials(Carrier::Twilio, TWILIO_ROTATED)});
    let r = send(app.post(&org, "/byok").json(&body)).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (502, json!("provider_unavailable")), "{}", r.text);
    fake.set_mode(Mode::Ok);

    for (id, was) in ids.iter().zip(&before) {
        assert_eq!(&get_phone(&app, &org, id).await.json(), was, "nothing changed");
        let r = twilio_status(&app, id, twilio.secret, &format!("CAkept{id}")).await;
        assert_eq!(r.status, 200, "the saved token still verifies: {}", r.text);
    }
    let r = send(app.get(&org, "/byok")).await;
    assert!(r.text.contains(&old_id), "{}", r.text);

    // The same account's new token is taken, and moves both numbers.
    let new_id = save_byok(&app, &org, Carrier::Twilio, TWILIO_ROTATED).await;
    for id in &ids {
        let v = get_phone(&app, &org, id).await.json();
        assert_eq!(v["credential_secret_id"], json!(new_id));
        assert_eq!(v["previous_credential"]["secret_id"], json!(old_id));
    }
    // A saved credential no number uses is taken as given: nothing to check it against.
    let r = send(
        app.post(&org, "/byok").json(&json!({"provider": "plivo", "api_key": credentials(Carrier::Plivo, WRONG)})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// A number imported with the saved credential while its replacement was being checked with
/// the carrier is not moved unchecked: the replacement is refused whole.
#[tokio::test]
async fn a_saved_credential_is_not_replaced_over_a_number_its_check_did_not_see() {
    use callgate::domain::{OrgId, PhoneId, SecretId};
    use callgate::store::{AuditRecord, Conflict};
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let old_id = save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    let r = import(&app, &org, Carrier::Twilio, json!({"number": twilio.numbers[0]})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = PhoneId::parse(str_of(&r.json(), "id")).unwrap();
    let org_id = OrgId::parse(&org.id).unwrap();
    let new = callgate::vault::validate("twilio", &credentials(Carrier::Twilio, TWILIO_ROTATED)).unwrap();
    let rec = app.state.vault.seal(&org_id, &new, None, T0);
    let audit = AuditRecord {
        org_id: org_id.clone(),
        key_id: None,
        action: "set".into(),
        provider: "twilio".into(),
        at_ms: T0,
    };
    let store = app.state.store.as_ref();
    assert_eq!(store.byok_put(&rec, &audit, T0 + GRACE_MS, &[]).unwrap(), Err(Conflict::CredentialChanged));
    let phone = store.phone_get(&org_id, &id).unwrap().unwrap();
    assert_eq!((phone.credential.as_str(), phone.previous_credential), (old_id.as_str(), None), "the number was moved");
    assert_eq!(store.byok_get(&org_id, "twilio").unwrap().unwrap().id.as_str(), old_id);
    let old = SecretId::parse(&old_id).unwrap();
    assert_eq!(store.byok_put(&rec, &audit, T0 + GRACE_MS, std::slice::from_ref(&id)).unwrap(), Ok(Some(old)));
    assert_eq!(store.phone_get(&org_id, &id).unwrap().unwrap().credential, rec.id);
}

/// An import reads the saved credential, then waits on the carrier; a delete or a replacement
/// of that credential meanwhile must not leave the number on a secret that is gone.
#[tokio::test]
async fn an_import_racing_a_change_of_the_saved_credential_is_refused_not_left_on_it() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    for (i, change) in ["delete", "replace"].into_iter().enumerate() {
        save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
        fake.set_mode(Mode::Slow);
        let importing = import(&app, &org, Carrier::Twilio, json!({"number": twilio.numbers[i]}));
        let changing = async {
            tokio::time::sleep(SLOW / 3).await;
            if change == "delete" {
                send(app.delete(&org, "/byok/twilio")).await
            } else {
                let body = json!({"provider": "twilio", "api_key": credentials(Carrier::Twilio, TWILIO_ROTATED)});
                send(app.post(&org, "/byok").json(&body)).await
            }
        };
        let (imported, changed) = tokio::join!(importing, changing);
        fake.set_mode(Mode::Ok);
        assert_eq!(changed.status, 200, "{change}: {}", changed.text);
        let msg = "the saved twilio credential was deleted or replaced during the import; try again";
        assert_error(&imported, 409, "credential_changed", msg, change);
        assert_eq!(list(&app, &org, "").await["phone_numbers"], json!([]), "{change}");
    }
}

/// A PATCH that waits on the carrier (new credentials), or an import that configures the number
/// there, writes what it changed onto the number as it is then: another PATCH that answered 200
/// meanwhile is not undone.
#[tokio::test]
async fn a_change_made_while_another_waits_on_the_carrier_is_kept() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let id = str_of(&import_inline(&app, &org, twilio, 0).await, "id").to_owned();
    let old_secret_id = str_of(&get_phone(&app, &org, &id).await.json(), "credential_secret_id").to_owned();
    fake.set_mode(Mode::Slow);
    let rotating = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)}));
    let relabelling = async {
        tokio::time::sleep(SLOW / 3).await;
        patch_phone(
            &app,
            &org,
            &id,
            json!({"label": "front desk", "config": {"stream_url": "wss://new.example.com/ws"}}),
        )
        .await
    };
    let (rotated, relabelled) = tokio::join!(rotating, relabelling);
    fake.set_mode(Mode::Ok);
    assert_eq!(relabelled.status, 200, "{}", relabelled.text);
    assert_eq!(rotated.status, 200, "{}", rotated.text);
    let now = get_phone(&app, &org, &id).await.json();
    assert_eq!(rotated.json(), now, "the PATCH answers with the number as written");
    assert_eq!(
        (&now["label"], &now["config"]["stream_url"]),
        (&json!("front desk"), &json!("wss://new.example.com/ws"))
    );
    assert_eq!(now["previous_credential"]["secret_id"], old_secret_id.as_str(), "and the rotation took");

    // An import that configures the number at the carrier, and a PATCH once it is stored.
    fake.set_mode(Mode::Slow);
    let body = json!({"number": twilio.numbers[1], "credentials": credentials(Carrier::Twilio, twilio.secret), "configure_provider": true});
    let importing = import(&app, &org, Carrier::Twilio, body);
    let patching = async {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        let id = loop {
            let listed = list(&app, &org, "").await;
            let found =
                listed["phone_numbers"].as_array().unwrap().iter().find(|p| p["number"] == twilio.numbers[1]).cloned();
            if let Some(p) = found {
                break str_of(&p, "id").to_owned();
            }
            assert!(std::time::Instant::now() < until, "the import never stored the number");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        (patch_phone(&app, &org, &id, json!({"label": "set while configuring"})).await, id)
    };
    let (imported, (patched, id)) = tokio::join!(importing, patching);
    fake.set_mode(Mode::Ok);
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(imported.status, 201, "{}", imported.text);
    let now = get_phone(&app, &org, &id).await.json();
    assert_eq!(imported.json(), now);
    assert_eq!(now["label"], "set while configuring");
    assert_eq!(now["provider_configuration"]["changed"], true);
}

/// A number moved off a saved credential still verifies with it until its grace ends, so the
/// credential cannot be deleted before then.
#[tokio::test]
async fn a_saved_credential_in_a_numbers_grace_cannot_be_deleted() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    let r = import(&app, &org, Carrier::Twilio, json!({"number": twilio.numbers[0]})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = str_of(&r.json(), "id").to_owned();
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = send(app.delete(&org, "/byok/twilio")).await;
    let msg = "1 phone number(s) verify their webhooks with this credential; delete them or give them another credential first";
    assert_error(&r, 409, "credential_in_use", msg, "in grace");
    let r = twilio_status(&app, &id, twilio.secret, "CAgrace").await;
    assert_eq!(r.status, 200, "the old token still verifies: {}", r.text);
    // Once the grace is over it can go.
    app.clock.set_ms(T0 + GRACE_MS + 1);
    assert_eq!(send(app.delete(&org, "/byok/twilio")).await.status, 200);
}

/// Replacing the saved credential must not take away the one a number moved off it still
/// verifies with during its grace, as deleting it may not either.
#[tokio::test]
async fn a_saved_credential_replaced_while_in_a_numbers_grace_verifies_until_the_grace_ends() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let first = save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    let r = import(&app, &org, Carrier::Twilio, json!({"number": twilio.numbers[0]})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = str_of(&r.json(), "id").to_owned();
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Nothing verifies with the saved one as its current credential any more: it is replaced.
    let second = save_byok(&app, &org, Carrier::Twilio, TWILIO_ROTATED).await;
    assert_ne!(first, second);
    let r = twilio_status(&app, &id, twilio.secret, "CAgrace").await;
    assert_eq!(r.status, 200, "the old token still verifies in the grace: {}", r.text);
    assert!(secret_ids(&app).contains(&first));
    app.state.store.sweep(T0 + GRACE_MS).unwrap();
    assert!(secret_ids(&app).contains(&first), "kept to the grace's last moment");
    app.state.store.sweep(T0 + GRACE_MS + 1).unwrap();
    assert!(!secret_ids(&app).contains(&first), "gone with the grace");
    // Replaced with no number in its grace, a saved credential goes at once.
    let third = save_byok(&app, &org, Carrier::Twilio, twilio.secret).await;
    assert!(!secret_ids(&app).contains(&second));
    assert!(secret_ids(&app).contains(&third));
}

/// Exotel is configured by hand from the steps the import returns; with a webhook token the
/// URLs work only with the token added, which the steps must say.
#[tokio::test]
async fn exotel_steps_say_where_the_webhook_token_goes() {
    let (_fake, app, org) = setup().await;
    let a = account(Carrier::Exotel);
    for (i, token) in [None, Some(EXOTEL_TOKEN)].into_iter().enumerate() {
        let mut body = json!({"number": a.numbers[i], "credentials": credentials(Carrier::Exotel, a.secret), "configure_provider": true});
        if let Some(t) = token {
            body["config"] = json!({ "exotel_webhook_token": t });
        }
        let r = import(&app, &org, Carrier::Exotel, body).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let steps = str_of(&r.json()["provider_configuration"], "manual_steps").to_owned();
        assert_eq!(steps.contains("add ?token=<the token you set> to both URLs"), token.is_some(), "{steps}");
        assert!(!r.text.contains(EXOTEL_TOKEN));
    }
}

/// Saved credentials are checked as inline ones are before a number moves onto them: taken on
/// trust, another account's would push out the token the carrier signs with.
#[tokio::test]
async fn saved_credentials_are_checked_with_the_carrier_before_a_number_moves_onto_them() {
    let (_fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let v = import_inline(&app, &org, twilio, 0).await;
    let id = str_of(&v, "id").to_owned();
    let before = get_phone(&app, &org, &id).await.json();
    save_byok(&app, &org, Carrier::Twilio, WRONG).await;
    let rejected = format!("twilio rejected the credentials: {}", carrier_auth_message(Carrier::Twilio));
    let r = patch_phone(&app, &org, &id, json!({"credential": "byok"})).await;
    assert_error(&r, 422, "invalid_provider_credentials", &rejected, "saved wrong token");
    assert_eq!(get_phone(&app, &org, &id).await.json(), before, "nothing changed");
    let r = twilio_status(&app, &id, twilio.secret, "CAkept").await;
    assert_eq!(r.status, 200, "the number's token still verifies: {}", r.text);
    let saved = save_byok(&app, &org, Carrier::Twilio, TWILIO_ROTATED).await;
    let r = patch_phone(&app, &org, &id, json!({"credential": "byok"})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(str_of(&r.json(), "credential_secret_id"), saved);
}

/// A number keeps one previous credential, so a new one is taken only once the carrier shows
/// the number on its account: a wrong one would push out the token the carrier signs with.
#[tokio::test]
async fn new_inline_credentials_are_checked_with_the_carrier_before_they_replace_the_old() {
    let (fake, app, org) = setup().await;
    let twilio = account(Carrier::Twilio);
    let v = import_inline(&app, &org, twilio, 0).await;
    let id = str_of(&v, "id").to_owned();
    let before = get_phone(&app, &org, &id).await.json();
    let rejected = format!("twilio rejected the credentials: {}", carrier_auth_message(Carrier::Twilio));
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, WRONG)})).await;
    assert_error(&r, 422, "invalid_provider_credentials", &rejected, "wrong token");
    fake.set_mode(Mode::ServerError);
    let r = patch_phone(&app, &org, &id, json!({"credentials": credentials(Carrier::Twilio, TWILIO_ROTATED)})).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (502, json!("provider_unavailable")), "{}", r.text);
    fake.set_mode(Mode::Ok);
    assert_eq!(get_phone(&app, &org, &id).await.json(), before, "nothing changed");
    let r = twilio_status(&app, &id, twilio.secret, "CAkept").await;
    assert_eq!(r.status, 200, "the old token still verifies: {}", r.text);
}

/// A change that moves a number onto a credential that is gone (a saved one replaced or deleted
/// since the request read it) is refused whole: the number would verify with nothing.
#[tokio::test]
async fn a_number_is_never_moved_onto_a_credential_that_is_gone() {
    use callgate::domain::{OrgId, SecretId};
    use callgate::store::Modified;
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let a = account(Carrier::Twilio);
    let cred = credentials(Carrier::Twilio, a.secret);
    let store = app.state.store.as_ref();
    let phone =
        insert_phone(store, &app.state.vault, &org.id, Carrier::Twilio, a.numbers[0], &cred, Default::default(), T0);
    let org_id = OrgId::parse(&org.id).unwrap();
    let gone = SecretId::generate();
    let mut change = |p: &mut callgate::store::PhoneRecord| {
        p.credential = gone.clone();
        p.label = Some("moved".into());
    };
    let r = store.phone_modify(&org_id, &phone.id, None, &mut change).unwrap();
    assert!(matches!(r, Modified::CredentialGone), "{r:?}");
    let now = store.phone_get(&org_id, &phone.id).unwrap().unwrap();
    assert_eq!((now.credential, now.label), (phone.credential.clone(), None), "nothing was written");
    // Nor onto one kept only for another number's grace (retired), which the sweep removes.
    let rotated = credentials(Carrier::Twilio, TWILIO_ROTATED);
    let other =
        insert_phone(store, &app.state.vault, &org.id, Carrier::Twilio, a.numbers[1], &rotated, Default::default(), T0);
    let fresh = app.state.vault.seal(&org_id, &callgate::vault::validate("twilio", &cred).unwrap(), None, T0);
    let fresh_id = fresh.id.clone();
    let r = store.phone_modify(&org_id, &other.id, Some(&fresh), &mut |p| p.credential = fresh_id.clone()).unwrap();
    assert!(matches!(r, Modified::Written(_)), "{r:?}");
    let retired = other.credential.clone();
    assert!(store.secrets_all().unwrap().iter().any(|s| s.id == retired && s.retired_until_ms.is_some()));
    let r = store.phone_modify(&org_id, &phone.id, None, &mut |p| p.credential = retired.clone()).unwrap();
    assert!(matches!(r, Modified::CredentialGone), "{r:?}");
    // A number that is gone stays gone.
    assert!(store.phone_delete(&org_id, &phone.id).unwrap());
    let r = store.phone_modify(&org_id, &phone.id, None, &mut |p| p.label = Some("back".into())).unwrap();
    assert!(matches!(r, Modified::Gone), "{r:?}");
    assert!(store.phone_get(&org_id, &phone.id).unwrap().is_none());
}
