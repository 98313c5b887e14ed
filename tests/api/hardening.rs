//! Hostile input against the real server: every case gets a clear 4xx (or, for a slow client, a
//! closed connection), never a panic or a 500, and the server stays healthy afterwards.

use std::time::{Duration, Instant};

use callgate::carriers::plivo::signature::{sign_v3, Method, PlivoKey};
use callgate::domain::{Carrier, PhoneId};
use callgate::store::PhoneConfig;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

const TOKEN: &str = "hardeningPlivoToken0123456789";

/// An org with one Plivo number whose credential is known to the test.
async fn plivo_number(app: &TestApp) -> (Org, PhoneId) {
    let org = app.create_org("Hardening").await;
    let cred = json!({"auth_id": "MAHARDENING000000001", "auth_token": TOKEN});
    let config = PhoneConfig { stream_url: Some("wss://agent.example.com/ws".into()), ..Default::default() };
    let store = app.state.store.as_ref();
    let phone = insert_phone(
        store,
        &app.state.vault,
        &org.id,
        Carrier::Plivo,
        "+14155550111",
        &cred,
        config,
        app.clock.now_ms(),
    );
    (org, phone.id)
}

fn signed(path: &str, params: &[(&str, &str)], nonce: &str) -> String {
    let url = format!("https://gw.example.com{path}");
    sign_v3(&PlivoKey::new(TOKEN.as_bytes()), Method::Post, &url, params, nonce).unwrap()
}

async fn assert_healthy(app: &TestApp) {
    let res = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

async fn raw(app: &TestApp, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn webhook_bad_input_matrix_gets_clear_4xx() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let path = format!("/plivo/status/{id}");
    let url = app.url(&path);
    let form = "application/x-www-form-urlencoded";
    // Well formed and fresh, so that the body is what a Telnyx case's answer is about: headers
    // that fail the checks needing no key are refused before the body is read for a number.
    let telnyx_signature = format!("{}==", "A".repeat(86));
    let telnyx_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().to_string();
    let telnyx = |timestamp: &str, body: String| {
        app.client
            .post(app.url("/webhooks/telnyx/voice"))
            .header("telnyx-signature-ed25519", &telnyx_signature)
            .header("telnyx-timestamp", timestamp)
            .body(body)
    };
    let mut cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("oversized body", app.client.post(&url).header("content-type", form).body(vec![b'a'; 64 * 1024 + 1]), 413),
        (
            "invalid UTF-8 in a form value",
            app.client.post(&url).header("content-type", form).body(b"CallUUID=%FF%FE&From=1".to_vec()),
            400,
        ),
        (
            "invalid UTF-8 raw bytes",
            app.client.post(&url).header("content-type", form).body(vec![b'a', b'=', 0xff, 0xfe]),
            400,
        ),
        ("too many parameters", app.client.post(&url).header("content-type", form).body("a=1&".repeat(5000)), 400),
        ("no signature", app.client.post(&url).header("content-type", form).body("CallUUID=x"), 403),
        (
            "garbage signature headers",
            app.client
                .post(&url)
                .header("content-type", form)
                .header("x-plivo-signature-v3", "not base64 at all,,,")
                .header("x-plivo-signature-v3-nonce", "1")
                .body("CallUUID=x"),
            403,
        ),
        (
            "JSON body on a form carrier",
            app.client
                .post(&url)
                .header("content-type", "application/json")
                .header("x-plivo-signature-v3", signed(&path, &[], "n1"))
                .header("x-plivo-signature-v3-nonce", "n1")
                .body(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            403,
        ),
        ("wrong method", app.client.put(&url).body("x"), 405),
        ("wrong method DELETE", app.client.delete(&url), 405),
        ("path traversal", app.client.get(app.url("/plivo/status/..%2F..%2Fetc%2Fpasswd")), 404),
        ("odd characters in the id", app.client.get(app.url("/plivo/status/ph_%00%ff%20%3Cscript%3E")), 404),
        ("unknown phone", app.client.get(app.url(&format!("/plivo/status/{}", PhoneId::generate()))), 404),
        ("phone of another carrier", app.client.get(app.url(&format!("/twilio/status/{id}"))), 404),
        ("telnyx without headers", app.client.post(app.url("/webhooks/telnyx/voice")).body("{}"), 403),
        ("telnyx with a stale timestamp", telnyx("1", "{}".into()), 403),
        ("telnyx deep JSON", telnyx(&telnyx_now, format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))), 413),
        (
            "telnyx deep JSON under the limit",
            telnyx(&telnyx_now, format!("{}{}", "[".repeat(20_000), "]".repeat(20_000))),
            400,
        ),
        ("telnyx body not JSON", telnyx(&telnyx_now, "data=1".into()), 400),
    ];
    // Duplicate form keys and a duplicated signature header are still just a bad signature.
    cases.push((
        "duplicate headers and keys",
        app.client
            .post(&url)
            .header("content-type", form)
            .header("x-plivo-signature-v3", "AAAA")
            .header("x-plivo-signature-v3", "BBBB")
            .header("x-plivo-signature-v3-nonce", "n2")
            .body("CallUUID=a&CallUUID=b&From=1&From=2"),
        403,
    ));
    let n = cases.len();
    for (name, req, want) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), want, "{name}");
        let body: serde_json::Value = res.json().await.unwrap_or_else(|_| panic!("{name}: JSON error body"));
        assert!(body["error"]["code"].is_string(), "{name}: {body}");
    }
    assert!(n >= 17);
    // Nothing above was recorded.
    assert!(recorded(&app, &url).is_empty());
    assert_healthy(&app).await;
}

