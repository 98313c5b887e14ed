use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{Db, Transactional, Tree};

use super::event_log::{Batch, EventLog};
use super::journal::{Access, TornTail};
use super::phone_cache::{By, PhoneCache};
use super::*;

const CACHE_BYTES: u64 = 8 * 1024 * 1024;

const ORGS: &str = "orgs";
const API_KEYS: &str = "api_keys";
const API_KEY_HASHES: &str = "api_key_hashes";
const SECRETS: &str = "secrets";
const BYOK: &str = "byok";
const AUDIT: &str = "audit";
const PHONES: &str = "phones";
const PHONE_NUMBERS: &str = "phone_numbers";
const ORG_PHONES: &str = "org_phones";
const DEPARTED: &str = "departed_upstreams";

/// In sled's default tree once the data dir has an event journal.
const JOURNAL_MADE: &[u8] = b"journal made";

fn dec<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&SCHEMA, rest)) => {
            serde_json::from_slice(rest).map_err(|e| StoreError::Corrupt { tree, detail: e.to_string() })
        }
        Some((v, _)) => Err(StoreError::Corrupt { tree, detail: format!("unknown schema version {v}") }),
        None => Err(StoreError::Corrupt { tree, detail: "empty value".into() }),
    }
}

/// `org_id \0 rest`: keys of per-organization indexes, so a prefix scan stays inside one org.
fn scoped(org: &OrgId, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(org.as_str().len() + 1 + rest.len());
    k.extend_from_slice(org.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(rest);
    k
}

fn prefix(org: &OrgId) -> Vec<u8> {
    scoped(org, b"")
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn tx_err(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => StoreError::Sled(e),
    }
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

pub struct SledStore {
    db: Db,
    orgs: Tree,
    api_keys: Tree,
    api_key_hashes: Tree,
    secrets: Tree,
    byok: Tree,
    audit: Tree,
    phones: Tree,
    phone_numbers: Tree,
    org_phones: Tree,
    /// Deleted numbers' own upstreams, by number id: their events may still be waiting, or be
    /// delivered again, and the gateway's upstream is not where they were going. A few dozen
    /// bytes for each deleted number, whose events are kept anyway.
    departed: Tree,
    phone_cache: PhoneCache,
    events: EventLog,
    /// Held by the writes that decide which credential a number verifies with (saving or
    /// deleting a BYOK credential, importing or updating a number) from their check of who
    /// uses it to their commit: an import that raced a delete was left on a deleted secret.
    /// Operator writes only; webhooks never take it.
    credential_writes: std::sync::Mutex<()>,
    /// Last, so that sled closes before its copy is removed.
    _inspection: Option<Inspection>,
}

/// What an inspection holds while it looks: a shared lock on the database, which keeps a
/// server from starting meanwhile (the server takes it exclusively), and the copy of sled's
/// files that it opens instead of the originals, because sled writes to whatever it opens.
struct Inspection {
    _lock: std::fs::File,
    _copy: tempfile::TempDir,
    /// Held on the copy's lock file while the copy is in use, so that a later inspection can
    /// tell a copy whose inspection was killed (its lock gone with it) and remove it.
    _copy_lock: std::fs::File,
}

/// The temporary copies inspections make, and the file each holds locked while in use.
const COPY_PREFIX: &str = "callgate-check-";
const COPY_LOCK: &str = "inspection.lock";

/// Removes the copies in `tmp` left by inspections that were killed before they could remove
/// their own. One whose lock file is not there yet may be being made; it goes after an hour.
/// Only this user's directories are looked at, and a lock file is opened only if it is a plain
/// file: the temp dir is shared, and a FIFO or a link put there must not hold the check up.
fn sweep_stale_copies(tmp: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    let me = rustix::process::geteuid().as_raw();
    for entry in entries.flatten() {
        let ours = entry.file_name().to_string_lossy().starts_with(COPY_PREFIX);
        // Not followed: a link named like a copy is not one.
        let Ok(meta) = entry.metadata() else { continue };
        if !ours || !meta.is_dir() || meta.uid() != me {
            continue;
        }
        let path = entry.path();
        let stale = match lock_file_unheld(&path.join(COPY_LOCK)) {
            Some(unheld) => unheld,
            None => meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(3600)),
        };
        if stale {
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an old inspection's copy");
            }
        }
    }
}

/// Whether the lock file at `path` is free (its inspection gone); `None` if there is no
/// plain file there to ask.
fn lock_file_unheld(path: &Path) -> Option<bool> {
    use rustix::fs::{FileType, FlockOperation, Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::open(path, flags, Mode::empty()).ok()?;
    let stat = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return None;
    }
    Some(rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive).is_ok())
}

impl SledStore {
    pub fn open(dir: &Path, journal: JournalOptions) -> Result<Self, StoreError> {
        Self::open_with(dir, dir, journal, Access::Serve, None)
    }

