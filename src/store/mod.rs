//! The only module that touches sled. Trees are named once below; every value carries a schema
//! version byte; a record and its indexes are written in one transaction; every accessor that
//! serves an organization takes its `OrgId`, so scoping cannot be forgotten.

mod column;
mod durable;
mod event_index;
mod event_log;
mod journal;
mod phone_cache;
pub mod salvage;
pub use journal::{JournalOptions, TornTail};
pub mod records;
mod sled_store;

pub use durable::{serve_replies_here, GroupCommit, WriterStats, WRITE_BUCKETS_US};
pub use records::*;
pub use sled_store::SledStore;

use std::sync::Arc;

use crate::domain::{ApiKeyId, AuditId, Carrier, EventId, OrgId, PhoneId, SecretId, E164};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not a `source`: the message already holds sled's, and a report of the error's chain
    /// would say it twice.
    #[error("storage error: {0}")]
    Sled(sled::Error),
    #[error("corrupt record in {tree}: {detail}")]
    Corrupt { tree: &'static str, detail: String },
    #[error("the database is in use by another callgate process (is the server running?)")]
    Locked,
    /// The disk refused a read or a write (full, read-only, out of file descriptors): what is
    /// stored is intact, and the same request may succeed later.
    #[error("storage i/o failed: {detail}")]
    Io { detail: String },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e)
    }
}

/// What [`Store::phone_modify`] did.
#[derive(Debug)]
pub enum Modified {
    /// The phone as written.
    Written(Box<PhoneRecord>),
    /// The phone is gone; nothing was written.
    Gone,
    /// The change moved the phone onto a credential that is gone (a saved one replaced or
    /// deleted meanwhile); nothing was written.
    CredentialGone,
}

/// Why a write that must be unique did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflict {
    NumberTaken,
    InUse(usize),
    /// The saved credential a write relied on was deleted or replaced meanwhile.
    CredentialChanged,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded under this id, given out by the store; `parked`: its delivery waits off the
    /// queue (its number has no upstream, or events parked ahead of it), so the outbox has
    /// nothing new to do.
    New { id: EventId, parked: bool },
    /// Seen before: the event the first delivery of it became.
    Duplicate(Option<EventId>),
    /// Not recorded: larger than a record holds (an event over 8 MiB encoded, or a replay key
    /// over 65,535 bytes). Only a body far past a webhook's size can make one.
    TooLarge,
}

/// What waits to be delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboxDepth {
    /// On the queue, due or not.
    pub queued: usize,
    /// Of those, how many wait for a retry after a failed attempt.
    pub retrying: usize,
    /// Off the queue, with their number (an upstream that is missing or held).
    pub parked: usize,
}

/// A new event, encoded once on the request's thread so the single writer only has to put
/// bytes in place. The event's id is given out by the writer (ids ascend in recording order);
/// whatever id the record holds here is replaced. Its delivery starts as
/// [`DeliveryRecord::first`], which is made from the event when read rather than stored.
pub struct PreparedEvent {
    pub(crate) org_id: OrgId,
    pub(crate) phone_id: PhoneId,
    pub(crate) call_key: String,
    pub(crate) received_at_ms: i64,
    /// When its delivery is first due: on arrival, unless it waits for its answer.
    pub(crate) due_ms: i64,
    pub(crate) parked: bool,
    pub(crate) event: Vec<u8>,
    pub(crate) replay: Option<(Vec<u8>, i64)>,
}

impl PreparedEvent {
    pub fn new(ev: &EventRecord, replay_key: Option<(&[u8], i64)>) -> Self {
        PreparedEvent {
            org_id: ev.org_id.clone(),
            phone_id: ev.phone_id.clone(),
            call_key: DeliveryRecord::call_key_of(ev),
            received_at_ms: ev.received_at_ms,
            due_ms: ev.received_at_ms,
            parked: false,
            event: encode_event(ev),
            replay: replay_key.map(|(k, exp)| (k.to_vec(), exp)),
        }
    }

    /// No upstream can take the event yet: it waits off the outbox queue until one is set
    /// (for its number, or for the gateway at the next start).
    pub fn parked(mut self, parked: bool) -> Self {
        self.parked = parked;
        self
    }

