//! No secret ever leaks: a distinct secret for every provider, every endpoint driven through its
//! good and failure paths against the real binary logging at debug, then every response body and
//! header, every log line and every file under the data dir searched for each secret's bytes.

use std::time::Duration;

use callgate::carriers::twilio::signature::{sign, TwilioKey};
use callgate::domain::Carrier;
use serde_json::{json, Value};

use crate::fake_carrier::{FakeCarrier, Mode};
use crate::helpers::{client_builder, BinaryServer, ADMIN_TOKEN};

const UPSTREAM_PASSWORD: &str = "UPSTREAMPASSLEAKCANARY7";
const UPSTREAM_TOKEN: &str = "UPSTREAMTOKENLEAKCANARY8";

async fn start(data_dir: &std::path::Path, fake: &FakeCarrier, log: &std::path::Path) -> BinaryServer {
    let mut env = vec![
        ("CALLGATE_LOG", "debug".to_owned()),
        ("EXOTEL_ALLOWED_IPS", "127.0.0.1".to_owned()),
        ("CALLGATE_PROVIDER_TIMEOUT_MS", "2000".to_owned()),
        ("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE", "1000".to_owned()),
        // A platform's upstream with credentials in its URL, down: its breaker's log lines
        // name it.
        (
            "CALLGATE_UPSTREAM_URL",
            format!("http://hookuser:{UPSTREAM_PASSWORD}@127.0.0.1:9/hook?token={UPSTREAM_TOKEN}"),
        ),
        ("CALLGATE_DELIVERY_BREAKER_AFTER", "1".to_owned()),
    ];
    for k in [
        "CALLGATE_PLIVO_API_URL",
        "CALLGATE_VOBIZ_API_URL",
        "CALLGATE_TWILIO_API_URL",
        "CALLGATE_TELNYX_API_URL",
        "CALLGATE_EXOTEL_API_URL",
    ] {
        env.push((k, fake.base_url()));
    }
    BinaryServer::start(data_dir, &env, Some(log)).await
}

/// Everything a client saw, to be searched afterwards.
#[derive(Default)]
struct Seen(Vec<u8>);

