//! Telnyx webhook signatures (protocols.md §4.1): Ed25519 over
//! `telnyx-timestamp` + `|` + raw body, with a ±300 s freshness window.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Maximum distance between the signed timestamp and our clock, in either direction.
pub const TOLERANCE_SECS: u64 = 300;

const SIGNATURE_LEN: usize = 64;
const PUBLIC_KEY_LEN: usize = 32;

/// Why a Telnyx webhook was rejected. Deliberately carries no header or key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TelnyxError {
    #[error("Telnyx signature or timestamp header missing")]
    Missing,
    #[error("Telnyx signature or timestamp header malformed")]
    Malformed,
    #[error("Telnyx webhook timestamp outside the tolerance window")]
    Stale,
    #[error("Telnyx webhook signature invalid")]
    Invalid,
}

/// The configured account public key was not base64 of a valid 32-byte Ed25519 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid Telnyx public key")]
pub struct InvalidPublicKey;

/// An account's webhook public key, decoded and decompressed once at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelnyxKey(VerifyingKey);

impl TelnyxKey {
    /// Parses the Mission Control value: standard base64 of the raw 32-byte key.
    pub fn from_base64(encoded: &str) -> Result<Self, InvalidPublicKey> {
        let bytes = decode_exact::<PUBLIC_KEY_LEN>(encoded.trim()).ok_or(InvalidPublicKey)?;
        Self::from_bytes(&bytes)
    }

    /// A key of small order is refused: no real account has one, `verify_strict` would refuse
    /// everything signed with it, and batch verification must never see one.
    pub fn from_bytes(bytes: &[u8; PUBLIC_KEY_LEN]) -> Result<Self, InvalidPublicKey> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| InvalidPublicKey)?;
        if key.is_weak() {
            return Err(InvalidPublicKey);
        }
        Ok(Self(key))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }
}

/// Decodes standard base64 into exactly `N` bytes. The scratch buffer has room for a
/// couple of extra bytes so an over-long input is reported as wrong-length, not as a
/// short buffer, and nothing is allocated for attacker-sized input.
fn decode_exact<const N: usize>(encoded: &str) -> Option<[u8; N]> {
    if encoded.len() != N.div_ceil(3) * 4 {
        return None;
    }
    let mut buf = [0u8; 66];
    let len = STANDARD.decode_slice(encoded, &mut buf).ok()?;
    if len != N {
        return None;
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&buf[..N]);
    Some(out)
}

/// The signed message: timestamp header text, `|`, raw body bytes.
pub fn signed_message(timestamp: &str, body: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(timestamp.len() + 1 + body.len());
    message.extend_from_slice(timestamp.as_bytes());
    message.push(b'|');
    message.extend_from_slice(body);
    message
}

/// Base64 signature as Telnyx would send it; for test fixtures and the signing tool.
pub fn sign(signing_key: &SigningKey, timestamp: &str, body: &[u8]) -> String {
    let signature = signing_key.sign(&signed_message(timestamp, body));
    STANDARD.encode(signature.to_bytes())
}

/// Verifies a webhook from the `telnyx-signature-ed25519` and `telnyx-timestamp` header
/// values (`None` when absent) against the raw body, with `now` in Unix seconds.
pub fn verify(
    key: &TelnyxKey,
    signature_header: Option<&str>,
    timestamp_header: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), TelnyxError> {
    if prepare(key, signature_header, timestamp_header, body, now)?.check() {
        Ok(())
    } else {
        Err(TelnyxError::Invalid)
    }
}

/// A webhook whose headers and freshness passed, with the curve arithmetic still to do: alone
/// (`check`) or with others (`check_all`).
pub struct Pending {
    key: VerifyingKey,
    message: Vec<u8>,
    signature: Signature,
}

impl Pending {
    pub fn check(&self) -> bool {
        self.key.verify_strict(&self.message, &self.signature).is_ok()
    }
}

