//! Operator commands that run against the data dir while the server is stopped.

use anyhow::Context;

use crate::cli::{KeysCommand, OrgCommand};
use crate::clock::{rfc3339, Clock};
use crate::settings::{MasterKeyInput, Settings};
use crate::startup::open_data;
use crate::store::StoreError;
use crate::vault::crypto::{generate_key, write_key_file, Keyring, Owner, KEY_FILE, NEXT_KEY_FILE};

fn locked_hint(e: anyhow::Error) -> anyhow::Error {
    if e.downcast_ref::<StoreError>().is_some_and(|s| matches!(s, StoreError::Locked)) {
        anyhow::anyhow!("the database is locked by a running callgate server; stop it first, or use the HTTP admin API")
    } else {
        e
    }
}

pub fn org(settings: &Settings, cmd: OrgCommand) -> anyhow::Result<()> {
    let (store, _) = open_data(settings).map_err(locked_hint)?;
    match cmd {
        OrgCommand::Create { name } => {
            let name = crate::orgs::validate_name(&name).map_err(|e| anyhow::anyhow!(e.message))?;
            let c = crate::orgs::create(store.as_ref(), name, Clock::system().now_ms())?;
            store.flush()?;
            println!(
                "org_id:  {}\nkey_id:  {}\napi_key: {}\n(the API key is shown once; keep it)",
                c.org.id, c.key_id, c.api_key
            );
        }
        OrgCommand::List => {
            for o in store.org_list()? {
                println!("{}\t{}\t{}", o.id, rfc3339(o.created_at_ms), o.name);
            }
        }
    }
    Ok(())
}

pub fn keys(settings: &Settings, cmd: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::Rotate { new_key } = cmd;
    let (store, old_ring) = open_data(settings).map_err(locked_hint)?;
    let from_env = settings.master_key.is_some();
    let new_key = match (new_key, from_env) {
        (Some(k), _) => MasterKeyInput::parse_base64("--new-key", &k).map_err(|e| anyhow::anyhow!("{e}"))?.0,
        (None, false) => generate_key(),
        (None, true) => anyhow::bail!(
            "the master key comes from CALLGATE_MASTER_KEY: pass --new-key <base64 of 32 bytes>, then set CALLGATE_MASTER_KEY to it"
        ),
    };
    let next_path = settings.data_dir.join(NEXT_KEY_FILE);
    if !from_env {
        // The new key is on disk before any record depends on it.
        write_key_file(&next_path, &new_key).context("writing the new master key")?;
    }
    let mut ring = Keyring::from_key(new_key.clone());
    for k in old_ring.all_keys() {
        ring.add(k);
    }
    let mut rewrapped = Vec::new();
    for mut rec in store.secrets_all()? {
        rec.sealed = ring
            .rewrap(&Owner { org: &rec.org_id, provider: &rec.provider, secret: &rec.id }, &rec.sealed)
            .with_context(|| format!("re-wrapping secret {}", rec.id))?;
        rewrapped.push(rec);
    }
    store.secrets_rewrite(&rewrapped)?;
    if from_env {
        println!(
            "re-wrapped {} secret(s) under master key {}; now set CALLGATE_MASTER_KEY to the new key",
            rewrapped.len(),
            ring.current_id()
        );
    } else {
        std::fs::rename(&next_path, settings.data_dir.join(KEY_FILE)).context("installing the new master key")?;
        println!("re-wrapped {} secret(s) under master key {}", rewrapped.len(), ring.current_id());
    }
    Ok(())
}
