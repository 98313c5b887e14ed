use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn health_and_ready_answer_json() {
    let app = spawn_app().await;
    let res = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let res = app.client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["master_key"], "loaded");
}

#[tokio::test]
async fn first_start_generates_a_private_master_key() {
    let app = spawn_app().await;
    let key = app.data_dir.join("master.key");
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text.trim()).unwrap().len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

#[tokio::test]
async fn a_given_master_key_creates_no_key_file() {
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let app = spawn_with(Options::default().env("CALLGATE_MASTER_KEY", key)).await;
    assert!(!app.data_dir.join("master.key").exists());
}

#[tokio::test]
async fn admin_creates_orgs_and_keys_and_revokes_them() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    assert!(org.id.starts_with("org_"));
    assert!(org.key.starts_with("cg_"));
    assert_eq!(app.get(&org, "/byok").send().await.unwrap().status(), 200);

    let res = app.admin_post(&format!("/admin/orgs/{}/api-keys", org.id), json!({})).await;
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    let second = Org { id: org.id.clone(), key: v["api_key"].as_str().unwrap().to_owned() };
    let key_id = v["key_id"].as_str().unwrap().to_owned();
    assert_eq!(app.get(&second, "/byok").send().await.unwrap().status(), 200);

    let res =
        app.client.delete(app.url(&format!("/admin/api-keys/{key_id}"))).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 204);
    let res = app.get(&second, "/byok").send().await.unwrap();
    assert_eq!(res.status(), 401);
    // The first key still works.
    assert_eq!(app.get(&org, "/byok").send().await.unwrap().status(), 200);

    let res =
        app.client.delete(app.url(&format!("/admin/api-keys/{key_id}"))).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let res = app.admin_post("/admin/orgs/org_00000000000000000000000000000000/api-keys", json!({})).await;
    assert_eq!(res.status(), 404);
}

#[tokio::test]
async fn missing_or_unknown_keys_get_401_with_www_authenticate() {
    let app = spawn_app().await;
    for auth in [None, Some("Bearer cg_nope"), Some("Basic abc"), Some("Bearer ")] {
        let mut req = app.client.get(app.url("/byok"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401, "{auth:?}");
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        assert_eq!(error_code(res).await, "unauthorized");
    }
}

#[tokio::test]
async fn admin_api_needs_the_admin_token_and_is_absent_without_one() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/admin/orgs"))
        .bearer_auth("wrong-token-0123456789")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let org = app.create_org("Acme").await;
    // An organization's key is not an admin token.
    let res =
        app.client.post(app.url("/admin/orgs")).bearer_auth(&org.key).json(&json!({"name": "x"})).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["message"], "the admin token is required (Authorization: Bearer <CALLGATE_ADMIN_TOKEN>)");

    let app = spawn_with(Options::default().env("CALLGATE_ADMIN_TOKEN", "")).await;
    let res = app.admin_post("/admin/orgs", json!({"name": "x"})).await;
    assert_eq!(res.status(), 404);
    assert_eq!(error_code(res).await, "not_found");
}

#[tokio::test]
async fn bad_requests_get_the_json_error_shape() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/admin/orgs"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(error_code(res).await, "malformed_json");
    let res = app
        .client
        .post(app.url("/admin/orgs"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    assert_eq!(error_code(res).await, "unsupported_media_type");
    let big = format!("{{\"name\": \"{}\"}}", "a".repeat(70 * 1024));
    let res = app
        .client
        .post(app.url("/admin/orgs"))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(error_code(res).await, "payload_too_large");
    let res = app.admin_post("/admin/orgs", json!({"name": ""})).await;
    assert_eq!(res.status(), 422);
    assert_eq!(error_code(res).await, "invalid_field");
    let res = app.admin_post("/admin/orgs", json!({"nome": "x"})).await;
    assert_eq!(res.status(), 422);
    // A field the body does not have is refused, not dropped.
    let res = app.admin_post("/admin/orgs", json!({"name": "x", "plan": "gold"})).await;
    assert_eq!(res.status(), 422);
    assert_eq!(error_code(res).await, "invalid_field");
    let res = app.client.get(app.url("/no/such/path")).send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(error_code(res).await, "not_found");
    // A URL that exists, with a method it does not take.
    // Every URL of the API, with the methods it takes: any other is a 405 that names them.
    for (path, allow) in [
        ("/health", "GET"),
        ("/ready", "GET"),
        ("/metrics", "GET"),
        ("/admin/orgs", "GET, POST"),
        ("/admin/orgs/org_x/api-keys", "POST"),
        ("/admin/api-keys/key_x", "DELETE"),
        ("/byok/providers", "GET"),
        ("/byok/config", "GET"),
        ("/byok", "GET, POST, DELETE"),
        ("/byok/set", "POST"),
        ("/byok/openai", "DELETE"),
        ("/audit", "GET"),
        ("/voice/twilio/byok/validate", "POST"),
        ("/voice/twilio/byok/import", "POST"),
        ("/phone-numbers", "GET"),
        ("/phone-numbers/ph_x", "GET, PATCH, DELETE"),
        ("/events", "GET"),
        ("/events/evt_x", "GET"),
        ("/events/redeliver", "POST"),
        ("/events/evt_x/redeliver", "POST"),
    ] {
        let taken: Vec<&str> = allow.split(", ").collect();
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let res = app.client.request(m, app.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            if taken.contains(&method) {
                assert_ne!(res.status(), 405, "{method} {path}");
                continue;
            }
            assert_eq!(res.status(), 405, "{method} {path}");
            assert_eq!(res.headers()["allow"], allow, "{method} {path}");
            assert_eq!(error_code(res).await, "method_not_allowed", "{method} {path}");
        }
    }
}

#[tokio::test]
async fn orgs_survive_a_restart() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let app = app.restart().await;
    assert_eq!(app.get(&org, "/byok").send().await.unwrap().status(), 200);
    let res = app.client.get(app.url("/admin/orgs")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["orgs"][0]["org_id"], org.id.as_str());
    assert_eq!(v["orgs"][0]["name"], "Acme");
}