/// A signature header that is there but is not text is a wrong signature, not a missing one.
#[tokio::test]
async fn a_signature_header_that_is_not_text_is_an_invalid_signature() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let path = format!("/plivo/status/{id}");
    let url = app.url(&path);
    let binary = || reqwest::header::HeaderValue::from_bytes(b"\xff\xfesig").unwrap();
    // Signed with the right token over the text a non-text nonce would read as.
    let over_stand_in = signed(&path, &[("CallUUID", "x")], "\u{fffd}");
    let cases = [
        (
            "plivo signature",
            app.client
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-plivo-signature-v3", binary())
                .header("x-plivo-signature-v3-nonce", "n1")
                .body("CallUUID=x"),
        ),
        (
            "plivo nonce",
            app.client
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-plivo-signature-v3", "AAAA")
                .header("x-plivo-signature-v3-nonce", binary())
                .body("CallUUID=x"),
        ),
        (
            "plivo nonce under a signature over its stand-in",
            app.client
                .post(&url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-plivo-signature-v3", over_stand_in)
                .header("x-plivo-signature-v3-nonce", binary())
                .body("CallUUID=x"),
        ),
    ];
    for (name, req) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 403, "{name}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_signature", "{name}: {body}");
    }
    assert!(recorded(&app, &url).is_empty());
}

#[tokio::test]
async fn management_bad_input_matrix_gets_clear_4xx() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "truncated JSON",
            app.post(&org, "/byok").header("content-type", "application/json").body("{\"provider\": \"op"),
            400,
        ),
        (
            "invalid UTF-8 JSON",
            app.post(&org, "/byok").header("content-type", "application/json").body(vec![b'{', b'"', 0xff, b'"', b'}']),
            400,
        ),
        (
            "deep JSON",
            app.post(&org, "/byok").header("content-type", "application/json").body(format!(
                "{}{}",
                "[".repeat(5000),
                "]".repeat(5000)
            )),
            400,
        ),
        ("JSON array", app.post(&org, "/byok").json(&json!([1, 2])), 422),
        ("wrong content type", app.post(&org, "/byok").header("content-type", "application/xml").body("<x/>"), 415),
        ("no content type", app.post(&org, "/byok").body("{}"), 415),
        (
            "oversized",
            app.post(&org, "/byok").header("content-type", "application/json").body(vec![b' '; 65 * 1024]),
            413,
        ),
        ("bad phone id", app.get(&org, "/phone-numbers/..%2Fsecrets"), 404),
        ("bad event id", app.get(&org, "/events/evt_%FF"), 404),
        ("bad query", app.get(&org, "/events?limit=notanumber"), 400),
        ("unknown query key", app.get(&org, "/events?sort=desc"), 400),
        ("bad carrier", app.post(&org, "/voice/skype/byok/validate").json(&json!({})), 404),
        ("method not taken", app.client.put(app.url("/byok")).bearer_auth(&org.key).body("{}"), 405),
        (
            "api key with control chars",
            app.post(&org, "/byok").json(&json!({"provider": "openai", "api_key": "sk-a\u{0}b"})),
            422,
        ),
    ];
    for (name, req, want) in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status().as_u16(), want, "{name}");
        let body: serde_json::Value = res.json().await.unwrap_or_else(|_| panic!("{name}: JSON error body"));
        assert!(body["error"]["code"].is_string(), "{name}: {body}");
    }
    assert_healthy(&app).await;
}

