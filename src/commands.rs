//! Operator commands that run against the data dir while the server is stopped, and the
//! fixture tools, which need neither.

use std::io::Write;

use anyhow::Context;

use crate::cli::{FixturesCommand, KeysCommand, OrgCommand, ReplayArgs, UpstreamCommand, VobizFormArg};
use crate::clock::{rfc3339, Clock};
use crate::settings::{MasterKeyInput, Settings};
use crate::startup::{keyring_for, open_data};
use crate::store::{SledStore, Store, StoreError};
use crate::vault::crypto::{generate_key, read_key_file, write_key_file, Keyring, Owner, KEY_FILE, NEXT_KEY_FILE};

fn locked_hint(e: anyhow::Error) -> anyhow::Error {
    locked_then(e, "")
}

/// `e`, or for a database a running server holds, what to do: stop it first, and `or` else.
fn locked_then(e: anyhow::Error, or: &str) -> anyhow::Error {
    if e.downcast_ref::<StoreError>().is_some_and(|s| matches!(s, StoreError::Locked)) {
        anyhow::anyhow!("the database is locked by a running callgate server; stop it first{or}")
    } else {
        e
    }
}

/// Commands that read or change what is there refuse a data dir that is not: opening a
/// mistyped path would create a database and a master key there, and report on them.
fn existing_data(settings: &Settings) -> anyhow::Result<()> {
    if !settings.data_dir.join("db").is_dir() {
        anyhow::bail!("no callgate data at {} (CALLGATE_DATA_DIR): nothing to work on", settings.data_dir.display());
    }
    Ok(())
}

pub fn org(settings: &Settings, cmd: OrgCommand) -> anyhow::Result<()> {
    if matches!(cmd, OrgCommand::List) {
        existing_data(settings)?;
    }
    // Organizations can be made while the server runs, through it.
    let (store, _) = open_data(settings).map_err(|e| locked_then(e, ", or use its admin API (/admin/orgs)"))?;
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
    existing_data(settings)?;
    let (store, old_ring) = open_data(settings).map_err(locked_hint)?;
    let from_env = settings.master_key.is_some();
    let next_path = settings.data_dir.join(NEXT_KEY_FILE);
    // A rotation stopped before its end left its new key here, and records may be sealed under
    // it alone: it is finished, with that key, before any other is made. Written over, the key
    // would exist only in this process until the records were re-sealed, and a failure before
    // then would leave them under a key that exists nowhere.
    let pending = if from_env || !next_path.exists() {
        None
    } else {
        Some(read_key_file(&next_path).context("reading the new master key of a rotation that did not finish")?)
    };
    let finishing = pending.is_some();
    let new_key = match (new_key, from_env, pending) {
        (None, false, Some(pending)) => {
            println!("finishing a rotation that did not finish: its new key is in {NEXT_KEY_FILE}");
            pending
        }
        (Some(_), false, Some(_)) => anyhow::bail!(
            "a rotation that did not finish left its new key in {NEXT_KEY_FILE}: run `callgate keys rotate` without --new-key to finish it first"
        ),
        (Some(k), _, _) => {
            let k = MasterKeyInput::parse_base64("--new-key", &k).map_err(|e| anyhow::anyhow!("{e}"))?.0;
            if crate::vault::crypto::patterned(&k) {
                anyhow::bail!("{}", crate::vault::crypto::VaultError::Patterned("--new-key".into()));
            }
            k
        }
        (None, false, None) => generate_key(),
        (None, true, _) => anyhow::bail!(
            "the master key comes from CALLGATE_MASTER_KEY: pass --new-key <base64 of 32 bytes>, then set CALLGATE_MASTER_KEY to it"
        ),
    };
    if !from_env && !finishing {
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
        let key_path = settings.data_dir.join(KEY_FILE);
        std::fs::rename(&next_path, &key_path).context("installing the new master key")?;
        crate::private_file::sync_parent(&key_path).context("installing the new master key")?;
        println!("re-wrapped {} secret(s) under master key {}", rewrapped.len(), ring.current_id());
    }
    Ok(())
}

pub fn fixtures(cmd: FixturesCommand) -> anyhow::Result<()> {
    let FixturesCommand::Sign(a) = cmd;
    let carrier = a.carrier.parse().map_err(|e| anyhow::anyhow!("--carrier: {e}"))?;
    let text = std::fs::read_to_string(&a.credential)
        .with_context(|| format!("reading the credential {}", a.credential.display()))?;
    let credential = serde_json::from_str(&text).context("the credential file is not JSON")?;
    let body = match (&a.body, &a.body_file) {
        (Some(b), _) => b.clone(),
        (None, Some(path)) => {
            String::from_utf8(std::fs::read(path).with_context(|| format!("reading the body {}", path.display()))?)
                .context("the body is not UTF-8")?
        }
        (None, None) => String::new(),
    };
    let fixture = crate::fixtures::sign(&crate::fixtures::SignRequest {
        carrier: Some(carrier),
        credential,
        method: a.method,
        url: a.url,
        body,
        content_type: a.content_type,
        nonce: a.nonce,
        timestamp: a.timestamp,
        seed: a.seed,
        vobiz_form: match a.vobiz_form {
            VobizFormArg::Docs => crate::fixtures::VobizForm::Docs,
            VobizFormArg::Sdk => crate::fixtures::VobizForm::Sdk,
        },
        now: a.now,
        number: a.number,
        phone_id: None,
    })?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&fixture)?)?;
    Ok(())
}

