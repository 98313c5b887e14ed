use serde_json::{json, Value};

use crate::helpers::*;

const OPENAI_KEY: &str = "sk-proj-UNIQUEopenaiSECRETvalue0001AbCd";

fn phone_credentials() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "twilio",
            json!({"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "twilioSECRETtoken000111"}),
            "twilioSECRETtoken000111",
        ),
        (
            "plivo",
            json!({"auth_id": "MAPLIVO0000000000001", "auth_token": "plivoSECRETtoken000222"}),
            "plivoSECRETtoken000222",
        ),
        ("vobiz", json!({"auth_id": "MA_VOBIZ001", "auth_token": "vobizSECRETtoken000333"}), "vobizSECRETtoken000333"),
        (
            "exotel",
            json!({"api_key": "exokey", "api_token": "exotelSECRETtoken000444", "account_sid": "acme1", "subdomain": "api.in.exotel.com"}),
            "exotelSECRETtoken000444",
        ),
        (
            "telnyx",
            json!({"api_key": "KEYtelnyxSECRET000555", "public_key": "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="}),
            "KEYtelnyxSECRET000555",
        ),
    ]
}

/// The audit log pages back from the newest entry: `next_before` leads to the older ones, a
/// page holds them oldest first, and a limit of 0 or a cursor that is no entry's is refused.
#[tokio::test]
async fn the_audit_log_pages_back_through_every_entry() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let providers = ["openai", "groq", "deepgram", "elevenlabs", "cartesia"];
    for p in providers {
        let key = match p {
            "openai" => OPENAI_KEY.to_owned(),
            "groq" => "gsk_UNIQUEgroqSECRETvalue0001".to_owned(),
            _ => format!("{p}-UNIQUE-SECRET-value-0001"),
        };
        let res = app.post(&org, "/byok").json(&json!({"provider": p, "api_key": key})).send().await.unwrap();
        assert_eq!(res.status(), 200, "{p}: {}", res.text().await.unwrap());
    }
    let mut seen = Vec::new();
    let mut query = "/audit?limit=2".to_owned();
    let mut pages = 0;
    loop {
        let v: Value = app.get(&org, &query).send().await.unwrap().json().await.unwrap();
        let page: Vec<String> =
            v["audit"].as_array().unwrap().iter().map(|a| a["provider"].as_str().unwrap().to_owned()).collect();
        assert!(page.len() <= 2);
        seen.splice(0..0, page);
        pages += 1;
        match v["next_before"].as_str() {
            Some(b) => query = format!("/audit?limit=2&before={b}"),
            None => break,
        }
    }
    assert_eq!(seen, providers, "every entry once, in order");
    assert_eq!(pages, 3);
    for bad in ["/audit?limit=0", "/audit?before=aud_nope", "/audit?before=evt_0123456789abcdef0123456789abcdef"] {
        let res = app.get(&org, bad).send().await.unwrap();
        assert_eq!(res.status(), 400, "{bad}");
        assert_eq!(error_code(res).await, "invalid_query", "{bad}");
    }
}