/// Everything `verify` checks before the curve arithmetic.
pub fn prepare(
    key: &TelnyxKey,
    signature_header: Option<&str>,
    timestamp_header: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<Pending, TelnyxError> {
    let (signature, timestamp) = read_headers(signature_header, timestamp_header, now)?;
    Ok(Pending { key: key.0, message: signed_message(timestamp, body), signature })
}

/// The checks that need no key: both headers present, the timestamp digits within the
/// window, the signature base64 of 64 bytes. They run before the event's number is looked up,
/// so that what a request without a valid signature is told never depends on that number.
pub fn check_headers(
    signature_header: Option<&str>,
    timestamp_header: Option<&str>,
    now: i64,
) -> Result<(), TelnyxError> {
    read_headers(signature_header, timestamp_header, now).map(drop)
}

fn read_headers<'a>(
    signature_header: Option<&str>,
    timestamp_header: Option<&'a str>,
    now: i64,
) -> Result<(Signature, &'a str), TelnyxError> {
    let (signature, timestamp) = match (signature_header, timestamp_header) {
        (Some(s), Some(t)) if !s.is_empty() && !t.is_empty() => (s, t),
        _ => return Err(TelnyxError::Missing),
    };
    // Digits only: the header text is what was signed, so a lenient parse (sign, spaces)
    // would accept a message Telnyx never produced.
    if !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TelnyxError::Malformed);
    }
    let ts: i64 = timestamp.parse().map_err(|_| TelnyxError::Malformed)?;
    let signature = decode_exact::<SIGNATURE_LEN>(signature).ok_or(TelnyxError::Malformed)?;
    // The window check is cheap, so it runs before the curve arithmetic.
    if now.abs_diff(ts) > TOLERANCE_SECS {
        return Err(TelnyxError::Stale);
    }
    Ok((Signature::from_bytes(&signature), timestamp))
}

/// Most signatures one batch check takes: past this the cost per signature hardly falls, and
/// every request in the batch waits for all of it.
pub const BATCH_MAX: usize = 64;