#[tokio::test]
async fn oversized_headers_and_truncated_bodies_are_refused() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let huge = format!("POST /plivo/status/{id} HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let res = raw(&app, huge.as_bytes()).await;
    assert!(res.is_empty() || (400..500).contains(&status_of(&res)), "{res}");
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let res = raw(&app, format!("GET /health HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes()).await;
    assert!(res.is_empty() || (400..500).contains(&status_of(&res)), "{res}");
    // Declares 100 bytes, sends 10, then closes its side.
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let head = format!(
        "POST /plivo/status/{id} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallUUID=x"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let res = String::from_utf8_lossy(&out);
    assert!(res.is_empty() || (400..500).contains(&status_of(&res)), "{res}");
    assert_healthy(&app).await;
}

#[tokio::test]
async fn a_slow_loris_client_is_dropped_without_holding_a_worker() {
    let app = spawn_app().await;
    let mut slow = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let started = Instant::now();
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut dropped = false;
    for b in request.iter() {
        // Meanwhile, everyone else is served.
        assert_eq!(app.client.get(app.url("/health")).send().await.unwrap().status(), 200);
        if slow.write_all(&[*b]).await.is_err() {
            dropped = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(500), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                dropped = true;
                break;
            }
            Ok(Ok(_)) => {
                // A 408 before closing is fine too.
                dropped = true;
                break;
            }
            Err(_) => {}
        }
        if started.elapsed() > Duration::from_secs(12) {
            break;
        }
    }
    assert!(dropped, "slow client still connected after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(12));
    assert_healthy(&app).await;
}

/// Every event recorded for the number whose webhook URL (or path) ends with its id.
fn recorded(app: &TestApp, url: &str) -> Vec<callgate::store::EventRecord> {
    let id = PhoneId::parse(url.rsplit('/').next().unwrap()).unwrap();
    let phone = app.state.store.phone_resolve(&id).unwrap().unwrap();
    let all = callgate::store::EventFilter { phone_id: Some(id), limit: 10_000, ..Default::default() };
    app.state.store.event_list(&phone.org_id, &all).unwrap()
}

#[tokio::test]
async fn thousands_of_concurrent_connections_are_served_or_refused_cleanly() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let path = format!("/plivo/status/{id}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let client = client.clone();
        let url = app.url(&path);
        let nonce = format!("conc{i:06}");
        let params = [("CallUUID", "c-1"), ("CallStatus", "ringing")];
        let sig = signed(&path, &params, &nonce);
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("x-plivo-signature-v3", sig)
                .header("x-plivo-signature-v3-nonce", nonce)
                .body("CallUUID=c-1&CallStatus=ringing")
                .send()
                .await
                .map(|r| r.status().as_u16())
        }));
    }
    let (mut ok, mut timed_out, mut failed) = (0, 0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => ok += 1,
            // Under a burst the server may not read a request's headers within its 5 s limit;
            // it answers 408 and closes, which is the clean refusal we want.
            Ok(408) => timed_out += 1,
            Ok(s) => panic!("status {s}"),
            Err(_) => failed += 1,
        }
    }
    assert_eq!(ok + timed_out + failed, 2000);
    assert!(ok > 0);
    // Each acknowledged callback is recorded once.
    let events = recorded(&app, &path);
    assert_eq!(events.len(), ok);
    let mut nonces: Vec<&str> = events.iter().filter_map(|e| e.call_id.as_deref()).collect();
    nonces.dedup();
    assert_eq!(nonces, ["c-1"]);
    assert_healthy(&app).await;
}

/// The head arrived in time, the body trickles: the request is answered 408 once the body's
/// deadline passes, not held open for as long as the sender likes.
#[tokio::test]
async fn a_body_that_trickles_in_gets_408_at_its_deadline() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let head = format!(
        "POST /plivo/status/{id} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nCallUUID=x"
    );
    // Taken before the head is sent: the server's deadline starts once it has the head, and
    // a test thread preempted between the write and the clock would see less than the deadline.
    let started = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    // One more byte a second, so the connection is never idle.
    while started.elapsed() < callgate::net::body::BODY_DEADLINE + Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {
                let _ = s.write_all(b"&").await;
            }
        }
    }
    let res = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&res), 408, "{res}");
    assert!(res.contains("\"body_timeout\""), "{res}");
    let took = started.elapsed();
    assert!(
        took >= callgate::net::body::BODY_DEADLINE
            && took < callgate::net::body::BODY_DEADLINE + Duration::from_secs(3),
        "{took:?}"
    );
    assert_healthy(&app).await;
}

