//! Per-request cost of webhook authentication: form parsing plus each carrier's verifier.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use callgate::carriers::plivo::signature as plivo;
use callgate::carriers::telnyx::signature as telnyx;
use callgate::carriers::twilio::signature as twilio;
use callgate::carriers::vobiz::signature as vobiz;
use callgate::net::form;

/// A realistic inbound-call callback, about 600 bytes encoded.
const CALLBACK_BODY: &str = "ALegRequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36\
&ALegUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36&BillRate=0.0085\
&CallStatus=ringing&CallUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36\
&CallerName=%2B14155550100&Direction=inbound&Event=StartApp&From=14155550100\
&ParentAuthID=MANWVLYTK4ZWU1YTY4QA&RequestUUID=3e82ae9d-2c78-4d85-b1a4-6eae7dbafb36\
&SIP-H-To=%3Csip%3A918035551234%4052.9.11.55%3Btransport%3Dudp%3E%3Btag%3D1\
&SessionStart=2024-05-01+10%3A00%3A00.238707&To=918035551234\
&STIRVerification=Not+Applicable&CallerIdName=Jane+Doe\
&SIP-H-X-Tenant=acme-production-eu-west&SIP-H-X-Queue=inbound%20support%20tier%201";

/// A 700-byte form body for the parser benchmark (the callback padded with a long field).
fn body_700() -> String {
    let mut body = CALLBACK_BODY.to_owned();
    body.push_str("&Padding=");
    while body.len() < 700 {
        body.push_str("x%20");
    }
    body.truncate(700);
    body
}

const TX1_BODY: &str = r#"{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0","occurred_at":"2024-05-01T10:00:00.000000Z","payload":{"call_control_id":"v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg","call_leg_id":"428c31b6-7af4-4bcb-b7f5-5013ef9657c1","call_session_id":"428c31b6-abf3-3bc1-b7f4-5013ef9657c1","client_state":null,"connection_id":"1494404757140276705","direction":"incoming","from":"+13125550100","to":"+13125550199","start_time":"2024-05-01T10:00:00.000000Z","state":"parked"},"record_type":"event"},"meta":{"attempt":1,"delivered_to":"https://gw.example.com/telnyx/events"}}"#;
const TX1_PUBLIC: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
const TX1_TS: &str = "1714557600";
const TX1_SIG: &str = "Qq/nrl6jQecOZ8fuNKTl4k9YDy81JVUfhCA/zVxWGLOBMueBqueqfKfGmcmabEfK8i+3Lp/ALYUpuU2eKTqRBQ==";

const NONCE: &str = "31627761595286130198";

fn bench_form(c: &mut Criterion) {
    let body = body_700();
    assert_eq!(body.len(), 700);
    let mut group = c.benchmark_group("form");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse_700b", |b| b.iter(|| form::parse(black_box(body.as_bytes())).unwrap()));
    group.finish();
}

fn bench_verify(c: &mut Criterion) {
    let params = form::parse(CALLBACK_BODY.as_bytes()).unwrap();
    let mut group = c.benchmark_group("verify");

    // Key preparation happens once per token in the service, so it is outside the loop.
    let plivo_key = plivo::PlivoKey::new(b"MAtestAuthToken0123456789abcdefXYZ");
    let plivo_url = "https://gw.example.com/plivo/answer?tenant=acme";
    let plivo_sig = plivo::sign_v3(&plivo_key, plivo::Method::Post, plivo_url, &params, NONCE).unwrap();
    group.bench_function("plivo_v3_post", |b| {
        b.iter(|| {
            assert!(plivo::verify_v3(
                black_box(&plivo_key),
                plivo::Method::Post,
                black_box(plivo_url),
                black_box(&params),
                black_box(NONCE),
                black_box(&plivo_sig),
            ))
        })
    });

    let twilio_key = twilio::TwilioKey::new(b"twTestAuthToken0123456789abcdef0");
    let twilio_url = "https://gw.example.com/twilio/voice?tenant=acme";
    let twilio_sig = twilio::sign(&twilio_key, twilio_url, &params);
    group.bench_function("twilio_form_post", |b| {
        b.iter(|| {
            assert!(twilio::verify_form(
                black_box(&twilio_key),
                black_box(twilio_url),
                black_box(&params),
                black_box(&twilio_sig),
            ))
        })
    });

    // Worst case for Vobiz: the SDK-form signature matches, so both forms are computed.
    let vobiz_key = vobiz::VobizKey::new(b"vobizTestAuthToken0123456789abcd");
    let vobiz_url = "https://gw.example.com/vobiz/answer?tenant=acme";
    let vobiz_sig = vobiz::sign_v3_sdk(&vobiz_key, plivo::Method::Post, vobiz_url, &params, NONCE).unwrap();
    group.bench_function("vobiz_v3_post", |b| {
        b.iter(|| {
            assert!(vobiz::verify_v3(
                black_box(&vobiz_key),
                plivo::Method::Post,
                black_box(vobiz_url),
                black_box(&params),
                black_box(NONCE),
                black_box(&vobiz_sig),
            ))
        })
    });

    let telnyx_key = telnyx::TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
    let now: i64 = TX1_TS.parse().unwrap();
    group.bench_function("telnyx_tx1", |b| {
        b.iter(|| {
            telnyx::verify(
                black_box(&telnyx_key),
                Some(black_box(TX1_SIG)),
                Some(black_box(TX1_TS)),
                black_box(TX1_BODY.as_bytes()),
                now,
            )
            .unwrap()
        })
    });

    // Batches of the size a loaded worker gathers (13 on average in the telnyx-event scenario);
    // reported per batch, so divide by the size for the cost per signature.
    let signer = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let batch_key = telnyx::TelnyxKey::from_bytes(signer.verifying_key().as_bytes()).unwrap();
    for n in [1usize, 4, 16, 64] {
        let pending: Vec<telnyx::Pending> = (0..n)
            .map(|i| {
                let body = TX1_BODY.replace("0ccc7b54", &format!("{i:08x}"));
                let sig = telnyx::sign(&signer, TX1_TS, body.as_bytes());
                telnyx::prepare(&batch_key, Some(&sig), Some(TX1_TS), body.as_bytes(), now).unwrap()
            })
            .collect();
        group.bench_function(format!("telnyx_batch_{n}"), |b| {
            b.iter(|| assert!(telnyx::check_all(black_box(&pending)).iter().all(|ok| *ok)))
        });
    }

    group.finish();
}

criterion_group!(benches, bench_form, bench_verify);
criterion_main!(benches);