pub fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let fixtures = if a.dir.is_file() {
        let text = std::fs::read_to_string(&a.dir).with_context(|| format!("reading {}", a.dir.display()))?;
        let f = serde_json::from_str(&text).with_context(|| format!("parsing {}", a.dir.display()))?;
        let name = a.dir.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        vec![(name, f)]
    } else {
        crate::fixtures::load_dir(&a.dir)?
    };
    if fixtures.is_empty() {
        anyhow::bail!("no fixtures under {}", a.dir.display());
    }
    let opts = crate::fixtures::ReplayOptions { fresh_timestamps: a.fresh_timestamps, now: None };
    let verdicts = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(crate::fixtures::replay(&fixtures, &a.target, opts));
    let mut out = std::io::stdout().lock();
    for v in &verdicts {
        writeln!(out, "{v}")?;
    }
    if verdicts.last().is_some_and(|v| v.unreachable) {
        anyhow::bail!("nothing answers at {}: is callgate running there? No other fixture was sent", a.target);
    }
    let failed = verdicts.iter().filter(|v| !v.passed).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} fixtures failed", verdicts.len());
    }
    Ok(())
}

/// Works while the server runs: the secret file is only read (or created once).
pub fn upstream(settings: &Settings, cmd: UpstreamCommand) -> anyhow::Result<()> {
    let UpstreamCommand::Secret = cmd;
    // Made in a mistyped data dir, a secret would be one the server never signs with.
    if settings.handoff.upstream_secret.is_none() && !settings.data_dir.join("db").is_dir() {
        anyhow::bail!(
            "no callgate data at {} (CALLGATE_DATA_DIR): start the gateway there first (it makes the secret), \
             or set CALLGATE_UPSTREAM_SECRET",
            settings.data_dir.display()
        );
    }
    let (secret, generated) = crate::handoff::load_or_create_secret(settings)?;
    if generated {
        eprintln!("generated a new upstream signing secret in {}", settings.data_dir.display());
    }
    println!("{}", secret.expose());
    Ok(())
}

/// Where a salvage writes the new journal before it takes the damaged one's place.
const SALVAGE_PREFIX: &str = "events.salvage-";

pub fn salvage(settings: &Settings, dry_run: bool) -> anyhow::Result<()> {
    use crate::store::salvage::{check, salvage, Salvage};
    existing_data(settings)?;
    let db = settings.data_dir.join("db");
    // Held to the end: no server starts on the journal while it is being replaced.
    let _lock = SledStore::hold_stopped(&db, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| locked_hint(e.into()))?;
    let events = db.join("events");
    if !events.is_dir() {
        anyhow::bail!("no event journal at {}: nothing to salvage", events.display());
    }
    // Beside the database, not in it: `check` copies what is in it.
    let beside = &settings.data_dir;
    settle_leftovers(beside, &events)?;
    let options = settings.journal;
    let found = salvage(&events, None, options)?;
    for d in &found.damaged {
        println!("damaged: segment {}, {} bytes from byte {}", d.segment, d.bytes, d.at);
    }
    for (first, last) in &found.missing_segments {
        match first == last {
            true => println!("missing: segment {first}"),
            false => println!("missing: segments {first} to {last}"),
        }
    }
    if let Some(t) = found.torn {
        println!(
            "note: segment {} ends in a write torn by a crash, {} bytes from byte {} (never acknowledged)",
            t.segment, t.bytes, t.at
        );
    }
    if !found.needed() {
        println!("nothing to salvage: every record of the journal reads back ({} events)", found.events);
        return Ok(());
    }
    let lost = |f: &Salvage| {
        let older = match f.older_json {
            0 => String::new(),
            n => format!(" ({n} of them with their event's earlier JSON: a later one was lost)"),
        };
        format!(
            "{} records kept{older} ({} events); {} unreadable or cut off from their event, {}{} lost in the damage",
            f.records,
            f.events,
            f.dropped,
            if f.lost_unknown { "at least " } else { "" },
            f.lost
        )
    };
    if dry_run {
        println!("would keep: {}", lost(&found));
        return Ok(());
    }
    let stamp = Clock::system().now_ms();
    let fresh = beside.join(format!("{SALVAGE_PREFIX}{stamp}"));
    let kept = salvage(&events, Some(&fresh), options).and_then(|kept| check(&fresh).map(|()| kept));
    let kept = match kept {
        Ok(kept) => kept,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(anyhow::Error::from(e).context("the salvaged journal did not check out; nothing was changed"));
        }
    };
    let damaged = format!("events.damaged-{stamp}");
    let note = serde_json::json!({
        "salvaged_at": rfc3339(stamp),
        "damaged_journal": damaged,
        "records_kept": kept.records,
        "events_kept": kept.events,
        "records_dropped": kept.dropped,
        "records_lost": kept.lost,
        "records_lost_at_least": kept.lost_unknown,
    });
    let mut f = std::fs::File::create(fresh.join(SALVAGE_NOTE))?;
    f.write_all(format!("{note:#}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::File::open(&fresh)?.sync_all()?;
    // Swapped in one step: a crash leaves either journal in place, never none.
    let swapped =
        rustix::fs::renameat_with(rustix::fs::CWD, &fresh, rustix::fs::CWD, &events, rustix::fs::RenameFlags::EXCHANGE);
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&fresh);
        return Err(anyhow::Error::from(e).context("cannot swap the salvaged journal in; nothing was changed"));
    }
    std::fs::rename(&fresh, beside.join(&damaged))?;
    std::fs::File::open(&db)?.sync_all()?;
    std::fs::File::open(beside)?.sync_all()?;
    println!("salvaged: {}", lost(&kept));
    println!(
        "the damaged journal is kept at {}; the next start rebuilds the event index from the new one",
        beside.join(&damaged).display()
    );
    Ok(())
}