impl Seen {
    async fn take(&mut self, res: reqwest::Response) -> (u16, Value) {
        let status = res.status().as_u16();
        for (k, v) in res.headers() {
            self.0.extend_from_slice(k.as_str().as_bytes());
            self.0.extend_from_slice(v.as_bytes());
        }
        let body = res.bytes().await.unwrap();
        self.0.extend_from_slice(&body);
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

#[tokio::test]
async fn no_secret_appears_in_responses_logs_or_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeCarrier::start().await;
    let log_path = dir.path().join("callgate.log");
    let server = start(&data_dir, &fake, &log_path).await;
    let client = client_builder().build().unwrap();
    let url = |p: &str| format!("{}{p}", server.base);
    let mut seen = Seen::default();
    let mut secrets: Vec<String> = Vec::new();

    let (status, org) = seen
        .take(
            client
                .post(url("/admin/orgs"))
                .bearer_auth(ADMIN_TOKEN)
                .json(&json!({"name": "Leak test"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(status, 201);
    let key = org["api_key"].as_str().unwrap().to_owned();

    // A distinct API key for every non-phone provider, with its prefix where it has one.
    let providers: Value = client.get(url("/byok/providers")).send().await.unwrap().json().await.unwrap();
    for p in providers["providers"].as_array().unwrap() {
        if p["type"] == "phone" {
            continue;
        }
        let name = p["provider"].as_str().unwrap();
        let secret =
            format!("{}LEAKCANARY{}x{}", p["key_prefix"].as_str().unwrap_or(""), name.replace('_', ""), "q".repeat(16));
        let (status, _) = seen
            .take(
                client
                    .post(url("/byok"))
                    .bearer_auth(&key)
                    .json(&json!({"provider": name, "api_key": secret}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        assert_eq!(status, 200, "{name}");
        secrets.push(secret);
    }

    // A distinct credential for every carrier, its numbers on the fake.
    let sid = "AC0123456789abcdef0123456789abcd01";
    let phone_creds = [
        (
            Carrier::Plivo,
            json!({"auth_id": "MALEAK00000000000001", "auth_token": "PLIVOLEAKCANARYtoken0001"}),
            "PLIVOLEAKCANARYtoken0001",
            "+14155550101",
        ),
        (
            Carrier::Vobiz,
            json!({"auth_id": "MA_LEAK1", "auth_token": "VOBIZLEAKCANARYtoken0002"}),
            "VOBIZLEAKCANARYtoken0002",
            "+919800000102",
        ),
        (
            Carrier::Twilio,
            json!({"account_sid": sid, "auth_token": "TWILIOLEAKCANARYtoken003"}),
            "TWILIOLEAKCANARYtoken003",
            "+14155550103",
        ),
        (
            Carrier::Exotel,
            json!({"api_key": "exoleakkey", "api_token": "EXOTELLEAKCANARYtoken004", "account_sid": "leak1", "subdomain": "api.exotel.com"}),
            "EXOTELLEAKCANARYtoken004",
            "+918030000104",
        ),
        (
            Carrier::Telnyx,
            json!({"api_key": "KEYTELNYXLEAKCANARY00005", "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}),
            "KEYTELNYXLEAKCANARY00005",
            "+13125550105",
        ),
    ];
    let mut phone_ids = Vec::new();
    for (carrier, cred, secret, number) in &phone_creds {
        secrets.push(secret.to_string());
        fake.add_account(*carrier, cred.clone(), [*number]);
        let c = carrier.as_str();
        // Good paths: vault, validate, import (with configuration), read back.
        let (status, _) = seen
            .take(
                client
                    .post(url("/byok"))
                    .bearer_auth(&key)
                    .json(&json!({"provider": c, "api_key": cred}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        assert_eq!(status, 200, "{c}");
        let (status, _) = seen
            .take(
                client
                    .post(url(&format!("/voice/{c}/byok/validate")))
                    .bearer_auth(&key)
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        assert_eq!(status, 200, "{c} validate");
        let token = "EXOTELWEBHOOKLEAKCANARY6";
        let config = if *carrier == Carrier::Exotel { json!({"exotel_webhook_token": token}) } else { json!({}) };
        let (status, phone) = seen
            .take(
                client
                    .post(url(&format!("/voice/{c}/byok/import")))
                    .bearer_auth(&key)
                    .json(&json!({"number": number, "credentials": cred, "config": config, "configure_provider": true}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        assert_eq!(status, 201, "{c} import: {phone}");
        let id = phone["id"].as_str().unwrap().to_owned();
        seen.take(client.get(url(&format!("/phone-numbers/{id}"))).bearer_auth(&key).send().await.unwrap()).await;
        phone_ids.push((*carrier, id));
        // Failure paths: the carrier refuses, echoes the secret back, breaks, or answers garbage.
        for mode in [Mode::Unauthorized, Mode::UnauthorizedEcho, Mode::ServerError, Mode::Garbage] {
            fake.set_mode(mode);
            let (status, _) = seen
                .take(
                    client
                        .post(url(&format!("/voice/{c}/byok/validate")))
                        .bearer_auth(&key)
                        .json(&json!({}))
                        .send()
                        .await
                        .unwrap(),
                )
                .await;
            assert!(status == 422 || status == 502, "{c} {mode:?}: {status}");
        }
        fake.set_mode(Mode::Ok);
        // Malformed credentials: the error names the field, never echoes the value.
        let mut broken = cred.clone();
        broken.as_object_mut().unwrap().retain(|k, _| k.contains("token") || k == "api_key");
        let (status, _) = seen
            .take(
                client
                    .post(url("/byok"))
                    .bearer_auth(&key)
                    .json(&json!({"provider": c, "api_key": broken}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
        assert_eq!(status, 422, "{c} broken");
        secrets.push(token.to_owned());
    }

    // Webhooks: a good Twilio callback, a forged one, and every other carrier unsigned.
    for (carrier, id) in &phone_ids {
        let c = carrier.as_str();
        let path = format!("/{c}/status/{id}");
        let params = [("CallSid", "CALEAK"), ("CallStatus", "completed")];
        let mut req = client
            .post(url(&path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("CallSid=CALEAK&CallStatus=completed");
        if *carrier == Carrier::Twilio {
            let sig =
                sign(&TwilioKey::new(b"TWILIOLEAKCANARYtoken003"), &format!("https://gw.example.com{path}"), &params);
            req = req.header("x-twilio-signature", sig);
        }
        seen.take(req.send().await.unwrap()).await;
        seen.take(
            client.post(url(&path)).header("x-twilio-signature", "forged").body("CallSid=CALEAK").send().await.unwrap(),
        )
        .await;
        seen.take(
            client.get(url(&format!("{path}?token=EXOTELWEBHOOKLEAKCANARY6&CallSid=CALEAK2"))).send().await.unwrap(),
        )
        .await;
    }
    seen.take(client.post(url("/webhooks/telnyx/voice")).body("{}").send().await.unwrap()).await;
    seen.take(client.get(url("/events")).bearer_auth(&key).send().await.unwrap()).await;
    seen.take(client.get(url("/byok")).bearer_auth(&key).send().await.unwrap()).await;
    seen.take(client.get(url("/audit")).bearer_auth(&key).send().await.unwrap()).await;
    seen.take(client.get(url("/phone-numbers")).bearer_auth(&key).send().await.unwrap()).await;
    seen.take(client.get(url("/metrics")).send().await.unwrap()).await;
    // The recorded callback's delivery fails, and the breaker says so.
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !contains(&std::fs::read(&log_path).unwrap(), "upstream keeps failing") {
        assert!(std::time::Instant::now() < until, "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    secrets.extend([UPSTREAM_PASSWORD.to_owned(), UPSTREAM_TOKEN.to_owned()]);

    // Stop it gracefully so the logs and the store are complete.
    server.terminate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = std::fs::read(&log_path).unwrap();
    assert!(contains(&log, "webhook rejected"), "debug logs were captured");
    assert!(contains(&log, "upstream=http://127.0.0.1:9/hook?..."), "the upstream is named in the log");
    drop(server);

    let mut files = Vec::new();
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out)
            } else {
                out.push(e.path())
            }
        }
    }
    walk(&data_dir, &mut files);
    assert!(files.len() > 3);
    assert!(secrets.len() >= 27);
    let contents: Vec<_> = files.iter().map(|f| (f, std::fs::read(f).unwrap())).collect();
    for s in &secrets {
        assert!(!contains(&seen.0, s), "a response carries {s}");
        assert!(!contains(&log, s), "the log carries {s}");
        for (f, bytes) in &contents {
            assert!(!contains(bytes, s), "{} carries {s}", f.display());
        }
    }
    eprintln!(
        "scanned {} secrets in {} response bytes, {} log bytes, {} files",
        secrets.len(),
        seen.0.len(),
        log.len(),
        files.len()
    );
}
