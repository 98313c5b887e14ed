//! Kill -9 under load, several times, then restart on the same data dir: every acknowledged
//! organization, BYOK write, import and event is there, and nothing is half-written.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callgate::carriers::twilio::signature::{sign, TwilioKey};
use callgate::domain::Carrier;
use rand::Rng;
use serde_json::{json, Value};

use crate::fake_carrier::FakeCarrier;
use crate::helpers::*;

const SID: &str = "AC0123456789abcdef0123456789abcd77";
const TOKEN: &str = "crashTestTwilioToken000000";

#[derive(Default)]
struct Acked {
    orgs: Vec<(Org, String)>,
    phones: Vec<String>,
    calls: Vec<String>,
}

fn number(i: usize) -> String {
    format!("+1415555{i:04}")
}

#[tokio::test]
async fn sigkill_under_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let fake = FakeCarrier::start().await;
    let cred = json!({"account_sid": SID, "auth_token": TOKEN});
    fake.add_account(Carrier::Twilio, cred.clone(), (0..400).map(number));
    let env = vec![
        ("CALLGATE_TWILIO_API_URL", fake.base_url()),
        ("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE", "100000".to_owned()),
    ];
    let client = client_builder().timeout(Duration::from_secs(5)).build().unwrap();

    // The number that receives the webhooks.
    let server = BinaryServer::start(&data_dir, &env, None).await;
    let res = client
        .post(server.url("/admin/orgs"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "base"}))
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    let base = Org { id: v["org_id"].as_str().unwrap().into(), key: v["api_key"].as_str().unwrap().into() };
    let res = client
        .post(server.url("/voice/twilio/byok/import"))
        .bearer_auth(&base.key)
        .json(&json!({"number": number(0), "credentials": cred}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let phone: Value = res.json().await.unwrap();
    let phone_id = phone["id"].as_str().unwrap().to_owned();
    drop(server);

    let acked = Arc::new(Mutex::new(Acked::default()));
    let next_number = Arc::new(std::sync::atomic::AtomicUsize::new(1));
    let kills = 5;
    for cycle in 0..kills {
        let server = Arc::new(BinaryServer::start(&data_dir, &env, None).await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut tasks = Vec::new();
        // Organizations, each with a BYOK key.
        {
            let (server, client, acked) = (server.clone(), client.clone(), acked.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let Ok(res) = client
                        .post(server.url("/admin/orgs"))
                        .bearer_auth(ADMIN_TOKEN)
                        .json(&json!({"name": format!("o{cycle}-{i}")}))
                        .send()
                        .await
                    else {
                        return;
                    };
                    let Ok(v) = res.json::<Value>().await else { return };
                    let org =
                        Org { id: v["org_id"].as_str().unwrap().into(), key: v["api_key"].as_str().unwrap().into() };
                    let secret = format!("sk-crash-{cycle}-{i}-000000000000");
                    let Ok(res) = client
                        .post(server.url("/byok"))
                        .bearer_auth(&org.key)
                        .json(&json!({"provider": "openai", "api_key": secret}))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if res.status() == 200 {
                        acked.lock().unwrap().orgs.push((org, secret));
                    }
                }
            }));
        }
        // Imports.
        {
            let (server, client, acked, base, cred, next) =
                (server.clone(), client.clone(), acked.clone(), base.clone(), cred.clone(), next_number.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n >= 400 || tokio::time::Instant::now() > deadline {
                        return;
                    }
                    let Ok(res) = client
                        .post(server.url("/voice/twilio/byok/import"))
                        .bearer_auth(&base.key)
                        .json(&json!({"number": number(n), "credentials": cred}))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if res.status() == 201 {
                        let Ok(v) = res.json::<Value>().await else { return };
                        acked.lock().unwrap().phones.push(v["id"].as_str().unwrap().to_owned());
                    }
                }
            }));
        }
        // Signed webhooks, several at once.
        for w in 0..4 {
            let (server, client, acked, phone_id) = (server.clone(), client.clone(), acked.clone(), phone_id.clone());
            tasks.push(tokio::spawn(async move {
                let path = format!("/twilio/status/{phone_id}");
                let key = TwilioKey::new(TOKEN.as_bytes());
                for i in 0.. {
                    if tokio::time::Instant::now() > deadline {
                        return;
                    }
                    let call = format!("CA{cycle:02}{w:02}{i:06}");
                    let params = [("CallSid", call.as_str()), ("CallStatus", "completed")];
                    let sig = sign(&key, &format!("https://gw.example.com{path}"), &params);
                    let Ok(res) = client
                        .post(server.url(&path))
                        .header("content-type", "application/x-www-form-urlencoded")
                        .header("x-twilio-signature", sig)
                        .body(format!("CallSid={call}&CallStatus=completed"))
                        .send()
                        .await
                    else {
                        return;
                    };
                    if res.status() == 200 {
                        acked.lock().unwrap().calls.push(call);
                    }
                }
            }));
        }
        let wait = rand::thread_rng().gen_range(300..900);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // SIGKILL by pid: the load tasks still hold the server handle.
        let pid = server.child.id();
        std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        for t in tasks {
            let _ = t.await;
        }
    }

    // A server that is not killed, on the same data dir.
    let app = spawn_on(&data_dir).await;
    let acked = Arc::try_unwrap(acked).ok().unwrap().into_inner().unwrap();
    assert!(
        !acked.orgs.is_empty() && !acked.phones.is_empty() && acked.calls.len() > 20,
        "load too light to prove anything"
    );
    for (org, secret) in &acked.orgs {
        let v: Value = app.get(org, "/byok").send().await.unwrap().json().await.unwrap();
        assert!(v["byok_keys"]["openai_secret_id"].is_string(), "org {} lost its key", org.id);
        let org_id = callgate::domain::OrgId::parse(&org.id).unwrap();
        let rec = app.state.store.byok_get(&org_id, "openai").unwrap().unwrap();
        assert_eq!(app.state.vault.open(&rec).unwrap().expose(), secret);
    }
    for id in &acked.phones {
        let res = app.get(&base, &format!("/phone-numbers/{id}")).send().await.unwrap();
        assert_eq!(res.status(), 200, "phone {id} lost");
    }
    let mut recorded = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let q = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let v: Value = app.get(&base, &format!("/events?limit=1000{q}")).send().await.unwrap().json().await.unwrap();
        for e in v["events"].as_array().unwrap() {
            assert!(recorded.insert(e["call_id"].as_str().unwrap().to_owned()), "an event recorded twice");
        }
        match v["next_after"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    for call in &acked.calls {
        assert!(recorded.contains(call), "acknowledged event {call} lost");
    }
    let problems = app.state.store.verify_integrity().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    eprintln!(
        "{kills} kills survived: {} orgs+keys, {} imports, {} events acknowledged and found ({} recorded)",
        acked.orgs.len(),
        acked.phones.len(),
        acked.calls.len(),
        recorded.len()
    );
    app.stop().await;
}