/// Whether each of `pending` verifies. Two or more are checked together by random linear
/// combination (`ed25519_dalek::verify_batch`), about half the cost per signature from eight
/// up; if that fails, each is checked alone, so one bad signature refuses only itself.
///
/// A batch can accept what `verify_strict` refuses only for a key of small order, which anyone
/// can sign for, or for signatures made by whoever made the key (an R with a small-order
/// component or not canonically encoded, or a key built with a small-order component). Keys of
/// small order are refused when configured; anyone else's forgery needs the private key either
/// way.
pub fn check_all(pending: &[Pending]) -> Vec<bool> {
    let mut out = Vec::with_capacity(pending.len());
    for chunk in pending.chunks(BATCH_MAX) {
        if chunk.len() > 1 {
            let messages: Vec<&[u8]> = chunk.iter().map(|p| p.message.as_slice()).collect();
            let signatures: Vec<Signature> = chunk.iter().map(|p| p.signature).collect();
            let keys: Vec<VerifyingKey> = chunk.iter().map(|p| p.key).collect();
            if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
                out.extend(std::iter::repeat_n(true, chunk.len()));
                continue;
            }
        }
        out.extend(chunk.iter().map(Pending::check));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::{Digest, Sha256};

    const TX1_SEED: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const TX1_PUBLIC: &str = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
    const TX1_TS: &str = "1714557600";
    const TX1_BODY: &str = r#"{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0","occurred_at":"2024-05-01T10:00:00.000000Z","payload":{"call_control_id":"v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg","call_leg_id":"428c31b6-7af4-4bcb-b7f5-5013ef9657c1","call_session_id":"428c31b6-abf3-3bc1-b7f4-5013ef9657c1","client_state":null,"connection_id":"1494404757140276705","direction":"incoming","from":"+13125550100","to":"+13125550199","start_time":"2024-05-01T10:00:00.000000Z","state":"parked"},"record_type":"event"},"meta":{"attempt":1,"delivered_to":"https://gw.example.com/telnyx/events"}}"#;
    const TX1_SIG: &str = "Qq/nrl6jQecOZ8fuNKTl4k9YDy81JVUfhCA/zVxWGLOBMueBqueqfKfGmcmabEfK8i+3Lp/ALYUpuU2eKTqRBQ==";

    const TX2_SEED: &str = "de89ad2182ffb780f3fd0b4f522e6c24ddb725072d3c83317acf86f61dc6b61f";
    const TX2_PUBLIC: &str = "A6kHo0DNOHN7mYm1+vpmVsy0x9t9cv0VZMxxtYyjs/w=";
    const TX2_TS: &str = "1714557900";
    const TX2_BODY: &str = r#"{"data":{"event_type":"call.hangup","id":"7de74477-79e4-4af7-aa75-a05b4e78ee6f","occurred_at":"2024-05-01T10:05:00.000000Z","payload":{"call_control_id":"v3:abc","connection_id":"1494404757140276705","from":"+13125550100","to":"+13125550199","hangup_cause":"normal_clearing","hangup_source":"caller"},"record_type":"event"}}"#;
    const TX2_SIG: &str = "uhwlyflS3KpDYVtJjj4TGTPK4ukamMWKy8cxngMtBTmtckEeAz5dWDMAKCYoYB8tNBGLIs6qmE5tK6+IGlKfBw==";

    fn signing_key(seed_hex: &str) -> SigningKey {
        let seed: [u8; 32] = hex::decode(seed_hex).unwrap().try_into().unwrap();
        SigningKey::from_bytes(&seed)
    }

    fn check_vector(seed: &str, public: &str, ts: &str, body: &str, sig: &str) {
        let sk = signing_key(seed);
        let key = TelnyxKey::from_base64(public).unwrap();
        assert_eq!(STANDARD.encode(sk.verifying_key().as_bytes()), public);
        assert_eq!(key.to_base64(), public);
        assert_eq!(sign(&sk, ts, body.as_bytes()), sig);

        let now: i64 = ts.parse().unwrap();
        let check = |now: i64| verify(&key, Some(sig), Some(ts), body.as_bytes(), now);
        assert_eq!(check(now), Ok(()));
        assert_eq!(check(now + 10), Ok(()));
        assert_eq!(check(now + 300), Ok(()));
        assert_eq!(check(now - 300), Ok(()));
        assert_eq!(check(now + 301), Err(TelnyxError::Stale));
        assert_eq!(check(now - 301), Err(TelnyxError::Stale));

        let mut tampered = body.as_bytes().to_vec();
        tampered[body.len() / 2] ^= 1;
        assert_eq!(verify(&key, Some(sig), Some(ts), &tampered, now), Err(TelnyxError::Invalid));
        let mut longer = body.as_bytes().to_vec();
        longer.push(b'\n');
        assert_eq!(verify(&key, Some(sig), Some(ts), &longer, now), Err(TelnyxError::Invalid));
        // A different (still fresh) timestamp changes the signed message.
        let other_ts = (now + 1).to_string();
        assert_eq!(verify(&key, Some(sig), Some(&other_ts), body.as_bytes(), now), Err(TelnyxError::Invalid));
        let other_key =
            TelnyxKey::from_base64(&STANDARD.encode(signing_key(&"11".repeat(32)).verifying_key().as_bytes())).unwrap();
        assert_eq!(verify(&other_key, Some(sig), Some(ts), body.as_bytes(), now), Err(TelnyxError::Invalid));
    }

    #[test]
    fn tx1() {
        assert_eq!(TX1_BODY.len(), 608);
        assert_eq!(
            hex::encode(Sha256::digest(TX1_BODY)),
            "f9ea0276534ac2667f7a6821065a5edb688c997cf1588b300e9c3cf7e40b5ed4"
        );
        check_vector(TX1_SEED, TX1_PUBLIC, TX1_TS, TX1_BODY, TX1_SIG);
    }

    #[test]
    fn tx2() {
        assert_eq!(hex::encode(Sha256::digest("telnyx-test-vector-2")), TX2_SEED);
        assert_eq!(TX2_BODY.len(), 324);
        assert_eq!(
            hex::encode(Sha256::digest(TX2_BODY)),
            "ec6d880ac9bbb58299ad551eb3372ed0e03932d88a7083a802043c4abc236949"
        );
        check_vector(TX2_SEED, TX2_PUBLIC, TX2_TS, TX2_BODY, TX2_SIG);
    }

    #[test]
    fn signed_message_layout() {
        assert_eq!(signed_message("1714557600", b"{}"), b"1714557600|{}");
    }

    #[test]
    fn missing_and_malformed_headers() {
        let key = TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
        let body = TX1_BODY.as_bytes();
        let now = 1_714_557_600;
        let v = |sig: Option<&str>, ts: Option<&str>| verify(&key, sig, ts, body, now);
        assert_eq!(v(None, Some(TX1_TS)), Err(TelnyxError::Missing));
        assert_eq!(v(Some(TX1_SIG), None), Err(TelnyxError::Missing));
        assert_eq!(v(Some(""), Some(TX1_TS)), Err(TelnyxError::Missing));
        assert_eq!(v(Some(TX1_SIG), Some("")), Err(TelnyxError::Missing));
        for ts in ["abc", "-1714557600", "+1714557600", " 1714557600", "1714557600.0", "99999999999999999999"] {
            assert_eq!(v(Some(TX1_SIG), Some(ts)), Err(TelnyxError::Malformed), "{ts}");
        }
        let unpadded = TX1_SIG.trim_end_matches('=');
        let short = &TX1_SIG[4..];
        let long = format!("AAAA{TX1_SIG}");
        let not_b64 = TX1_SIG.replace('/', "_");
        for sig in [unpadded, short, long.as_str(), not_b64.as_str(), "!", "QQ=="] {
            assert_eq!(v(Some(sig), Some(TX1_TS)), Err(TelnyxError::Malformed), "{sig}");
        }
        // Malformed wins over stale: a garbage header is reported as such.
        assert_eq!(verify(&key, Some("!"), Some(TX1_TS), body, 0), Err(TelnyxError::Malformed));
        // Far-away clocks do not overflow.
        assert_eq!(v(Some(TX1_SIG), Some("9223372036854775807")), Err(TelnyxError::Stale));
        assert_eq!(verify(&key, Some(TX1_SIG), Some(TX1_TS), body, i64::MIN), Err(TelnyxError::Stale));
    }

    #[test]
    fn every_signature_byte_matters() {
        let key = TelnyxKey::from_base64(TX1_PUBLIC).unwrap();
        let raw = STANDARD.decode(TX1_SIG).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            let bad = STANDARD.encode(&bad);
            assert_eq!(
                verify(&key, Some(&bad), Some(TX1_TS), TX1_BODY.as_bytes(), 1_714_557_600),
                Err(TelnyxError::Invalid)
            );
        }
    }

    #[test]
    fn public_key_parsing() {
        assert!(TelnyxKey::from_base64(TX1_PUBLIC).is_ok());
        assert!(TelnyxKey::from_base64(&format!(" {TX1_PUBLIC}\n")).is_ok());
        assert_eq!(TelnyxKey::from_base64(""), Err(InvalidPublicKey));
        assert_eq!(TelnyxKey::from_base64(&TX1_PUBLIC[4..]), Err(InvalidPublicKey));
        assert_eq!(TelnyxKey::from_base64(TX1_SIG), Err(InvalidPublicKey));
        assert_eq!(TelnyxKey::from_base64("not base64 at all, really!!!!!!!!!!!!!!!!!!"), Err(InvalidPublicKey));
    }

    /// `n` fresh webhooks signed by `seed`'s key; those at `bad` carry another key's signature
    /// of the same message.
    fn pending(n: usize, bad: &[usize]) -> Vec<Pending> {
        let sk = signing_key(&"42".repeat(32));
        let other = signing_key(&"43".repeat(32));
        let key = TelnyxKey::from_bytes(sk.verifying_key().as_bytes()).unwrap();
        (0..n)
            .map(|i| {
                let body = format!(r#"{{"data":{{"id":"{i}","event_type":"call.answered"}}}}"#);
                let by = if bad.contains(&i) { &other } else { &sk };
                prepare(
                    &key,
                    Some(&sign(by, "1714557600", body.as_bytes())),
                    Some("1714557600"),
                    body.as_bytes(),
                    1_714_557_600,
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_batch_with_a_bad_signature_refuses_that_one_only() {
        assert_eq!(check_all(&pending(12, &[])), vec![true; 12]);
        let mut expected = vec![true; 12];
        expected[0] = false;
        expected[7] = false;
        assert_eq!(check_all(&pending(12, &[0, 7])), expected);
        assert_eq!(check_all(&pending(1, &[0])), vec![false]);
        assert_eq!(check_all(&pending(1, &[])), vec![true]);
        assert_eq!(check_all(&[]), Vec::<bool>::new());
        // Past one batch's worth, each batch is judged on its own.
        let n = BATCH_MAX + 9;
        let mut expected = vec![true; n];
        expected[BATCH_MAX + 3] = false;
        assert_eq!(check_all(&pending(n, &[BATCH_MAX + 3])), expected);
        for (p, ok) in pending(5, &[2]).iter().zip(check_all(&pending(5, &[2]))) {
            assert_eq!(p.check(), ok);
        }
    }

    #[test]
    fn a_key_of_small_order_is_refused() {
        // The identity, and a point of order 8 (the canonical encodings of two of the eight).
        let identity = {
            let mut b = [0u8; 32];
            b[0] = 1;
            b
        };
        let order_8 = hex::decode("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a").unwrap();
        assert_eq!(TelnyxKey::from_bytes(&identity), Err(InvalidPublicKey));
        assert_eq!(TelnyxKey::from_bytes(&order_8.try_into().unwrap()), Err(InvalidPublicKey));
        assert_eq!(TelnyxKey::from_base64(&STANDARD.encode(identity)), Err(InvalidPublicKey));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn sign_then_verify(
            seed in any::<[u8; 32]>(),
            ts in 0i64..4_000_000_000,
            skew in -300i64..=300,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let sk = SigningKey::from_bytes(&seed);
            let key = TelnyxKey::from_bytes(sk.verifying_key().as_bytes()).unwrap();
            let ts_text = ts.to_string();
            let sig = sign(&sk, &ts_text, &body);
            prop_assert_eq!(verify(&key, Some(&sig), Some(&ts_text), &body, ts + skew), Ok(()));
            prop_assert_eq!(
                verify(&key, Some(&sig), Some(&ts_text), &body, ts + 301 + skew.abs()),
                Err(TelnyxError::Stale)
            );
        }

        #[test]
        fn flips_fail(
            seed in any::<[u8; 32]>(),
            body in proptest::collection::vec(any::<u8>(), 1..256),
            which in 0usize..3,
            index in any::<usize>(),
            bit in 0u8..8,
        ) {
            let sk = SigningKey::from_bytes(&seed);
            let key = TelnyxKey::from_bytes(sk.verifying_key().as_bytes()).unwrap();
            let ts = "1714557600";
            let now = 1_714_557_600;
            let sig = sign(&sk, ts, &body);
            let result = match which {
                0 => {
                    let mut bad = body.clone();
                    let i = index % bad.len();
                    bad[i] ^= 1 << bit;
                    verify(&key, Some(&sig), Some(ts), &bad, now)
                }
                1 => {
                    let mut raw = STANDARD.decode(&sig).unwrap();
                    let i = index % raw.len();
                    raw[i] ^= 1 << bit;
                    verify(&key, Some(&STANDARD.encode(&raw)), Some(ts), &body, now)
                }
                _ => {
                    // Any other fresh timestamp.
                    let other = (now + 1 + (index % 300) as i64).to_string();
                    verify(&key, Some(&sig), Some(&other), &body, now)
                }
            };
            prop_assert!(result.is_err());
        }
    }
}
