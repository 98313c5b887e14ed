//! Per-request cost of the webhook path around verification: URL reconstruction, form
//! parsing, event encoding, and the store's record path (with and without a flush per
//! record, which is what group commit saves). Kept short: the build machine has 2 cores.

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use ipnet::IpNet;

use callgate::carriers::exotel::Exotel;
use callgate::carriers::plivo::{signature as plivo_sig, Plivo};
use callgate::carriers::{params, pipeline, CarrierHooks, Hook, Inbound, Prepared, VerifyContext};
use callgate::domain::{Carrier, EventId, OrgId, PhoneId, SecretId, E164};
use callgate::net::{client, form};
use callgate::store::{EventRecord, PhoneConfig, PhoneRecord, PreparedEvent, SledStore, Store, VerifiedBy};

/// A Plivo hangup callback as `callgate-bench` sends it (~780 bytes).
const STATUS_BODY: &str = "ALegRequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36\
&ALegUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&BillRate=0.0085\
&CallUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&CallerName=%2B14155550100&Direction=inbound\
&From=14155550100&ParentAuthID=MANWVLYTK4ZWU1YTY4QA&RequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36\
&STIRAttestation=Not+Applicable&STIRVerification=Not+Applicable\
&SessionStart=2024-05-01+10%3A00%3A00.238707\
&SIP-H-To=%3Csip%3A14152010000%4052.9.11.55%3Btransport%3Dudp%3E%3Btag%3D1&To=14152010000\
&AnswerTime=2024-05-01+10%3A00%3A02&BillDuration=60&CallStatus=completed&Duration=37\
&EndTime=2024-05-01+10%3A00%3A39&Event=Hangup&HangupCause=NORMAL_CLEARING&HangupCauseCode=4000\
&HangupCauseName=Normal+Hangup&HangupSource=Caller&StartTime=2024-05-01+10%3A00%3A00&TotalCost=0.00850";

const PUBLIC_URL: &str = "https://gw.bench.example";
const PATH: &str = "/plivo/status/ph_01a20373bcdd734da0c3378ff2af8aa1";

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

fn bench_net(c: &mut Criterion) {
    let mut group = c.benchmark_group("net");
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let carrier_headers = headers(&[
        ("host", "127.0.0.1:18080"),
        ("user-agent", "PlivoHTTP/1.0"),
        ("content-type", "application/x-www-form-urlencoded"),
        ("x-plivo-signature-v3", "QkFTRTY0U0lHTkFUVVJFQkFTRTY0U0lHTkFUVVJFMDA="),
        ("x-plivo-signature-v3-nonce", "31627761595286130198"),
    ]);
    group.bench_function("signed_url_direct", |b| {
        b.iter(|| client::signed_url(black_box(PUBLIC_URL), peer, black_box(&carrier_headers), &[], black_box(PATH)))
    });
    group.bench_function("client_ip_direct", |b| b.iter(|| client::client_ip(black_box(peer), &carrier_headers, &[])));

    let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "127.0.0.0/8".parse().unwrap()];
    let proxied = headers(&[
        ("host", "10.0.0.5:8080"),
        ("x-forwarded-for", "198.51.100.7, 10.1.2.3"),
        ("x-forwarded-host", "gw.bench.example"),
        ("x-forwarded-proto", "https"),
    ]);
    group.bench_function("signed_url_proxied", |b| {
        b.iter(|| client::signed_url(black_box(PUBLIC_URL), peer, black_box(&proxied), &proxies, black_box(PATH)))
    });
    group.bench_function("client_ip_proxied", |b| b.iter(|| client::client_ip(black_box(peer), &proxied, &proxies)));
    group.finish();
}

fn bench_form(c: &mut Criterion) {
    let mut group = c.benchmark_group("form");
    group.throughput(Throughput::Bytes(STATUS_BODY.len() as u64));
    group.bench_function("parse_plivo_status", |b| b.iter(|| form::parse(black_box(STATUS_BODY.as_bytes())).unwrap()));
    group.finish();
}

