//! The operator commands, run as the real binary on a data dir.

use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::*;

fn callgate(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(args)
        .env("CALLGATE_DATA_DIR", data_dir)
        .env("CALLGATE_LOG", "warn")
        .env_remove("CALLGATE_MASTER_KEY")
        .output()
        .expect("run callgate")
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("{name} missing in {out}"))
}

#[tokio::test]
async fn org_create_and_list_work_on_a_stopped_servers_data_dir_and_the_key_works() {
    let dir = tempfile::tempdir().unwrap();
    let out = callgate(dir.path(), &["org", "create", "Acme Voice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let org_id = field(&text, "org_id:").to_owned();
    let key = field(&text, "api_key:").to_owned();
    assert!(org_id.starts_with("org_") && key.starts_with("cg_"));

    let out = callgate(dir.path(), &["org", "list"]);
    let listed = String::from_utf8(out.stdout).unwrap();
    let out = callgate(dir.path(), &["check"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
    assert!(listed.contains(&org_id) && listed.contains("Acme Voice"));

    let app = spawn_on(dir.path()).await;
    let org = Org { id: org_id, key };
    assert_eq!(app.get(&org, "/byok").send().await.unwrap().status(), 200);

    // While the server holds the database, the CLI says so instead of failing obscurely.
    let out = callgate(dir.path(), &["org", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked by a running callgate server"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn bad_settings_stop_start_up_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value) in [
        ("CALLGATE_TRUSTED_PROXIES", "10.0.0.0/99"),
        ("EXOTEL_ALLOWED_IPS", "exotel.example"),
        ("CALLGATE_MASTER_KEY", "dG9vLXNob3J0"),
        ("CALLGATE_LISTEN", "localhost"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
            .arg("serve")
            .env("CALLGATE_DATA_DIR", dir.path())
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(name), "{err}");
    }
    // Nothing was started or created.
    assert!(!dir.path().join("db").exists());
}

#[tokio::test]
async fn keys_rotate_rewraps_every_secret_without_changing_it() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let secret = "sk-rotate-me-0000000000000000Zz9";
    let res = app.post(&org, "/byok").json(&json!({"provider": "openai", "api_key": secret})).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let data_dir = app.data_dir.clone();
    let old_key = std::fs::read_to_string(data_dir.join("master.key")).unwrap();
    let before: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    let env = app.env.clone();
    let _dir = app.stop().await;

    let out = callgate(&data_dir, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-wrapped 1 secret"));
    let new_key = std::fs::read_to_string(data_dir.join("master.key")).unwrap();
    assert_ne!(old_key, new_key);
    assert!(!data_dir.join("master.key.next").exists());

    let app = spawn_on_with(&data_dir, env).await;
    let after: Value = app.get(&org, "/byok").send().await.unwrap().json().await.unwrap();
    assert_eq!(before, after);
    let rec = app.state.store.secrets_all().unwrap().pop().unwrap();
    assert_eq!(app.state.vault.open(&rec).unwrap().expose(), secret);
    assert_eq!(rec.sealed.master_key_id, app.state.vault.keyring().current_id());
    app.stop().await;
}

#[tokio::test]
async fn upstream_secret_is_generated_once_and_shown() {
    let app = spawn_app().await;
    let file = std::fs::read_to_string(app.data_dir.join("upstream.secret")).unwrap();
    let out = callgate(&app.data_dir, &["upstream", "secret"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8(out.stdout).unwrap();
    assert_eq!(shown.trim(), file.trim());
    assert!(shown.starts_with("whsec_"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(app.data_dir.join("upstream.secret")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The variable wins over the file.
    let given = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(["upstream", "secret"])
        .env("CALLGATE_DATA_DIR", &app.data_dir)
        .env("CALLGATE_UPSTREAM_SECRET", given)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), given);
    app.stop().await;
}
