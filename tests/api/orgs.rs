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
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, rand::random::<[u8; 32]>());
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
    // Two credentials, even two good ones or the same twice, are ambiguous: neither is taken.
    let (one, other) = (app.create_org("One").await, app.create_org("Other").await);
    for (first, second) in [(&one.key, &other.key), (&other.key, &other.key)] {
        let res = app
            .client
            .get(app.url("/byok"))
            .header("Authorization", format!("Bearer {first}"))
            .header("Authorization", format!("Bearer {second}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
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
    // Nor does a method the admin API would refuse with 405 tell that it exists.
    for (method, path) in
        [("PUT", "/admin/orgs"), ("GET", "/admin/api-keys/key_x"), ("PATCH", "/admin/orgs/org_x/api-keys")]
    {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let res = app.client.request(m, app.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(res.status(), 404, "{method} {path}");
        assert_eq!(error_code(res).await, "not_found", "{method} {path}");
    }
}

/// HEAD is answered wherever GET is, with GET's headers and no body (load balancers check
/// health so); a webhook URL is not among them.
#[tokio::test]
async fn head_is_answered_like_get_without_a_body() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    for path in ["/health", "/ready", "/phone-numbers", "/events"] {
        let got = app.client.get(app.url(path)).bearer_auth(&org.key).send().await.unwrap();
        assert_eq!(got.status(), 200, "{path}");
        let length = got.headers()["content-length"].clone();
        assert_ne!(got.bytes().await.unwrap().len(), 0, "{path}");
        let head = app.client.head(app.url(path)).bearer_auth(&org.key).send().await.unwrap();
        assert_eq!(head.status(), 200, "{path}");
        assert_eq!(head.headers()["content-length"], length, "{path}");
        assert_eq!(head.bytes().await.unwrap().len(), 0, "{path}");
    }
    let res = app.client.head(app.url("/phone-numbers")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = app.client.head(app.url("/exotel/incoming/ph_00000000000000000000000000000000")).send().await.unwrap();
    assert_eq!(res.status(), 405);
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
        ("/health", "GET, HEAD"),
        ("/ready", "GET, HEAD"),
        ("/metrics", "GET, HEAD"),
        ("/admin/orgs", "GET, HEAD, POST"),
        ("/admin/orgs/org_x/api-keys", "POST"),
        ("/admin/api-keys/key_x", "DELETE"),
        ("/byok/providers", "GET, HEAD"),
        ("/byok/config", "GET, HEAD"),
        ("/byok", "GET, HEAD, POST, DELETE"),
        ("/byok/set", "POST"),
        ("/byok/openai", "DELETE"),
        ("/audit", "GET, HEAD"),
        ("/voice/twilio/byok/validate", "POST"),
        ("/voice/twilio/byok/import", "POST"),
        ("/phone-numbers", "GET, HEAD"),
        ("/phone-numbers/ph_x", "GET, HEAD, PATCH, DELETE"),
        ("/events", "GET, HEAD"),
        ("/events/evt_x", "GET, HEAD"),
        ("/events/redeliver", "POST"),
        ("/events/evt_x/redeliver", "POST"),
    ] {
        let taken: Vec<&str> = allow.split(", ").collect();
        for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] {
            let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let res = app.client.request(m, app.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            if taken.contains(&method) {
                assert_ne!(res.status(), 405, "{method} {path}");
                continue;
            }
            assert_eq!(res.status(), 405, "{method} {path}");
            assert_eq!(res.headers()["allow"], allow, "{method} {path}");
            if method != "HEAD" {
                assert_eq!(error_code(res).await, "method_not_allowed", "{method} {path}");
            }
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