fn phone() -> PhoneRecord {
    PhoneRecord {
        id: PhoneId::generate(),
        org_id: OrgId::generate(),
        provider: Carrier::Plivo,
        number: E164::parse("+14152010000").unwrap(),
        provider_number_id: "14152010000".into(),
        friendly_name: Some("bench plivo 0".into()),
        label: Some("callgate-bench".into()),
        config: PhoneConfig { stream_url: Some("wss://stream.bench.example/media".into()), ..PhoneConfig::default() },
        credential: SecretId::generate(),
        previous_credential: None,
        billing_status: "byok".into(),
        monthly_cost_cents: 0,
        provider_configuration: None,
        connection_id: None,
        created_at_ms: 1_714_557_600_000,
        updated_at_ms: 1_714_557_600_000,
    }
}

/// The event the pipeline builds for the status body above: its fields kept as received.
fn event(phone: &PhoneRecord) -> EventRecord {
    EventRecord {
        id: EventId::generate(),
        org_id: phone.org_id.clone(),
        phone_id: phone.id.clone(),
        provider: phone.provider,
        kind: "call.hangup".into(),
        call_id: Some("3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36".into()),
        from: Some("+14155550100".into()),
        to: Some("+14152010000".into()),
        direction: Some("inbound".into()),
        status: Some("completed".into()),
        received_at: "2024-05-01T10:00:39.123Z".into(),
        received_at_ms: 1_714_557_639_123,
        verified_by: VerifiedBy {
            scheme: "plivo-v3".into(),
            credential: "current".into(),
            secret_id: Some(phone.credential.clone()),
        },
        params: serde_json::value::RawValue::NULL.to_owned(),
        form: Some(STATUS_BODY.into()),
        answer: None,
    }
}

/// A form-encoded status callback as the pipeline hands it to a carrier, its form decoded.
fn status_callback<'a>(headers: &'a HeaderMap, url: &'a str, body: &'a [u8]) -> Inbound<'a> {
    Inbound {
        method: "POST",
        headers,
        url,
        query: "",
        body,
        form: form::parse(body).unwrap(),
        is_form: true,
        envelope: None,
        client_ip: IpAddr::from([127, 0, 0, 1]),
        now_secs: 1_714_557_639,
    }
}

fn bench_event(c: &mut Criterion) {
    let phone = phone();
    let ev = event(&phone);
    let mut group = c.benchmark_group("event");
    // The event as the writer gets it: its JSON, then its form text as received.
    group.bench_function("encode_for_writer", |b| b.iter(|| PreparedEvent::new(black_box(&ev), None)));
    // The event's `params` as the pipeline writes them, from the already decoded form.
    let headers = HeaderMap::new();
    let inbound = status_callback(&headers, "https://gw.example.com/plivo/status/ph_x", STATUS_BODY.as_bytes());
    group.bench_function("build_params_json", |b| b.iter(|| params::form_params(black_box(&inbound), &[])));
    // What the pipeline keeps instead, and the JSON made from it when the event is read out.
    group.bench_function("keep_params_as_received", |b| b.iter(|| params::as_received(black_box(&inbound))));
    group.bench_function("params_json_when_read", |b| b.iter(|| params::received_json(black_box(STATUS_BODY))));
    group.finish();
}

/// A fresh event, delivery and replay key per iteration, as every real callback has.
fn unique(template: &EventRecord, expires: i64) -> PreparedEvent {
    let ev = template.clone();
    let mut key = b"plivo\0nonce:".to_vec();
    key.extend_from_slice(EventId::generate().as_str().as_bytes());
    PreparedEvent::new(&ev, Some((&key, expires)))
}