/// With a low open-file limit, the server raises its soft limit to the hard one and lets
/// connections take at most half: a crowd of idle connections waits in the listen backlog
/// instead of taking the descriptors the store needs, and the server still writes once the
/// crowd's connections time out.
#[tokio::test]
async fn idle_connections_take_at_most_half_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("callgate.log");
    let info = [("CALLGATE_LOG", "info".to_owned())];
    let limits = Some("ulimit -Sn 100 && ulimit -Hn 300");
    let server = BinaryServer::start_limited(&dir.path().join("data"), &info, Some(&log), limits).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("raised the open-file limit") && text.contains("Some(300)"), "{text}");
    let workers = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let cap = callgate::net::fds::connection_cap(Some(300), workers) * workers;
    assert!(cap <= 150);

    // `exec` kept the shell's pid.
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", server.child.id())).unwrap().count();
    let before = fds();
    let mut crowd = Vec::new();
    for _ in 0..250 {
        crowd.push(TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = fds() - before;
    assert!(held + 8 >= cap && held <= cap + 8, "{held} descriptors taken by connections, cap {cap}");

    // The crowd's connections close at the 5 s request timeout; the queued ones after them
    // too; then a write goes through.
    let client = client_builder().timeout(Duration::from_secs(30)).build().unwrap();
    let res = client
        .post(server.url("/admin/orgs"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "After the crowd"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    drop(crowd);
}

/// Below the open-file limit callgate needs, `serve` says so and exits, instead of starting
/// workers that cannot accept.
#[tokio::test]
async fn serve_refuses_an_open_file_limit_too_low_to_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -Sn 64 && ulimit -Hn 64 && exec \"$0\" serve")
        .arg(env!("CARGO_BIN_EXE_callgate"))
        .env("CALLGATE_DATA_DIR", dir.path().join("data"))
        .env("CALLGATE_LISTEN", "127.0.0.1:0")
        .env("CALLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("CALLGATE_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the open-file limit is 64; callgate needs at least 128"), "{err}");
}

/// An organization's name, a credential's label and a number's label are shown to people in
/// lists and logs: control characters and invisible formatting ones (a right-to-left override
/// that shows `exe.txt` as `txt.exe`, a zero-width space) are refused, and nothing is stored.
#[tokio::test]
async fn names_and_labels_refuse_control_and_invisible_formatting_characters() {
    let app = spawn_app().await;
    let (org, id) = plivo_number(&app).await;
    for bad in ["evil\u{202E}txt.exe", "ad\u{200B}min", "two\nlines", "\u{FEFF}bom"] {
        let res = app.admin_post("/admin/orgs", json!({"name": bad})).await;
        assert_eq!(res.status(), 422, "{bad:?}");
        assert_eq!(error_code(res).await, "invalid_field");
        let res = app
            .post(&org, "/byok")
            .json(&json!({"provider": "openai", "api_key": "sk-label-check-00000000000000Zz9", "label": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 422, "{bad:?}");
        let res = app.patch(&org, &format!("/phone-numbers/{id}")).json(&json!({"label": bad})).send().await.unwrap();
        assert_eq!(res.status(), 422, "{bad:?}");
    }
    let byok: serde_json::Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(byok["credentials"], json!([]));
    let phone: serde_json::Value =
        app.get(&org, &format!("/phone-numbers/{id}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(phone["label"], serde_json::Value::Null);
    let orgs: serde_json::Value =
        app.client.get(app.url("/admin/orgs")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!(orgs["orgs"].as_array().unwrap().len(), 1, "{orgs}");
    // Letters of any script are names.
    let res = app.admin_post("/admin/orgs", json!({"name": "São Paulo Voz — 東京"})).await;
    assert_eq!(res.status(), 201);
}

/// Whoever holds a number's credential can sign any nonce; one longer than a record's key
/// holds once made the journal unreadable, stopping every later start.
#[tokio::test]
async fn a_callback_signed_with_an_outsized_nonce_is_recorded_once_and_survives_a_restart() {
    let app = spawn_app().await;
    let (_, id) = plivo_number(&app).await;
    let path = format!("/plivo/status/{id}");
    let url = app.url(&path);
    let nonce = "7".repeat(70_000);
    let params = [("CallUUID", "c-outsized-nonce"), ("CallStatus", "completed")];
    let signature = signed(&path, &params, &nonce);
    for _ in 0..2 {
        let res = app
            .client
            .post(&url)
            .header("x-plivo-signature-v3", &signature)
            .header("x-plivo-signature-v3-nonce", &nonce)
            .form(&params)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    }
    assert_eq!(recorded(&app, &url).len(), 1, "the second was a replay");
    let app = app.restart().await;
    assert_healthy(&app).await;
    let kept = recorded(&app, &url);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].call_id.as_deref(), Some("c-outsized-nonce"));
}
