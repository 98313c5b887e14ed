//! Telnyx Ed25519 webhooks: the public-key parser, `verify` with arbitrary headers, body and
//! clock, and the JSON handling the pipeline does before and after verification
//! (`telnyx::locate` to find the number in a real `SledStore` on tmpfs, `Telnyx::parse` to normalise the event).
//!
//! Input (newline-separated, last field takes the rest):
//!   public_key_base64 \n signature_header \n timestamp_header \n now \n body
//! An empty header field means the header is absent; an unusable key falls back to TX-1's.
//!
//! Oracles: `verify` equals a reference built from `ed25519-dalek` and `base64` directly
//! (Missing / Malformed / Stale / Invalid / Ok, in that order); what TX-1's key signs verifies at
//! the signed time, is stale 301 s later and invalid with another body; the hook's verdict is
//! `verify`'s; in a batch beside a good signature (`check_all`) the verdict is `verify`'s;
//! `locate` only rejects unsigned or non-JSON requests.
#![no_main]

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use callgate::carriers::params::nests_too_deep;
use callgate::carriers::telnyx::signature::{self as telnyx, TelnyxError, TelnyxKey, TOLERANCE_SECS};
use callgate::carriers::telnyx::legs::Legs;
use callgate::carriers::telnyx::{locate, other_party, Telnyx};
use callgate::carriers::{CarrierHooks, Hook, Inbound, Prepared, Reject, VerifyContext};
use callgate::domain::{Carrier, Secret};
use callgate_fuzz::{fields, header_map, phone, telnyx_store, text, TELNYX_NUMBER};
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;

const TX1_SEED: [u8; 32] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30,
    31,
];
const TX1_PUBLIC: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
const DEFAULT_NOW: i64 = 1_714_557_600;