/// The note a salvage leaves in the journal it wrote, once that journal is complete.
const SALVAGE_NOTE: &str = "SALVAGED.json";

/// Finishes or undoes what a salvage stopped midway left beside the database. A salvage writes
/// its journal as `events.salvage-T`, adds the note naming `events.damaged-T` once it is
/// complete, exchanges it with `db/events`, then renames what it swapped out `events.damaged-T`.
/// So a leftover is the damaged journal, swapped out, if the journal in place has the note
/// naming it; otherwise the swap never happened, the damaged journal is still in place, and the
/// leftover is a new journal, finished or not, which goes.
fn settle_leftovers(beside: &std::path::Path, events: &std::path::Path) -> anyhow::Result<()> {
    let in_place: Option<serde_json::Value> =
        std::fs::read(events.join(SALVAGE_NOTE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    for entry in std::fs::read_dir(beside)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(stamp) = name.strip_prefix(SALVAGE_PREFIX) else { continue };
        let path = beside.join(&name);
        let damaged = format!("events.damaged-{stamp}");
        // Only the swap brings a note naming this run into place (a journal swapped out may
        // carry the note of an earlier salvage, naming another).
        if in_place.as_ref().is_some_and(|n| n["damaged_journal"] == damaged.as_str()) {
            std::fs::rename(&path, beside.join(&damaged))?;
            println!("moved {name}, the damaged journal an earlier salvage swapped out, to {damaged}");
        } else {
            std::fs::remove_dir_all(&path)?;
            println!("removed {name}, a new journal an earlier salvage did not finish");
        }
    }
    std::fs::File::open(beside)?.sync_all()?;
    Ok(())
}

pub fn check(settings: &Settings) -> anyhow::Result<()> {
    existing_data(settings)?;
    let store = SledStore::inspect(&settings.data_dir.join("db")).map_err(|e| locked_hint(e.into()))?;
    // Without a key or a secret there is nothing to open, and a key would be made.
    let secrets = store.secrets_all()?;
    let no_key = settings.master_key.is_none() && !settings.data_dir.join(KEY_FILE).exists();
    let mut unopened = Vec::new();
    if !(no_key && secrets.is_empty()) {
        // Every secret is opened, not only matched to its key by id: an altered record fails.
        let vault = crate::vault::Vault::new(keyring_for(settings, &store)?);
        for rec in &secrets {
            if let Err(e) = vault.open(rec) {
                unopened.push(format!("secret {} ({}, {}): {e}", rec.id, rec.provider, rec.org_id));
            }
        }
    }
    if let Some(t) = store.torn_tail() {
        // Not a problem: a write a crash cut short was never acknowledged to anyone.
        println!(
            "note: journal segment {} ends in a write torn by a crash, at byte {} ({} bytes, never \
             acknowledged); the server's next start cuts it",
            t.segment, t.at, t.bytes
        );
    }
    let mut problems = store.verify_integrity()?;
    problems.extend(unopened);
    if problems.is_empty() {
        println!(
            "ok: every record has its indexes, every event its delivery record, and the master key opens \
             every stored secret ({})",
            secrets.len()
        );
        return Ok(());
    }
    for p in &problems {
        println!("{p}");
    }
    anyhow::bail!("{} problem(s) found", problems.len())
}
