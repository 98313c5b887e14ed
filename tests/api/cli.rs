//! The operator commands, run as the real binary on a data dir.

use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::*;

/// The CLI on `data_dir`, with the master key from its file.
fn command(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callgate"));
    cmd.env("CALLGATE_DATA_DIR", data_dir)
        .env("CALLGATE_LOG", "warn")
        .env_remove("CALLGATE_MASTER_KEY")
        .env_remove("CALLGATE_NEW_MASTER_KEY");
    cmd
}

fn callgate(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    command(data_dir).args(args).output().expect("run callgate")
}

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("{name} missing in {out}"))
}

#[test]
fn check_removes_its_copy_and_the_copies_of_checks_killed_before_they_could() {
    let dir = tempfile::tempdir().unwrap();
    assert!(callgate(dir.path(), &["org", "create", "Acme"]).status.success());
    let tmp = tempfile::tempdir().unwrap();
    // What a check killed midway leaves: a copy of sled's files, its lock file no longer held.
    let killed = tmp.path().join("callgate-check-AbC123");
    std::fs::create_dir(&killed).unwrap();
    std::fs::write(killed.join("inspection.lock"), b"").unwrap();
    std::fs::write(killed.join("db"), b"a copy of the configuration").unwrap();
    let unrelated = tmp.path().join("other-tool-dir");
    std::fs::create_dir(&unrelated).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .arg("check")
        .env("CALLGATE_DATA_DIR", dir.path())
        .env("CALLGATE_LOG", "warn")
        .env("TMPDIR", tmp.path())
        .env_remove("CALLGATE_MASTER_KEY")
        .output()
        .expect("run callgate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok:"));
    let left: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["other-tool-dir"], "the killed check's copy and this check's own are gone");
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
async fn serve_refuses_a_master_key_that_cannot_open_the_stored_secrets() {
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let secret = "sk-key-check-0000000000000000Zz9";
    let res = app.post(&org, "/byok").json(&json!({"provider": "openai", "api_key": secret})).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let data_dir = app.data_dir.clone();
    let env = app.env.clone();
    let _dir = app.stop().await;
    let key_file = data_dir.join("master.key");
    let key = std::fs::read_to_string(&key_file).unwrap();
    let serve = |master_key: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callgate"));
        cmd.arg("serve")
            .env("CALLGATE_DATA_DIR", &data_dir)
            .env("CALLGATE_LISTEN", "127.0.0.1:0")
            .env("CALLGATE_LOG", "warn")
            .env_remove("CALLGATE_MASTER_KEY");
        if let Some(k) = master_key {
            cmd.env("CALLGATE_MASTER_KEY", k);
        }
        // A server that starts after all would serve forever: it is given 20 s to exit.
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("callgate serve started with a master key that cannot open the stored secrets");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };

    // The key file lost: no new key is made in its place.
    std::fs::rename(&key_file, data_dir.join("master.key.bak")).unwrap();
    let (code, err) = serve(None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("master.key is missing") && err.contains("1 stored secret(s)"), "{err}");
    assert!(!key_file.exists(), "no key was generated");
    std::fs::rename(data_dir.join("master.key.bak"), &key_file).unwrap();

    // Another key given: refused, naming both keys by their ids and neither by its value.
    let other = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [9u8; 32]);
    let (code, err) = serve(Some(&other));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not the one 1 stored secret(s) were sealed under (mk_"), "{err}");
    assert!(!err.contains(&other) && !err.contains(key.trim()), "{err}");
    let out = callgate(&data_dir, &["check"]);
    assert!(out.status.success(), "the key file still opens them: {}", String::from_utf8_lossy(&out.stderr));

    // The right key given as a setting opens them.
    let app =
        spawn_on_with(&data_dir, env.into_iter().chain([("CALLGATE_MASTER_KEY".into(), key.trim().into())]).collect())
            .await;
    let rec = app.state.store.secrets_all().unwrap().pop().unwrap();
    assert_eq!(app.state.vault.open(&rec).unwrap().expose(), secret);
    app.stop().await;
}