    /// An incoming call whose answer is still being decided is not delivered before it is
    /// noted on the event, which makes it due at once; `at_ms` is when it goes if that never
    /// happens. Delivered earlier, the event went without its answer, and a retry under the
    /// same `webhook-id` carried a different body.
    pub fn due_at(mut self, at_ms: i64) -> Self {
        self.due_ms = at_ms;
        self
    }
}

/// Every stored value: a schema version byte, then JSON.
pub(crate) const SCHEMA: u8 = 1;

pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    encode_sized(v, 0)
}

/// An event whose fields are kept as received: the event's JSON, a NUL byte, then the form text.
/// JSON text never holds a raw NUL, so the first one ends it, and the form is copied as it is
/// rather than escaped into a JSON string byte by byte.
pub(crate) const SCHEMA_WITH_FORM: u8 = 2;

/// An event, into a buffer with room for the carrier's fields it embeds: growing to fit them
/// would copy the buffer twice.
pub(crate) fn encode_event(ev: &EventRecord) -> Vec<u8> {
    let Some(form) = &ev.form else { return encode_sized(ev, ev.params.get().len()) };
    let mut out = encode_sized(ev, ev.params.get().len() + 1 + form.len());
    out[0] = SCHEMA_WITH_FORM;
    out.push(0);
    out.extend_from_slice(form.as_bytes());
    out
}

/// The event [`encode_event`] wrote.
pub(crate) fn decode_event(bytes: &[u8]) -> Result<EventRecord, String> {
    let (json, form) = match bytes.split_first() {
        Some((&SCHEMA, json)) => (json, None),
        Some((&SCHEMA_WITH_FORM, rest)) => {
            let nul = memchr::memchr(0, rest).ok_or("an event's form has no separator")?;
            (&rest[..nul], Some(&rest[nul + 1..]))
        }
        _ => return Err("unknown schema version".into()),
    };
    let mut ev: EventRecord = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if let Some(form) = form {
        ev.form = Some(String::from_utf8(form.to_vec()).map_err(|_| "an event's form is not UTF-8")?);
    }
    Ok(ev)
}

/// [`encode`] into a buffer with room for `extra` bytes beyond a record's usual size.
fn encode_sized<T: serde::Serialize>(v: &T, extra: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + extra);
    out.push(SCHEMA);
    serde_json::to_writer(&mut out, v).expect("records always serialize");
    out
}

#[derive(Debug, Default, Clone)]
pub struct EventFilter {
    pub phone_id: Option<PhoneId>,
    pub kind: Option<String>,
    pub after: Option<EventId>,
    pub delivery: Option<DeliveryState>,
    pub limit: usize,
}

