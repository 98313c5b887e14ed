//! Plivo V3/V2 and Vobiz V3/V2 signatures, directly and through the carrier hooks the
//! webhook pipeline calls.
//!
//! Input (newline-separated, last field takes the rest):
//!   flags \n auth_token \n url \n nonce \n signature_header \n body
//! flags (first byte of the first line): bits 0-1 pick the HTTP method (POST, GET, PUT, POST),
//! bit 2 set means the body is *not* form-encoded, bit 3 makes the hooks see the header on the
//! main-account (`-MA-V3`) name instead.
//!
//! Oracles: the streamed MAC equals HMAC over `v3_signed_string`; a signature we produce is
//! accepted (also inside a comma list); a fuzzer-supplied header is accepted only if it lists
//! exactly that signature; the hooks accept what the signature functions accept.
#![no_main]

use std::borrow::Cow;

use callgate::carriers::plivo::signature::{self as plivo, Method, PlivoKey};
use callgate::carriers::plivo::Plivo;
use callgate::carriers::vobiz::signature::{self as vobiz, VobizKey};
use callgate::carriers::vobiz::Vobiz;
use callgate::carriers::{CarrierHooks, Hook, Inbound, Prepared, VerifyContext};
use callgate::domain::Carrier;
use callgate::net::form;
use callgate_fuzz::{fields, header_lists, header_map, hmac_sha256_b64, phone, text};
use libfuzzer_sys::fuzz_target;

fn params_of(body: &[u8]) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    match form::parse(body) {
        Ok(p) => p,
        // Undecodable bodies still give the signature code arbitrary strings to sort and hash.
        Err(_) => text(body)
            .split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (Cow::Owned(k.to_owned()), Cow::Owned(v.to_owned()))
            })
            .collect(),
    }
}

struct Names {
    sig: &'static str,
    ma: &'static str,
    nonce: &'static str,
}

const PLIVO: Names =
    Names { sig: "x-plivo-signature-v3", ma: "x-plivo-signature-ma-v3", nonce: "x-plivo-signature-v3-nonce" };
const VOBIZ: Names =
    Names { sig: "x-vobiz-signature-v3", ma: "x-vobiz-signature-ma-v3", nonce: "x-vobiz-signature-v3-nonce" };