#[test]
fn commands_on_a_path_with_no_data_say_so_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("dat");
    let out = callgate(&typo, &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no callgate data at") && err.contains("nothing to work on"), "{err}");
    assert!(!typo.exists(), "no data dir, no master key made");
    // So do the other commands that read or change what is there.
    for args in [&["org", "list"][..], &["keys", "rotate"][..]] {
        let out = callgate(&typo, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no callgate data at"), "{args:?}");
        assert!(!typo.exists(), "{args:?} made a data dir");
    }
    // An empty setting is not the working directory.
    let out = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(["org", "list"])
        .env("CALLGATE_DATA_DIR", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CALLGATE_DATA_DIR"));
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

/// A rotation stopped between re-sealing the records and installing its key leaves the key in
/// `master.key.next`, and the records under it alone. The next rotation finishes that one with
/// that key: it once wrote a new key over it, and failing before its own end (here on a record
/// it cannot re-seal) left the records under a key that existed nowhere.
#[tokio::test]
async fn a_rotation_that_did_not_finish_is_finished_with_its_own_key() {
    let (dir, _org, _ids) = data_dir_with_events().await;
    let data_dir = dir.path();
    let first = std::fs::read(data_dir.join("master.key")).unwrap();
    let out = callgate(data_dir, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated = std::fs::read(data_dir.join("master.key")).unwrap();
    // As the first rotation's crash would have left it: the old key installed, the new one next.
    std::fs::write(data_dir.join("master.key.next"), &rotated).unwrap();
    std::fs::write(data_dir.join("master.key"), &first).unwrap();

    // A record that cannot be re-sealed (its wrapped key altered) stops the next rotation.
    let app = spawn_on(data_dir).await;
    let mut rec = app.state.store.secrets_all().unwrap().pop().unwrap();
    rec.sealed.wrapped_dek[0] ^= 1;
    let phone = app.state.store.phone_list(&rec.org_id, None, None, 10).unwrap().pop().unwrap();
    assert!(app.state.store.phone_update(&phone, Some(&rec)).unwrap());
    let _dir = app.stop().await;
    let out = callgate(data_dir, &["keys", "rotate", "--new-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without --new-key to finish it first"));
    let out = callgate(data_dir, &["keys", "rotate"]);
    assert!(!out.status.success(), "the altered record cannot be re-sealed");
    assert!(String::from_utf8_lossy(&out.stdout).contains("finishing a rotation that did not finish"));
    assert_eq!(std::fs::read(data_dir.join("master.key.next")).unwrap(), rotated, "the pending key is kept");
}

/// A data dir callgate makes is its owner's alone: it holds every webhook's body.
#[cfg(unix)]
#[test]
fn a_data_dir_callgate_makes_is_readable_by_its_owner_alone() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("fresh");
    let out = callgate(&data_dir, &["org", "create", "Acme"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&data_dir).unwrap().permissions().mode() & 0o777, 0o700);
}

/// The new key can come from the environment, where other local users cannot read it (a
/// command line they can).
#[tokio::test]
async fn keys_rotate_takes_the_new_key_from_the_environment() {
    let (dir, _org, _ids) = data_dir_with_events().await;
    let before = std::fs::read_to_string(dir.path().join("master.key")).unwrap();
    // A key of a few byte values is no random key, and is refused before anything is written.
    for weak in ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "MDEyMzAxMjMwMTIzMDEyMzAxMjMwMTIzMDEyMzAxMjM="] {
        let out = command(dir.path()).args(["keys", "rotate"]).env("CALLGATE_NEW_MASTER_KEY", weak).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("is not random"), "{stderr}");
        assert!(!stderr.contains(weak), "{stderr}");
        assert_eq!(std::fs::read_to_string(dir.path().join("master.key")).unwrap(), before);
        assert!(!dir.path().join("master.key.next").exists());
    }
    let key = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=";
    let out = command(dir.path()).args(["keys", "rotate"]).env("CALLGATE_NEW_MASTER_KEY", key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("master.key")).unwrap().trim(), key);
    let out = callgate(dir.path(), &["check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[cfg(unix)]
#[test]
fn a_key_file_others_may_read_is_made_private_and_a_key_file_the_variable_overrides_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path();
    let out = callgate(data_dir, &["org", "create", "Acme"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key_file = data_dir.join("master.key");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_file), 0o600);

    // A restore under a loose umask: the key is still used, the file made private, and said.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = callgate(data_dir, &["org", "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Acme"), "{stderr}");
    assert!(stderr.contains("other users could read this key file") && stderr.contains("master.key"), "{stderr}");
    assert!(!stderr.contains(std::fs::read_to_string(&key_file).unwrap().trim()), "the key itself is never shown");
    assert_eq!(mode(&key_file), 0o600);
    let out = callgate(data_dir, &["org", "list"]);
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));

    // Under CALLGATE_MASTER_KEY the file is not the key: one that holds another is named.
    let with_key =
        |key: &str| command(data_dir).args(["org", "list"]).env("CALLGATE_MASTER_KEY", key).output().unwrap();
    let same = std::fs::read_to_string(&key_file).unwrap();
    let out = with_key(same.trim());
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = with_key("AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("this master key file holds another key: it is not used"), "{stderr}");
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

    // A mistyped data dir gets no secret of its own, which the server would never sign with.
    let nowhere = tempfile::tempdir().unwrap().path().join("none");
    let out = callgate(&nowhere, &["upstream", "secret"]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no callgate data at") && err.contains("CALLGATE_UPSTREAM_SECRET"), "{err}");
    assert!(!nowhere.exists(), "nothing was made");
}

/// Every file under `dir` with its size and SHA-256, to tell whether anything changed.
fn tree(dir: &std::path::Path) -> std::collections::BTreeMap<std::path::PathBuf, (usize, String)> {
    use sha2::Digest;
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(tree(&path));
        } else {
            let bytes = std::fs::read(&path).unwrap();
            out.insert(path.clone(), (bytes.len(), hex::encode(sha2::Sha256::digest(&bytes))));
        }
    }
    out
}