    /// Opens a stopped server's data to look at (`callgate check`), changing nothing in it: sled
    /// is opened on a copy of its files, and the journal is read without cutting a torn tail
    /// (see [`Self::torn_tail`]). Refused while a server runs on it. For reading only: an event
    /// written fails, and a change to the configuration lands in the copy and is dropped with it.
    pub fn inspect(dir: &Path) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| StoreError::Io { detail: e.to_string() };
        let lock = Self::hold_stopped(dir, rustix::fs::FlockOperation::NonBlockingLockShared)?;
        sweep_stale_copies(&std::env::temp_dir());
        let copy = tempfile::Builder::new().prefix(COPY_PREFIX).tempdir().map_err(io)?;
        // Locked under another name and then renamed, so that no sweep ever finds the lock
        // file there but not yet held.
        let unheld = copy.path().join("inspection.lock.new");
        let copy_lock = std::fs::File::create(&unheld).map_err(io)?;
        rustix::fs::flock(&copy_lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io(e.into()))?;
        std::fs::rename(&unheld, copy.path().join(COPY_LOCK)).map_err(io)?;
        copy_files(dir, copy.path(), "events").map_err(io)?;
        let sled_dir = copy.path().to_owned();
        Self::open_with(
            &sled_dir,
            dir,
            JournalOptions::default(),
            Access::Inspect,
            Some(Inspection { _lock: lock, _copy: copy, _copy_lock: copy_lock }),
        )
    }

    /// Locks sled's own lock file in `dir` (`how`: shared to read, exclusive to replace
    /// files), so that no server starts on the data while the lock is held. `Locked` while a
    /// server runs on it.
    pub fn hold_stopped(dir: &Path, how: rustix::fs::FlockOperation) -> Result<std::fs::File, StoreError> {
        let io = |e: std::io::Error| StoreError::Io { detail: e.to_string() };
        let lock = std::fs::File::open(dir.join("db")).map_err(io)?;
        rustix::fs::flock(&lock, how).map_err(|e| match e {
            rustix::io::Errno::WOULDBLOCK => StoreError::Locked,
            e => io(e.into()),
        })?;
        Ok(lock)
    }

    fn open_with(
        sled_dir: &Path,
        dir: &Path,
        journal: JournalOptions,
        access: Access,
        inspection: Option<Inspection>,
    ) -> Result<Self, StoreError> {
        // A bounded page cache: sled holds the configuration (orgs, secrets, numbers), not events.
        let db = sled::Config::new().path(sled_dir).cache_capacity(CACHE_BYTES).open().map_err(|e| match e {
            sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => StoreError::Locked,
            sled::Error::Io(ref io) if io.to_string().contains("lock") => StoreError::Locked,
            sled::Error::Io(io) => StoreError::Io { detail: format!("cannot open {}: {io}", sled_dir.display()) },
            other => StoreError::Sled(other),
        })?;
        let t = |name: &str| db.open_tree(name);
        let events_dir = dir.join("events");
        // sled notes that this data dir has a journal: one gone whole (deleted, a volume that
        // did not mount) leaves no snapshot to tell, and a start would begin an empty one.
        let had_journal = db.get(JOURNAL_MADE)?.is_some();
        if had_journal && super::journal::segment_numbers(&events_dir).map_or(true, |n| n.is_empty()) {
            return Err(StoreError::Corrupt {
                tree: "journal",
                detail: format!(
                    "the event journal ({}) is missing, though this data dir had one: every event is gone \
                     from it. Nothing was changed; restore it from a backup (to go on without the events, \
                     create it with one empty segment, 00000000.log)",
                    events_dir.display()
                ),
            });
        }
        let events = EventLog::open(&events_dir, journal, access)?;
        if !had_journal && access == Access::Serve {
            db.insert(JOURNAL_MADE, &[1u8])?;
            db.flush()?;
        }
        Ok(Self {
            orgs: t(ORGS)?,
            api_keys: t(API_KEYS)?,
            api_key_hashes: t(API_KEY_HASHES)?,
            secrets: t(SECRETS)?,
            byok: t(BYOK)?,
            audit: t(AUDIT)?,
            phones: t(PHONES)?,
            phone_numbers: t(PHONE_NUMBERS)?,
            org_phones: t(ORG_PHONES)?,
            departed: t(DEPARTED)?,
            phone_cache: PhoneCache::default(),
            events,
            credential_writes: std::sync::Mutex::default(),
            db,
            _inspection: inspection,
        })
    }

    /// The torn write an inspection found at the journal's end and left there.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.events.torn_tail()
    }

    fn get<T: DeserializeOwned>(tree: &Tree, name: &'static str, key: &[u8]) -> Result<Option<T>, StoreError> {
        tree.get(key)?.map(|v| dec(name, &v)).transpose()
    }

    /// Whether `secret` is the organization's saved credential for a provider, or the current or
    /// previous credential of one of its numbers other than `except`: then it must stay.
    fn named_elsewhere(&self, org: &OrgId, secret: &SecretId, except: &PhoneId) -> Result<bool, StoreError> {
        for item in self.byok.scan_prefix(prefix(org)) {
            if item?.1 == secret.as_str().as_bytes() {
                return Ok(true);
            }
        }
        for item in self.org_phones.scan_prefix(prefix(org)) {
            let (_, id) = item?;
            if let Some(p) = Self::get::<PhoneRecord>(&self.phones, PHONES, &id)? {
                let names =
                    p.credential == *secret || p.previous_credential.as_ref().is_some_and(|c| c.secret_id == *secret);
                if p.id != *except && names {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// [`Store::phone_update`] under the hold of operator writes, which the caller has.
    fn phone_write(
        &self,
        phone: &PhoneRecord,
        inline: Option<&SecretRecord>,
        _writing: &std::sync::MutexGuard<'_, ()>,
    ) -> Result<Modified, StoreError> {
        // A credential of the number's own that the update moves it off is retired until its
        // grace ends (at once if it keeps none) and then swept, as a replaced BYOK credential
        // is; otherwise a second rotation would leave it sealed with nothing naming it.
        let outgoing = match self.phone_get(&phone.org_id, &phone.id)? {
            Some(old)
                if old.credential != phone.credential
                    && !self.named_elsewhere(&phone.org_id, &old.credential, &phone.id)? =>
            {
                let until = phone
                    .previous_credential
                    .as_ref()
                    .filter(|p| p.secret_id == old.credential)
                    .map_or(phone.updated_at_ms, |p| p.valid_until_ms);
                Some((old.credential, until))
            }
            _ => None,
        };
        self.phone_cache.around(|| {
            (&self.phones, &self.secrets)
                .transaction(|(phones, secrets)| {
                    match phones.get(phone.id.as_str())? {
                        Some(raw) => match dec::<PhoneRecord>(PHONES, &raw) {
                            Ok(old) if old.org_id == phone.org_id => {
                                // A credential it moves onto must still be there: a saved one
                                // replaced or deleted since the caller read it is not, nor one
                                // kept only for others' grace (retired), which the sweep removes.
                                let given = inline.is_some_and(|s| s.id == phone.credential);
                                if old.credential != phone.credential && !given {
                                    let live = match secrets.get(phone.credential.as_str())? {
                                        Some(raw) => match dec::<SecretRecord>(SECRETS, &raw) {
                                            Ok(rec) => rec.retired_until_ms.is_none(),
                                            Err(e) => return abort(e),
                                        },
                                        None => false,
                                    };
                                    if !live {
                                        return Ok(Modified::CredentialGone);
                                    }
                                }
                                if let Some((id, until)) = outgoing.as_ref().filter(|(id, _)| *id == old.credential) {
                                    if let Some(raw) = secrets.get(id.as_str())? {
                                        let mut rec: SecretRecord = match dec(SECRETS, &raw) {
                                            Ok(r) => r,
                                            Err(e) => return abort(e),
                                        };
                                        rec.retired_until_ms = Some(*until);
                                        secrets.insert(id.as_str(), encode(&rec))?;
                                    }
                                }
                            }
                            Ok(_) => return Ok(Modified::Gone),
                            Err(e) => return abort(e),
                        },
                        None => return Ok(Modified::Gone),
                    }
                    if let Some(s) = inline {
                        secrets.insert(s.id.as_str(), encode(s))?;
                    }
                    phones.insert(phone.id.as_str(), encode(phone))?;
                    Ok(Modified::Written(Box::new(phone.clone())))
                })
                .map_err(tx_err)
        })
    }

    fn credential_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.credential_writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The organization's numbers for which `keep` holds.
    fn phones_where(&self, org: &OrgId, keep: impl Fn(&PhoneRecord) -> bool) -> Result<Vec<PhoneRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.org_phones.scan_prefix(prefix(org)) {
            let (_, id) = item?;
            if let Some(p) = Self::get::<PhoneRecord>(&self.phones, PHONES, &id)? {
                if keep(&p) {
                    out.push(p);
                }
            }
        }
        Ok(out)
    }
}

/// Copies the files under `from` to `to`, leaving out the entry named `skip` at the top.
fn copy_files(from: &Path, to: &Path, skip: &str) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_name() == skip {
            continue;
        }
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir(&target)?;
            copy_files(&entry.path(), &target, "")?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

impl Store for SledStore {
    fn health(&self) -> Result<(), StoreError> {
        self.db.get(b"__health")?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    fn org_create(&self, org: &OrgRecord, key: &ApiKeyRecord) -> Result<(), StoreError> {
        (&self.orgs, &self.api_keys, &self.api_key_hashes)
            .transaction(|(orgs, keys, hashes)| {
                orgs.insert(org.id.as_str(), encode(org))?;
                keys.insert(key.id.as_str(), encode(key))?;
                hashes.insert(&key.hash[..], key.id.as_str())?;
                Ok(())
            })
            .map_err(tx_err)
    }

    fn org_get(&self, id: &OrgId) -> Result<Option<OrgRecord>, StoreError> {
        Self::get(&self.orgs, ORGS, id.as_ref())
    }

    fn org_list(&self) -> Result<Vec<OrgRecord>, StoreError> {
        self.orgs.iter().map(|r| dec(ORGS, &r?.1)).collect()
    }

    fn api_key_add(&self, key: &ApiKeyRecord) -> Result<bool, StoreError> {
        (&self.orgs, &self.api_keys, &self.api_key_hashes)
            .transaction(|(orgs, keys, hashes)| {
                if orgs.get(key.org_id.as_str())?.is_none() {
                    return Ok(false);
                }
                keys.insert(key.id.as_str(), encode(key))?;
                hashes.insert(&key.hash[..], key.id.as_str())?;
                Ok(true)
            })
            .map_err(tx_err)
    }

    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError> {
        match self.api_key_hashes.get(hash)? {
            Some(id) => Self::get(&self.api_keys, API_KEYS, &id),
            None => Ok(None),
        }
    }

    fn api_key_revoke(&self, id: &ApiKeyId) -> Result<bool, StoreError> {
        (&self.api_keys, &self.api_key_hashes)
            .transaction(|(keys, hashes)| {
                let Some(raw) = keys.remove(id.as_str())? else { return Ok(false) };
                let rec: ApiKeyRecord = match dec(API_KEYS, &raw) {
                    Ok(r) => r,
                    Err(e) => return abort(e),
                };
                hashes.remove(&rec.hash[..])?;
                Ok(true)
            })
            .map_err(tx_err)
    }

    fn byok_put(
        &self,
        rec: &SecretRecord,
        audit: &AuditRecord,
        grace_until_ms: i64,
        checked: &[PhoneId],
    ) -> Result<Result<Option<SecretId>, Conflict>, StoreError> {
        let _writing = self.credential_writes();
        let slot = scoped(&rec.org_id, rec.provider.as_bytes());
        let old_id = match self.byok.get(&slot)? {
            Some(v) => Some(
                SecretId::parse(std::str::from_utf8(&v).unwrap_or(""))
                    .map_err(|_| StoreError::Corrupt { tree: BYOK, detail: "bad secret id".into() })?,
            ),
            None => None,
        };
        // One pass over the organization's numbers: those that verify with the old credential,
        // and those moved off it that still do until their grace ends (it is kept, retired,
        // until the last of them, as `byok_delete` keeps it).
        let (users, in_grace): (Vec<PhoneRecord>, Vec<PhoneRecord>) = match &old_id {
            Some(old) => self
                .phones_where(&rec.org_id, |p| {
                    &p.credential == old
                        || p.previous_credential
                            .as_ref()
                            .is_some_and(|c| &c.secret_id == old && c.valid_until_ms >= audit.at_ms)
                })?
                .into_iter()
                .partition(|p| &p.credential == old),
            None => (Vec::new(), Vec::new()),
        };
        if users.iter().any(|p| !checked.contains(&p.id)) {
            return Ok(Err(Conflict::CredentialChanged));
        }
        let in_grace_until =
            in_grace.iter().filter_map(|p| p.previous_credential.as_ref().map(|c| c.valid_until_ms)).max();
        // Its users move off it now and verify with it for a grace of their own.
        let retired_until = match (users.is_empty(), in_grace_until) {
            (true, until) => until,
            (false, until) => Some(until.map_or(grace_until_ms, |u| u.max(grace_until_ms))),
        };
        let audit_key = scoped(&rec.org_id, uuid::Uuid::now_v7().as_bytes());
        self.phone_cache.around(|| {
            (&self.secrets, &self.byok, &self.audit, &self.phones)
                .transaction(|(secrets, byok, audit_t, phones)| {
                    secrets.insert(rec.id.as_str(), encode(rec))?;
                    byok.insert(slot.as_slice(), rec.id.as_str())?;
                    audit_t.insert(audit_key.as_slice(), encode(audit))?;
                    if let Some(old) = &old_id {
                        match retired_until {
                            None => drop(secrets.remove(old.as_str())?),
                            Some(until) => {
                                if let Some(raw) = secrets.get(old.as_str())? {
                                    let mut old_rec: SecretRecord = match dec(SECRETS, &raw) {
                                        Ok(r) => r,
                                        Err(e) => return abort(e),
                                    };
                                    old_rec.retired_until_ms = Some(until);
                                    secrets.insert(old.as_str(), encode(&old_rec))?;
                                }
                            }
                        }
                        for p in &users {
                            let mut p = p.clone();
                            p.previous_credential =
                                Some(PreviousCredential { secret_id: old.clone(), valid_until_ms: grace_until_ms });
                            p.credential = rec.id.clone();
                            p.updated_at_ms = audit.at_ms;
                            phones.insert(p.id.as_str(), encode(&p))?;
                        }
                    }
                    Ok(())
                })
                .map_err(tx_err)
        })?;
        Ok(Ok(old_id))
    }

    fn phones_using(&self, org: &OrgId, secret: &SecretId) -> Result<Vec<PhoneRecord>, StoreError> {
        self.phones_where(org, |p| &p.credential == secret)
    }

    fn byok_delete(
        &self,
        org: &OrgId,
        provider: &str,
        audit: &AuditRecord,
    ) -> Result<Result<bool, Conflict>, StoreError> {
        let _writing = self.credential_writes();
        let slot = scoped(org, provider.as_bytes());
        let Some(raw_id) = self.byok.get(&slot)? else { return Ok(Ok(false)) };
        let id = SecretId::parse(std::str::from_utf8(&raw_id).unwrap_or(""))
            .map_err(|_| StoreError::Corrupt { tree: BYOK, detail: "bad secret id".into() })?;
        // A number moved off it still verifies with it until its grace ends.
        let users = self
            .phones_where(org, |p| {
                p.credential == id
                    || p.previous_credential
                        .as_ref()
                        .is_some_and(|c| c.secret_id == id && c.valid_until_ms > audit.at_ms)
            })?
            .len();
        if users > 0 {
            return Ok(Err(Conflict::InUse(users)));
        }
        let audit_key = scoped(org, uuid::Uuid::now_v7().as_bytes());
        (&self.secrets, &self.byok, &self.audit)
            .transaction(|(secrets, byok, audit_t)| {
                byok.remove(slot.as_slice())?;
                secrets.remove(id.as_str())?;
                audit_t.insert(audit_key.as_slice(), encode(audit))?;
                Ok(())
            })
            .map_err(tx_err)?;
        Ok(Ok(true))
    }

    fn byok_get(&self, org: &OrgId, provider: &str) -> Result<Option<SecretRecord>, StoreError> {
        match self.byok.get(scoped(org, provider.as_bytes()))? {
            Some(id) => Self::get(&self.secrets, SECRETS, &id),
            None => Ok(None),
        }
    }

    fn byok_list(&self, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.byok.scan_prefix(prefix(org)) {
            let (_, id) = item?;
            if let Some(rec) = Self::get(&self.secrets, SECRETS, &id)? {
                out.push(rec);
            }
        }
        Ok(out)
    }

    fn secret_get(&self, org: &OrgId, id: &SecretId) -> Result<Option<SecretRecord>, StoreError> {
        Ok(Self::get::<SecretRecord>(&self.secrets, SECRETS, id.as_ref())?.filter(|s| &s.org_id == org))
    }

    fn audit_list(
        &self,
        org: &OrgId,
        before: Option<&AuditId>,
        limit: usize,
    ) -> Result<Vec<(AuditId, AuditRecord)>, StoreError> {
        let entries = match before {
            Some(b) => self.audit.range(prefix(org)..scoped(org, b.uuid().as_bytes())),
            None => self.audit.scan_prefix(prefix(org)),
        };
        let mut out = Vec::new();
        for item in entries.rev().take(limit) {
            let (key, value) = item?;
            let uuid = key
                .len()
                .checked_sub(16)
                .and_then(|at| uuid::Uuid::from_slice(&key[at..]).ok())
                .ok_or_else(|| StoreError::Corrupt { tree: AUDIT, detail: "bad audit key".into() })?;
            out.push((AuditId::of(uuid), dec(AUDIT, &value)?));
        }
        out.reverse();
        Ok(out)
    }

    fn secrets_all(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.secrets.iter().map(|r| dec(SECRETS, &r?.1)).collect()
    }

    fn secrets_rewrite(&self, recs: &[SecretRecord]) -> Result<(), StoreError> {
        self.secrets
            .transaction(|secrets| {
                for r in recs {
                    secrets.insert(r.id.as_str(), encode(r))?;
                }
                Ok(())
            })
            .map_err(tx_err)?;
        self.flush()
    }

    fn phone_insert(
        &self,
        phone: &PhoneRecord,
        inline: Option<&SecretRecord>,
    ) -> Result<Result<(), Conflict>, StoreError> {
        let _writing = self.credential_writes();
        // A saved credential read before the carrier was asked may have been deleted or
        // replaced since.
        if inline.is_none() {
            let current = Self::get::<SecretRecord>(&self.secrets, SECRETS, phone.credential.as_ref())?;
            if !current.is_some_and(|s| s.org_id == phone.org_id && s.retired_until_ms.is_none()) {
                return Ok(Err(Conflict::CredentialChanged));
            }
        }
        self.phone_cache.around(|| {
            (&self.phones, &self.phone_numbers, &self.org_phones, &self.secrets)
                .transaction(|(phones, numbers, org_phones, secrets)| {
                    if numbers.get(phone.number.as_str())?.is_some() {
                        return Ok(Err(Conflict::NumberTaken));
                    }
                    if let Some(s) = inline {
                        secrets.insert(s.id.as_str(), encode(s))?;
                    }
                    phones.insert(phone.id.as_str(), encode(phone))?;
                    numbers.insert(phone.number.as_str(), phone.id.as_str())?;
                    org_phones.insert(scoped(&phone.org_id, phone.id.as_ref()), phone.id.as_str())?;
                    Ok(Ok(()))
                })
                .map_err(tx_err)
        })
    }

    fn phone_get(&self, org: &OrgId, id: &PhoneId) -> Result<Option<PhoneRecord>, StoreError> {
        Ok(self.phone_resolve(id)?.filter(|p| &p.org_id == org).map(Arc::unwrap_or_clone))
    }

    fn phone_resolve(&self, id: &PhoneId) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
        self.phone_cache.get_or_load(By::Id, id.as_str(), || Self::get(&self.phones, PHONES, id.as_ref()))
    }

    fn phone_by_number(&self, number: &E164) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
        self.phone_cache.get_or_load(By::Number, number.as_str(), || match self.phone_numbers.get(number.as_str())? {
            Some(id) => Self::get(&self.phones, PHONES, &id),
            None => Ok(None),
        })
    }

    fn phone_by_connection(
        &self,
        carrier: Carrier,
        connection_id: &str,
    ) -> Result<Option<Arc<PhoneRecord>>, StoreError> {
        let index = self.phone_cache.connections(|| {
            let mut index = crate::store::phone_cache::Connections::new();
            for item in self.phones.iter() {
                let p: PhoneRecord = dec(PHONES, &item?.1)?;
                if let Some(conn) = p.connection_id {
                    index.entry((p.provider, conn)).and_modify(|only| *only = None).or_insert(Some(p.id));
                }
            }
            Ok(index)
        })?;
        match index.get(&(carrier, connection_id.to_owned())) {
            Some(Some(id)) => self.phone_resolve(id),
            _ => Ok(None),
        }
    }

    fn phone_list(
        &self,
        org: &OrgId,
        provider: Option<Carrier>,
        after: Option<&PhoneId>,
        limit: usize,
    ) -> Result<Vec<PhoneRecord>, StoreError> {
        let start = match after {
            Some(a) => {
                let mut k = scoped(org, a.as_ref());
                k.push(0);
                k
            }
            None => prefix(org),
        };
        let end = {
            let mut k = org.as_str().as_bytes().to_vec();
            k.push(1);
            k
        };
        let mut out = Vec::new();
        for item in self.org_phones.range(start..end) {
            let (_, id) = item?;
            if let Some(p) = Self::get::<PhoneRecord>(&self.phones, PHONES, &id)? {
                if provider.is_none_or(|c| c == p.provider) {
                    out.push(p);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    fn phone_update(&self, phone: &PhoneRecord, inline: Option<&SecretRecord>) -> Result<bool, StoreError> {
        let writing = self.credential_writes();
        Ok(matches!(self.phone_write(phone, inline, &writing)?, Modified::Written(_)))
    }

    fn phone_modify(
        &self,
        org: &OrgId,
        id: &PhoneId,
        inline: Option<&SecretRecord>,
        change: &mut dyn FnMut(&mut PhoneRecord),
    ) -> Result<Modified, StoreError> {
        let writing = self.credential_writes();
        // From the tree, not the cache: what the last writer committed.
        let Some(mut phone) = Self::get::<PhoneRecord>(&self.phones, PHONES, id.as_ref())?.filter(|p| &p.org_id == org)
        else {
            return Ok(Modified::Gone);
        };
        change(&mut phone);
        self.phone_write(&phone, inline, &writing)
    }

    fn phone_delete(&self, org: &OrgId, id: &PhoneId) -> Result<bool, StoreError> {
        // Which credentials go with the number is decided from what it holds now: a PATCH
        // committed between that reading and this commit would leave its new credential
        // sealed with nothing naming it.
        let _writing = self.credential_writes();
        let Some(phone) = Self::get::<PhoneRecord>(&self.phones, PHONES, id.as_ref())?.filter(|p| &p.org_id == org)
        else {
            return Ok(false);
        };
        let drop_current = !self.named_elsewhere(org, &phone.credential, &phone.id)?;
        let drop_previous = match &phone.previous_credential {
            Some(p) => !self.named_elsewhere(org, &p.secret_id, &phone.id)?,
            None => false,
        };
        self.phone_cache.around(|| {
            (&self.phones, &self.phone_numbers, &self.org_phones, &self.secrets, &self.departed)
                .transaction(|(phones, numbers, org_phones, secrets, departed)| {
                    phones.remove(phone.id.as_str())?;
                    numbers.remove(phone.number.as_str())?;
                    org_phones.remove(scoped(org, phone.id.as_ref()))?;
                    if let Some(url) = &phone.config.upstream_url {
                        departed.insert(phone.id.as_str(), super::encode(url))?;
                    }
                    // An inline credential belongs to its number alone: it goes with it.
                    if drop_current {
                        secrets.remove(phone.credential.as_str())?;
                    }
                    if let (true, Some(p)) = (drop_previous, &phone.previous_credential) {
                        secrets.remove(p.secret_id.as_str())?;
                    }
                    Ok(true)
                })
                .map_err(tx_err)
        })
    }

    fn departed_upstream(&self, id: &PhoneId) -> Result<Option<String>, StoreError> {
        Self::get(&self.departed, DEPARTED, id.as_ref())
    }

    fn write_batch(
        &self,
        events: &[PreparedEvent],
        deliveries: &[DeliveryRecord],
        answers: &[(EventId, serde_json::Value)],
    ) -> Result<Vec<Recorded>, StoreError> {
        self.events.write(Batch { events, deliveries, answers })
    }

    fn event_get(&self, org: &OrgId, id: &EventId) -> Result<Option<EventRecord>, StoreError> {
        self.events.event_get(org, id)
    }

    fn event_list(&self, org: &OrgId, f: &EventFilter) -> Result<Vec<EventRecord>, StoreError> {
        self.events.event_list(org, f)
    }

    fn delivery_get(&self, org: &OrgId, id: &EventId) -> Result<Option<DeliveryRecord>, StoreError> {
        self.events.delivery_get(org, id)
    }

    fn is_call_head(&self, id: &EventId) -> bool {
        self.events.is_call_head(id)
    }

    fn deliveries_due(&self, now_ms: i64, limit: usize) -> Result<Vec<(EventRecord, DeliveryRecord)>, StoreError> {
        self.events.deliveries_due(now_ms, limit)
    }

    fn next_due_ms(&self) -> Option<i64> {
        self.events.next_due()
    }

    fn release(&self, phone: &PhoneId, limit: usize) -> usize {
        self.events.release(phone.as_str(), limit)
    }

    fn hold(&self, events: &[(EventId, PhoneId)]) -> usize {
        self.events.hold(events.iter().map(|(e, p)| (e, p.as_str())))
    }

    fn outbox(&self) -> OutboxDepth {
        let (queued, retrying, parked) = self.events.outbox();
        OutboxDepth { queued, retrying, parked }
    }

    fn damaged_events(&self) -> usize {
        self.events.damaged()
    }

    fn parked_phones(&self) -> Vec<(PhoneId, usize)> {
        // A key the index took from a record it accepted parses; one that somehow does not is
        // left parked rather than guessed at.
        self.events.parked_phones().into_iter().filter_map(|(p, n)| Some((PhoneId::parse(&p).ok()?, n))).collect()
    }

    fn close(&self) -> Result<(), StoreError> {
        // The snapshot only makes the next start fast (the journal holds every event): a disk
        // that refuses it (full, read-only) must not also cost the configuration its flush.
        if let Err(e) = self.events.save_snapshot() {
            tracing::warn!(error = %e, "could not save the event index; the next start reads the journal instead");
        }
        self.flush()
    }

    fn verify_integrity(&self) -> Result<Vec<String>, StoreError> {
        let mut problems = Vec::new();
        for item in self.api_keys.iter() {
            let k: ApiKeyRecord = dec(API_KEYS, &item?.1)?;
            if self.api_key_hashes.get(k.hash)?.as_deref() != Some(k.id.as_str().as_bytes()) {
                problems.push(format!("api key {} has no hash index", k.id));
            }
            if self.orgs.get(k.org_id.as_str())?.is_none() {
                problems.push(format!("api key {} belongs to a missing org", k.id));
            }
        }
        for item in self.byok.iter() {
            let (slot, id) = item?;
            if self.secrets.get(&id)?.is_none() {
                problems.push(format!(
                    "byok slot {} points to a missing secret",
                    String::from_utf8_lossy(&slot).replace('\0', "/")
                ));
            }
        }
        for item in self.phones.iter() {
            let p: PhoneRecord = dec(PHONES, &item?.1)?;
            if self.phone_numbers.get(p.number.as_str())?.as_deref() != Some(p.id.as_str().as_bytes()) {
                problems.push(format!("phone {} has no number index", p.id));
            }
            if self.org_phones.get(scoped(&p.org_id, p.id.as_ref()))?.is_none() {
                problems.push(format!("phone {} has no org index", p.id));
            }
            if self.secrets.get(p.credential.as_str())?.is_none() {
                problems.push(format!("phone {} verifies with a missing secret", p.id));
            }
        }
        for item in self.phone_numbers.iter() {
            let (number, id) = item?;
            if self.phones.get(&id)?.is_none() {
                problems.push(format!("number {} points to a missing phone", String::from_utf8_lossy(&number)));
            }
        }
        for item in self.departed.iter() {
            let (id, raw) = item?;
            if dec::<String>(DEPARTED, &raw).is_err() {
                problems.push(format!("deleted number {}'s upstream does not read back", String::from_utf8_lossy(&id)));
            }
        }
        problems.extend(self.events.verify()?);
        Ok(problems)
    }

    fn checkpoint(&self) -> Result<bool, StoreError> {
        self.events.snapshot_if_due()
    }

    fn sweep(&self, now_ms: i64) -> Result<usize, StoreError> {
        let mut n = self.events.sweep(now_ms);
        for item in self.secrets.iter() {
            let (k, v) = item?;
            let rec: SecretRecord = dec(SECRETS, &v)?;
            // Verification accepts a previous credential up to and including its deadline.
            if rec.retired_until_ms.is_some_and(|t| t < now_ms) {
                self.secrets.remove(&k)?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_removes_copies_whose_inspection_is_gone_and_keeps_those_in_use_or_being_made() {
        let tmp = tempfile::tempdir().unwrap();
        let copy = |name: &str, lock_file: bool| {
            let d = tmp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("db"), b"sled").unwrap();
            if lock_file {
                std::fs::write(d.join(COPY_LOCK), b"").unwrap();
            }
            d
        };
        let killed = copy("callgate-check-killed", true);
        let running = copy("callgate-check-running", true);
        let being_made = copy("callgate-check-new", false);
        let other = copy("someone-elses", true);
        let held = std::fs::File::open(running.join(COPY_LOCK)).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
        // Planted by someone else: a FIFO, whose open would block, and a link to a file elsewhere.
        let fifo = copy("callgate-check-fifo", false);
        rustix::fs::mknodat(rustix::fs::CWD, fifo.join(COPY_LOCK), rustix::fs::FileType::Fifo, 0o600.into(), 0)
            .unwrap();
        let linked = copy("callgate-check-link", false);
        std::fs::write(tmp.path().join("elsewhere"), b"").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), linked.join(COPY_LOCK)).unwrap();
        let dir_link = tmp.path().join("callgate-check-dirlink");
        std::os::unix::fs::symlink(&killed, &dir_link).unwrap();

        sweep_stale_copies(tmp.path());
        assert!(!killed.exists(), "its inspection's lock is gone with it");
        assert!(running.join("db").exists(), "its inspection holds the lock");
        assert!(being_made.exists(), "no lock file yet, and not an hour old");
        assert!(other.exists(), "not an inspection's copy");
        assert!(fifo.join("db").exists() && linked.join("db").exists(), "no plain lock file: left, being young");
        assert!(dir_link.symlink_metadata().is_ok(), "a link is not a copy");

        drop(held);
        sweep_stale_copies(tmp.path());
        assert!(!running.exists());
    }

    /// sled's flusher thread lets go of the file lock a moment after the last handle.
    fn reopen(dir: &Path) -> Result<SledStore, StoreError> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(dir, JournalOptions { preallocate_bytes: 0 }) {
                Err(StoreError::Locked) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// A data dir whose journal is gone whole (and its snapshot with it) is refused, not
    /// started on a new, empty one; one empty segment, made on purpose, starts it again.
    #[test]
    fn a_data_dir_whose_journal_is_gone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path()).unwrap();
        store.close().unwrap();
        drop(store);
        let events = dir.path().join("events");
        std::fs::remove_dir_all(&events).unwrap();
        let msg = reopen(dir.path()).err().expect("refused").to_string();
        assert!(msg.contains("the event journal") && msg.contains("is missing"), "{msg}");
        assert!(!events.exists(), "nothing was made");
        std::fs::create_dir(&events).unwrap();
        let msg = reopen(dir.path()).err().expect("refused").to_string();
        assert!(msg.contains("is missing"), "an empty directory is no journal: {msg}");
        std::fs::File::create(events.join("00000000.log")).unwrap();
        reopen(dir.path()).unwrap().close().unwrap();
    }

    #[test]
    fn closing_flushes_the_configuration_even_when_the_index_snapshot_cannot_be_saved() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), JournalOptions { preallocate_bytes: 0 }).unwrap();
        // Where the snapshot is renamed into place stands a directory, as a refused write would.
        let snapshot = dir.path().join("events").join("index.snapshot");
        let _ = std::fs::remove_file(&snapshot);
        std::fs::create_dir(&snapshot).unwrap();
        assert!(store.events.save_snapshot().is_err(), "the snapshot cannot be installed");
        store.orgs.insert(b"probe", b"kept").unwrap();
        store.close().unwrap();
        drop(store);
        // sled's flusher thread lets go of the file lock a moment after the last handle.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(dir.path()) {
                Ok(db) => break db,
                Err(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("the database stayed locked: {e}"),
            }
        };
        let again = db.open_tree(ORGS).unwrap().get(b"probe").unwrap();
        assert_eq!(again.as_deref(), Some(&b"kept"[..]));
    }
}