fn reference(
    key: &VerifyingKey,
    sig: Option<&str>,
    ts: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), TelnyxError> {
    let (Some(sig), Some(ts)) = (sig.filter(|s| !s.is_empty()), ts.filter(|t| !t.is_empty())) else {
        return Err(TelnyxError::Missing);
    };
    if !ts.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TelnyxError::Malformed);
    }
    let t: i64 = ts.parse().map_err(|_| TelnyxError::Malformed)?;
    let raw = STANDARD.decode(sig).map_err(|_| TelnyxError::Malformed)?;
    let raw: [u8; 64] = raw.try_into().map_err(|_| TelnyxError::Malformed)?;
    if now.abs_diff(t) > TOLERANCE_SECS {
        return Err(TelnyxError::Stale);
    }
    let mut msg = ts.as_bytes().to_vec();
    msg.push(b'|');
    msg.extend_from_slice(body);
    key.verify_strict(&msg, &Signature::from_bytes(&raw)).map_err(|_| TelnyxError::Invalid)
}

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 5);
    let pk_text = text(f[0]);
    let sig = text(f[1]);
    let ts = text(f[2]);
    let now = text(f[3]).trim().parse::<i64>().unwrap_or(DEFAULT_NOW);
    let body = f[4];

    // ---- The public key parser, against base64 + ed25519-dalek directly.
    let parsed_key = TelnyxKey::from_base64(&pk_text);
    let direct = STANDARD
        .decode(pk_text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        // A key of small order is refused: batch verification must never see one.
        .filter(|v| !v.is_weak());
    assert_eq!(parsed_key.is_ok(), direct.is_some(), "TelnyxKey::from_base64 disagrees with base64+dalek");
    if let Ok(k) = &parsed_key {
        assert_eq!(k.to_base64(), pk_text.trim());
        assert_eq!(TelnyxKey::from_base64(&k.to_base64()).as_ref(), Ok(k));
    }
    let (key, vk) = match (parsed_key, direct) {
        (Ok(k), Some(v)) => (k, v),
        _ => {
            let k = TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
            let v = VerifyingKey::from_bytes(&STANDARD.decode(TX1_PUBLIC).unwrap().try_into().unwrap()).unwrap();
            (k, v)
        }
    };

    // ---- verify with the fuzzer's headers and clock.
    let opt = |s: &str| Some(s.to_owned()).filter(|s| !s.is_empty());
    let (sig_h, ts_h) = (opt(&sig), opt(&ts));
    let got = telnyx::verify(&key, sig_h.as_deref(), ts_h.as_deref(), body, now);
    assert_eq!(got, reference(&vk, sig_h.as_deref(), ts_h.as_deref(), body, now));
    // Present-but-empty is the same as absent.
    assert_eq!(telnyx::verify(&key, Some(""), ts_h.as_deref(), body, now), Err(TelnyxError::Missing));
    // Checked in a batch beside a good signature, the verdict is the one given alone, and the
    // good one stays good.
    if let Ok(pending) = telnyx::prepare(&key, sig_h.as_deref(), ts_h.as_deref(), body, now) {
        let sk = SigningKey::from_bytes(&TX1_SEED);
        let tx1 = TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
        let good_body = b"{}";
        let good_sig = telnyx::sign(&sk, "1714557600", good_body);
        let good = telnyx::prepare(&tx1, Some(&good_sig), Some("1714557600"), good_body, DEFAULT_NOW).unwrap();
        assert_eq!(telnyx::check_all(&[pending, good]), vec![got.is_ok(), true]);
    }

    // ---- Round trip with TX-1's signing key at the fuzzer's timestamp.
    if let Some(t) = ts_h.as_deref().filter(|t| t.bytes().all(|b| b.is_ascii_digit())) {
        if let Ok(at) = t.parse::<i64>() {
            let sk = SigningKey::from_bytes(&TX1_SEED);
            let tx1 = TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
            let s = telnyx::sign(&sk, t, body);
            assert_eq!(telnyx::verify(&tx1, Some(&s), Some(t), body, at), Ok(()));
            if let Some(later) = at.checked_add(TOLERANCE_SECS as i64 + 1) {
                assert_eq!(telnyx::verify(&tx1, Some(&s), Some(t), body, later), Err(TelnyxError::Stale));
            }
            let mut other = body.to_vec();
            other.push(b' ');
            assert_eq!(telnyx::verify(&tx1, Some(&s), Some(t), &other, at), Err(TelnyxError::Invalid));
        }
    }

    // ---- As the pipeline does it: locate, verify through the hook, parse.
    let mut pairs: Vec<(&str, &[u8])> = vec![("content-type", b"application/json".as_slice())];
    if !f[1].is_empty() {
        pairs.push(("telnyx-signature-ed25519", f[1]));
    }
    if !f[2].is_empty() {
        pairs.push(("telnyx-timestamp", f[2]));
    }
    let headers = header_map(pairs);
    let url = "https://gw.example.com/webhooks/telnyx/voice";
    let mut inbound = Inbound {
        method: "POST",
        headers: &headers,
        url,
        query: "",
        body,
        form: Vec::new(),
        is_form: false,
        envelope: None,
        client_ip: [203, 0, 113, 9].into(),
        now_secs: now,
    };
    let sig_seen = inbound.header("telnyx-signature-ed25519").map(str::to_owned);
    let ts_seen = inbound.header("telnyx-timestamp").map(str::to_owned);
    let (sig_seen, ts_seen) = (sig_seen.as_deref(), ts_seen.as_deref());
    // The checks that need no key come before the lookup, whatever the body.
    let headers_pass = telnyx::check_headers(sig_seen, ts_seen, now);
    // What the gateway reads as an event: JSON it could read back as a tree once stored.
    let json = serde_json::from_slice::<serde_json::Value>(body).ok().filter(|_| !nests_too_deep(body));

    match (locate(&mut inbound, telnyx_store(), &Legs::default()), headers_pass) {
        (Err(Reject::MissingSignature), Err(TelnyxError::Missing))
        | (Err(Reject::StaleTimestamp), Err(TelnyxError::Stale))
        | (Err(Reject::InvalidSignature), Err(TelnyxError::Malformed)) => {}
        (Err(Reject::MalformedBody), Ok(())) => assert!(json.is_none()),
        (Err(other), h) => panic!("locate rejected with {other:?}, the headers' checks said {h:?}"),
        (Ok(found), h) => {
            assert!(h.is_ok() && json.is_some(), "located with headers {h:?}");
            if let Some(p) = found.expect("store lookup") {
                assert_eq!(p.number.as_str(), TELNYX_NUMBER);
                // The store holds one number: there is never another party to try.
                assert!(other_party(&inbound, telnyx_store(), &p).expect("store lookup").is_none());
            }
        }
    }

    let ctx = VerifyContext { exotel_allowed: &[] };
    let record = phone(Carrier::Telnyx, TELNYX_NUMBER);
    let verdict = Telnyx::verify(
        &inbound,
        &Prepared::Telnyx { key: key.clone(), api_key: Secret::new(String::new()) },
        &record,
        &ctx,
    );
    let expected = telnyx::verify(&key, sig_seen, ts_seen, body, now);
    match (&verdict, expected) {
        (Ok(scheme), Ok(())) => assert_eq!(*scheme, "telnyx-ed25519"),
        (Err(Reject::MissingSignature), Err(TelnyxError::Missing))
        | (Err(Reject::StaleTimestamp), Err(TelnyxError::Stale))
        | (Err(Reject::InvalidSignature), Err(TelnyxError::Malformed | TelnyxError::Invalid)) => {}
        (v, e) => panic!("hook verdict {v:?} for verify result {e:?}"),
    }

    let parsed = Telnyx::parse(&mut inbound, Hook::Events);
    let stored: serde_json::Value = serde_json::from_str(parsed.params.get()).expect("stored params are JSON");
    let Some(json) = json else {
        assert_eq!(stored, serde_json::Value::String(String::from_utf8_lossy(body).into_owned()));
        return;
    };
    assert_eq!(stored, json);
    let data = &json["data"];
    if let Some(id) = data["id"].as_str() {
        assert_eq!(parsed.replay_id.as_deref(), Some(format!("event:{id}").as_str()));
    } else {
        assert!(parsed.replay_id.is_none());
    }
    if data["event_type"].as_str() == Some("call.initiated") && data["payload"]["direction"] == "incoming" {
        assert_eq!(parsed.kind, "call.incoming");
    }
});