/// A stopped server's data dir with two recorded Twilio status callbacks, and their event ids.
async fn data_dir_with_events() -> (tempfile::TempDir, Org, Vec<String>) {
    use callgate::carriers::twilio::signature::{sign, TwilioKey};
    const TOKEN: &str = "checkTwilioToken0000000000";
    let app = spawn_app().await;
    let org = app.create_org("Acme").await;
    let cred = json!({"account_sid": "AC0123456789abcdef0123456789abcd55", "auth_token": TOKEN});
    let phone = insert_phone(
        app.state.store.as_ref(),
        &app.state.vault,
        &org.id,
        callgate::domain::Carrier::Twilio,
        "+14155550177",
        &cred,
        Default::default(),
        app.clock.now_ms(),
    );
    let path = format!("/twilio/status/{}", phone.id);
    for call in ["CACHECK0", "CACHECK1"] {
        let params = [("CallSid", call), ("CallStatus", "completed"), ("To", "+14155550177")];
        let sig = sign(&TwilioKey::new(TOKEN.as_bytes()), &format!("https://gw.example.com{path}"), &params);
        let res = app.client.post(app.url(&path)).header("x-twilio-signature", sig).form(&params).send().await.unwrap();
        assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    }
    let ids = listed_events(&app, &org).await;
    assert_eq!(ids.len(), 2);
    let dir = app.stop().await.unwrap();
    (dir, org, ids)
}

