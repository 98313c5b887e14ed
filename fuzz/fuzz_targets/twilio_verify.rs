//! Twilio `X-Twilio-Signature`: form POSTs, GETs, raw (JSON) bodies with `bodySHA256`, the
//! port-variant URL handling, and the carrier hook the pipeline calls.
//!
//! Input (newline-separated, last field takes the rest):
//!   flags \n auth_token \n url \n signature_header \n body
//! flags (first byte): bits 0-1 pick the HTTP method (POST, GET, PUT, POST), bit 2 set means
//! the body is *not* form-encoded, bit 3 adds an `X-Twilio-Webhooks-Signature-Settings` header.
//!
//! Oracles: the streamed MAC equals HMAC-SHA1 over `signed_string`; what we sign verifies
//! (form, GET, and body-hash URLs built by `url_with_body_hash`); a changed body does not;
//! the hook's verdict is the signature function's verdict.
#![no_main]

use std::borrow::Cow;

use callgate::carriers::twilio::signature::{self as twilio, TwilioKey, BODY_HASH_PARAM};
use callgate::carriers::twilio::Twilio;
use callgate::carriers::{CarrierHooks, Hook, Inbound, Prepared, VerifyContext};
use callgate::domain::Carrier;
use callgate::net::form;
use callgate_fuzz::{fields, header_map, hmac_sha1_b64, phone, text};
use libfuzzer_sys::fuzz_target;
use sha2::Digest;

fn params_of(body: &[u8]) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    match form::parse(body) {
        Ok(p) => p,
        Err(_) => text(body)
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (Cow::Owned(k.to_owned()), Cow::Owned(v.to_owned()))
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 5);
    let flags = f[0].first().copied().unwrap_or(0);
    let token = f[1];
    let url = text(f[2]);
    let header = text(f[3]);
    let body = f[4];
    let http_method = ["POST", "GET", "PUT", "POST"][usize::from(flags & 3)];
    let is_form = http_method == "POST" && flags & 4 == 0;
    let params = params_of(body);
    let key = TwilioKey::new(token);

    // ---- Form POST.
    let sig = twilio::sign(&key, &url, &params);
    assert_eq!(sig, hmac_sha1_b64(token, twilio::signed_string(&url, &params).as_bytes()));
    assert!(twilio::verify_form(&key, &url, &params, &sig));
    // Order of the parameters does not matter, nor do exact duplicates.
    let mut shuffled = params.clone();
    shuffled.reverse();
    if let Some(first) = params.first() {
        shuffled.push(first.clone());
    }
    assert!(twilio::verify_form(&key, &url, &shuffled, &sig));
    if twilio::verify_form(&key, &url, &params, &header) {
        assert_eq!(header.len(), 28);
    }

    // ---- GET: the URL alone.
    let get_sig = twilio::sign_url(&key, &url);
    assert_eq!(get_sig, hmac_sha1_b64(token, url.as_bytes()));
    assert!(twilio::verify_get(&key, &url, &get_sig));
    let _ = twilio::verify_get(&key, &url, &header);

    // ---- Raw body: `bodySHA256` in the URL, then the URL's signature.
    assert_eq!(twilio::body_sha256_hex(body), hex_sha256(body));
    let hashed_url = twilio::url_with_body_hash(&url, body);
    let hashed_sig = twilio::sign_url(&key, &hashed_url);
    // The appended hash is the one read back unless the URL has a fragment (everything after
    // `#` is dropped), an earlier `bodySHA256`, or an undecodable pair before it.
    let (_, query) = form::split_url(&url);
    let readable = !url.contains('#')
        && form::pairs(query.unwrap_or("").as_bytes()).all(|p| p.is_ok_and(|(k, _)| k != BODY_HASH_PARAM));
    let raw_ok = twilio::verify_raw_body(&key, &hashed_url, body, &hashed_sig);
    if readable {
        assert!(raw_ok, "own bodySHA256 URL refused");
    }
    let mut other = body.to_vec();
    other.push(b'x');
    assert!(!twilio::verify_raw_body(&key, &hashed_url, &other, &hashed_sig), "changed body accepted");
    let _ = twilio::verify_raw_body(&key, &url, body, &header);

    // ---- The carrier hook.
    let form_pairs = if is_form {
        match form::parse(body) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        Vec::new()
    };
    let query = query.unwrap_or("");
    let record = phone(Carrier::Twilio, "+14155550199");
    let prepared = Prepared::Twilio(key.clone());
    let ctx = VerifyContext { exotel_allowed: &[] };
    let run = |sig_value: &[u8]| {
        let mut pairs: Vec<(&str, &[u8])> = vec![("x-twilio-signature", sig_value)];
        if flags & 8 != 0 {
            pairs.push(("x-twilio-webhooks-signature-settings", b"v1".as_slice()));
        }
        let headers = header_map(pairs);
        let mut inbound = Inbound {
            method: http_method,
            headers: &headers,
            url: &url,
            query,
            body,
            form: form_pairs.clone(),
            is_form,
            envelope: None,
            client_ip: [203, 0, 113, 9].into(),
            now_secs: 1_714_557_600,
        };
        let verdict = Twilio::verify(&inbound, &prepared, &record, &ctx);
        for hook in [Hook::Incoming, Hook::Status] {
            let parsed = Twilio::parse(&mut inbound, hook);
            assert!(parsed.replay_id.is_none());
        }
        (verdict, inbound.header("x-twilio-signature").map(str::to_owned))
    };
    // What the hook must decide for a given header value.
    let expected = |h: &str| -> bool {
        if h.is_empty() {
            return false;
        }
        match http_method {
            "GET" => twilio::verify_get(&key, &url, h),
            "POST" if is_form => twilio::verify_form(&key, &url, &form_pairs, h),
            "POST" if body.is_empty() => twilio::verify_get(&key, &url, h),
            "POST" => twilio::verify_raw_body(&key, &url, body, h),
            _ => false,
        }
    };

    let (verdict, seen) = run(f[3]);
    assert_eq!(verdict.is_ok(), seen.as_deref().is_some_and(expected), "hook disagrees with the signature functions");

    let good = match http_method {
        "POST" if is_form => twilio::sign(&key, &url, &form_pairs),
        _ => twilio::sign_url(&key, &url),
    };
    let (verdict, seen) = run(good.as_bytes());
    assert_eq!(verdict.is_ok(), expected(seen.as_deref().unwrap()));
    if http_method == "GET" || (http_method == "POST" && (is_form || body.is_empty())) {
        assert!(verdict.is_ok(), "hook refused its own signature: {verdict:?}");
    }
});

fn hex_sha256(b: &[u8]) -> String {
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}