fn bench_store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(&dir.path().join("db"), Default::default()).unwrap();
    let mut phone = phone();
    // A number is stored with its credential, sealed as the import seals it.
    let vault = callgate::vault::Vault::new(callgate::vault::crypto::Keyring::from_key(
        callgate::vault::crypto::generate_key(),
    ));
    let credential =
        serde_json::json!({"auth_id": "MABENCH0000000000001", "auth_token": "MAtestAuthToken0123456789abcdefXYZ"});
    let new = callgate::vault::validate("plivo", &credential).unwrap();
    let sealed = vault.seal(&phone.org_id, &new, None, phone.created_at_ms);
    phone.credential = sealed.id.clone();
    store.phone_insert(&phone, Some(&sealed)).unwrap().unwrap();
    store.flush().unwrap();
    let template = event(&phone);
    let expires = template.received_at_ms + 86_400_000;

    let mut group = c.benchmark_group("store");
    group.bench_function("phone_resolve", |b| b.iter(|| store.phone_resolve(black_box(&phone.id)).unwrap().unwrap()));
    // The durable writer's batch: 64 events in one journal append and one fdatasync, as under
    // load with 64 connections. Reported per batch; divide by 64 for the cost per event.
    group.throughput(Throughput::Elements(64));
    group.bench_function("record_batch_64_durable", |b| {
        b.iter_batched(
            || (0..64).map(|_| unique(&template, expires)).collect::<Vec<_>>(),
            |batch| store.write_batch(&batch, &[], &[]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    // One event alone: what every request would pay without group commit.
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.bench_function("record_one_durable", |b| {
        b.iter_batched(
            || vec![unique(&template, expires)],
            |one| store.write_batch(&one, &[], &[]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

/// The CPU a Plivo status callback costs between its body arriving and its record going to
/// the writer: form decoding, the V3 check, reading the fields, building and encoding the event.
/// What the load test measures besides HTTP and the sync, in one number.
fn bench_path(c: &mut Criterion) {
    let phone = phone();
    let key = plivo_sig::PlivoKey::new(b"MAtestAuthToken0123456789abcdefXYZ");
    let url = format!("{PUBLIC_URL}{PATH}");
    let nonce = "31627761595286130198";
    let pairs = form::parse(STATUS_BODY.as_bytes()).unwrap();
    let sig = plivo_sig::sign_v3(&key, plivo_sig::Method::Post, &url, &pairs, nonce).unwrap();
    let headers = headers(&[("x-plivo-signature-v3", &sig), ("x-plivo-signature-v3-nonce", nonce)]);
    let keys = Prepared::Plivo(key);
    let ctx = VerifyContext { exotel_allowed: &[] };
    let mut group = c.benchmark_group("path");
    group.bench_function("plivo_status_cpu", |b| {
        b.iter(|| {
            let body = black_box(STATUS_BODY.as_bytes());
            let mut inbound = status_callback(&headers, &url, body);
            let scheme = Plivo::verify(&inbound, &keys, &phone, &ctx).unwrap();
            let parsed = Plivo::parse(&mut inbound, Hook::Status);
            let verified_by = VerifiedBy { scheme: scheme.into(), credential: "current".into(), secret_id: None };
            let ev = pipeline::event(&phone, parsed, verified_by, 1_714_557_639_123);
            PreparedEvent::new(&ev, Some((b"plivo\0nonce", 1)))
        })
    });
    group.finish();
}

/// Exotel's check: the client address against an allow-list of six ranges (the request's in
/// the last), then the number's webhook token from the query against its hash.
fn bench_exotel(c: &mut Criterion) {
    use sha2::{Digest, Sha256};
    let token = "exotel-webhook-token-0123456789";
    let mut phone = phone();
    phone.provider = Carrier::Exotel;
    phone.config.exotel_webhook_token_sha256 = Some(Sha256::digest(token.as_bytes()).into());
    let allowed: Vec<IpNet> =
        ["54.251.0.0/16", "13.228.0.0/15", "52.74.0.0/16", "18.139.0.0/16", "103.27.142.0/24", "203.0.113.0/24"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
    let ctx = VerifyContext { exotel_allowed: &allowed };
    let headers = HeaderMap::new();
    let query = format!("token={token}");
    let url = format!("{PUBLIC_URL}/exotel/status/ph_x?{query}");
    let mut inbound = status_callback(&headers, &url, STATUS_BODY.as_bytes());
    inbound.query = &query;
    inbound.client_ip = IpAddr::from([203, 0, 113, 9]);
    let mut group = c.benchmark_group("verify");
    group.bench_function("exotel_ip_and_token", |b| {
        b.iter(|| Exotel::verify(black_box(&inbound), &Prepared::Exotel, &phone, &ctx).unwrap())
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_net, bench_form, bench_event, bench_store, bench_path, bench_exotel
}
criterion_main!(benches);