async fn listed_events(app: &TestApp, org: &Org) -> Vec<String> {
    let events: Value = app.get(org, "/events").send().await.unwrap().json().await.unwrap();
    let mut ids: Vec<String> =
        events["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_owned()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn check_changes_nothing_and_reports_a_torn_write_that_the_next_start_cuts() {
    let (dir, org, ids) = data_dir_with_events().await;
    // A crash in the middle of a batch's write: some of its pages reached the disk, the first
    // did not. It lies past the batches written before it, in prepared zeros or appended.
    // The last segment: the first events may have gone to segment 0 or, once the spare was
    // ready, to the next.
    let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("db/events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let segment = segments.pop().unwrap();
    let no: u32 = segment.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let end = bytes.iter().rposition(|b| *b != 0).unwrap() + 64;
    bytes.resize(bytes.len().max(end + 40), 0);
    bytes[end..end + 40].fill(0xAB);
    std::fs::write(&segment, &bytes).unwrap();
    let before = tree(dir.path());

    let out = callgate(dir.path(), &["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let note = text.lines().next().unwrap();
    assert!(
        note.starts_with(&format!("note: journal segment {no} ends in a write torn by a crash, at byte ")),
        "{text}"
    );
    assert!(text.lines().nth(1).unwrap().starts_with("ok:"), "{text}");
    let at: u64 = note.split("at byte ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(at < end as u64, "{note}");
    assert_eq!(tree(dir.path()), before, "check changed the data dir");

    // The server cuts what check reported, and keeps every acknowledged event.
    let app = spawn_on(dir.path()).await;
    assert_eq!(listed_events(&app, &org).await, ids);
    let _dir = app.stop().await;
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), at, "the tear was cut");
    let out = callgate(dir.path(), &["check"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().next().unwrap().get(..3), Some("ok:"));
    drop(dir);
}

#[tokio::test]
async fn check_refuses_while_a_server_runs_and_makes_no_master_key() {
    let (dir, org, ids) = data_dir_with_events().await;
    let app = spawn_on(dir.path()).await;
    let out = callgate(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("locked by a running callgate server"), "{err}");
    let _dir = app.stop().await;

    // No key file and no secret sealed: check does not make one, as serve would.
    let key = dir.path().join("master.key");
    let no_secrets = tempfile::tempdir().unwrap();
    let out = callgate(no_secrets.path(), &["org", "create", "Bare"]);
    assert!(out.status.success());
    std::fs::remove_file(no_secrets.path().join("master.key")).unwrap();
    let before = tree(no_secrets.path());
    let out = callgate(no_secrets.path(), &["check"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tree(no_secrets.path()), before, "check made a key or changed the data");

    // A number's sealed credential with its key gone: reported, and no key made.
    std::fs::rename(&key, dir.path().join("master.key.bak")).unwrap();
    let out = callgate(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("master.key is missing"));
    assert!(!key.exists());
    std::fs::rename(dir.path().join("master.key.bak"), &key).unwrap();
    let app = spawn_on(dir.path()).await;
    assert_eq!(listed_events(&app, &org).await, ids);
    app.stop().await;
}

#[tokio::test]
async fn check_opens_every_stored_secret_and_names_one_that_was_altered() {
    let (dir, _org, _ids) = data_dir_with_events().await;
    let out = callgate(dir.path(), &["check"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("the master key opens every stored secret (1)"), "{text}");

    // One byte of the sealed credential flipped, as a damaged disk or a hand edit would.
    let app = spawn_on(dir.path()).await;
    let mut rec = app.state.store.secrets_all().unwrap().pop().unwrap();
    rec.sealed.ciphertext[0] ^= 1;
    let org_id = rec.org_id.clone();
    let phone = app.state.store.phone_list(&org_id, None, None, 10).unwrap().pop().unwrap();
    assert!(app.state.store.phone_update(&phone, Some(&rec)).unwrap());
    let _dir = app.stop().await;

    let out = callgate(dir.path(), &["check"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.trim(),
        format!(
            "secret {} (twilio, {org_id}): a secret could not be opened (wrong master key, or the record was altered or moved)",
            rec.id
        )
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 problem(s) found"));
}