fuzz_target!(|data: &[u8]| {
    let f = fields(data, 6);
    let flags = f[0].first().copied().unwrap_or(0);
    let token = f[1];
    let url = text(f[2]);
    let nonce = text(f[3]);
    let header = text(f[4]);
    let body = f[5];
    let http_method = ["POST", "GET", "PUT", "POST"][usize::from(flags & 3)];
    let method = if http_method == "GET" { Method::Get } else { Method::Post };
    let is_form = http_method == "POST" && flags & 4 == 0;
    let params = params_of(body);

    // ---- Plivo V3, the functions themselves.
    let key = PlivoKey::new(token);
    let signed = plivo::v3_signed_string(method, &url, &params, &nonce);
    let sig = plivo::sign_v3(&key, method, &url, &params, &nonce);
    let (base, query) = form::split_url(&url);
    match (&signed, &sig) {
        (Ok(signed), Ok(sig)) => {
            assert_eq!(*sig, hmac_sha256_b64(token, signed.as_bytes()), "streamed MAC differs from the string");
            assert!(signed.starts_with(base));
            assert!(signed.ends_with(&format!(".{nonce}")));
            assert!(plivo::verify_v3(&key, method, &url, &params, &nonce, sig));
            assert!(plivo::verify_v3(&key, method, &url, &params, &nonce, &format!("AAAA, {sig} ,x")));
        }
        (Err(_), Err(_)) => {
            // Only an undecodable query in the URL can fail.
            assert!(form::parse(query.expect("a failure needs a query").as_bytes()).is_err());
            assert!(!plivo::verify_v3(&key, method, &url, &params, &nonce, &header));
        }
        _ => panic!("v3_signed_string and sign_v3 disagree"),
    }
    if plivo::verify_v3(&key, method, &url, &params, &nonce, &header) {
        assert!(header_lists(&header, sig.as_ref().unwrap()), "accepted a header that does not list the signature");
    }

    // ---- Plivo V2.
    let v2 = plivo::sign_v2(&key, &url, &nonce);
    assert_eq!(v2, hmac_sha256_b64(token, plivo::v2_signed_string(&url, &nonce).as_bytes()));
    assert!(plivo::verify_v2(&key, &url, &nonce, &v2));
    if plivo::verify_v2(&key, &url, &nonce, &header) {
        assert_eq!(*header, v2);
    }

    // ---- Vobiz: docs form, SDK (= Plivo) form, V2.
    let vkey = VobizKey::new(token);
    let docs = vobiz::sign_v3_docs(&vkey, &url, &nonce);
    assert_eq!(docs, hmac_sha256_b64(token, vobiz::v3_docs_signed_string(&url, &nonce).as_bytes()));
    // The docs form ignores the query, so it verifies even when the query cannot be decoded.
    assert!(vobiz::verify_v3(&vkey, method, &url, &params, &nonce, &docs));
    let sdk = vobiz::sign_v3_sdk(&vkey, method, &url, &params, &nonce);
    assert_eq!(sdk.as_ref().ok(), sig.as_ref().ok(), "Vobiz SDK form drifted from Plivo V3");
    assert_eq!(vobiz::v3_sdk_signed_string(method, &url, &params, &nonce).ok(), signed.as_ref().ok().cloned());
    if let Ok(sdk) = &sdk {
        assert!(vobiz::verify_v3(&vkey, method, &url, &params, &nonce, sdk));
    }
    if vobiz::verify_v3(&vkey, method, &url, &params, &nonce, &header) {
        assert!(header_lists(&header, &docs) || sdk.as_ref().is_ok_and(|s| header_lists(&header, s)));
    }
    let vv2 = vobiz::sign_v2(&vkey, &url, &nonce);
    assert_eq!(vv2, v2);
    assert!(vobiz::verify_v2(&vkey, &url, &nonce, &format!("x,{vv2}")));
    if vobiz::verify_v2(&vkey, &url, &nonce, &header) {
        assert!(header_lists(&header, &vv2));
    }

    // ---- Through the carrier hooks, as the pipeline calls them.
    // The pipeline answers 400 to an undecodable form body before any hook runs.
    let form_pairs = if is_form {
        match form::parse(body) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        Vec::new()
    };
    let query = query.unwrap_or("");
    let ctx = VerifyContext { exotel_allowed: &[] };
    for (carrier, names) in [(Carrier::Plivo, &PLIVO), (Carrier::Vobiz, &VOBIZ)] {
        let record = phone(carrier, "+14155550199");
        let prepared = match carrier {
            Carrier::Plivo => Prepared::Plivo(key.clone()),
            _ => Prepared::Vobiz(vkey.clone()),
        };
        let sig_name = if flags & 8 == 0 { names.sig } else { names.ma };
        let run = |header_value: &[u8]| {
            let headers = header_map([(sig_name, header_value), (names.nonce, f[3])]);
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
            let verdict = match carrier {
                Carrier::Plivo => Plivo::verify(&inbound, &prepared, &record, &ctx),
                _ => Vobiz::verify(&inbound, &prepared, &record, &ctx),
            };
            for hook in [Hook::Incoming, Hook::Status] {
                let parsed = match carrier {
                    Carrier::Plivo => Plivo::parse(&mut inbound, hook),
                    _ => Vobiz::parse(&mut inbound, hook),
                };
                // A form carrier keeps its fields as received (`params` null, `form` the text);
                // their JSON is made when the event is read out, and must be what the form held.
                let json = match &parsed.form {
                    Some(text) => {
                        assert_eq!(parsed.params.get(), "null");
                        let j = callgate::carriers::params::received_json(text);
                        let made = callgate::carriers::params::form_params(&inbound, &[]);
                        assert_eq!(j.get(), made.get(), "received_json differs from form_params");
                        j
                    }
                    None => parsed.params,
                };
                assert!(serde_json::from_str::<serde_json::Value>(json.get()).is_ok_and(|v| v.is_object()));
                if let Some(id) = &parsed.replay_id {
                    assert!(id.starts_with("nonce:"));
                }
            }
            (verdict, inbound.header(names.nonce).map(str::to_owned), inbound.header(sig_name).map(str::to_owned))
        };

        // The fuzzer's header: accepted only if the signature function accepts it.
        let (verdict, seen_nonce, seen_sig) = run(f[4]);
        if verdict.is_ok() {
            let (n, h) = (seen_nonce.clone().unwrap(), seen_sig.unwrap());
            let m = Method::from_http(http_method).unwrap();
            let ok = match carrier {
                Carrier::Plivo => plivo::verify_v3(&key, m, &url, &form_pairs, &n, &h),
                _ => vobiz::verify_v3(&vkey, m, &url, &form_pairs, &n, &h),
            };
            assert!(ok, "hook accepted what the signature function refuses");
        }

        // The right signature for what the hook will hash: accepted whenever the request is
        // well-formed (nonce present, GET or POST, no non-form POST body).
        let Some(nonce_seen) = seen_nonce.filter(|n| !n.is_empty()) else { continue };
        let Some(m) = Method::from_http(http_method) else {
            assert!(verdict.is_err(), "{carrier} hook accepted a {http_method}");
            continue;
        };
        let good = match carrier {
            Carrier::Plivo => plivo::sign_v3(&key, m, &url, &form_pairs, &nonce_seen).ok(),
            _ => Some(vobiz::sign_v3_docs(&vkey, &url, &nonce_seen)),
        };
        let Some(good) = good else { continue };
        let (verdict, _, _) = run(good.as_bytes());
        // A nonce that is not text reads as U+FFFD, which the hooks refuse before any check.
        let expect_ok = !(m == Method::Post && !is_form && !body.is_empty()) && nonce_seen != "\u{fffd}";
        assert_eq!(verdict.is_ok(), expect_ok, "{carrier} hook verdict {verdict:?} for its own signature");
    }
});