#[tokio::test]
async fn catalog_lists_every_provider_without_auth() {
    let app = spawn_app().await;
    let v: Value = app.client.get(app.url("/byok/providers")).send().await.unwrap().json().await.unwrap();
    let providers = v["providers"].as_array().unwrap();
    assert_eq!(providers.len(), 26);
    let openai = providers.iter().find(|p| p["provider"] == "openai").unwrap();
    assert_eq!(openai["type"], "llm");
    assert_eq!(openai["key_prefix"], "sk-");
    assert!(openai["models"].as_array().unwrap().iter().any(|m| m["default"] == true));
    let twilio = providers.iter().find(|p| p["provider"] == "twilio").unwrap();
    assert_eq!(twilio["key_prefix"], Value::Null);
    let v: Value = app.client.get(app.url("/byok/config")).send().await.unwrap().json().await.unwrap();
    let anthropic = v["providers"].as_array().unwrap().iter().find(|p| p["id"] == "anthropic").unwrap();
    assert_eq!(anthropic["category"], "llm");
    assert!(!anthropic["models"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn set_list_replace_and_delete_an_llm_key() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let res = app
        .post(&org, "/byok")
        .json(&json!({"provider": "openai", "api_key": OPENAI_KEY, "label": "prod"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text = res.text().await.unwrap();
    assert!(!text.contains(OPENAI_KEY));
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["success"], true);
    let first_id = v["byok_keys"]["openai_secret_id"].as_str().unwrap().to_owned();
    assert!(first_id.starts_with("sec_"));
    assert_eq!(v["byok_keys"]["anthropic_secret_id"], Value::Null);
    assert_eq!(v["byok_keys"].as_object().unwrap().len(), 26);

    let v: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    let c = &v["credentials"][0];
    assert_eq!(c["provider"], "openai");
    assert_eq!(c["hint"], "sk-...AbCd");
    assert_eq!(c["label"], "prod");
    assert_eq!(c["secret_id"], first_id.as_str());

    // The alias replaces it: a new secret id, and the old ciphertext is gone.
    let res = app
        .post(&org, "/byok/set")
        .json(&json!({"provider": "openai", "key": "sk-second-key-0000000000WxYz"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    let second_id = v["byok_keys"]["openai_secret_id"].as_str().unwrap().to_owned();
    assert_ne!(first_id, second_id);
    let v: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["credentials"].as_array().unwrap().len(), 1);
    assert_eq!(v["credentials"][0]["hint"], "sk-...WxYz");
    assert!(app.state.store.secrets_all().unwrap().iter().all(|s| s.id.as_str() != first_id));

    let res = app
        .client
        .delete(app.url("/byok"))
        .bearer_auth(&org.key)
        .json(&json!({"provider": "openai"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["byok_keys"]["openai_secret_id"], Value::Null);
    assert!(app.state.store.secrets_all().unwrap().is_empty());
    let res = app.delete(&org, "/byok/openai").send().await.unwrap();
    assert_eq!(res.status(), 404);

    let audit: Value = app.get(&org, "/audit").send().await.unwrap().json().await.unwrap();
    let actions: Vec<_> =
        audit["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap().to_owned()).collect();
    assert_eq!(actions, ["set", "set", "delete"]);
    assert!(audit["audit"][0]["key_id"].as_str().unwrap().starts_with("key_"));
    assert!(!audit.to_string().contains("sk-"));
}

#[tokio::test]
async fn every_phone_credential_shape_is_stored_and_shows_its_identifier() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    for (provider, cred, secret) in phone_credentials() {
        let res = app.post(&org, "/byok").json(&json!({"provider": provider, "api_key": cred})).send().await.unwrap();
        assert_eq!(res.status(), 200, "{provider}");
        assert!(!res.text().await.unwrap().contains(secret));
        // The JSON-in-a-string form is accepted too.
        let res = app
            .post(&org, "/byok")
            .json(&json!({"provider": provider, "api_key": cred.to_string()}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{provider} as string");
    }
    let text = app.get(&org, "/byok").send().await.unwrap().text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let hint =
        |p: &str| v["credentials"].as_array().unwrap().iter().find(|c| c["provider"] == p).unwrap()["hint"].clone();
    assert_eq!(hint("twilio"), "AC0123456789abcdef0123456789abcdef");
    assert_eq!(hint("plivo"), "MAPLIVO0000000000001");
    assert_eq!(hint("vobiz"), "MA_VOBIZ001");
    assert_eq!(hint("exotel"), "acme1");
    assert_eq!(hint("telnyx"), Value::Null);
    for (_, _, secret) in phone_credentials() {
        assert!(!text.contains(secret));
        app.assert_not_in_data_dir(secret);
    }
}

/// serde_json keeps the last of a repeated key: what a proxy or a log that reads the first
/// saw would not be what was stored.
#[tokio::test]
async fn a_body_that_repeats_a_key_is_refused_and_nothing_is_stored() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let twilio = r#"{"account_sid": "AC0123456789abcdef0123456789abcdef", "auth_token": "twilioSECRETtoken000111""#;
    let cases = [
        ("/byok", format!(r#"{{"provider": "openai", "api_key": "{OPENAI_KEY}", "api_key": "sk-other"}}"#), "api_key"),
        ("/byok", format!(r#"{{"provider": "twilio", "api_key": {twilio}, "auth_token": "x"}}}}"#), "auth_token"),
        (
            "/byok/set",
            format!(r#"{{"provider": "openai", "provider": "anthropic", "key": "{OPENAI_KEY}"}}"#),
            "provider",
        ),
        ("/voice/twilio/byok/validate", format!(r#"{{"credentials": {twilio}, "auth_token": "x"}}}}"#), "auth_token"),
        (
            "/voice/twilio/byok/import",
            format!(r#"{{"number": "+14155550100", "credentials": {twilio}, "auth_token": "x"}}}}"#),
            "auth_token",
        ),
        (
            "/voice/twilio/byok/import",
            format!(
                r#"{{"number": "+14155550100", "credentials": {twilio}}}, "config": {{"label": "a", "label": "b"}}}}"#
            ),
            "label",
        ),
    ];
    for (path, body, key) in cases {
        let res =
            app.post(&org, path).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        assert_eq!(res.status(), 422, "{path} {body}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_field", "{body}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("invalid request body: duplicate field `{key}`")), "{body}: {message}");
        assert!(!message.contains("SECRET"), "{message}");
    }
    let v: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["credentials"], json!([]));
    let v: Value = app.get(&org, "/phone-numbers").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["phone_numbers"], json!([]), "{v}");
}

#[tokio::test]
async fn bad_credentials_get_422_naming_the_field() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let cases = [
        (json!({"provider": "nope", "api_key": "x"}), "unknown_provider", "accepted: openai"),
        (json!({"provider": "openai", "api_key": "pk-wrongprefix000000"}), "invalid_key_prefix", "api_key"),
        (json!({"provider": "anthropic", "api_key": "sk-notant-000000000"}), "invalid_key_prefix", "sk-ant-"),
        (json!({"provider": "openai"}), "invalid_field", "api_key"),
        (json!({"api_key": "sk-x"}), "invalid_field", "provider"),
        (json!({"provider": "openai", "api_key": 12}), "invalid_field", "api_key"),
        (
            json!({"provider": "twilio", "api_key": {"account_sid": "AC1", "auth_token": "t"}}),
            "invalid_credentials",
            "account_sid",
        ),
        (
            json!({"provider": "twilio", "api_key": {"account_sid": "AC0123456789abcdef0123456789abcdef"}}),
            "invalid_credentials",
            "auth_token",
        ),
        (json!({"provider": "plivo", "api_key": {"auth_token": "t"}}), "invalid_credentials", "auth_id"),
        (
            json!({"provider": "exotel", "api_key": {"api_key": "k", "api_token": "t"}}),
            "invalid_credentials",
            "account_sid",
        ),
        (
            json!({"provider": "telnyx", "api_key": {"api_key": "k", "public_key": "AAAA"}}),
            "invalid_credentials",
            "public_key",
        ),
        (json!({"provider": "telnyx", "api_key": "not json"}), "invalid_credentials", "credentials"),
        (
            // The identity point: a valid encoding, of small order.
            json!({"provider": "telnyx", "api_key": {"api_key": "k", "public_key": "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}}),
            "invalid_credentials",
            "public_key: is a key of small order",
        ),
        (json!({"provider": "openai", "api_key": OPENAI_KEY, "scope": "all"}), "invalid_field", "scope: unknown field"),
        (
            // A secret pasted as a field's name does not come back.
            json!({"provider": "openai", "api_key": "x", "sk-proj-pasted-again": ""}),
            "invalid_field",
            "(a field whose name is not shown): unknown field",
        ),
        (
            json!({"provider": "vobiz", "api_key": {"auth_id": "VB1", "auth_token": "tok\u{1}en"}}),
            "invalid_credentials",
            "auth_token: must not contain control characters",
        ),
        (
            json!({"provider": "openai", "api_key": format!("{OPENAI_KEY}\u{200B}")}),
            "invalid_field",
            "api_key: must not contain control or invisible formatting characters",
        ),
        (
            // A field of the carrier's misspelt: dropped, the credential would lack the real one.
            json!({"provider": "twilio", "api_key": {"account_sid": "AC0123456789abcdef0123456789abcdef",
                   "auth_token": "twilioSECRETtoken000111", "authToken": "pasted-again"}}),
            "invalid_credentials",
            "credentials: takes only account_sid and auth_token",
        ),
    ];
    for (body, code, mention) in cases {
        let res = app.post(&org, "/byok").json(&body).send().await.unwrap();
        assert_eq!(res.status(), 422, "{body}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{body}");
        assert!(v["error"]["message"].as_str().unwrap().contains(mention), "{body}: {v}");
        assert!(!v.to_string().contains("pasted-again"), "{v}");
    }
    let v: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert!(v["credentials"].as_array().unwrap().is_empty());
    // serde's message quotes the client's field name: one that does not read as a field name
    // (here 20,000 characters of it) does not come back.
    let long = "a".repeat(20_000);
    let res = app.get(&org, &format!("/phone-numbers?{long}=1")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_query");
    let message = v["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "invalid query string: Query deserialize error: unknown field (not shown), expected one of `provider`, `after`, `limit`"
    );
}

#[tokio::test]
async fn secrets_are_encrypted_at_rest_and_survive_a_restart() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    app.post(&org, "/byok").json(&json!({"provider": "openai", "api_key": OPENAI_KEY})).send().await.unwrap();
    app.assert_not_in_data_dir(OPENAI_KEY);
    app.assert_not_in_data_dir("UNIQUEopenaiSECRET");
    let before: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    let app = app.restart().await;
    let after: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(before, after);
    // And it still opens with the persisted master key.
    let rec = app.state.store.secrets_all().unwrap().pop().unwrap();
    assert_eq!(app.state.vault.open(&rec).unwrap().expose(), OPENAI_KEY);
}

#[tokio::test]
async fn organizations_cannot_see_or_touch_each_others_keys() {
    let app = spawn_app().await;
    let a = app.create_org("A").await;
    let b = app.create_org("B").await;
    app.post(&a, "/byok").json(&json!({"provider": "openai", "api_key": OPENAI_KEY})).send().await.unwrap();
    let v: Value = app.get(&b, "/byok").send().await.unwrap().json().await.unwrap();
    assert!(v["credentials"].as_array().unwrap().is_empty());
    assert_eq!(v["byok_keys"]["openai_secret_id"], Value::Null);
    assert_eq!(app.delete(&b, "/byok/openai").send().await.unwrap().status(), 404);
    let audit: Value = app.get(&b, "/audit").send().await.unwrap().json().await.unwrap();
    assert!(audit["audit"].as_array().unwrap().is_empty());
    let v: Value = app.get(&a, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["credentials"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn set_operations_are_rate_limited_per_org() {
    let app = spawn_with(Options::default().env("CALLGATE_BYOK_RATE_LIMIT_PER_MINUTE", "3")).await;
    let a = app.create_org("A").await;
    let b = app.create_org("B").await;
    for _ in 0..3 {
        let res =
            app.post(&a, "/byok").json(&json!({"provider": "openai", "api_key": OPENAI_KEY})).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = app.post(&a, "/byok").json(&json!({"provider": "openai", "api_key": OPENAI_KEY})).send().await.unwrap();
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(error_code(res).await, "rate_limited");
    let res = app.post(&b, "/byok").json(&json!({"provider": "openai", "api_key": OPENAI_KEY})).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_hint_shows_the_published_prefix_and_four_characters_never_the_keys_own_head() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    for (provider, key, hint) in [
        // No published prefix: where the dash falls says nothing of what is public.
        ("cohere", "abcdefgh-ijklmnop", "...mnop"),
        ("anthropic", "sk-ant-api03-secretpart0000WxYz", "sk-ant-...WxYz"),
        ("openai", "sk-proj-secretpart0000AbCd", "sk-...AbCd"),
    ] {
        let res = app.post(&org, "/byok").json(&json!({"provider": provider, "api_key": key})).send().await.unwrap();
        assert_eq!(res.status(), 200, "{provider}");
        let listed: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
        let shown = listed["credentials"].as_array().unwrap().iter().find(|c| c["provider"] == provider).unwrap();
        assert_eq!(shown["hint"], hint, "{provider}");
    }
}