/// Kept as a trait so a shared backend (PostgreSQL, for several gateway nodes) can be added
/// without touching the handlers.
pub trait Store: Send + Sync + 'static {
    fn health(&self) -> Result<(), StoreError>;
    /// Blocking: call through `GroupCommit`, never from an async worker directly.
    fn flush(&self) -> Result<(), StoreError>;

    fn org_create(&self, org: &OrgRecord, key: &ApiKeyRecord) -> Result<(), StoreError>;
    fn org_get(&self, id: &OrgId) -> Result<Option<OrgRecord>, StoreError>;
    fn org_list(&self) -> Result<Vec<OrgRecord>, StoreError>;
    /// False when the organization does not exist.
    fn api_key_add(&self, key: &ApiKeyRecord) -> Result<bool, StoreError>;
    fn api_key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<ApiKeyRecord>, StoreError>;
    fn api_key_revoke(&self, id: &ApiKeyId) -> Result<bool, StoreError>;

    /// Sets the organization's credential for `provider`. The replaced secret is deleted, or, if
    /// phone numbers verify with it, kept until `grace_until_ms` as their previous credential.
    /// `checked` are the numbers the caller made sure the new credential serves: if the
    /// replaced one has another user (imported meanwhile), nothing is written
    /// (`Conflict::CredentialChanged`).
    fn byok_put(
        &self,
        rec: &SecretRecord,
        audit: &AuditRecord,
        grace_until_ms: i64,
        checked: &[PhoneId],
    ) -> Result<Result<Option<SecretId>, Conflict>, StoreError>;
    /// The organization's numbers that verify their webhooks with `secret`.
    fn phones_using(&self, org: &OrgId, secret: &SecretId) -> Result<Vec<PhoneRecord>, StoreError>;
    fn byok_delete(
        &self,
        org: &OrgId,
        provider: &str,
        audit: &AuditRecord,
    ) -> Result<Result<bool, Conflict>, StoreError>;
    fn byok_get(&self, org: &OrgId, provider: &str) -> Result<Option<SecretRecord>, StoreError>;
    fn byok_list(&self, org: &OrgId) -> Result<Vec<SecretRecord>, StoreError>;
    fn secret_get(&self, org: &OrgId, id: &SecretId) -> Result<Option<SecretRecord>, StoreError>;
    /// The organization's newest `limit` audit entries (before `before`, when given), oldest
    /// first.
    fn audit_list(
        &self,
        org: &OrgId,
        before: Option<&AuditId>,
        limit: usize,
    ) -> Result<Vec<(AuditId, AuditRecord)>, StoreError>;
    fn secrets_all(&self) -> Result<Vec<SecretRecord>, StoreError>;
    /// Replaces every given record at once (master key rotation).
    fn secrets_rewrite(&self, recs: &[SecretRecord]) -> Result<(), StoreError>;

    fn phone_insert(
        &self,
        phone: &PhoneRecord,
        inline: Option<&SecretRecord>,
    ) -> Result<Result<(), Conflict>, StoreError>;
    fn phone_get(&self, org: &OrgId, id: &PhoneId) -> Result<Option<PhoneRecord>, StoreError>;
    /// Unscoped on purpose: a carrier's webhook names the phone, and the phone names its org.
    fn phone_resolve(&self, id: &PhoneId) -> Result<Option<Arc<PhoneRecord>>, StoreError>;
    fn phone_by_number(&self, number: &E164) -> Result<Option<Arc<PhoneRecord>>, StoreError>;
    /// The one number of `carrier` attached to the carrier-side application `connection_id`;
    /// none when several share it, since guessing would verify with the wrong key.
    fn phone_by_connection(
        &self,
        carrier: Carrier,
        connection_id: &str,
    ) -> Result<Option<Arc<PhoneRecord>>, StoreError>;
    fn phone_list(
        &self,
        org: &OrgId,
        provider: Option<Carrier>,
        after: Option<&PhoneId>,
        limit: usize,
    ) -> Result<Vec<PhoneRecord>, StoreError>;
    /// Rewrites a phone as given (and seals its new inline secret, if any); false if it is gone.
    fn phone_update(&self, phone: &PhoneRecord, inline: Option<&SecretRecord>) -> Result<bool, StoreError>;
    /// Reads the phone, lets `change` edit it and writes it back (with its new inline secret,
    /// if any), with no other operator write in between: a change another request made after
    /// the caller first read the number is kept, not overwritten with the caller's old copy.
    fn phone_modify(
        &self,
        org: &OrgId,
        id: &PhoneId,
        inline: Option<&SecretRecord>,
        change: &mut dyn FnMut(&mut PhoneRecord),
    ) -> Result<Modified, StoreError>;
    /// Deletes the number. Its events stay, and so does the upstream of its own it had, if any,
    /// for the events of it still to be delivered (or delivered again).
    fn phone_delete(&self, org: &OrgId, id: &PhoneId) -> Result<bool, StoreError>;
    /// The upstream of its own a deleted number had when it was deleted.
    fn departed_upstream(&self, id: &PhoneId) -> Result<Option<String>, StoreError>;

    /// The durable writer's whole batch in one durable write: new events (event, delivery
    /// record and replay marker in one record: no event without its delivery, no second event
    /// for the same replay key, a key repeated inside the batch counting as seen), new
    /// delivery states, and answers noted on events. Only `GroupCommit` calls this.
    fn write_batch(
        &self,
        events: &[PreparedEvent],
        deliveries: &[DeliveryRecord],
        answers: &[(EventId, serde_json::Value)],
    ) -> Result<Vec<Recorded>, StoreError>;
    fn event_get(&self, org: &OrgId, id: &EventId) -> Result<Option<EventRecord>, StoreError>;
    fn event_list(&self, org: &OrgId, filter: &EventFilter) -> Result<Vec<EventRecord>, StoreError>;
    fn delivery_get(&self, org: &OrgId, id: &EventId) -> Result<Option<DeliveryRecord>, StoreError>;
    /// Whether the event is the oldest undelivered one of its call: only it may be delivered
    /// next.
    fn is_call_head(&self, id: &EventId) -> bool;
    /// Deliveries due at or before `now_ms`, oldest first, each with its event.
    fn deliveries_due(&self, now_ms: i64, limit: usize) -> Result<Vec<(EventRecord, DeliveryRecord)>, StoreError>;
    /// When the earliest queued delivery is due (from memory: cheap enough for every pass).
    fn next_due_ms(&self) -> Option<i64>;
    /// Queues up to `limit` of a number's parked deliveries, oldest first (its upstream can
    /// take them). Returns how many.
    fn release(&self, phone: &PhoneId, limit: usize) -> usize;
    /// Takes queued deliveries off the queue and parks them with their number (their upstream
    /// is held). Returns how many were queued.
    fn hold(&self, events: &[(EventId, PhoneId)]) -> usize;
    /// How many deliveries are queued and parked.
    fn outbox(&self) -> OutboxDepth;
    /// How many event records were found unreadable since start, and passed over.
    fn damaged_events(&self) -> usize;
    /// The numbers with deliveries parked, each with how many of its queued deliveries wait
    /// for a retry.
    fn parked_phones(&self) -> Vec<(PhoneId, usize)>;
    /// Saves what makes the next start fast; called once the writer has stopped.
    fn close(&self) -> Result<(), StoreError>;
    /// Saves the event index if much has been written since it was last saved, which bounds
    /// how much of the journal a start after a crash must read. True if it saved.
    fn checkpoint(&self) -> Result<bool, StoreError>;

    /// Every record has its indexes and every index its record; each problem found, described.
    fn verify_integrity(&self) -> Result<Vec<String>, StoreError>;

    /// Drops replay markers and retired secrets whose time is up.
    fn sweep(&self, now_ms: i64) -> Result<usize, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storage_error_is_said_once_in_a_report_of_its_chain() {
        let io = std::io::Error::other("Read-only file system (os error 30)");
        let report = format!("{:#}", anyhow::Error::from(StoreError::from(sled::Error::Io(io))));
        assert_eq!(report, "storage error: IO error: Read-only file system (os error 30)");
    }

    fn event(form: Option<&str>) -> EventRecord {
        EventRecord {
            id: EventId::from_value(7),
            org_id: OrgId::generate(),
            phone_id: PhoneId::generate(),
            provider: Carrier::Plivo,
            kind: "call.status".into(),
            call_id: Some("c1".into()),
            from: None,
            to: None,
            direction: None,
            status: Some("completed".into()),
            received_at: "2024-05-01T10:00:00.000Z".into(),
            received_at_ms: 1_714_557_600_000,
            verified_by: VerifiedBy { scheme: "plivo-v3".into(), credential: "current".into(), secret_id: None },
            params: if form.is_some() {
                serde_json::value::RawValue::NULL.to_owned()
            } else {
                serde_json::value::to_raw_value(&serde_json::json!({"CallUUID": "c1"})).unwrap()
            },
            form: form.map(str::to_owned),
            answer: Some(serde_json::json!({"source": "static"})),
        }
    }

    #[test]
    fn an_event_reads_back_as_written_with_its_form_copied_not_escaped() {
        // Quotes, backslashes and NULs: what JSON would have to escape, and the separator itself.
        let form = "a=\"1\"&b=\\&c=\0x\0&d=%00";
        let ev = event(Some(form));
        let bytes = encode_event(&ev);
        assert_eq!(bytes[0], SCHEMA_WITH_FORM);
        assert!(bytes.ends_with(form.as_bytes()));
        let back = decode_event(&bytes).unwrap();
        assert_eq!((back.form.as_deref(), back.params.get()), (Some(form), "null"));
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&ev).unwrap());

        let bytes = encode_event(&event(None));
        assert_eq!(bytes[0], SCHEMA);
        let back = decode_event(&bytes).unwrap();
        assert_eq!((back.form, back.params.get()), (None, r#"{"CallUUID":"c1"}"#));
    }

    #[test]
    fn a_damaged_event_is_an_error_not_a_panic() {
        let good = encode_event(&event(Some("a=1")));
        let nul = good.iter().position(|&b| b == 0).unwrap();
        let mut no_separator = good[..nul].to_vec();
        no_separator.extend_from_slice(b"a=1");
        let mut not_utf8 = good.clone();
        not_utf8.push(0xff);
        let mut cut = good[..nul / 2].to_vec();
        cut.push(0);
        for bad in [&no_separator[..], &not_utf8, &cut, &[], &[9, b'{', b'}']] {
            assert!(decode_event(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
